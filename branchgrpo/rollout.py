"""Grow rollout graphs from a velocity function, depth by depth (DESIGN section 3).

All nodes of one depth - across every tree, chain and prompt of the batch - go through the velocity function
together, in micro-batches of `batch_size`; never one node at a time (the official code's batch-1 loop).
Noise is drawn per node from generators keyed by (seed, iteration, prompt, node): the same inputs give bitwise the
same graph whatever the batch size, and another iteration gives another graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from branchgrpo import sde
from branchgrpo.graph import ODE, ROOT, SDE, GraphPlan, RolloutGraph, expand_plan
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

    def edge(self, prompt: int, local_node: int) -> int:
        return mix_key(self.seed, self.iteration, "edge", self.prompt_keys[prompt], local_node)

    def split(self, prompt: int, local_parent: int) -> int:
        return mix_key(self.seed, self.iteration, "split", self.prompt_keys[prompt], local_parent)


def _evaluate(velocity_fn: VelocityFn, x: torch.Tensor, sigma_B: torch.Tensor, prompt_B: torch.Tensor,
              batch_size: int) -> torch.Tensor:
    outs = []
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        outs.append(velocity_fn(x[sl], sigma_B[sl], prompt_B[sl]).float())
    return torch.cat(outs)


@torch.no_grad()
def run_rollout(
    plan: GraphPlan,
    velocity_fn: VelocityFn,
    sigmas: torch.Tensor,
    kernel: sde.Kernel,
    noise: NoiseKeys,
    latent_shape: Sequence[int],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    branch_innovation: float = 1.0,
    keep_all_latents: bool = False,
) -> RolloutGraph:
    """Execute `plan` for every prompt of `noise.prompt_keys`; returns the filled RolloutGraph.

    Split children with `shares_noise` draw eps_k = sqrt(1 - r^2) xi_shared + r xi_k (paper Eq. 2, r =
    `branch_innovation`): each child alone is an ordinary SDE step, siblings correlate by 1 - r^2.
    Latents are kept for the nodes training and rewards need (both ends of SDE edges, leaves); all with
    `keep_all_latents`.
    """
    device = torch.device(device)
    num_prompts = len(noise.prompt_keys)
    n_local = plan.num_nodes
    nodes = expand_plan(plan, num_prompts)
    parent, step, kind, prompt = nodes["parent"], nodes["step"], nodes["kind"], nodes["prompt"]
    num_nodes = parent.numel()
    local = torch.arange(num_nodes) % n_local
    std_scale = plan.std_scale.repeat(num_prompts)
    shares_noise = plan.shares_noise.repeat(num_prompts)
    sigma32 = sigmas.to(torch.float32)
    shape = tuple(latent_shape)

    log_prob = torch.zeros(num_nodes, dtype=torch.float32)
    std = torch.zeros(num_nodes, dtype=torch.float32)
    current: dict[int, torch.Tensor] = {}  # latents of the frontier
    kept: dict[int, torch.Tensor] = {}
    keep = plan.is_leaf.repeat(num_prompts) | (kind == SDE)
    keep[parent[kind == SDE]] = True
    if keep_all_latents:
        keep[:] = True

    roots = torch.nonzero(kind == ROOT).flatten().tolist()
    root_slot = plan.root_slot.repeat(num_prompts)
    for r in roots:
        current[r] = keyed_normal(shape, noise.root(int(prompt[r]), int(root_slot[r])), device)
    forward_passes = 0
    depth = nodes["depth"]
    has_children = plan.evaluated.repeat(num_prompts)
    for d in range(int(depth.max())):
        evaluated = torch.nonzero((depth == d) & has_children).flatten()
        x = torch.stack([current[int(i)] for i in evaluated])
        v = _evaluate(velocity_fn, x, sigma32[step[evaluated]].to(device), prompt[evaluated].to(device), batch_size)
        forward_passes += evaluated.numel()
        row_of = {int(node): row for row, node in enumerate(evaluated.tolist())}

        children = torch.nonzero(depth == d + 1).flatten()
        rows = torch.tensor([row_of[int(p)] for p in parent[children]], dtype=torch.long, device=device)
        xp, vp = x[rows], v[rows]
        s_from = sigma32[step[parent[children]]].to(device)
        s_to = sigma32[step[children]].to(device)
        x_next = sde.ode_step(xp, vp, s_from, s_to)
        is_sde = kind[children] == SDE
        if bool(is_sde.any()):
            idx = torch.nonzero(is_sde).flatten()
            eps = torch.stack([_edge_noise(int(c), noise, prompt, local, parent, shares_noise, branch_innovation,
                                           shape, device) for c in children[idx]])
            step_out = sde.sde_step(xp[idx], vp[idx], s_from[idx], s_to[idx], kernel, noise=eps,
                                    std_scale=std_scale[children[idx]].to(device))
            x_next[idx] = step_out.sample
            log_prob[children[idx]] = step_out.log_prob.cpu()
            std[children[idx]] = step_out.std.cpu()
        for node in evaluated.tolist():
            if keep[node]:
                kept[node] = current[node]
            del current[node]
        for j, c in enumerate(children.tolist()):
            current[c] = x_next[j]
    for node, latent in current.items():  # leaves
        kept[node] = latent
    for r in roots:  # a root without children (T = 0 never happens) would stay in `current`
        if keep[r] and r in current:
            kept[r] = current[r]

    kept_ids = sorted(kept)
    latent_row = torch.full((num_nodes,), -1, dtype=torch.long)
    latent_row[kept_ids] = torch.arange(len(kept_ids))
    return RolloutGraph(
        plan=plan,
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
        latents=torch.stack([kept[i] for i in kept_ids]),
        latent_row=latent_row,
        num_forward_passes=forward_passes,
    )


def _edge_noise(child: int, noise: NoiseKeys, prompt, local, parent, shares_noise, r: float, shape, device):
    b = int(prompt[child])
    own = keyed_normal(shape, noise.edge(b, int(local[child])), device)
    if not bool(shares_noise[child]) or r >= 1.0:
        return own
    shared = keyed_normal(shape, noise.split(b, int(local[parent[child]])), device)
    return math.sqrt(1.0 - r * r) * shared + r * own
