"""Grow rollout graphs from a velocity function, depth by depth (DESIGN section 3).

All nodes of one depth - across every tree, chain and prompt of the batch - go through the velocity function
together, in micro-batches of `batch_size`; never one node at a time (the official code's batch-1 loop).
Noise comes from generators keyed by (seed, iteration, prompt, depth), one row per node of that prompt and depth
in plan order - i.e. keyed by (seed, iteration, prompt, node): the same inputs give bitwise the same graph whatever
the rollout batch size or the batch's other prompts, and another iteration gives another graph.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from branchgrpo import sde
from branchgrpo.graph import SDE, GraphPlan, RolloutGraph, expand_plans, sub_plan
from branchgrpo.seeding import keyed_normal, mix_key

# velocity_fn(latents [B, ...] fp32, sigmas [B] fp32, prompt index [B] long) -> velocity [B, ...] fp32
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NoiseKeys:
    """Where a rollout's randomness comes from.

    `prompt_keys[b]` identifies prompt b of the batch for seeding (its global sample index, unique per iteration
    across ranks). `shared_root_key` set (`--init_same_noise`): every root of the batch starts from that one noise.
    """

    seed: int
    iteration: int
    prompt_keys: tuple[int, ...]
    shared_root_key: int | None = None

    def root(self, prompt: int, slot: int) -> int:
        if self.shared_root_key is not None:
            return mix_key(self.seed, self.iteration, "root-shared", self.shared_root_key)
        return mix_key(self.seed, self.iteration, "root", self.prompt_keys[prompt], slot)

    def edge(self, prompt: int, depth: int) -> int:
        """Own noise of the SDE edges into the prompt's nodes at `depth` (one draw, a row per edge)."""
        return mix_key(self.seed, self.iteration, "edge", self.prompt_keys[prompt], depth)

    def split(self, prompt: int, depth: int) -> int:
        """Sibling-shared noise of the splits whose parents sit at `depth` (a row per split parent)."""
        return mix_key(self.seed, self.iteration, "split", self.prompt_keys[prompt], depth)


def _evaluate(velocity_fn: VelocityFn, x: torch.Tensor, sigma_B: torch.Tensor, prompt_B: torch.Tensor,
              batch_size: int) -> torch.Tensor:
    outs = []
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        outs.append(velocity_fn(x[sl], sigma_B[sl], prompt_B[sl]).float())
    return torch.cat(outs)


# expand(parents [n] global ids, x0_hat [n, ...], prompt [n]) -> children to keep [n] long: guided expansion's hook,
# called at each split with the split parents whose velocities were just evaluated (branchgrpo.algorithms.dynamic)
ExpandFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def run_rollout(
    plan: GraphPlan | Sequence[GraphPlan],
    velocity_fn: VelocityFn,
    sigmas: torch.Tensor,
    kernel: sde.Kernel,
    noise: NoiseKeys,
    latent_shape: Sequence[int],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    branch_innovation: float | Mapping[int, float] = 1.0,
    keep_all_latents: bool = False,
    expand: ExpandFn | None = None,
) -> RolloutGraph:
    """Execute `plan` for every prompt of `noise.prompt_keys`; returns the filled RolloutGraph.

    `plan` may be a sequence with one plan per prompt (dynamic allocation). Split children (`shares_noise`) draw
    eps_k = sqrt(1 - r^2) xi_shared + r xi_k (paper Eq. 2, r = `branch_innovation`, a float or a map from the
    children's depth to r): each child alone is an ordinary SDE step, and siblings correlate by 1 - r^2.
    `expand` (guided expansion): at each split, keeps only the first `expand(...)` children of each split parent;
    the dropped children and their subtrees are never run, and the returned graph holds the prompts' reduced plans.
    Latents are kept for the nodes training and rewards need (both ends of SDE edges, and leaves); all of them with
    `keep_all_latents`.
    """
    device = torch.device(device)
    num_prompts = len(noise.prompt_keys)
    plans = [plan] * num_prompts if isinstance(plan, GraphPlan) else list(plan)
    assert len(plans) == num_prompts, (len(plans), num_prompts)
    nodes = expand_plans(plans)
    parent, step, kind, prompt, depth = (nodes[k] for k in ("parent", "step", "kind", "prompt", "depth"))
    num_nodes = parent.numel()
    std_scale, shares_noise, has_children = nodes["std_scale"], nodes["shares_noise"], nodes["evaluated"]
    sigma32 = sigmas.to(torch.float32)
    shape = tuple(latent_shape)
    alive = torch.ones(num_nodes, dtype=torch.bool)

    keep = nodes["is_leaf"] | (kind == SDE)
    keep[parent[kind == SDE]] = True
    if keep_all_latents:
        keep[:] = True
    log_prob = torch.zeros(num_nodes, dtype=torch.float32)
    std = torch.zeros(num_nodes, dtype=torch.float32)

    # level d holds the latents of every node at depth d, in node-id order
    level_ids = torch.nonzero(depth == 0).flatten()
    root_slot = nodes["root_slot"]
    level_x = torch.stack([keyed_normal(shape, noise.root(int(prompt[r]), int(root_slot[r])), device)
                           for r in level_ids.tolist()])
    kept_ids, kept_x = [], []
    forward_passes = 0
    for d in range(int(depth.max()) + 1):
        keep_rows = keep[level_ids]
        kept_ids.append(level_ids[keep_rows])
        kept_x.append(level_x[keep_rows.to(device)])
        children = torch.nonzero(depth == d + 1).flatten()
        orphan = ~alive[parent[children]]  # below a child that guided expansion dropped
        alive[children[orphan]] = False
        children = children[~orphan]
        if children.numel() == 0:
            break
        evaluated = has_children[level_ids]
        ev_ids, ev_x = level_ids[evaluated], level_x[evaluated.to(device)]
        v = _evaluate(velocity_fn, ev_x, sigma32[step[ev_ids]].to(device), prompt[ev_ids].to(device), batch_size)
        forward_passes += ev_ids.numel()
        if expand is not None and bool(shares_noise[children].any()):
            children = _expand(expand, children, parent, shares_noise, ev_ids, ev_x, v, sigma32, step, prompt, alive)

        row_of = torch.full((num_nodes,), -1, dtype=torch.long)
        row_of[ev_ids] = torch.arange(ev_ids.numel())
        rows = row_of[parent[children]].to(device)
        xp, vp = ev_x[rows], v[rows]
        s_from, s_to = sigma32[step[parent[children]]].to(device), sigma32[step[children]].to(device)
        level_x = sde.ode_step(xp, vp, s_from, s_to)
        is_sde = kind[children] == SDE
        if bool(is_sde.any()):
            idx = torch.nonzero(is_sde).flatten()
            c = children[idx]
            r = branch_innovation if isinstance(branch_innovation, float | int) else branch_innovation.get(d + 1, 1.0)
            eps = _edge_noise(c, parent, prompt, depth, shares_noise, noise, float(r), shape, device)
            out = sde.sde_step(xp[idx], vp[idx], s_from[idx], s_to[idx], kernel, noise=eps,
                               std_scale=std_scale[c].to(device))
            level_x[idx.to(device)] = out.sample
            log_prob[c] = out.log_prob.cpu()
            std[c] = out.std.cpu()
        level_ids = children

    ids = torch.cat(kept_ids)
    order = torch.argsort(ids)
    latent_row = torch.full((num_nodes,), -1, dtype=torch.long)
    latent_row[ids[order]] = torch.arange(ids.numel())
    graph = RolloutGraph(
        plan=plans[0],
        num_prompts=num_prompts,
        sigmas=sigmas,
        parent=parent,
        step=step,
        depth=depth,
        kind=kind,
        prompt=prompt,
        group=nodes["group"],
        log_prob=log_prob,
        std=std,
        latents=torch.cat(kept_x)[order.to(device)],
        latent_row=latent_row,
        num_forward_passes=forward_passes,
        prompt_plans=None if isinstance(plan, GraphPlan) and bool(alive.all()) else tuple(plans),
    )
    return graph if bool(alive.all()) else _alive_subgraph(graph, alive)


def _expand(expand: ExpandFn, children, parent, shares_noise, ev_ids, ev_x, v, sigma32, step, prompt, alive):
    """Guided expansion at one split: ask `expand` how many children each split parent keeps; mark the rest dead."""
    split_parents = torch.unique(parent[children[shares_noise[children]]])
    rows = torch.nonzero(torch.isin(ev_ids, split_parents)).flatten()
    x0 = sde.predict_x0(ev_x[rows.to(ev_x.device)], v[rows.to(v.device)], sigma32[step[ev_ids[rows]]].to(v.device))
    num_keep = expand(ev_ids[rows], x0, prompt[ev_ids[rows]]).to(torch.long).cpu()
    limit = torch.full((alive.numel(),), 1 << 30, dtype=torch.long)
    limit[ev_ids[rows]] = num_keep.clamp(min=1)
    # rank of each child among its siblings (siblings are consecutive in node-id order)
    first = torch.ones_like(children, dtype=torch.bool)
    first[1:] = parent[children[1:]] != parent[children[:-1]]
    start = torch.cummax(torch.where(first, torch.arange(children.numel()), torch.zeros_like(children)), 0).values
    rank = torch.arange(children.numel()) - start
    live = rank < limit[parent[children]]
    alive[children[~live]] = False
    return children[live]


def _alive_subgraph(graph: RolloutGraph, alive: torch.Tensor) -> RolloutGraph:
    """The rollout graph without the nodes guided expansion dropped (never run): per-prompt reduced plans."""
    ids = torch.nonzero(alive).flatten()
    new_id = torch.full((alive.numel(),), -1, dtype=torch.long)
    new_id[ids] = torch.arange(ids.numel())
    parent = graph.parent[ids]
    plans = tuple(sub_plan(p, alive[graph.prompt == b]) for b, p in enumerate(graph.prompt_plans))
    return dataclasses.replace(
        graph, parent=torch.where(parent >= 0, new_id[parent.clamp(min=0)], parent), step=graph.step[ids],
        depth=graph.depth[ids], kind=graph.kind[ids], prompt=graph.prompt[ids], group=graph.group[ids],
        log_prob=graph.log_prob[ids], std=graph.std[ids], latent_row=graph.latent_row[ids], plan=plans[0],
        prompt_plans=plans)


def _edge_noise(children, parent, prompt, depth, shares_noise, noise: NoiseKeys, r: float, shape, device):
    """Noise of the SDE edges into `children` (all at one depth, in node-id order, hence grouped by prompt): one
    keyed draw per (prompt, depth) for the children's own components, and one per (prompt, depth) for the
    components that the siblings of a split share."""
    d = int(depth[children[0]])
    prompts, counts = torch.unique_consecutive(prompt[children], return_counts=True)
    own = torch.cat([keyed_normal((n, *shape), noise.edge(b, d), device)
                     for b, n in zip(prompts.tolist(), counts.tolist())])
    mix = shares_noise[children] & (r < 1.0)
    if not bool(mix.any()):
        return own
    shared_rows, which = torch.unique_consecutive(parent[children], return_inverse=True)
    per_prompt = torch.unique_consecutive(prompt[shared_rows], return_counts=True)
    shared = torch.cat([keyed_normal((n, *shape), noise.split(b, d - 1), device)
                        for b, n in zip(per_prompt[0].tolist(), per_prompt[1].tolist())])
    mixed = math.sqrt(1.0 - r * r) * shared[which.to(device)] + r * own
    return torch.where(mix.to(device).reshape(-1, *([1] * len(shape))), mixed, own)
