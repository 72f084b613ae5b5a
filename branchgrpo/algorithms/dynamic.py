"""Dynamic branching (the BranchGRPO paper's future work 1): the math of the four adaptive policies of the
`branchgrpo` unit (the policy objects the unit drives are in branchgrpo.algorithms.branching), each a pure function of
logged statistics plus a small state object with `state_dict`/`load_state_dict` (saved in the checkpoint's algorithm
state; JSON-exact, so a resumed run matches an unbroken one bitwise).

    SpreadAllocation   --dynamic_allocation    per-prompt trees within a forward-pass budget, by recent reward spread
    SplitPlacement     --adaptive_splits       split steps move toward the steps of largest sibling spread
    InnovationControl  --adaptive_innovation   per-split r (paper Eq. 2) toward a target within-parent variance ratio
    guided_children    --guided_expansion      at a split, the top fraction of nodes (x0-prediction reward) get K
                                               children, the rest fewer

The statistics come from the iteration's graph: `split_spread` gives, per split step, the within-parent (sibling)
variance of the fused rewards of the split's children and its ratio to their total variance, averaged over prompts.
See docs/design_notes.md ("Dynamic branching") for each policy's effect on the estimator.
"""

from __future__ import annotations

import math

import torch

from branchgrpo.core.graph import GraphPlan, RolloutGraph, plan_counts
from branchgrpo.core.plans import tree_plan


# --- statistics --------------------------------------------------------------------------------------------------
def split_spread(graph: RolloutGraph, values: torch.Tensor) -> dict[int, tuple[float, float, int]]:
    """Per split step s: (within-parent variance of the fused values of s's children, its share of the variance of
    the prompt's leaf values, number of prompts), the first two averaged over the prompts that have the split.
    By the law of total variance the shares of all splits and of the chains after the last split sum to 1."""
    split_child = (graph.parent >= 0) & graph.num_children[graph.parent.clamp(min=0)].gt(1)
    children = torch.nonzero(split_child & torch.isfinite(values)).flatten()
    leaves = graph.leaves[torch.isfinite(values[graph.leaves])]
    parent_step = graph.step[graph.parent[children]]
    out: dict[int, tuple[float, float, int]] = {}
    for s in torch.unique(parent_step).tolist():
        c = children[parent_step == s]
        within, shares = [], []
        for b in torch.unique(graph.prompt[c]).tolist():
            cb = c[graph.prompt[c] == b]
            v = values[cb].double()
            _, inv, cnt = torch.unique(graph.parent[cb], return_inverse=True, return_counts=True)
            mean = torch.zeros(cnt.numel(), dtype=torch.float64).index_add(0, inv, v) / cnt
            w = float(((v - mean[inv]) ** 2).mean())
            leaf_v = values[leaves[graph.prompt[leaves] == b]].double()
            total = float(((leaf_v - leaf_v.mean()) ** 2).mean())
            within.append(w)
            shares.append(min(1.0, w / total) if total > 1e-12 else 0.0)
        out[int(s)] = (sum(within) / len(within), sum(shares) / len(shares), len(within))
    return out


def prompt_spreads(graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
    """float64 [num_prompts]: the std of each prompt's finite leaf rewards (NaN with fewer than two)."""
    prompt = graph.prompt[graph.leaves]
    out = torch.full((graph.num_prompts,), float("nan"), dtype=torch.float64)
    for b in range(graph.num_prompts):
        r = leaf_rewards[(prompt == b)].double()
        r = r[torch.isfinite(r)]
        if r.numel() >= 2:
            out[b] = r.std()
    return out


# --- 1. difficulty-aware allocation ------------------------------------------------------------------------------
def tree_ladder(num_steps: int, split_points: list[int], max_splits: int) -> list[list[int]]:
    """The trees allocation chooses from, smallest first: the first m split points for m = 1..max_splits, the
    default points extended past the last one with their last spacing (within the schedule's steps 0..T-2)."""
    points = sorted(split_points)
    stride = points[-1] - points[-2] if len(points) > 1 else max(1, (num_steps - 2 - points[-1]) // 2 or 1)
    while len(points) < max_splits and points[-1] + stride <= num_steps - 2:
        points.append(points[-1] + stride)
    return [points[:m] for m in range(1, min(max_splits, len(points)) + 1)]


def allocate(spreads: list[float | None], costs: list[int], default_rung: int, budget: int,
             min_spread: float = 1e-6) -> list[int]:
    """Rungs of the ladder (index into `costs`, ascending) for the prompts, total cost <= `budget` (exactly
    enforced). Every prompt starts on rung 0; a prompt on its first visit (spread None) is raised to
    `default_rung` first; then, one rung at a time, the prompt of largest spread / (rung + 1) (D'Hondt: shares
    follow the spreads) whose next rung fits the budget. Prompts with spread < min_spread stay on rung 0: their
    trees would give (near) zero advantages. Ties go to the earlier prompt: deterministic."""
    rungs = [0] * len(spreads)
    left = budget - costs[0] * len(spreads)
    if left < 0:
        raise ValueError(f"dynamic allocation: the budget {budget} is below {len(spreads)} prompts x the smallest "
                         f"tree ({costs[0]} forward passes); raise --dynamic_budget_ratio")

    def priority(b: int) -> float:
        s = spreads[b]
        if s is None:
            return math.inf if rungs[b] < default_rung else -1.0
        return s / (rungs[b] + 1) if s >= min_spread and rungs[b] + 1 < len(costs) else -1.0

    while True:
        order = sorted(range(len(spreads)), key=lambda b: (-priority(b), b))
        chosen = next((b for b in order if priority(b) >= 0 and costs[rungs[b] + 1] - costs[rungs[b]] <= left), None)
        if chosen is None:
            return rungs
        left -= costs[rungs[chosen] + 1] - costs[rungs[chosen]]
        rungs[chosen] += 1


class SpreadAllocation:
    """Per-prompt reward spread history (an exponential moving average of the leaf-reward std, per dataset row)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.spread: dict[int, float] = {}

    def observe(self, prompt_ids: list[int], spreads: torch.Tensor) -> None:
        for pid, s in zip(prompt_ids, spreads.tolist()):
            if math.isfinite(s):
                old = self.spread.get(pid)
                self.spread[pid] = s if old is None else self.decay * old + (1 - self.decay) * s

    def state_dict(self) -> dict:
        return {"spread": [[k, v] for k, v in sorted(self.spread.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.spread = {int(k): float(v) for k, v in state["spread"]}


# --- 2. adaptive split placement ---------------------------------------------------------------------------------
def place_splits(points: list[int], profile: dict[int, float], lo: int, hi: int, min_spacing: int,
                 margin: float) -> list[int]:
    """Move each split step by at most one toward a neighbouring step of larger sibling spread: the profile is
    interpolated between observed steps (linearly extended beyond them), and a move needs a relative gain over
    `margin`. Steps
    stay in [lo, hi] and at least `min_spacing` apart; their number (hence the leaves) is unchanged."""
    if not profile:
        return list(points)
    known = sorted(profile)

    def at(s: int) -> float:  # linear between observed steps, extended linearly past the outer two
        if s in profile or len(known) == 1:
            return profile.get(s, profile[known[0]])
        if s < known[0]:
            a, b = known[0], known[1]
        elif s > known[-1]:
            a, b = known[-2], known[-1]
        else:
            a, b = max(k for k in known if k < s), min(k for k in known if k > s)
        return profile[a] + (profile[b] - profile[a]) * (s - a) / (b - a)

    out = list(points)
    for j, s in enumerate(out):
        best, best_gain = s, at(s) * (1 + margin) + 1e-12
        for cand in (s - 1, s + 1):
            left_ok = j == 0 or cand - out[j - 1] >= min_spacing
            right_ok = j == len(out) - 1 or out[j + 1] - cand >= min_spacing
            if lo <= cand <= hi and left_ok and right_ok and at(cand) > best_gain:
                best, best_gain = cand, at(cand)
        out[j] = best
    return out


class SplitPlacement:
    """The current split steps and a window of per-step sibling spreads; moves every `window` iterations."""

    def __init__(self, points: list[int], window: int, lo: int, hi: int, min_spacing: int, margin: float):
        self.points, self.window = list(points), window
        self.lo, self.hi, self.min_spacing, self.margin = lo, hi, min_spacing, margin
        self.history: list[list[list[float]]] = []  # per iteration: [[step, within-parent variance], ...]

    def observe(self, spread: dict[int, tuple[float, float]]) -> bool:
        """Record one iteration; returns whether the splits moved."""
        self.history.append([[s, w] for s, (w, *_) in sorted(spread.items())])
        if len(self.history) < self.window:
            return False
        sums: dict[int, list[float]] = {}
        for row in self.history:
            for s, w in row:
                sums.setdefault(int(s), []).append(w)
        self.history = []
        profile = {s: sum(v) / len(v) for s, v in sums.items()}
        new = place_splits(self.points, profile, self.lo, self.hi, self.min_spacing, self.margin)
        moved, self.points = new != self.points, new
        return moved

    def state_dict(self) -> dict:
        return {"points": list(self.points), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.points = [int(p) for p in state["points"]]
        self.history = [[[int(s), float(w)] for s, w in row] for row in state["history"]]


# --- 3. adaptive sibling correlation -----------------------------------------------------------------------------
def adapt_innovation(r: float, ratio: float, target: float, gain: float, r_min: float) -> float:
    """One step of r <- clip(r exp(gain (target - ratio)), r_min, 1): siblings too alike (their within-parent
    variance a smaller share of the leaf-reward variance than `target`) -> larger r (more independent noise); too
    different -> smaller r (siblings share more noise: sharper comparisons between them)."""
    return min(1.0, max(r_min, r * math.exp(gain * (target - ratio))))


class InnovationControl:
    """r per split (by its index in the split list, so it follows a split that moves)."""

    def __init__(self, r0: float, num_splits: int, target: float, gain: float, r_min: float):
        self.r = [float(r0)] * num_splits
        self.target, self.gain, self.r_min = target, gain, r_min

    def observe(self, points: list[int], spread: dict[int, tuple[float, float]]) -> None:
        for j, s in enumerate(points):
            if s in spread:
                self.r[j] = adapt_innovation(self.r[j], spread[s][1], self.target, self.gain, self.r_min)

    def by_child_depth(self, points: list[int]) -> dict[int, float]:
        return {s + 1: r for s, r in zip(points, self.r)}

    def state_dict(self) -> dict:
        return {"r": list(self.r)}

    def load_state_dict(self, state: dict) -> None:
        self.r = [float(r) for r in state["r"]]


# --- 4. reward-guided expansion ----------------------------------------------------------------------------------
def guided_children(scores: torch.Tensor, prompt: torch.Tensor, top_fraction: float, full: int, reduced: int):
    """Children per split node: within each prompt, the ceil(top_fraction n) best-scored nodes get `full`, the rest
    `reduced` (ties: the earlier node). Non-finite scores rank last."""
    out = torch.full_like(prompt, reduced)
    key = torch.where(torch.isfinite(scores), scores.double(), torch.full_like(scores.double(), -math.inf))
    for b in torch.unique(prompt).tolist():
        idx = torch.nonzero(prompt == b).flatten()
        n_top = math.ceil(top_fraction * idx.numel())
        order = sorted(range(idx.numel()), key=lambda i: (-float(key[idx[i]]), i))
        out[idx[order[:n_top]]] = full
    return out


def guided_plan(num_steps: int, points: list[int], full: int, reduced: int, top_fraction: float,
                split_noise_scale: float = 1.0, sde_steps=None) -> GraphPlan:
    """A plan with guided expansion's node counts (which nodes are expanded depends on the rewards, how many does
    not): the first ceil(top_fraction n) nodes of each split get `full` children. For counts and budgets."""
    from branchgrpo.core.graph import ODE, SDE, PlanBuilder

    splits, sde = set(points), None if sde_steps is None else set(sde_steps) | set(points)
    b = PlanBuilder(num_steps)
    frontier = [b.root()]
    for i in range(num_steps):
        nxt = []
        n_top = math.ceil(top_fraction * len(frontier))
        for k, node in enumerate(frontier):
            if i in splits:
                nxt += [b.edge(node, i + 1, SDE, std_scale=split_noise_scale, shares_noise=True)
                        for _ in range(full if k < n_top else reduced)]
            else:
                last = i == num_steps - 1 or (sde is not None and i not in sde)
                nxt.append(b.edge(node, i + 1, ODE if last else SDE))
        frontier = nxt
    return b.build()


def leaf_log_weights(graph: RolloutGraph) -> torch.Tensor:
    """Importance log-weights of the leaves for fusion under guided expansion: log prod over the leaf's ancestors a
    of 1 / children(a), shifted so the largest is 0. Weighted means over the leaves below a node then equal the
    recursive mean of its children's values (each child stands for its share of the full tree); with every node
    expanded alike all weights are exactly 0 and fusion is the plain one."""
    lw = -torch.log(graph.num_children.clamp(min=1).double())
    cum = torch.zeros(graph.num_nodes, dtype=torch.float64)
    for d in range(1, int(graph.depth.max()) + 1):
        at = torch.nonzero(graph.depth == d).flatten()
        cum[at] = cum[graph.parent[at]] + lw[graph.parent[at]]
    out = cum[graph.leaves]
    return out - out.max()


def ladder_counts(num_steps: int, ladder: list[list[int]], branch_factor: int) -> list[int]:
    return [int(plan_counts(tree_plan(num_steps, pts, branch_factor))["forward_passes"]) for pts in ladder]
