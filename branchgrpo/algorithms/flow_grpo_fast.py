"""Flow-GRPO-Fast: per prompt, an ODE prefix shared by the group, then G children that take a window of w SDE steps
starting at a random step in [lo, hi - w] (default lo 0, hi T / 2), then ODE to the end; only the window's steps are
trained. It is a one-split tree: `tree_plan` with one split point at the window's start, K = G children and the
window as its only SDE steps. Advantages as Flow-GRPO's (--global_std)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, GlobalStdFlags, GroupFlags
from branchgrpo.core.flags import flag, parse_int_list, require
from branchgrpo.core.graph import GraphPlan, RolloutGraph
from branchgrpo.core.plans import tree_plan
from branchgrpo.core.seeding import keyed_generator, mix_key


@dataclass
class FlowGRPOFastConfig(GroupFlags, GlobalStdFlags):
    sde_window_size: int = flag(2, "flow_grpo_fast: SDE steps w after the shared ODE prefix (the steps trained)")
    sde_window_range: str = flag("", "flow_grpo_fast: 'lo,hi' - the window starts at a random step in [lo, hi - w] "
                                 "(default 0,T/2)")

    def window_range(self, num_steps: int) -> tuple[int, int]:
        if not self.sde_window_range.strip():
            return 0, num_steps // 2
        bounds = parse_int_list(self.sde_window_range, "--sde_window_range")
        require(len(bounds) == 2, f"--sde_window_range: expected 'lo,hi', got '{self.sde_window_range}'")
        return bounds[0], bounds[1]

    def validate(self, sampling) -> None:
        GroupFlags.validate(self, sampling)
        T, w = sampling.sampling_steps, self.sde_window_size
        require(1 <= w <= T - 1, f"--sde_window_size: need 1..{T - 1}, got {w}")
        lo, hi = self.window_range(T)
        require(0 <= lo <= hi - w, f"--sde_window_range {lo},{hi}: need 0 <= lo <= hi - w (w = {w})")
        require(hi <= T - 1, f"--sde_window_range {lo},{hi}: hi may be at most {T - 1} (the last step is "
                "deterministic)")


@register_algorithm
class FlowGRPOFast(Algorithm):
    name = "flow_grpo_fast"
    Config = FlowGRPOFastConfig
    default_kernel = "flow"
    tiny_flags = ("--num_generations", "4")
    # the CPS row is the reference's FLUX recipe (cps, eta 0.8, w 3)
    presets = {
        "flow_grpo_fast": ("Flow-GRPO-Fast", ["--algo", "flow_grpo_fast", "--num_generations", "16", "--sde_kernel",
                                              "flow", "--eta", "0.7", "--sde_window_size", "2"]),
        "flow_grpo_fast_cps": ("Flow-GRPO-Fast (CPS)", ["--algo", "flow_grpo_fast", "--num_generations", "16",
                                                        "--sde_kernel", "cps", "--eta", "0.8", "--sde_window_size",
                                                        "3"]),
    }

    def window_start(self, iteration: int) -> int:
        """The iteration's window start, uniform in [lo, hi - w], keyed by (seed, iteration): the same on every
        rank and on a resumed run."""
        lo, hi = self.cfg.window_range(self.num_steps)
        gen = keyed_generator(mix_key(self.seed, iteration, "flow-fast-window"))
        return lo + int(torch.randint(hi - self.cfg.sde_window_size - lo + 1, (1,), generator=gen))

    def plan(self, iteration: int) -> GraphPlan:
        start = self.window_start(iteration)
        window = range(start, start + self.cfg.sde_window_size)
        return tree_plan(self.num_steps, [start], self.cfg.num_generations, sde_steps=window)

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        return self.cfg.group_advantages(graph, leaf_rewards)
