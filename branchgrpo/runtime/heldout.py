"""Held-out evaluation during training: fixed prompts, fixed seeds, the same sampler every time.

Each evaluation sample is a one-chain rollout (ODE by default, or the training SDE kernel) from noise keyed by
(--eval_seed, sample id), so the samples before and after training differ only by the weights. Means are over the
samples with a finite reward; how many were not is reported beside them (a mean over none is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from branchgrpo.core import distributed, sde
from branchgrpo.data.embeddings import EmbeddingStore, with_extras
from branchgrpo.data.prompts import eval_prompts
from branchgrpo.core.plans import group_plan
from branchgrpo.models.base import decode_media
from branchgrpo.rewards.base import RewardSet, decode_and_score
from branchgrpo.core.rollout import NoiseKeys, run_rollout


@dataclass
class EvalResult:
    reward: float | None  # weighted sum of the reward models, mean over the samples where it is finite
    per_reward: dict[str, float | None]  # each reward's mean over the samples where it is finite
    num_samples: int
    num_nonfinite: int  # samples whose weighted sum is not finite (left out of `reward`)
    media: torch.Tensor  # this rank's decoded samples (rank 0: the first prompts), for grids
    labels: list[str]


class Evaluator:
    def __init__(self, store: EmbeddingStore, eval_cfg, num_steps: int, rollout_batch_size: int,
                 reward_batch_size: int, rank: int, world_size: int):
        self.store, self.cfg, self.num_steps = store, eval_cfg, num_steps
        self.rollout_batch_size, self.reward_batch_size = rollout_batch_size, reward_batch_size
        self.rows, self.sample_ids, self.is_pad = eval_prompts(store, eval_cfg.num_eval_prompts,
                                                               eval_cfg.eval_samples_per_prompt, rank, world_size)
        self.texts = [store.text(i) for i in self.rows]

    @property
    def num_samples(self) -> int:
        return min(self.cfg.num_eval_prompts, len(self.store)) * self.cfg.eval_samples_per_prompt

    @torch.no_grad()
    def run(self, velocity_for, adapter, rewards: RewardSet, sigmas: torch.Tensor, kernel: sde.Kernel,
            device: torch.device, extras: dict) -> EvalResult:
        plan = group_plan(self.num_steps, 1, sde_steps=None if self.cfg.eval_sampler == "sde" else [])
        per_prompt = self.store.batch(self.rows)  # one row per sample
        embeddings = with_extras(per_prompt, extras, device)
        graph = run_rollout(plan, velocity_for(embeddings), sigmas, kernel,
                            NoiseKeys(self.cfg.eval_seed, 0, tuple(self.sample_ids)), adapter.latent_shape, device,
                            batch_size=self.rollout_batch_size)
        scores, media = decode_and_score(partial(decode_media, adapter), graph.node_latents(graph.leaves), self.texts,
                                         rewards, self.reward_batch_size,
                                         rewards.conditions(per_prompt, also=adapter.decode_keys))
        keep = ~torch.tensor(self.is_pad)
        per_reward = {}
        total = torch.zeros(keep.numel(), dtype=torch.float64)
        for name, values in scores.items():
            values = values.double()
            total += rewards.weights[name] * values
            per_reward[name], _ = _global_mean(values, keep)
        reward, num_nonfinite = _global_mean(total, keep)
        return EvalResult(reward, per_reward, self.num_samples, num_nonfinite, media.cpu(), self.texts)


def _global_mean(values: torch.Tensor, keep: torch.Tensor) -> tuple[float | None, int]:
    """Mean over every rank's kept samples with a finite value (None if there are none), and the number of kept
    samples whose value is not finite."""
    finite = torch.isfinite(values)
    use = keep & finite
    acc = torch.stack([torch.where(use, values, torch.zeros_like(values)).sum(), use.double().sum(),
                       (keep & ~finite).double().sum()])
    acc = distributed.all_reduce_sum(acc)
    return (float(acc[0] / acc[1]) if acc[1] > 0 else None), int(acc[2])
