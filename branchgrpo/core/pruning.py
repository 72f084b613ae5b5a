"""Which edges are trained (DESIGN sections 5-6): masks over the child nodes of a rollout graph, and the schedules
that move windows with the TRAINING ITERATION. Pruning never changes rollouts or rewards, only the loss's edges.

Every schedule is a pure function of the iteration with `state_dict()` / `load_state_dict()`: the state records the
schedule's settings and the last iteration it served, so a resumed run continues the same trajectory and a resume
with changed schedule flags is refused instead of silently jumping.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from branchgrpo.core.graph import RolloutGraph
from branchgrpo.core.seeding import keyed_permutation, mix_key

# ----------------------------------------------------------------------------------------------------------------
# Masks (True = the edge into this node is kept)
# ----------------------------------------------------------------------------------------------------------------


def ancestor_at_step(graph: RolloutGraph, step: int) -> torch.Tensor:
    """For each node at or below `step`, its ancestor (or itself) whose step is exactly `step`; -1 otherwise."""
    out = torch.full((graph.num_nodes,), -1, dtype=torch.long)
    at = graph.step == step
    out[at] = torch.nonzero(at).flatten()
    for d in range(1, int(graph.depth.max()) + 1):  # parents are resolved before their children
        nodes = torch.nonzero((graph.depth == d) & (graph.step > step)).flatten()
        out[nodes] = out[graph.parent[nodes]]
    return out


def depth_pruning_mask(graph: RolloutGraph, pruned_depths: Sequence[int]) -> torch.Tensor:
    """Drop the edges whose child depth is in `pruned_depths`."""
    if not pruned_depths:
        return torch.ones(graph.num_nodes, dtype=torch.bool)
    return ~torch.isin(graph.depth, torch.tensor(sorted(pruned_depths), dtype=torch.long))


def parent_top1_mask(graph: RolloutGraph, advantages: torch.Tensor, split_step: int) -> torch.Tensor:
    """Width pruning mode 1 (Parent-Top1): at the last split step, each parent keeps only its best child (highest
    fused value, i.e. highest advantage at that depth); the edges of the other children's subtrees - the split edge
    into them included - are dropped. Edges above the split are kept."""
    chain_head = ancestor_at_step(graph, split_step + 1)  # the child of the split each post-split node descends from
    heads = torch.nonzero(graph.step == split_step + 1).flatten()
    score = torch.nan_to_num(advantages[heads].to(torch.float64), nan=-float("inf"))
    parents = graph.parent[heads]
    best = torch.full((graph.num_nodes,), -float("inf"), dtype=torch.float64).scatter_reduce(
        0, parents, score, reduce="amax"
    )
    is_best = score == best[parents]
    # ties (equal values): keep the first child only, so exactly one child per parent survives
    first = torch.full((graph.num_nodes,), graph.num_nodes, dtype=torch.long).scatter_reduce(
        0, parents, torch.where(is_best, heads, torch.full_like(heads, graph.num_nodes)), reduce="amin"
    )
    winner = torch.zeros(graph.num_nodes, dtype=torch.bool)
    winner[first[parents[is_best]]] = True
    return (graph.step <= split_step) | winner[chain_head.clamp(min=0)] & (chain_head >= 0)


def extreme_mask(graph: RolloutGraph, advantages: torch.Tensor, split_step: int, ratio: float) -> torch.Tensor:
    """Width pruning mode 2 (Extreme): in each prompt's tree keep the post-split chains of the best and worst leaves
    (max(2, floor(ratio * leaves)) of them: floor(keep / 2) best, the rest worst; ranked by leaf advantage, which
    orders leaves like their rewards). Edges above the last split are kept."""
    leaves = graph.leaves
    keep_leaf = torch.zeros(graph.num_nodes, dtype=torch.bool)
    for b in range(graph.num_prompts):
        mine = leaves[graph.prompt[leaves] == b]
        score = advantages[mine].to(torch.float64)
        mine, score = mine[torch.isfinite(score)], score[torch.isfinite(score)]
        order = mine[torch.argsort(score, descending=True, stable=True)]
        keep = min(max(2, int(ratio * mine.numel())), mine.numel())
        num_best = keep // 2
        keep_leaf[order[:num_best]] = True
        keep_leaf[order[order.numel() - (keep - num_best):]] = True
    # a post-split node lies on exactly one leaf's chain: mark the chains of the kept leaves
    on_kept = keep_leaf.clone()
    for d in range(int(graph.depth.max()), 0, -1):
        nodes = torch.nonzero((graph.depth == d) & on_kept).flatten()
        on_kept[graph.parent[nodes]] |= True
    return (graph.step <= split_step) | on_kept


def timestep_fraction_mask(graph: RolloutGraph, fraction: float, seed: int, iteration: int,
                           prompt_keys: Sequence[int]) -> torch.Tensor:
    """DanceGRPO: each chain trains a random floor(fraction * its trainable edges) subset of its SDE edges (a fresh
    subset per chain and iteration, keyed like the rollout noise)."""
    keep = torch.zeros(graph.num_nodes, dtype=torch.bool)
    stochastic = graph.stochastic
    for leaf in graph.leaves.tolist():
        chain, node = [], leaf
        while node >= 0:
            if bool(stochastic[node]):
                chain.append(node)
            node = int(graph.parent[node])
        chain.reverse()
        n_keep = int(fraction * len(chain) + 1e-9)
        perm = keyed_permutation(len(chain), mix_key(seed, iteration, "tf", prompt_keys[int(graph.prompt[leaf])], leaf))
        keep[[chain[i] for i in perm[:n_keep].tolist()]] = True
    return keep


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


class _Schedule:
    """State = settings + last iteration served; settings must match on load (as JSON values: tuples are lists).
    `max_train_steps` may change on resume (training longer is legitimate); the new value applies."""

    last_iteration: int = -1

    _not_compared = ("last_iteration", "max_train_steps")

    def settings(self) -> dict:
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in self._not_compared}))

    def state_dict(self) -> dict:
        return {"settings": self.settings(), "last_iteration": self.last_iteration}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state["settings"].items() if k not in self._not_compared}
        if saved != self.settings():
            raise ValueError(
                f"resume: {type(self).__name__} settings changed since the checkpoint "
                f"({state['settings']} -> {self.settings()}); resume with the original flags"
            )
        self.last_iteration = state["last_iteration"]


@dataclass
class WindowSchedule(_Schedule):
    """MixGRPO's sliding SDE window (also BranchGRPO-Mix's): steps [c, c + size), where c starts at `start`, advances
    by `stride` every `interval` iterations, and rolls back to `start` once it passes `max_start`."""

    size: int
    interval: int
    stride: int
    start: int
    max_start: int
    last_iteration: int = -1

    def window(self, iteration: int) -> list[int]:
        self.last_iteration = iteration
        positions = (self.max_start - self.start) // self.stride + 1 if self.stride > 0 else 1
        c = self.start + ((iteration // self.interval) % positions) * self.stride
        return list(range(c, c + self.size))


@dataclass
class DepthPruningSchedule(_Schedule):
    """Depth pruning with an optional sliding window (DESIGN section 5): the pruned depths move one depth every
    `interval` iterations towards `stop_depth` (the direction follows from where the stop lies) and stay there.
    Active only while iteration < step_ratio * max_train_steps."""

    depths: tuple[int, ...]
    slide: bool
    interval: int
    stop_depth: int | None
    step_ratio: float
    max_train_steps: int
    last_iteration: int = -1

    def active(self, iteration: int) -> bool:
        return iteration < self.step_ratio * self.max_train_steps

    def pruned_depths(self, iteration: int) -> list[int]:
        self.last_iteration = iteration
        if not self.depths or not self.active(iteration):
            return []
        if not self.slide or self.stop_depth is None:
            return list(self.depths)
        lo, hi = min(self.depths), max(self.depths)
        if self.stop_depth < lo:  # towards noisier steps, like the official script's "15,16,17,18" -> 9
            shift = -min(iteration // self.interval, lo - self.stop_depth)
        else:  # towards later steps, as the paper's text describes
            shift = min(iteration // self.interval, max(0, self.stop_depth - hi))
        return [d + shift for d in self.depths]
