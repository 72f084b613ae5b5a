"""Generate and score media for a prompt file with fixed seeds: the measurement behind the reward columns of the
paper's Table 1 (HPS-v2.1, PickScore, ImageReward, CLIP score before and after training) and its video analogues.

Sampling is the training code's own rollout (`run_rollout` on `plans.group_plan(T, 1, sde_steps=[])`: one
deterministic ODE chain per sample, or the SDE kernel with `sampler="sde"`) through the trainer's velocity closure
(`velocity_fn`), with noise keyed by (seed, sample id), sample id = prompt index * samples_per_prompt + seed index -
the keys the trainer's held-out evaluation uses. Decoding and scoring go through `decode_and_score`, as in training.
So the base model and a checkpoint see identical noise, the result does not depend on how samples are chunked into
batches, and with the trainer's eval prompts, seed and steps the numbers reproduce its `eval_reward_*`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from branchgrpo.core import plans, sde
from branchgrpo.data.embeddings import with_extras
from branchgrpo.models.base import decode_media, velocity_fn
from branchgrpo.rewards._image import as_unit_images, resized_to
from branchgrpo.rewards.base import RewardSet, decode_and_score, parse_reward_spec
from branchgrpo.core.rollout import NoiseKeys, run_rollout
from branchgrpo.runtime.outputs import still_frames


@dataclass
class SampleSettings:
    steps: int = 20
    shift: float = 3.0
    mu: float | None = None  # the dynamic shift (None: the static --shift)
    shift_terminal: float | None = None  # the dynamic schedule's last nonzero sigma (None: not stretched)
    sampler: str = "ode"  # ode | sde
    kernel: sde.Kernel = field(default_factory=lambda: sde.Kernel("dance", 0.3))
    seed: int = 1234
    samples_per_prompt: int = 4
    batch_size: int = 16  # latents per velocity call
    chunk_prompts: int = 8  # prompts sampled, decoded and scored together (bounds memory)
    reward_batch_size: int = 16


def resolve_reward_names(text: str, spec) -> list[str]:
    """'default' / 'all' (the backbone's `eval_rewards`) or 'hps,pickscore,...' (weights, if given, are ignored:
    every reward is reported alone)."""
    if text.strip() in ("default", "all"):
        return list(spec.eval_rewards)
    return list(parse_reward_spec(text, "--rewards"))


def encode_prompts(spec, source, items: list, device, settings, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Prompt embeddings [P, ...] on `device` from the backbone's own encoders (the preprocessing step's encoder,
    `spec.prompt_encoder`; `items` as its prompt format reads them: texts, or records with a conditioning image),
    with its dataset-wide extras (Wan's negative prompt) expanded per prompt."""
    encode = spec.prompt_encoder(source, device, settings)
    parts = [encode(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    per_prompt = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    extras = encode.extras() if hasattr(encode, "extras") else {}
    return with_extras(per_prompt, extras, device)


@dataclass
class Generated:
    scores: dict[str, torch.Tensor]  # reward (then media metric) -> [N] float32, sample order (prompt-major)
    prompt_index: torch.Tensor  # [N] long
    seed_index: torch.Tensor  # [N] long
    grid_media: torch.Tensor  # the grid's tiles: one per sample of the `grid_prompts` prompts (images), or
    # three (first, middle, last frame) per sample (videos); [G, C, H, W]
    image_files: list[str]
    video_files: list[str]
    num_forward_passes: int


@torch.no_grad()
def generate_and_score(adapter, media_kind: str, embeddings: dict[str, torch.Tensor], texts: list[str],
                       rewards: RewardSet, settings: SampleSettings, device: torch.device,
                       autocast: Callable | None = None,
                       save_images: str | Path | None = None, grid_prompts: Sequence[int] = range(8),
                       progress: Callable[[int, int], None] | None = None,
                       media_metrics: Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]] | None = None
                       ) -> Generated:
    """Sample `samples_per_prompt` seeds of every prompt, decode, score with every reward; optionally write one PNG
    per sample (videos: its middle frame) and, for videos (`media_kind`: the backbone spec's `media`), one MP4 per
    sample. `media_metrics` (e.g. the video
    metrics of branchgrpo.eval.video_metrics) maps each decoded chunk to more per-sample columns beside the rewards."""
    S, P = settings.samples_per_prompt, len(texts)
    grid_prompts = set(grid_prompts)
    sigmas = sde.make_sigmas(settings.steps, settings.shift, settings.mu, settings.shift_terminal)
    plan = plans.group_plan(settings.steps, 1, sde_steps=None if settings.sampler == "sde" else [])
    scores = {name: [] for name in rewards.models}
    grid, images, videos, forwards = [], [], [], 0
    embeddings = {key: value.to(device) for key, value in embeddings.items()}
    for first in range(0, P, settings.chunk_prompts):
        prompts = range(first, min(P, first + settings.chunk_prompts))
        sample_prompt = torch.tensor([p for p in prompts for _ in range(S)])
        sample_ids = tuple(int(p) * S + s for p in prompts for s in range(S))
        velocity = velocity_fn(adapter, embeddings, autocast or contextlib.nullcontext, sample_prompt.to(device))
        graph = run_rollout(plan, velocity, sigmas, settings.kernel, NoiseKeys(settings.seed, 0, sample_ids),
                            adapter.latent_shape, device, batch_size=settings.batch_size)
        forwards += graph.num_forward_passes
        # media to the CPU chunk by chunk: a chunk of decoded videos can outgrow the GPU
        chunk_texts = [texts[int(p)] for p in sample_prompt]
        chunk_scores, media = decode_and_score(lambda z, rows: decode_media(adapter, z, rows).cpu(),
                                               graph.node_latents(graph.leaves), chunk_texts, rewards,
                                               settings.reward_batch_size,
                                               rewards.conditions(embeddings, sample_prompt, also=adapter.decode_keys))
        if media_metrics is not None:
            chunk_scores.update(media_metrics(media, chunk_texts))
        for name, values in chunk_scores.items():
            scores.setdefault(name, []).append(values)
        shown = [i for i, sample in enumerate(sample_ids) if sample // S in grid_prompts]
        grid += grid_tiles(media[shown], media_kind)
        if save_images is not None:
            images += save_pngs(still_frames(media, media_kind), sample_ids, S, Path(save_images))
            if media_kind == "video":
                videos += save_mp4s(media, sample_ids, S, Path(save_images), adapter.video_fps)
        if progress is not None:
            progress(prompts.stop, P)
    prompt_index = torch.arange(P).repeat_interleave(S)
    seed_index = torch.arange(S).repeat(P)
    return Generated({n: torch.cat(v) for n, v in scores.items()}, prompt_index, seed_index,
                     torch.stack(grid) if grid else torch.zeros(0), images, videos, forwards)


def grid_tiles(media: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """One tile per image, or the first, middle and last frame of each video, in sample order."""
    if kind != "video":
        return list(media)
    frames = media.shape[2]
    return [video[:, f] for video in media for f in (0, frames // 2, frames - 1)]


def with_condition_tiles(tiles: torch.Tensor, conditions: torch.Tensor, per_prompt: int) -> torch.Tensor:
    """The grid's tiles [P * per_prompt, C, H, W] with each prompt's conditioning image (uint8 [P, 3, h, w], e.g. an
    edit's source, resized to the tiles' size) before its own: a row of the grid reads source | results."""
    images = resized_to(as_unit_images(conditions.cpu()), *tiles.shape[-2:]).to(tiles.dtype)
    rows = [torch.cat([images[p : p + 1], tiles[p * per_prompt : (p + 1) * per_prompt]]) for p in range(len(images))]
    return torch.cat(rows)


def _sample_name(sample: int, samples_per_prompt: int) -> str:
    """`p<prompt>_s<seed>`: sorted names are sample order."""
    p, s = divmod(int(sample), samples_per_prompt)
    return f"p{p:05d}_s{s:03d}"


def save_pngs(images: torch.Tensor, sample_ids, samples_per_prompt: int, folder: Path) -> list[str]:
    """One PNG per sample (what the diversity CLI reads)."""
    from PIL import Image

    from branchgrpo.runtime.outputs import to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for array, sample in zip(to_uint8(images), sample_ids):
        path = folder / f"{_sample_name(sample, samples_per_prompt)}.png"
        Image.fromarray(array).save(path)
        names.append(str(path))
    return names


def save_mp4s(videos: torch.Tensor, sample_ids, samples_per_prompt: int, folder: Path, fps: int) -> list[str]:
    """One MP4 per sample (GIF where no ffmpeg is available), named like its PNG."""
    from branchgrpo.runtime.outputs import save_videos

    names = []
    for video, sample in zip(videos, sample_ids):
        stem = _sample_name(sample, samples_per_prompt)
        (written,) = save_videos(video[None], folder, stem, fps=fps)  # writes <stem>_00.<ext>
        names.append(str(written.replace(folder / f"{stem}{written.suffix}")))
    return names
