"""BranchGRPO (arXiv:2509.06040): rollouts as a branching tree sharing denoising prefixes (DESIGN section 3), reward
fusion and depth-wise advantages (section 4), width and depth pruning and the hybrid ODE/SDE tree (section 5).

    plan       every node emits K SDE children at each split step (paper Eq. 2 split noise); BranchGRPO-Mix: only
               split steps and a window sliding with the training iteration are SDE
    estimate   fusion over path log-probs (Eq. 3), depth-wise z-scores within each prompt's tree (Eq. 4)
    select     depth pruning (optionally sliding), then width pruning at the last split (Parent-Top1 / Extreme)
    rollout    the tree as the active dynamic-branching policies adjust it (branchgrpo.algorithms.branching), grown
               by a branchgrpo.core.rollout.Rollout that the unit steps from split to split when a policy acts there
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from branchgrpo.core import advantages as adv
from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, WindowFlags, window_flag_names
from branchgrpo.algorithms.branching import (
    POLICIES,
    AllocationFlags,
    BranchingPolicy,
    GuidedFlags,
    InnovationFlags,
    Observation,
    SplitFlags,
)
from branchgrpo.core.flags import either, flag, parse_int_list, require
from branchgrpo.core.graph import GraphPlan, RolloutGraph
from branchgrpo.core.plans import tree_plan
from branchgrpo.core.rollout import RolloutSetup
from branchgrpo.core.pruning import DepthPruningSchedule, depth_pruning_mask, extreme_mask, parent_top1_mask

log = logging.getLogger(__name__)
_REPORTED: set[tuple] = set()  # split-point settings already reported (_report_split_points)

_PAPER_TREE = ["--algo", "branchgrpo", "--tree_split_points", "0,3,6,9", "--branch_factor", "2", "--sde_kernel",
               "dance", "--eta", "0.3"]


@dataclass
class BranchGRPOConfig(GuidedFlags, InnovationFlags, SplitFlags, AllocationFlags, WindowFlags):
    """The tree, fusion and pruning flags (the window flags act only with --mix_ode_sde_tree), and each dynamic-
    branching policy's flags (branchgrpo.algorithms.branching)."""

    tree_split_points: str = flag("0,3,6,9", "comma-separated step indices where every node branches")
    tree_split_rounds: int = flag(4, "official fallback when --tree_split_points is empty: splits at k*(T // rounds)")
    branch_factor: int = flag(2, "children per split (K); leaves per prompt = K ** (number of split points)")
    branch_innovation: float = flag(1.0, "paper Eq. 2 r in (0, 1]: siblings share sqrt(1-r^2) of their split noise "
                                    "(r = 1: independent siblings)")
    tree_split_noise_scale: float = flag(1.0, "lambda: split edges' kernel std is lambda * std, in sampling and in "
                                         "every log-prob of the edge (the official code scaled only the sampling)")
    fusion_alpha: float | None = flag(None, "reward fusion temperature (Eq. 3): 0 = mean of the leaves below, "
                                      "1 = behaviour-policy path weighting")
    tree_prob_weighted: bool = flag(False, "official name for --fusion_alpha 1")
    width_pruning_mode: int = flag(0, "0 none, 1 Parent-Top1, 2 Extreme (best and worst leaves)", (0, 1, 2))
    width_pruning_ratio: float = flag(0.5, "Extreme mode: fraction of leaves whose post-split chains are trained")
    depth_pruning: str = flag("", "comma-separated child depths whose edges are not trained, e.g. 15,16,17,18")
    depth_pruning_slide: bool = flag(False, "slide the pruned depths one step every --depth_pruning_slide_interval "
                                     "iterations towards --depth_pruning_stop_depth")
    depth_pruning_slide_interval: int = flag(1, "iterations between two moves of the depth-pruning window")
    depth_pruning_stop_depth: int | None = flag(None, "where the sliding window stops (default: the last split point)")
    pruning_step_ratio: float = flag(1.0, "prune only during the first fraction of --max_train_steps")
    mix_ode_sde_tree: bool = flag(False, "BranchGRPO-Mix: only split steps and a sliding window of SDE steps are "
                                  "stochastic (and trained); the rest are ODE steps")

    # --- derived values ----------------------------------------------------------------------------------------
    def split_points(self, num_steps: int) -> list[int]:
        """The steps where the tree branches, ascending (the tree branches in step order, whatever the flag's)."""
        if self.tree_split_points.strip():
            return sorted(parse_int_list(self.tree_split_points, "--tree_split_points"))
        stride = max(1, num_steps // max(1, self.tree_split_rounds))
        return [k * stride for k in range(self.tree_split_rounds)]

    @property
    def pruned_depths(self) -> list[int]:
        return parse_int_list(self.depth_pruning, "--depth_pruning") if self.depth_pruning.strip() else []

    @property
    def alpha(self) -> float:
        if self.fusion_alpha is not None:
            return self.fusion_alpha
        return 1.0 if self.tree_prob_weighted else 0.0

    def num_leaves(self, sampling) -> int:
        return self.branch_factor ** len(self.split_points(sampling.sampling_steps))

    # --- checks ------------------------------------------------------------------------------------------------
    def validate(self, sampling) -> None:
        T = sampling.sampling_steps
        if not self.tree_split_points.strip():
            require(self.tree_split_rounds >= 1, "--tree_split_rounds: need >= 1 when --tree_split_points is empty, "
                    f"got {self.tree_split_rounds}")
        points = self.split_points(T)
        self._report_split_points(points, T)
        require(bool(points), "--tree_split_points: BranchGRPO needs at least one split point")
        for p in points:
            require(0 <= p <= T - 2, f"--tree_split_points: {p} is outside 0..{T - 2} "
                    f"(steps of a {T}-step schedule; the last step is deterministic)")
        require(self.branch_factor >= 2, f"--branch_factor: need >= 2, got {self.branch_factor}")
        leaves = self.num_leaves(sampling)
        require(leaves <= sampling.max_leaves, f"--tree_split_points/--branch_factor: {leaves} leaves per prompt "
                f"exceed --max_leaves {sampling.max_leaves} (raise --max_leaves if you mean it)")
        r = self.branch_innovation
        require(0 < r <= 1, f"--branch_innovation: need r in (0, 1], got {r}")
        require(self.tree_split_noise_scale > 0, f"--tree_split_noise_scale: need > 0, got {self.tree_split_noise_scale}")
        if self.tree_prob_weighted and self.fusion_alpha is not None and self.fusion_alpha != 1.0:
            raise ValueError(f"--tree_prob_weighted means --fusion_alpha 1, but --fusion_alpha {self.fusion_alpha} is set")
        ratio = self.width_pruning_ratio
        require(self.width_pruning_mode in (0, 1, 2), f"--width_pruning_mode: 0, 1 or 2, got {self.width_pruning_mode}")
        require(0 < ratio <= 1, f"--width_pruning_ratio: need a value in (0, 1], got {ratio}")
        for d in self.pruned_depths:
            require(1 <= d <= T - 1, f"--depth_pruning: depth {d} is outside 1..{T - 1} (child depths of trainable edges)")
        if self.depth_pruning_slide:
            require(self.depth_pruning_slide_interval >= 1,
                    f"--depth_pruning_slide_interval: need >= 1, got {self.depth_pruning_slide_interval}")
            stop = self.depth_pruning_stop_depth
            if stop is not None:
                require(1 <= stop <= T - 1, f"--depth_pruning_stop_depth: {stop} is outside 1..{T - 1}")
        require(0 < self.pruning_step_ratio <= 1, f"--pruning_step_ratio: need (0, 1], got {self.pruning_step_ratio}")
        if self.mix_ode_sde_tree:
            self.validate_window(T)
        reshaping = [policy for policy in POLICIES if policy.reshapes_tree]
        require(not (self.width_pruning_mode and any(policy.enabled(self) for policy in reshaping)),
                f"--width_pruning_mode: not with {either(f'--{policy.flag}' for policy in reshaping)} (the trees' "
                "last splits differ)")
        for policy in POLICIES:
            policy.validate(self, T, points, sampling.max_leaves)

    def _report_split_points(self, points: list[int], num_steps: int) -> None:
        """Say which split points are used when they are not the flag's text as given: derived from
        --tree_split_rounds (empty flag), or put in ascending order."""
        used = ",".join(map(str, points))
        key = (self.tree_split_points, self.tree_split_rounds, num_steps)
        if key in _REPORTED:  # the unit is validated each time it is built: say it once per process
            return
        _REPORTED.add(key)
        if not self.tree_split_points.strip():
            log.info("--tree_split_points is empty: splitting at steps %s (--tree_split_rounds %d over %d steps)",
                     used, self.tree_split_rounds, num_steps)
        elif parse_int_list(self.tree_split_points, "--tree_split_points") != points:
            log.warning("--tree_split_points '%s' is not in ascending order; the tree splits at steps %s",
                        self.tree_split_points, used)

    def conditions(self) -> dict[str, tuple[bool, str]]:
        return {
            **{name: (self.mix_ode_sde_tree, "--mix_ode_sde_tree") for name in window_flag_names()},
            "width_pruning_ratio": (self.width_pruning_mode == 2, "--width_pruning_mode 2"),
            "depth_pruning_slide": (bool(self.depth_pruning.strip()), "a non-empty --depth_pruning"),
            "depth_pruning_slide_interval": (self.depth_pruning_slide, "--depth_pruning_slide"),
            "depth_pruning_stop_depth": (self.depth_pruning_slide, "--depth_pruning_slide"),
            **{name: condition for policy in POLICIES for name, condition in policy.conditions(self).items()},
        }

    def selection_summary(self) -> str:
        return (f"--depth_pruning '{self.depth_pruning}' / --width_pruning_mode {self.width_pruning_mode} / "
                f"--mix_ode_sde_tree {self.mix_ode_sde_tree}")


@register_algorithm
class BranchGRPO(Algorithm):
    name = "branchgrpo"
    Config = BranchGRPOConfig
    default_kernel = "dance"
    tiny_flags = ("--tree_split_points", "0,2")
    presets = {
        "branchgrpo": ("BranchGRPO", _PAPER_TREE),
        "branchgrpo_widpru": ("BranchGRPO-WidPru", [*_PAPER_TREE, "--width_pruning_mode", "1"]),
        "branchgrpo_deppru": ("BranchGRPO-DepPru", [*_PAPER_TREE, "--depth_pruning", "15,16,17,18",
                                                    "--depth_pruning_slide", "--depth_pruning_slide_interval",
                                                    "{interval}", "--depth_pruning_stop_depth", "9"]),
        "branchgrpo_mix": ("BranchGRPO-Mix", [*_PAPER_TREE, "--mix_ode_sde_tree", "--mix_sde_window_size", "4",
                                              "--mix_window_interval", "{interval}"]),
    }

    def __init__(self, cfg: BranchGRPOConfig, sampling, **kwargs):
        super().__init__(cfg, sampling, **kwargs)
        self._fixed_points = cfg.split_points(self.num_steps)
        self.schedules["window"] = cfg.window_schedule(self.num_steps) if cfg.mix_ode_sde_tree else None
        stop = cfg.depth_pruning_stop_depth
        if stop is None and cfg.depth_pruning_slide:
            stop = max(self._fixed_points)  # the official default
        self.depth_schedule = DepthPruningSchedule(
            depths=tuple(cfg.pruned_depths), slide=cfg.depth_pruning_slide, interval=cfg.depth_pruning_slide_interval,
            stop_depth=stop, step_ratio=cfg.pruning_step_ratio, max_train_steps=self.max_train_steps)
        self.schedules["depth_schedule"] = self.depth_schedule
        # dynamic branching (branchgrpo.algorithms.branching): the policies whose flag is on, each with its state
        active = {policy: policy(cfg, self) for policy in POLICIES if policy.enabled(cfg)}
        self.policies: list[BranchingPolicy] = list(active.values())
        self.schedules.update({policy.state_name: active.get(policy) for policy in POLICIES if policy.state_name})

    @property
    def split_points(self) -> list[int]:
        """The current split steps (the flag's, unless a policy moves them)."""
        points = self._fixed_points
        for policy in self.policies:
            points = policy.split_points(points)
        return list(points)

    @property
    def branch_innovation(self) -> float:
        return self.cfg.branch_innovation

    def sde_steps(self, iteration: int) -> list[int] | None:
        """BranchGRPO-Mix: the SDE window's steps at this iteration (None: every step but the last is SDE)."""
        window = self.schedules["window"]
        return window.window(iteration) if window else None

    def tree(self, iteration: int, points: list[int]) -> GraphPlan:
        """The fixed tree that splits at `points`."""
        return tree_plan(self.num_steps, points, self.cfg.branch_factor, sde_steps=self.sde_steps(iteration),
                         split_noise_scale=self.cfg.tree_split_noise_scale)

    def plan(self, iteration: int) -> GraphPlan:
        """The tree at the current split steps, as the policies report it (guided expansion: its node counts)."""
        plan = self.tree(iteration, self.split_points)
        for policy in self.policies:
            plan = policy.plan(plan, iteration)
        return plan

    def rollout(self, iteration: int, setup: RolloutSetup, prompt_ids: list[int], scorer=None) -> RolloutGraph:
        """The tree at the current split steps, grown with what the policies make of it: per-prompt trees, r per
        split, and at each split the children they keep."""
        points, r = self.split_points, self.branch_innovation
        plan = self._first_answer(lambda policy: policy.prompt_plans(iteration, prompt_ids))
        plan = plan or self.tree(iteration, points)  # one plan per prompt from a policy, else the tree for all
        for policy in self.policies:
            r = policy.branch_innovation(r, points)
        rollout = setup.start(plan, r, pause_at_splits=any(policy.pauses_at_splits for policy in self.policies))
        while (split := rollout.next_split()) is not None:
            for policy in self.policies:
                policy.at_split(split, scorer)
        return rollout.finish()

    @property
    def prompt_separable(self) -> bool:
        return not self.policies  # a dynamic-branching policy looks across the batch (budgets, guided splits)

    def observe(self, graph: RolloutGraph, leaf_rewards: torch.Tensor, prompt_ids: list[int], iteration: int) -> dict:
        """Feed the iteration's results to the policies; returns what they log."""
        obs = Observation(self, graph, leaf_rewards, prompt_ids)
        out: dict = {}
        for policy in self.policies:
            out.update(policy.observe(obs))
        if out:
            out["rollout_forward_passes"] = graph.num_forward_passes
        return out

    def leaf_log_weights(self, graph: RolloutGraph) -> torch.Tensor | None:
        """Fusion's importance log-weights, from the policy that skews the sampling (None: plain fusion)."""
        return self._first_answer(lambda policy: policy.leaf_log_weights(graph))

    def _first_answer(self, ask):
        """The first active policy's answer to `ask(policy)` that is not None (None when none answers)."""
        return next((answer for answer in map(ask, self.policies) if answer is not None), None)

    def fuse(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        """Node values: paper Eq. 3 fusion of the leaf rewards below each node."""
        return adv.fuse_rewards(graph, leaf_rewards, self.cfg.alpha, self.leaf_log_weights(graph))

    def counts(self, iteration: int = 0) -> dict:
        out = super().counts(iteration)
        if self.policies:
            out["policies"] = {policy.flag: policy.counts(iteration, out) for policy in self.policies}
        return out

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        return adv.tree_advantages(graph, leaf_rewards, self.cfg.alpha, self.leaf_log_weights(graph))

    def select(self, graph: RolloutGraph, advantages: torch.Tensor, iteration: int,
               prompt_keys: tuple[int, ...] = ()) -> torch.Tensor:
        c = self.cfg
        keep = graph.stochastic.clone()
        keep &= depth_pruning_mask(graph, self.depth_schedule.pruned_depths(iteration))
        if c.width_pruning_mode and self.depth_schedule.active(iteration):
            last_split = max(self.split_points)
            if c.width_pruning_mode == 1:
                keep &= parent_top1_mask(graph, advantages, last_split)
            else:
                keep &= extreme_mask(graph, advantages, last_split, c.width_pruning_ratio)
        return keep
