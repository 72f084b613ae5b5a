"""G2RPO (seed 003): Singular Stochastic Sampling - an ODE anchor, G members taking ONE SDE step from it at each
branch step k, each finished by ODE at several granularities - and Multi-Granularity Advantage Integration
(per-(k, granularity) z-scores summed over granularities). Only the singular SDE edges are trained (DESIGN 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.core import advantages as adv
from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, GroupFlags
from branchgrpo.core.flags import flag, parse_int_list, require
from branchgrpo.core.graph import GraphPlan, RolloutGraph
from branchgrpo.core.plans import comb_plan


@dataclass
class G2RPOConfig(GroupFlags):
    g2rpo_steps: str = flag("", "g2rpo: steps k that get a singular SDE branch (default: the first half, 0..T/2-1)")
    g2rpo_granularities: str = flag("1,2,3", "g2rpo: ODE strides used to finish each member (Lambda)")

    def branch_steps(self, num_steps: int) -> list[int]:
        if self.g2rpo_steps.strip():
            return parse_int_list(self.g2rpo_steps, "--g2rpo_steps")
        return list(range(max(1, num_steps // 2)))

    @property
    def granularities(self) -> list[int]:
        return parse_int_list(self.g2rpo_granularities, "--g2rpo_granularities")

    def num_leaves(self, sampling) -> int:
        return self.num_generations * len(self.branch_steps(sampling.sampling_steps)) * len(self.granularities) + 1

    def validate(self, sampling) -> None:
        super().validate(sampling)
        T = sampling.sampling_steps
        for k in self.branch_steps(T):
            require(0 <= k <= T - 2, f"--g2rpo_steps: {k} is outside 0..{T - 2} (the last step is deterministic)")
        for g in self.granularities:
            require(g >= 1, f"--g2rpo_granularities: strides must be >= 1, got {g}")


@register_algorithm
class G2RPO(Algorithm):
    name = "g2rpo"
    Config = G2RPOConfig
    default_kernel = "flow"
    tiny_flags = ("--num_generations", "4")
    presets = {
        "g2rpo": ("G2RPO", ["--algo", "g2rpo", "--num_generations", "16", "--sde_kernel", "flow", "--eta", "0.7",
                            "--g2rpo_steps", "0,3,6,9", "--g2rpo_granularities", "1,2,3"]),
    }

    def plan(self, iteration: int) -> GraphPlan:
        return comb_plan(self.num_steps, self.cfg.branch_steps(self.num_steps), self.cfg.num_generations,
                         self.cfg.granularities)

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        return adv.group_advantages(graph, leaf_rewards)
