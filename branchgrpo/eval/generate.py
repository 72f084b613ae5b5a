"""Generate and score media for a prompt file with fixed seeds: the measurement behind the reward columns of the
paper's Table 1 (HPS-v2.1, PickScore, ImageReward, CLIP score before and after training).

Sampling is the training code's own rollout (`run_rollout` on `builders.group_plan(T, 1, sde_steps=[])`: one
deterministic ODE chain per sample, or the SDE kernel with `sampler="sde"`), with noise keyed by (seed, sample id),
sample id = prompt index * samples_per_prompt + seed index - the keys the trainer's held-out evaluation uses. So the
base model and a checkpoint see identical noise, the result does not depend on how samples are chunked into
batches, and with the trainer's eval prompts, seed and steps the numbers reproduce its `eval_reward_*`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from branchgrpo import builders, sde
from branchgrpo.models.base import gather_cond
from branchgrpo.rewards.base import RewardModel, build_reward, parse_reward_spec
from branchgrpo.rollout import NoiseKeys, run_rollout

log = logging.getLogger(__name__)

# What `--rewards default` and `--rewards all` mean per backbone. The toy's rewards parse the toy prompt grammar, so
# they are never applied to FLUX prompts; the CLIP-family rewards are meaningless on 8x8 digits.
DEFAULT_REWARDS = {"toy": ("toy", "toy_digit", "toy_style"), "flux": ("hps", "pickscore", "clip", "imagereward")}
ALL_REWARDS = DEFAULT_REWARDS


@dataclass
class SampleSettings:
    steps: int = 20
    shift: float = 3.0
    mu: float | None = None  # FLUX's dynamic shift (None: the static --shift)
    sampler: str = "ode"  # ode | sde
    kernel: sde.Kernel = field(default_factory=lambda: sde.Kernel("dance", 0.3))
    seed: int = 1234
    samples_per_prompt: int = 4
    batch_size: int = 16  # latents per velocity call
    chunk_prompts: int = 8  # prompts sampled, decoded and scored together (bounds memory)
    reward_batch_size: int = 16


def resolve_reward_names(spec: str, model: str) -> list[str]:
    """'default' / 'all' / 'hps,pickscore,...' (weights, if given, are ignored: every reward is reported alone)."""
    if spec.strip() in ("default", "all"):
        return list((DEFAULT_REWARDS if spec.strip() == "default" else ALL_REWARDS)[model])
    return list(parse_reward_spec(spec))


def build_rewards(names: list[str], device, model_dir: str, options: dict) -> tuple[dict[str, RewardModel], dict]:
    """Every reward whose checkpoint is available; the others are skipped with a one-line reason each.

    Only a missing file skips a reward: a checkpoint that exists but cannot be read is an error, not a silently
    shorter table."""
    from branchgrpo.trainer import _reward_options  # the trainer's default checkpoint locations under model_dir

    models, skipped = {}, {}
    for name in names:
        opts = _reward_options(name, options, model_dir)[name]
        try:
            models[name] = build_reward(name, device=device, **opts)
        except FileNotFoundError as err:
            reason = str(err).splitlines()[0]
            skipped[name] = reason
            print(f"skipping reward '{name}': checkpoint not available ({reason})", flush=True)
    return models, skipped


def encode_prompts(model: str, pretrained: str | None, texts: list[str], device, max_sequence_length: int = 512,
                   encoder_dtype: str = "auto", batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Prompt embeddings from the backbone's own text encoders (the preprocessing step's encoder), [P, ...]."""
    from types import SimpleNamespace

    if model == "toy":
        from branchgrpo.models.toy import build_prompt_encoder
    else:
        from branchgrpo.models.flux import build_prompt_encoder
    encode = build_prompt_encoder(pretrained, device,
                                  SimpleNamespace(max_sequence_length=max_sequence_length, dtype=encoder_dtype))
    parts = [encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


@dataclass
class Generated:
    scores: dict[str, torch.Tensor]  # reward -> [N] float64, sample order (prompt-major)
    prompt_index: torch.Tensor  # [N] long
    seed_index: torch.Tensor  # [N] long
    grid_media: torch.Tensor  # decoded samples of the first `grid_prompts` prompts, [G, C, H, W]
    image_files: list[str]
    num_forward_passes: int


@torch.no_grad()
def generate_and_score(adapter, embeddings: dict[str, torch.Tensor], texts: list[str],
                       rewards: dict[str, RewardModel], settings: SampleSettings, device: torch.device,
                       autocast: Callable = None, save_images: str | Path | None = None,
                       grid_prompts: int = 8, progress: Callable[[int, int], None] | None = None) -> Generated:
    """Sample `samples_per_prompt` seeds of every prompt, decode, score with every reward, optionally write PNGs."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    S, P = settings.samples_per_prompt, len(texts)
    sigmas = sde.make_sigmas(settings.steps, settings.shift, settings.mu)
    plan = builders.group_plan(settings.steps, 1, sde_steps=None if settings.sampler == "sde" else [])
    scores = {name: [] for name in rewards}
    grid, files, forwards = [], [], 0
    cond = {k: v.to(device) for k, v in embeddings.items()}
    for first in range(0, P, settings.chunk_prompts):
        prompts = range(first, min(P, first + settings.chunk_prompts))
        sample_prompt = torch.tensor([p for p in prompts for _ in range(S)])
        sample_ids = tuple(int(p) * S + s for p in prompts for s in range(S))

        def velocity(x, sigma, rows, _prompt=sample_prompt.to(device)):
            with autocast():
                return adapter.velocity(x, sigma, gather_cond(cond, _prompt[rows])).float()

        graph = run_rollout(plan, velocity, sigmas, settings.kernel, NoiseKeys(settings.seed, 0, sample_ids),
                            adapter.latent_shape, device, batch_size=settings.batch_size)
        forwards += graph.num_forward_passes
        latents = graph.node_latents(graph.leaves)
        sample_texts = [texts[int(p)] for p in sample_prompt]
        for start in range(0, latents.shape[0], settings.reward_batch_size):
            media = adapter.decode(latents[start : start + settings.reward_batch_size]).float().cpu()
            part_texts = sample_texts[start : start + settings.reward_batch_size]
            for name, model in rewards.items():
                values = torch.as_tensor(model(media, part_texts), dtype=torch.float64).reshape(-1)
                if values.numel() != media.shape[0]:
                    raise RuntimeError(f"reward '{name}' returned {values.numel()} scores for {media.shape[0]} images")
                scores[name].append(values)
            if media.dim() == 5:  # video: the middle frame stands for the clip in grids and PNGs
                media = media[:, :, media.shape[2] // 2]
            ids = sample_ids[start : start + media.shape[0]]
            if save_images is not None:
                files += _save_pngs(media, ids, S, Path(save_images))
            grid += [m for m, i in zip(media, ids) if i // S < grid_prompts]
        if progress is not None:
            progress(prompts.stop, P)
    prompt_index = torch.arange(P).repeat_interleave(S)
    seed_index = torch.arange(S).repeat(P)
    return Generated({n: torch.cat(v) for n, v in scores.items()}, prompt_index, seed_index,
                     torch.stack(grid) if grid else torch.zeros(0), files, forwards)


def _save_pngs(media: torch.Tensor, sample_ids, samples_per_prompt: int, folder: Path) -> list[str]:
    """One PNG per sample, named so that sorted order is sample order (what diversity_cli reads)."""
    from PIL import Image

    from branchgrpo.outputs import to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for array, sample in zip(to_uint8(media), sample_ids):
        p, s = divmod(int(sample), samples_per_prompt)
        name = f"p{p:05d}_s{s:03d}.png"
        Image.fromarray(array).save(folder / name)
        names.append(str(folder / name))
    return names
