"""Dynamic branching as policies of the `branchgrpo` unit (docs/design_notes.md "Dynamic branching"; the math and the
state objects are in branchgrpo.algorithms.dynamic). Each policy owns its flags (a dataclass mixed into the unit's
config section), their checks and conditions, its line in `plan`'s budget and its checkpointed state, and acts
through the hooks of `BranchingPolicy`; the unit calls every active policy's hooks in turn:

    policy                --flag                 plan adjustment                 at a split          after the rewards
    DynamicAllocation     --dynamic_allocation   prompt_plans: per-prompt trees  -                   observe: spreads
    AdaptiveSplits        --adaptive_splits      split_points: its steps         -                   observe: moves them
    AdaptiveInnovation    --adaptive_innovation  branch_innovation: r per split  -                   observe: adapts r
    GuidedExpansion       --guided_expansion     plan: its node counts           at_split: keep the  leaf_log_weights
                                                                                 best nodes' children

The rollout pauses at each split only for a policy with `pauses_at_splits`: the unit then gets a
branchgrpo.core.rollout.Split (the split parents' x0-predictions) and hands it to `at_split` with the batch's scorer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from branchgrpo.algorithms import dynamic as dyn
from branchgrpo.core import distributed
from branchgrpo.core.flags import flag, parse_int_list, require
from branchgrpo.core.graph import GraphPlan, RolloutGraph, plan_counts
from branchgrpo.core.rollout import Split

# scorer(latents [n, ...], prompt index [n]) -> float32 [n]: the weighted training reward of decoded latents
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- each policy's flags (mixed into BranchGRPOConfig; flat official names) -------------------------------------
@dataclass
class AllocationFlags:
    dynamic_allocation: bool = flag(False, "per-prompt trees (more or fewer splits) shared out by recent reward spread "
                                    "within a budget of rollout forward passes per iteration and rank")
    dynamic_budget_ratio: float = flag(1.0, "allocation budget as a fraction of what the fixed tree spends, in (0, 2]")
    dynamic_max_splits: int | None = flag(None, "largest tree allocation may give (number of splits; default: the "
                                          "fixed tree's + 1, within --max_leaves)")
    dynamic_spread_decay: float = flag(0.5, "weight of a prompt's older spread in its moving average, in [0, 1)")

    def max_splits(self, points: list[int]) -> int:
        return self.dynamic_max_splits if self.dynamic_max_splits is not None else len(points) + 1


@dataclass
class SplitFlags:
    adaptive_splits: bool = flag(False, "move split steps toward the steps of largest sibling reward spread")
    adaptive_split_window: int = flag(5, "iterations of statistics behind each move of the split steps")
    adaptive_split_range: str = flag("", "lo,hi: steps the splits may move within (default 0,T-2)")
    adaptive_split_min_spacing: int = flag(2, "least distance between two split steps")
    adaptive_split_margin: float = flag(0.1, "relative spread gain a split needs before it moves one step")

    def split_range(self, num_steps: int) -> tuple[int, int]:
        if not self.adaptive_split_range.strip():
            return 0, num_steps - 2
        lo, hi = parse_int_list(self.adaptive_split_range, "--adaptive_split_range")
        return lo, hi


@dataclass
class InnovationFlags:
    adaptive_innovation: bool = flag(False, "adjust --branch_innovation r per split toward --innovation_target")
    innovation_target: float = flag(0.25, "target share of the leaf-reward variance that each split's within-parent "
                                    "(sibling) variance should carry, in (0, 1)")
    innovation_gain: float = flag(0.5, "step size of r's multiplicative update")
    innovation_min: float = flag(0.1, "smallest r the adaptation may reach, in (0, 1]")


@dataclass
class GuidedFlags:
    guided_expansion: bool = flag(False, "at each split, the nodes whose x0-prediction scores best get K children, the "
                                  "rest --guided_reduced_children (extra decodes and rewards, in the rollout time)")
    guided_top_fraction: float = flag(0.5, "fraction of a prompt's nodes fully expanded at each split, in (0, 1]")
    guided_reduced_children: int = flag(1, "children of the other nodes at a split, 1..K-1")
    guided_importance_weights: bool = flag(True, "fusion weights each leaf by prod 1/children over its ancestors "
                                           "(unbiased node values); off: the plain leaf mean (biased to top nodes)")


# --- the interface ---------------------------------------------------------------------------------------------
class Observation:
    """One iteration's results as the policies' `observe` reads them. `points`: the split steps the rollout used
    (taken before any policy moves them); `split_spread` is computed on first use, with one all-reduce - every rank
    holds the same policies, so every rank makes the same collective calls."""

    def __init__(self, unit, graph: RolloutGraph, leaf_rewards: torch.Tensor, prompt_ids: list[int]):
        self.unit, self.graph, self.leaf_rewards, self.prompt_ids = unit, graph, leaf_rewards, prompt_ids
        self.points = unit.split_points

    @functools.cached_property
    def split_spread(self) -> dict[int, tuple[float, float]]:
        """`dynamic.split_spread` of the unit's fused rewards, summed over ranks (weighted by prompts): per split
        step, (within-parent variance, its share of the leaf-reward variance); the same on every rank."""
        num_steps = self.unit.num_steps
        sums = torch.zeros(num_steps + 1, 3, dtype=torch.float64)
        for s, (w, ratio, n) in dyn.split_spread(self.graph, self.unit.fuse(self.graph, self.leaf_rewards)).items():
            sums[s] = torch.tensor([w * n, ratio * n, n], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums)
        return {s: (float(sums[s, 0] / sums[s, 2]), float(sums[s, 1] / sums[s, 2]))
                for s in range(num_steps + 1) if sums[s, 2] > 0}


class BranchingPolicy:
    """One dynamic-branching policy: built by the unit (`unit`: the BranchGRPO instance whose tree it adjusts) when
    its `flag` is on. Every hook's default leaves things as they are."""

    #: the switch (a bool field of `Flags`)
    flag: ClassVar[str]
    #: the policy's flags: the switch and its knobs
    Flags: ClassVar[type]
    #: its slot in the unit's checkpointed state (`Algorithm.schedules`), or None when it keeps no state
    state_name: ClassVar[str | None] = None
    #: its trees' last split may differ from the fixed tree's (so width pruning cannot act)
    reshapes_tree: ClassVar[bool] = False
    #: the rollout stops at each split for its `at_split`
    pauses_at_splits: ClassVar[bool] = False

    def __init__(self, cfg, unit):
        self.cfg, self.unit = cfg, unit

    # --- flags ----------------------------------------------------------------------------------------------
    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(getattr(cfg, cls.flag))

    @classmethod
    def validate(cls, cfg, num_steps: int, points: list[int], max_leaves: int) -> None:
        """Checks of the knobs (whether or not the policy is on), given the fixed split steps."""

    @classmethod
    def conditions(cls, cfg) -> dict[str, tuple[bool, str]]:
        """Every knob acts only with the switch."""
        return {f.name: (cls.enabled(cfg), f"--{cls.flag}") for f in dataclasses.fields(cls.Flags) if f.name != cls.flag}

    # --- plan adjustment ------------------------------------------------------------------------------------
    def split_points(self, points: list[int]) -> list[int]:
        """The split steps of the next rollout."""
        return points

    def plan(self, plan: GraphPlan, iteration: int) -> GraphPlan:
        """The per-prompt plan that `Algorithm.plan` reports (counts and budgets)."""
        return plan

    def prompt_plans(self, iteration: int, prompt_ids: list[int]) -> list[GraphPlan] | None:
        """One plan per prompt for the rollout to grow; None: the unit's tree for every prompt."""
        return None

    def branch_innovation(self, r: float | dict[int, float], points: list[int]) -> float | dict[int, float]:
        """r of paper Eq. 2: one value, or one per split children's depth."""
        return r

    # --- the rollout and after it ---------------------------------------------------------------------------
    def at_split(self, split: Split, scorer: Scorer) -> None:
        """At a split the rollout paused at (`pauses_at_splits`): may `split.keep(...)` fewer children."""

    def leaf_log_weights(self, graph: RolloutGraph) -> torch.Tensor | None:
        """Importance log-weights of the leaves for fusion, when the policy skews the sampling; None otherwise."""
        return None

    def observe(self, obs: Observation) -> dict:
        """Update the state from the iteration's results; returns figures for the iteration's metrics."""
        return {}

    def counts(self, iteration: int, counts: dict) -> str:
        """The policy's budget for `plan` (given the unit's per-prompt counts at `iteration`)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The state checkpointed under `state_name` (policies that keep one)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


# --- the policies ----------------------------------------------------------------------------------------------
class DynamicAllocation(BranchingPolicy):
    """Per-prompt trees from a ladder (the first m split points), within a budget of rollout forward passes, by each
    prompt's recent reward spread (`dynamic.allocate`)."""

    flag, Flags, state_name, reshapes_tree = "dynamic_allocation", AllocationFlags, "allocation", True

    def __init__(self, cfg, unit):
        super().__init__(cfg, unit)
        self.spread = dyn.SpreadAllocation(cfg.dynamic_spread_decay)

    @classmethod
    def validate(cls, cfg, num_steps, points, max_leaves):
        require(0 < cfg.dynamic_budget_ratio <= 2, f"--dynamic_budget_ratio: need (0, 2], got {cfg.dynamic_budget_ratio}")
        if cfg.dynamic_allocation:
            m = cfg.max_splits(points)
            require(1 <= m and cfg.branch_factor ** m <= max_leaves, f"--dynamic_max_splits: need 1.."
                    f"{int(math.log(max_leaves, cfg.branch_factor))} (--max_leaves {max_leaves}), got {m}")
        require(0 <= cfg.dynamic_spread_decay < 1, f"--dynamic_spread_decay: need [0, 1), got {cfg.dynamic_spread_decay}")

    def ladder(self) -> tuple[list[list[int]], list[int], int]:
        """The trees (split lists, smallest first), their rollout forward passes, the fixed tree's rung."""
        points, num_steps = self.unit.split_points, self.unit.num_steps
        ladder = dyn.tree_ladder(num_steps, points, self.cfg.max_splits(points))
        return ladder, dyn.ladder_counts(num_steps, ladder, self.cfg.branch_factor), len(points) - 1

    def rollout_budget(self, num_prompts: int) -> int:
        """Rollout forward passes per iteration and rank that the allocation may spend."""
        _, costs, default = self.ladder()
        return int(math.floor(self.cfg.dynamic_budget_ratio * num_prompts * costs[default]))

    def prompt_plans(self, iteration, prompt_ids):
        ladder, costs, default = self.ladder()
        rungs = dyn.allocate([self.spread.spread.get(p) for p in prompt_ids], costs, default,
                             self.rollout_budget(len(prompt_ids)))
        return [self.unit.tree(iteration, ladder[r]) for r in rungs]

    def observe(self, obs):
        graph = obs.graph
        spreads = distributed.all_gather_cat(dyn.prompt_spreads(graph, obs.leaf_rewards))
        ids = distributed.all_gather_cat(torch.tensor(obs.prompt_ids, dtype=torch.long)).tolist()
        self.spread.observe(ids, spreads)
        return {"allocation_leaves_per_prompt": int(graph.is_leaf.sum()) / graph.num_prompts}

    def counts(self, iteration, counts):
        ratio, (ladder, costs, default) = self.cfg.dynamic_budget_ratio, self.ladder()
        return (f"budget {ratio:g} x {costs[default]} = {ratio * costs[default]:.6g} rollout forwards per prompt "
                "(averaged over a rank's prompts); trees " + ", ".join(
                    f"[{','.join(map(str, pts))}]: {self.cfg.branch_factor ** len(pts)} leaves / {f} forwards"
                    for pts, f in zip(ladder, costs)))

    def state_dict(self):
        return self.spread.state_dict()

    def load_state_dict(self, state):
        self.spread.load_state_dict(state)


class AdaptiveSplits(BranchingPolicy):
    """The split steps move, every window of iterations, toward the steps of largest sibling spread
    (`dynamic.SplitPlacement`); their number, hence the leaves, is kept."""

    flag, Flags, state_name, reshapes_tree = "adaptive_splits", SplitFlags, "splits", True

    def __init__(self, cfg, unit):
        super().__init__(cfg, unit)
        lo, hi = cfg.split_range(unit.num_steps)
        self.placement = dyn.SplitPlacement(cfg.split_points(unit.num_steps), cfg.adaptive_split_window, lo, hi,
                                            cfg.adaptive_split_min_spacing, cfg.adaptive_split_margin)

    @classmethod
    def validate(cls, cfg, num_steps, points, max_leaves):
        require(cfg.adaptive_split_window >= 1, f"--adaptive_split_window: need >= 1, got {cfg.adaptive_split_window}")
        lo, hi = cfg.split_range(num_steps)
        require(0 <= lo <= hi <= num_steps - 2,
                f"--adaptive_split_range: need 0 <= lo <= hi <= {num_steps - 2}, got {lo},{hi}")
        require(cfg.adaptive_split_min_spacing >= 1, "--adaptive_split_min_spacing: need >= 1")
        require(cfg.adaptive_split_margin >= 0, f"--adaptive_split_margin: need >= 0, got {cfg.adaptive_split_margin}")

    def split_points(self, points):
        return list(self.placement.points)

    def observe(self, obs):
        self.placement.observe(obs.split_spread)
        return {"split_points": ",".join(map(str, self.placement.points))}

    def counts(self, iteration, counts):
        c, (lo, hi) = self.cfg, self.cfg.split_range(self.unit.num_steps)
        return (f"{len(self.placement.points)} splits (leaves fixed) within steps {lo}..{hi}, spacing >= "
                f"{c.adaptive_split_min_spacing}, moved every {c.adaptive_split_window} iterations; forwards vary "
                "with the placement")

    def state_dict(self):
        return self.placement.state_dict()

    def load_state_dict(self, state):
        self.placement.load_state_dict(state)


class AdaptiveInnovation(BranchingPolicy):
    """r of paper Eq. 2 per split, toward a target share of the leaf-reward variance within parents
    (`dynamic.InnovationControl`)."""

    flag, Flags, state_name = "adaptive_innovation", InnovationFlags, "innovation"

    def __init__(self, cfg, unit):
        super().__init__(cfg, unit)
        self.control = dyn.InnovationControl(cfg.branch_innovation, len(cfg.split_points(unit.num_steps)),
                                             cfg.innovation_target, cfg.innovation_gain, cfg.innovation_min)

    @classmethod
    def validate(cls, cfg, num_steps, points, max_leaves):
        require(0 < cfg.innovation_target < 1, f"--innovation_target: need (0, 1), got {cfg.innovation_target}")
        require(cfg.innovation_gain > 0, f"--innovation_gain: need > 0, got {cfg.innovation_gain}")
        require(0 < cfg.innovation_min <= 1, f"--innovation_min: need (0, 1], got {cfg.innovation_min}")

    def branch_innovation(self, r, points):
        return self.control.by_child_depth(points)

    def observe(self, obs):
        self.control.observe(obs.points, obs.split_spread)  # the steps the statistics were measured at
        return {"innovation_r": ",".join(f"{r:.4g}" for r in self.control.r)}

    def counts(self, iteration, counts):
        return (f"r per split in [{self.cfg.innovation_min:g}, 1] toward a within-parent variance share of "
                f"{self.cfg.innovation_target:g}; no change in forward passes")

    def state_dict(self):
        return self.control.state_dict()

    def load_state_dict(self, state):
        self.control.load_state_dict(state)


class GuidedExpansion(BranchingPolicy):
    """At each split, the nodes whose x0-prediction scores best (the training reward, batched) get K children, the
    others fewer (`dynamic.guided_children`); fusion then weights the leaves by their importance."""

    flag, Flags, reshapes_tree, pauses_at_splits = "guided_expansion", GuidedFlags, True, True

    @classmethod
    def validate(cls, cfg, num_steps, points, max_leaves):
        require(0 < cfg.guided_top_fraction <= 1, f"--guided_top_fraction: need (0, 1], got {cfg.guided_top_fraction}")
        require(1 <= cfg.guided_reduced_children < cfg.branch_factor, f"--guided_reduced_children: need 1.."
                f"{cfg.branch_factor - 1}, got {cfg.guided_reduced_children}")

    def plan(self, plan, iteration):
        """A tree of the node counts guided expansion gives (which nodes are fully expanded depends on the rewards;
        how many does not)."""
        c = self.cfg
        return dyn.guided_plan(self.unit.num_steps, self.unit.split_points, c.branch_factor, c.guided_reduced_children,
                               c.guided_top_fraction, c.tree_split_noise_scale, self.unit.sde_steps(iteration))

    @torch.no_grad()
    def at_split(self, split, scorer):
        c = self.cfg
        split.keep(dyn.guided_children(scorer(split.x0, split.prompt), split.prompt, c.guided_top_fraction,
                                       c.branch_factor, c.guided_reduced_children))

    def leaf_log_weights(self, graph):
        if self.cfg.guided_importance_weights and graph.prompt_plans is not None:
            return dyn.leaf_log_weights(graph)
        return None

    def observe(self, obs):
        """The x0-predictions decoded and scored: one per node at the steps the rollout split at."""
        return {"guided_decodes": int(torch.isin(obs.graph.step, torch.tensor(obs.points)).sum())}

    def counts(self, iteration, counts):
        points = self.unit.split_points
        full = plan_counts(self.unit.tree(iteration, points))
        decodes = sum(int((self.unit.plan(iteration).step == s).sum()) for s in points)
        return (f"{counts['forward_passes']} rollout forwards (fixed tree: {full['forward_passes']}), "
                f"{counts['leaves']} leaves, plus {decodes} decodes and reward calls of x0-predictions per prompt")


#: in the order the unit checks them, reports their budgets and calls their hooks
POLICIES: tuple[type[BranchingPolicy], ...] = (DynamicAllocation, AdaptiveSplits, AdaptiveInnovation, GuidedExpansion)

