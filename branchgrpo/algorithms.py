"""The four algorithms as (plan builder, advantage estimator, edge selector) triples over one rollout data type.

    branchgrpo  tree plan (+ Mix window)      fusion + depth-wise normalisation   width / depth pruning
    dancegrpo   G independent SDE chains       group z-score, broadcast            random timestep fraction
    mixgrpo     G chains, SDE only in window   group z-score, broadcast            the window's SDE edges
    g2rpo       ODE anchor + singular combs    per-(k, granularity) z, summed      the single SDE edges

The trainer calls `plan(iteration)`, runs the rollout, scores the leaves, then `advantages(...)` and `select(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from branchgrpo import advantages as adv
from branchgrpo import builders, sde
from branchgrpo.config import AlgoConfig, validate_algo
from branchgrpo.graph import GraphPlan, RolloutGraph
from branchgrpo.pruning import (
    DepthPruningSchedule,
    WindowSchedule,
    depth_pruning_mask,
    extreme_mask,
    parent_top1_mask,
    timestep_fraction_mask,
)


@dataclass
class Algorithm:
    cfg: AlgoConfig
    seed: int = 0
    window: WindowSchedule | None = field(default=None, init=False)
    depth_schedule: DepthPruningSchedule | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        validate_algo(self.cfg)
        c = self.cfg
        if c.algo == "mixgrpo" or (c.algo == "branchgrpo" and c.mix_ode_sde_tree):
            self.window = WindowSchedule(
                size=c.mix_sde_window_size,
                interval=c.mix_window_interval,
                stride=c.mix_window_stride,
                start=c.mix_window_start,
                max_start=c.window_max_start,
            )
        if c.algo == "branchgrpo":
            stop = c.depth_pruning_stop_depth
            if stop is None and c.depth_pruning_slide:
                stop = max(c.split_points)  # the official default
            self.depth_schedule = DepthPruningSchedule(
                depths=tuple(c.pruned_depths),
                slide=c.depth_pruning_slide,
                interval=c.depth_pruning_slide_interval,
                stop_depth=stop,
                step_ratio=c.pruning_step_ratio,
                max_train_steps=c.max_train_steps,
            )

    @property
    def name(self) -> str:
        return self.cfg.algo

    @property
    def kernel(self) -> sde.Kernel:
        return sde.Kernel(self.cfg.kernel_kind, self.cfg.eta_value)

    # --- rollout topology ---------------------------------------------------------------------------------------
    def plan(self, iteration: int) -> GraphPlan:
        c = self.cfg
        T = c.sampling_steps
        if c.algo == "branchgrpo":
            return builders.tree_plan(
                T,
                c.split_points,
                c.branch_factor,
                sde_steps=self.window.window(iteration) if self.window else None,
                split_noise_scale=c.tree_split_noise_scale,
            )
        if c.algo == "dancegrpo":
            return builders.group_plan(T, c.num_generations)
        if c.algo == "mixgrpo":
            return builders.group_plan(T, c.num_generations, sde_steps=self.window.window(iteration))
        return builders.comb_plan(T, c.g2rpo_step_list, c.num_generations, c.granularities)

    # --- advantages ---------------------------------------------------------------------------------------------
    def estimator(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        if self.cfg.algo == "branchgrpo":
            return adv.tree_advantages(graph, leaf_rewards, self.cfg.alpha)
        return adv.group_advantages(graph, leaf_rewards)

    def advantages(self, graph: RolloutGraph, scores: dict[str, torch.Tensor], weights: dict[str, float],
                   mode: str) -> torch.Tensor:
        """Per-node advantages (float64 [N], clipped to +-adv_clip_max; NaN where no finite reward lies below)."""
        a = adv.combined_advantages(self.estimator, graph, scores, weights, mode)
        return a.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)

    # --- selection ----------------------------------------------------------------------------------------------
    def select(self, graph: RolloutGraph, advantages: torch.Tensor, iteration: int,
               prompt_keys: tuple[int, ...] = ()) -> torch.Tensor:
        """Bool mask over nodes: the edges (child ends) trained this iteration. Always a subset of SDE edges."""
        c = self.cfg
        keep = graph.stochastic.clone()
        if c.algo == "branchgrpo":
            keep &= depth_pruning_mask(graph, self.depth_schedule.pruned_depths(iteration))
            if c.width_pruning_mode and self.depth_schedule.active(iteration):
                last_split = max(c.split_points)
                if c.width_pruning_mode == 1:
                    keep &= parent_top1_mask(graph, advantages, last_split)
                else:
                    keep &= extreme_mask(graph, advantages, last_split, c.width_pruning_ratio)
        elif c.algo == "dancegrpo" and c.timestep_fraction < 1.0:
            keys = prompt_keys or tuple(range(graph.num_prompts))
            keep &= timestep_fraction_mask(graph, c.timestep_fraction, self.seed, iteration, keys)
        return keep

    # --- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "window": self.window.state_dict() if self.window else None,
            "depth_schedule": self.depth_schedule.state_dict() if self.depth_schedule else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("window", "depth_schedule"):
            mine = getattr(self, name)
            if (mine is None) != (state.get(name) is None):
                raise ValueError(f"resume: the checkpoint's {name} does not match these flags (algo {self.cfg.algo})")
            if mine is not None:
                mine.load_state_dict(state[name])
