"""Held-out evaluation during training: fixed prompts, fixed seeds, the same sampler every time.

Each evaluation sample is a one-chain rollout (ODE by default, or the training SDE kernel) from noise keyed by
(--eval_seed, sample id), so the samples before and after training differ only by the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo import builders, distributed, sde
from branchgrpo.data.embeddings import EmbeddingStore
from branchgrpo.data.prompts import eval_prompts
from branchgrpo.rewards.base import RewardSet
from branchgrpo.rollout import NoiseKeys, run_rollout


@dataclass
class EvalResult:
    reward: float  # weighted sum of the reward models, mean over samples
    per_reward: dict[str, float]
    num_samples: int
    media: torch.Tensor  # this rank's decoded samples (rank 0: the first prompts), for grids
    labels: list[str]


class Evaluator:
    def __init__(self, store: EmbeddingStore, cfg, rank: int, world_size: int):
        self.store, self.cfg = store, cfg
        self.rows, self.sample_ids, self.is_pad = eval_prompts(store, cfg.num_eval_prompts,
                                                               cfg.eval_samples_per_prompt, rank, world_size)
        self.texts = [store.text(i) for i in self.rows]

    @property
    def num_samples(self) -> int:
        return min(self.cfg.num_eval_prompts, len(self.store)) * self.cfg.eval_samples_per_prompt

    @torch.no_grad()
    def run(self, velocity_for, adapter, rewards: RewardSet, sigmas: torch.Tensor, kernel: sde.Kernel,
            device: torch.device, extras: dict) -> EvalResult:
        cfg = self.cfg
        T = cfg.sampling_steps
        plan = builders.group_plan(T, 1, sde_steps=None if cfg.eval_sampler == "sde" else [])
        embeddings = {k: v.to(device) for k, v in self.store.batch(self.rows).items()}
        embeddings.update({k: v.to(device).unsqueeze(0).expand(len(self.rows), *v.shape) for k, v in extras.items()})
        graph = run_rollout(plan, velocity_for(embeddings), sigmas, kernel,
                            NoiseKeys(cfg.eval_seed, 0, tuple(self.sample_ids)), adapter.latent_shape, device,
                            batch_size=cfg.rollout_batch_size)
        media = decode_in_chunks(adapter, graph.node_latents(graph.leaves), cfg.reward_batch_size)
        scores = {name: [] for name in rewards.models}
        for start in range(0, media.shape[0], cfg.reward_batch_size):
            part = rewards.score(media[start : start + cfg.reward_batch_size],
                                 self.texts[start : start + cfg.reward_batch_size])
            for name, value in part.items():
                scores[name].append(value)
        keep = ~torch.tensor(self.is_pad)
        per_reward = {}
        total = torch.zeros(keep.numel(), dtype=torch.float64)
        for name, parts in scores.items():
            values = torch.cat(parts).double()
            total += rewards.weights[name] * values
            per_reward[name] = _global_mean(values, keep)
        return EvalResult(_global_mean(total, keep), per_reward, self.num_samples, media.cpu(), self.texts)


def _global_mean(values: torch.Tensor, keep: torch.Tensor) -> float:
    acc = torch.stack([torch.where(keep, values, torch.zeros_like(values)).sum(), keep.double().sum()])
    acc = distributed.all_reduce_sum(acc)
    return float(acc[0] / acc[1])


@torch.no_grad()
def decode_in_chunks(adapter, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([adapter.decode(latents[i : i + chunk]).float() for i in range(0, latents.shape[0], chunk)])
