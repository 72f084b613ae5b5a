"""Flow-GRPO (Liu et al. 2025): G independent SDE chains per prompt with the "flow" kernel (g = a sqrt(sigma /
(1 - sigma)), a = --eta 0.7 by default), advantages = reward minus the prompt group's mean over the std of every
reward of the iteration (--global_std; per group with --no-global_std), and the first floor(f (T - 1)) steps of each
chain trained, in order (--timestep_fraction). Classifier-free guidance, where the backbone has it, enters rollout
and training alike through the backbone's velocity; the KL to the reference is the shared --kl_coef."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, GlobalStdFlags, GroupFlags, TimestepFractionFlags
from branchgrpo.core.graph import GraphPlan, RolloutGraph
from branchgrpo.core.plans import group_plan


@dataclass
class FlowGRPOConfig(GroupFlags, TimestepFractionFlags, GlobalStdFlags):
    def validate(self, sampling) -> None:
        GroupFlags.validate(self, sampling)
        self.validate_fraction(sampling.sampling_steps)


@register_algorithm
class FlowGRPO(Algorithm):
    name = "flow_grpo"
    Config = FlowGRPOConfig
    default_kernel = "flow"
    tiny_flags = ("--num_generations", "4")
    # f = 1: the reference's 0.99 drops only its last transition, the deterministic one here
    presets = {
        "flow_grpo": ("Flow-GRPO", ["--algo", "flow_grpo", "--num_generations", "16", "--sde_kernel", "flow", "--eta",
                                    "0.7", "--timestep_fraction", "1.0"]),
    }

    def plan(self, iteration: int) -> GraphPlan:
        return group_plan(self.num_steps, self.cfg.num_generations)

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        return self.cfg.group_advantages(graph, leaf_rewards)

    def select(self, graph: RolloutGraph, advantages: torch.Tensor, iteration: int,
               prompt_keys: tuple[int, ...] = ()) -> torch.Tensor:
        """The SDE edges out of the first floor(f (T - 1)) steps (their parents sit at steps 0 .. n - 1)."""
        return graph.stochastic & (graph.step <= self.cfg.num_trained_steps(self.num_steps))
