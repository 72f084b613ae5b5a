"""DanceGRPO: G independent SDE trajectories per prompt, the group z-score of the terminal reward broadcast to every
step, and optionally a random fraction of each trajectory's steps trained (DESIGN section 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.core import advantages as adv
from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, GroupFlags, TimestepFractionFlags
from branchgrpo.core.graph import GraphPlan, RolloutGraph
from branchgrpo.core.plans import group_plan
from branchgrpo.core.pruning import timestep_fraction_mask

_DANCE = ["--algo", "dancegrpo", "--num_generations", "16", "--sde_kernel", "dance", "--eta", "0.3"]


@dataclass
class DanceGRPOConfig(GroupFlags, TimestepFractionFlags):
    def validate(self, sampling) -> None:
        GroupFlags.validate(self, sampling)
        self.validate_fraction(sampling.sampling_steps)


@register_algorithm
class DanceGRPO(Algorithm):
    name = "dancegrpo"
    Config = DanceGRPOConfig
    default_kernel = "dance"
    tiny_flags = ("--num_generations", "4")
    presets = {
        "dancegrpo_tf1.0": ("DanceGRPO (tf=1.0)", [*_DANCE, "--timestep_fraction", "1.0"]),
        "dancegrpo_tf0.6": ("DanceGRPO (tf=0.6)", [*_DANCE, "--timestep_fraction", "0.6"]),
    }

    def plan(self, iteration: int) -> GraphPlan:
        return group_plan(self.num_steps, self.cfg.num_generations)

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        return adv.group_advantages(graph, leaf_rewards)

    def select(self, graph: RolloutGraph, advantages: torch.Tensor, iteration: int,
               prompt_keys: tuple[int, ...] = ()) -> torch.Tensor:
        keep = graph.stochastic.clone()
        if self.cfg.timestep_fraction < 1.0:
            keys = prompt_keys or tuple(range(graph.num_prompts))
            keep &= timestep_fraction_mask(graph, self.cfg.timestep_fraction, self.seed, iteration, keys)
        return keep
