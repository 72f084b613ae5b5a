"""MixGRPO: G sequential trajectories per prompt that are SDE only inside a window of W steps, ODE elsewhere; only
the window's steps are trained, and the window moves with the TRAINING iteration (DESIGN section 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.core import advantages as adv
from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, GroupFlags, WindowFlags
from branchgrpo.core.graph import GraphPlan, RolloutGraph
from branchgrpo.core.plans import group_plan


@dataclass
class MixGRPOConfig(GroupFlags, WindowFlags):
    def validate(self, sampling) -> None:
        GroupFlags.validate(self, sampling)
        self.validate_window(sampling.sampling_steps)


@register_algorithm
class MixGRPO(Algorithm):
    name = "mixgrpo"
    Config = MixGRPOConfig
    default_kernel = "flow"
    tiny_flags = ("--num_generations", "4")
    presets = {
        "mixgrpo": ("MixGRPO (20,5)", ["--algo", "mixgrpo", "--num_generations", "16", "--sde_kernel", "flow", "--eta",
                                       "0.7", "--mix_sde_window_size", "5", "--mix_window_interval", "{interval}",
                                       "--mix_window_stride", "1"]),
    }

    def __init__(self, cfg: MixGRPOConfig, sampling, **kwargs):
        super().__init__(cfg, sampling, **kwargs)
        self.window = cfg.window_schedule(self.num_steps)
        self.schedules["window"] = self.window

    def plan(self, iteration: int) -> GraphPlan:
        return group_plan(self.num_steps, self.cfg.num_generations, sde_steps=self.window.window(iteration))

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        return adv.group_advantages(graph, leaf_rewards)
