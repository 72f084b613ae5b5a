"""The one rollout data type, for every algorithm: a forest of denoising states as flat tensors with parent indices.

A node is a latent at a schedule step; the edge into a node is the transition that produced it from its parent:
ROOT (no edge: initial noise), ODE (deterministic Euler step, not trainable) or SDE (a Gaussian transition with a
log-prob and a std, trainable). Everything an algorithm needs is a tensor over nodes: BranchGRPO's tree, DanceGRPO's
and MixGRPO's groups of chains, and G2RPO's ODE anchor with single-SDE-step combs are all the same type.

Two stages:
- `GraphPlan`: the topology of ONE prompt's graph (parents, steps, edge kinds), known before any model runs. The plan
  gives the honest counts (forward passes = nodes with children; leaves; trainable edges) without running anything.
- `RolloutGraph`: a plan replicated over a batch of prompts and executed (latents, log-probs, stds filled in).
Nodes are numbered so that a parent always precedes its children; within a rollout graph, prompt-major.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

ROOT, ODE, SDE = 0, 1, 2


@dataclass(frozen=True)
class GraphPlan:
    """Topology of one prompt's rollout graph (all tensors [n], long unless said otherwise)."""

    num_steps: int  # T of the schedule; leaves sit at step T
    parent: torch.Tensor  # -1 for roots
    step: torch.Tensor  # schedule index of the node: its latent is at sigma[step]
    kind: torch.Tensor  # ROOT / ODE / SDE: the edge into the node
    std_scale: torch.Tensor  # float64; multiplies the SDE std of the edge (split steps' lambda), 1 elsewhere
    shares_noise: torch.Tensor  # bool; the edge's noise mixes in a component shared with its siblings (Eq. 2)
    group: torch.Tensor  # leaf label for group-wise advantages (G2RPO's (k, granularity)); -1: left out
    root_slot: torch.Tensor  # roots: which initial noise of the prompt they start from; -1 for other nodes
    depth: torch.Tensor = field(init=False)  # edges from the root
    num_children: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        n = self.parent.numel()
        depth = torch.zeros(n, dtype=torch.long)
        for i, p in enumerate(self.parent.tolist()):  # parents precede children
            assert p < i, "plan nodes must be ordered parents first"
            depth[i] = 0 if p < 0 else depth[p] + 1
        object.__setattr__(self, "depth", depth)
        has_parent = self.parent >= 0
        counts = torch.bincount(self.parent[has_parent], minlength=n)
        object.__setattr__(self, "num_children", counts)

    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    @property
    def is_leaf(self) -> torch.Tensor:
        return self.num_children == 0

    @property
    def evaluated(self) -> torch.Tensor:
        """Nodes whose velocity is needed: every node with at least one child (one forward pass each)."""
        return self.num_children > 0


class PlanBuilder:
    """Grows a GraphPlan node by node (parents first)."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self._rows: list[tuple[int, int, int, float, bool, int, int]] = []

    def root(self, noise_slot: int = 0) -> int:
        self._rows.append((-1, 0, ROOT, 1.0, False, 0, noise_slot))
        return len(self._rows) - 1

    def edge(self, parent: int, step: int, kind: int, std_scale: float = 1.0, shares_noise: bool = False,
             group: int = 0) -> int:
        parent_step = self._rows[parent][1]
        assert kind in (ODE, SDE) and parent_step < step <= self.num_steps, (parent_step, step, kind)
        assert kind == ODE or step == parent_step + 1, "SDE edges advance one step"
        self._rows.append((parent, step, kind, std_scale, shares_noise, group, -1))
        return len(self._rows) - 1

    def set_group(self, node: int, group: int) -> None:
        row = list(self._rows[node])
        row[5] = group
        self._rows[node] = tuple(row)

    def build(self) -> GraphPlan:
        cols = list(zip(*self._rows))
        return GraphPlan(
            num_steps=self.num_steps,
            parent=torch.tensor(cols[0], dtype=torch.long),
            step=torch.tensor(cols[1], dtype=torch.long),
            kind=torch.tensor(cols[2], dtype=torch.long),
            std_scale=torch.tensor(cols[3], dtype=torch.float64),
            shares_noise=torch.tensor(cols[4], dtype=torch.bool),
            group=torch.tensor(cols[5], dtype=torch.long),
            root_slot=torch.tensor(cols[6], dtype=torch.long),
        )


@dataclass
class RolloutGraph:
    """An executed plan for a batch of prompts (all per-node tensors [N], on the CPU except `latents`)."""

    plan: GraphPlan
    num_prompts: int
    sigmas: torch.Tensor  # float64 [T + 1], the schedule the rollout used
    parent: torch.Tensor  # global node ids, -1 for roots
    step: torch.Tensor
    depth: torch.Tensor
    kind: torch.Tensor
    prompt: torch.Tensor  # which prompt of the batch (0..num_prompts-1)
    group: torch.Tensor
    log_prob: torch.Tensor  # float32: log-prob of the edge into the node under the behaviour policy (0 if not SDE)
    std: torch.Tensor  # float32: std of that edge's Gaussian kernel (0 if not SDE)
    latents: torch.Tensor  # fp32 [M, *latent_shape]: latents of the nodes with latent_row >= 0
    latent_row: torch.Tensor  # [N] row of each node in `latents`, -1 if not kept
    num_forward_passes: int = 0
    #: one plan per prompt when the prompts' graphs differ (dynamic branching); None: `plan` for every prompt
    prompt_plans: tuple[GraphPlan, ...] | None = None
    #: fp32 [M, *latent_shape] or None: rows aligned with `latents`, the behaviour kernel's mean of the SDE edge into
    #: each node (zeros for the other nodes); kept only when the loss needs it (--ratio_norm)
    means: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    def _per_node(self, name: str) -> torch.Tensor:
        if self.prompt_plans is None:
            return getattr(self.plan, name).repeat(self.num_prompts)
        return torch.cat([getattr(p, name) for p in self.prompt_plans])

    @property
    def num_children(self) -> torch.Tensor:
        return self._per_node("num_children")

    @property
    def stochastic(self) -> torch.Tensor:
        """Trainable edges: the SDE transitions (identified by their child node)."""
        return self.kind == SDE

    @property
    def is_leaf(self) -> torch.Tensor:
        return self._per_node("is_leaf")

    @property
    def std_scale(self) -> torch.Tensor:
        """float64 [N]: multiplier of each SDE edge's kernel std (split steps' lambda; 1 elsewhere)."""
        return self._per_node("std_scale")

    @property
    def leaves(self) -> torch.Tensor:
        """Global ids of the leaves (the final samples that get rewards), prompt-major."""
        return torch.nonzero(self.is_leaf).flatten()

    def node_latents(self, nodes: torch.Tensor) -> torch.Tensor:
        rows = self.latent_row[nodes]
        assert bool((rows >= 0).all()), "latent of a node that was not kept"
        return self.latents[rows.to(self.latents.device)]


def expand_plan(plan: GraphPlan, num_prompts: int) -> dict[str, torch.Tensor]:
    """Per-node tensors of `num_prompts` copies of `plan` with global node ids (prompt-major)."""
    n = plan.num_nodes
    offsets = torch.arange(num_prompts).repeat_interleave(n) * n
    parent = plan.parent.repeat(num_prompts)
    return {
        "parent": torch.where(parent >= 0, parent + offsets, parent),
        "step": plan.step.repeat(num_prompts),
        "depth": plan.depth.repeat(num_prompts),
        "kind": plan.kind.repeat(num_prompts),
        "prompt": torch.arange(num_prompts).repeat_interleave(n),
        "group": plan.group.repeat(num_prompts),
    }


def expand_plans(plans: list[GraphPlan]) -> dict[str, torch.Tensor]:
    """Like `expand_plan` for prompts with their own plans (plans[b] for prompt b), plus the per-node plan tensors
    (`std_scale`, `shares_noise`, `evaluated`, `is_leaf`, `root_slot`) the rollout needs."""
    sizes = torch.tensor([p.num_nodes for p in plans])
    offsets = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    parent = torch.cat([p.parent for p in plans])
    out = {"parent": torch.where(parent >= 0, parent + offsets, parent),
           "prompt": torch.repeat_interleave(torch.arange(len(plans)), sizes)}
    for name in ("step", "depth", "kind", "group", "std_scale", "shares_noise", "evaluated", "is_leaf", "root_slot"):
        out[name] = torch.cat([getattr(p, name) for p in plans])
    return out


def sub_plan(plan: GraphPlan, keep: torch.Tensor) -> GraphPlan:
    """The plan restricted to the nodes of bool mask `keep` (closed under parents: a kept node's parent is kept)."""
    ids = torch.nonzero(keep).flatten()
    new_id = torch.full((plan.num_nodes,), -1, dtype=torch.long)
    new_id[ids] = torch.arange(ids.numel())
    parent = plan.parent[ids]
    assert bool((keep[parent[parent >= 0]]).all()), "sub_plan: a kept node lost its parent"
    return GraphPlan(num_steps=plan.num_steps, parent=torch.where(parent >= 0, new_id[parent.clamp(min=0)], parent),
                     step=plan.step[ids], kind=plan.kind[ids], std_scale=plan.std_scale[ids],
                     shares_noise=plan.shares_noise[ids], group=plan.group[ids], root_slot=plan.root_slot[ids])


def skeleton_graph(plan: GraphPlan, num_prompts: int = 1) -> RolloutGraph:
    """A rollout graph with the plan's topology and no latents (log-probs 0): for counting, selection and tests."""
    nodes = expand_plan(plan, num_prompts)
    n = nodes["parent"].numel()
    return RolloutGraph(plan=plan, num_prompts=num_prompts, sigmas=torch.zeros(plan.num_steps + 1),
                        log_prob=torch.zeros(n), std=torch.zeros(n), latents=torch.zeros(0),
                        latent_row=torch.full((n,), -1, dtype=torch.long), **nodes)


def plan_counts(plan: GraphPlan, trained: torch.Tensor | None = None) -> dict[str, float]:
    """The honest cost figures of one prompt's graph ("NFE" in the papers' tables).

    forward_passes: transformer evaluations in the rollout (nodes with children; the official README counts nodes).
    trainable_edges: SDE transitions (the last step is deterministic and never trained).
    trained_edges: those left after selection/pruning (`trained`: bool mask over nodes = child ends of edges).
    train_forward_passes: distinct parents among trained edges (siblings share one forward in training).
    """
    leaves = int(plan.is_leaf.sum())
    forward = int(plan.evaluated.sum())
    trainable = plan.kind == SDE
    trained = trainable if trained is None else (trained & trainable)
    trained_parents = int(torch.unique(plan.parent[trained]).numel())
    num_trained = int(trained.sum())
    return {
        "leaves": leaves,
        "nodes": plan.num_nodes,
        "edges": int((plan.parent >= 0).sum()),
        "forward_passes": forward,
        "forward_passes_per_leaf": forward / leaves,
        "trainable_edges": int(trainable.sum()),
        "trainable_edges_per_leaf": int(trainable.sum()) / leaves,
        "trained_edges": num_trained,
        "trained_edges_per_leaf": num_trained / leaves,
        "train_forward_passes": trained_parents,
        "train_forward_passes_per_leaf": trained_parents / leaves,
    }


def _same_plan(a: GraphPlan, b: GraphPlan) -> bool:
    return a is b or (a.num_steps == b.num_steps and all(
        torch.equal(getattr(a, name), getattr(b, name))
        for name in ("parent", "step", "kind", "std_scale", "shares_noise", "group", "root_slot")))


def concat_graphs(graphs: Sequence[RolloutGraph]) -> RolloutGraph:
    """The graphs of consecutive chunks of a batch's prompts, rolled out one after the other, as one graph of the
    whole batch: the same per-node tensors as one rollout of the batch (node ids prompt-major, parents, prompts and
    latent rows shifted); `latents` keeps each chunk's rows in chunk order, which `latent_row` maps."""
    if len(graphs) == 1:
        return graphs[0]
    first = graphs[0]
    node_start = torch.tensor([0] + [g.num_nodes for g in graphs[:-1]]).cumsum(0).tolist()
    prompt_start = torch.tensor([0] + [g.num_prompts for g in graphs[:-1]]).cumsum(0).tolist()
    row_start = torch.tensor([0] + [g.latents.shape[0] for g in graphs[:-1]]).cumsum(0).tolist()

    def shifted(name: str, start: list[int]) -> torch.Tensor:  # ids >= 0 shifted, -1 kept
        return torch.cat([torch.where(getattr(g, name) >= 0, getattr(g, name) + s, getattr(g, name))
                          for g, s in zip(graphs, start)])

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(g, name) for g in graphs])

    shared = all(g.prompt_plans is None and _same_plan(g.plan, first.plan) for g in graphs)
    plans = None if shared else tuple(p for g in graphs for p in (g.prompt_plans or (g.plan,) * g.num_prompts))
    means = cat("means") if first.means is not None else None  # rows aligned with `latents`, like them
    return RolloutGraph(plan=first.plan, num_prompts=sum(g.num_prompts for g in graphs), sigmas=first.sigmas,
                        parent=shifted("parent", node_start), step=cat("step"), depth=cat("depth"), kind=cat("kind"),
                        prompt=torch.cat([g.prompt + s for g, s in zip(graphs, prompt_start)]), group=cat("group"),
                        log_prob=cat("log_prob"), std=cat("std"), latents=cat("latents"),
                        latent_row=shifted("latent_row", row_start),
                        num_forward_passes=sum(g.num_forward_passes for g in graphs), prompt_plans=plans,
                        means=means)
