"""Grow rollout graphs from a velocity function, depth by depth (DESIGN section 3).

All nodes of one depth - across every tree, chain and prompt of the batch - go through the velocity function
together, in micro-batches of `batch_size`; never one node at a time (the official code's batch-1 loop).
Noise comes from generators keyed by (seed, iteration, prompt, depth), one row per node of that prompt and depth
in plan order - i.e. keyed by (seed, iteration, prompt, node): the same inputs give bitwise the same graph whatever
the rollout batch size or the batch's other prompts, and another iteration gives another graph.

`run_rollout` grows a plan to the end. A `Rollout` (started from a `RolloutSetup`, what the trainer hands the
algorithm unit) can also pause at each split (`next_split`), for its caller to keep fewer children there
(`Split.keep`) before it goes on: guided expansion steps it so, with no callback into the rollout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from branchgrpo.core import sde
from branchgrpo.core.graph import SDE, GraphPlan, RolloutGraph, expand_plans, sub_plan
from branchgrpo.core.seeding import keyed_generator, keyed_normal, mix_key
from branchgrpo.core.transfer import to_device_once

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
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass
class _Depth:
    """One depth of a rollout, laid out on the host before the rollout runs: the level's nodes, which of them are
    stored and evaluated, and the transitions into the next level. `dev` holds the index and sigma tensors the
    loop needs on the device (moved there in one copy, `transfer.to_device_once`); a missing entry means "all
    rows, in order", so the loop skips that gather. The loop itself then only launches device work: no host sync."""

    depth: int
    ids: torch.Tensor  # host [n]: the level's node ids, in node-id order
    stored_ids: torch.Tensor  # host: those whose latents are stored
    dev: dict = dataclasses.field(default_factory=dict)
    ev_ids: torch.Tensor | None = None  # host: the evaluated nodes
    children: torch.Tensor | None = None  # host: the next level's node ids; None at the last level
    sde_ids: torch.Tensor | None = None  # host: the children entered by an SDE edge
    kinds: str = ""  # transitions into the children: "sde", "ode" or "mixed"
    own_draws: list = dataclasses.field(default_factory=list)  # [(prompt, rows)]: own noise, one draw per prompt
    shared_draws: list = dataclasses.field(default_factory=list)  # [(prompt, rows)]: split-shared noise
    innovation: float = 1.0


def _layout(nodes: dict, alive: torch.Tensor, keep: torch.Tensor, level_ids: torch.Tensor, depth: int,
            sigma32: torch.Tensor, branch_innovation, by_depth: list[torch.Tensor]) -> list[_Depth]:
    """The depths from `depth` (whose nodes are `level_ids`) down; nodes below a dead one are marked dead."""
    parent, step, kind, prompt = nodes["parent"], nodes["step"], nodes["kind"], nodes["prompt"]
    row_of = torch.full((parent.numel(),), -1, dtype=torch.long)
    out = []
    for d in range(depth, len(by_depth)):
        stored = keep[level_ids]
        lv = _Depth(d, level_ids, level_ids[stored])
        out.append(lv)
        if not bool(stored.all()):
            lv.dev["keep"] = torch.nonzero(stored).flatten()
        children = by_depth[d + 1] if d + 1 < len(by_depth) else by_depth[d][:0]
        children = children[alive[children]]
        orphan = ~alive[parent[children]]  # below a child dropped at a split (`Split.keep`)
        alive[children[orphan]] = False
        children = children[~orphan]
        if children.numel() == 0:
            break
        evaluated = nodes["evaluated"][level_ids]
        lv.ev_ids, lv.children = level_ids[evaluated], children
        if not bool(evaluated.all()):
            lv.dev["evaluated"] = torch.nonzero(evaluated).flatten()
        lv.dev["ev_sigma"], lv.dev["ev_prompt"] = sigma32[step[lv.ev_ids]], prompt[lv.ev_ids]
        row_of[lv.ev_ids] = torch.arange(lv.ev_ids.numel())
        rows = row_of[parent[children]]
        if not torch.equal(rows, torch.arange(lv.ev_ids.numel())):
            lv.dev["rows"] = rows
        lv.dev["s_from"], lv.dev["s_to"] = sigma32[step[parent[children]]], sigma32[step[children]]
        is_sde = kind[children] == SDE
        lv.kinds = "sde" if bool(is_sde.all()) else "mixed" if bool(is_sde.any()) else "ode"
        if lv.kinds != "ode":
            _noise_layout(lv, nodes, is_sde, branch_innovation)
        level_ids = children
    return out


def _noise_layout(lv: _Depth, nodes: dict, is_sde: torch.Tensor, branch_innovation) -> None:
    """Where the noise of the SDE edges into the level's children comes from (see `_edge_noise`)."""
    parent, prompt = nodes["parent"], nodes["prompt"]
    sde_ids = lv.children[is_sde]
    lv.sde_ids = sde_ids
    if lv.kinds == "mixed":
        lv.dev["sde_rows"] = torch.nonzero(is_sde).flatten()
    lv.dev["std_scale"] = nodes["std_scale"][sde_ids]
    prompts, counts = torch.unique_consecutive(prompt[sde_ids], return_counts=True)
    lv.own_draws = list(zip(prompts.tolist(), counts.tolist()))
    r = branch_innovation
    lv.innovation = float(r if isinstance(r, float | int) else r.get(lv.depth + 1, 1.0))
    mix = nodes["shares_noise"][sde_ids] & (lv.innovation < 1.0)
    if not bool(mix.any()):
        return
    shared_rows, which = torch.unique_consecutive(parent[sde_ids], return_inverse=True)
    prompts, counts = torch.unique_consecutive(prompt[shared_rows], return_counts=True)
    lv.shared_draws = list(zip(prompts.tolist(), counts.tolist()))
    lv.dev["which"] = which
    if not bool(mix.all()):
        lv.dev["mix_rows"] = torch.nonzero(mix).flatten()
        lv.dev["which"] = which[lv.dev["mix_rows"]]


# laid-out rollouts by (plans, sigmas, innovation, keep_all_latents) and device: a training run lays out its plan
# once, not every iteration (the layouts of a rollout that pauses at splits depend on what is kept there, and are
# never kept)
_LAYOUTS: dict[tuple, list[_Depth]] = {}
_MAX_LAYOUTS = 8


def _fingerprint(plans: list[GraphPlan], sigma32: torch.Tensor, branch_innovation, keep_all: bool) -> bytes:
    """A digest of everything a layout depends on (the plans' content, not their identity)."""
    digest, seen = hashlib.blake2b(digest_size=16), {}
    for p in plans:
        if id(p) not in seen:
            one = hashlib.blake2b(f"{p.num_steps},{p.num_nodes}".encode(), digest_size=16)
            for t in (p.parent, p.step, p.kind, p.std_scale, p.shares_noise, p.group, p.root_slot):
                one.update(t.numpy().tobytes())
            seen[id(p)] = one.digest()
        digest.update(seen[id(p)])
    r = branch_innovation
    digest.update(sigma32.cpu().numpy().tobytes())
    digest.update(repr((keep_all, sorted(r.items()) if isinstance(r, Mapping) else float(r))).encode())
    return digest.digest()


def _prepare(plans, nodes, alive, sigma32, branch_innovation, keep_all_latents: bool, device, cache: bool):
    """(levels, keep, by_depth): the rollout's layout, from the cache if `cache` and laid out before, plus the
    stored-latent mask and the node ids per depth that re-layouts after a `Split.keep` need (None from the cache)."""
    key = (_fingerprint(plans, sigma32, branch_innovation, keep_all_latents), str(device))
    if cache and key in _LAYOUTS:
        return list(_LAYOUTS[key]), None, None
    parent, kind, depth = nodes["parent"], nodes["kind"], nodes["depth"]
    keep = nodes["is_leaf"] | (kind == SDE)
    keep[parent[kind == SDE]] = True
    if keep_all_latents:
        keep[:] = True
    by_depth = [torch.nonzero(depth == d).flatten() for d in range(int(depth.max()) + 1)]
    levels = _layout(nodes, alive, keep, by_depth[0], 0, sigma32, branch_innovation, by_depth)
    to_device_once([lv.dev for lv in levels], device)
    if cache:
        _LAYOUTS[key] = levels
        while len(_LAYOUTS) > _MAX_LAYOUTS:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
    return list(levels), keep, by_depth  # a copy: a `Split.keep` replaces the levels below the split


def _rows(x: torch.Tensor, dev: dict, name: str) -> torch.Tensor:
    """x's rows `dev[name]`, or x itself where the layout says "all rows, in order"."""
    return x[dev[name]] if name in dev else x


@dataclass(frozen=True)
class RolloutSetup:
    """What the rollouts of one batch share besides their plan: the velocity function (bound to the batch's prompts),
    the schedule and SDE kernel, the noise keys, the latent shape, the device and the velocity micro-batch size.
    The trainer builds it; the algorithm unit starts its rollout from it."""

    velocity_fn: VelocityFn
    sigmas: torch.Tensor
    kernel: sde.Kernel
    noise: NoiseKeys
    latent_shape: Sequence[int]
    device: torch.device | str = "cpu"
    batch_size: int = 64
    keep_means: bool = False  # also keep each SDE edge's kernel mean (`RolloutGraph.means`, for --ratio_norm)

    def start(self, plan: GraphPlan | Sequence[GraphPlan], branch_innovation: float | Mapping[int, float] = 1.0,
              pause_at_splits: bool = False, keep_all_latents: bool = False) -> Rollout:
        return Rollout(self, plan, branch_innovation, pause_at_splits, keep_all_latents)


@dataclass
class Split:
    """A rollout paused at a split: the split parents (their velocities computed, their children not stepped yet),
    their x0-predictions x - sigma v and their prompts. `keep(num_children)` before the rollout goes on keeps only
    the first num_children[i] (at least 1) children of parent i; the others and their subtrees are never run."""

    parents: torch.Tensor  # host [n] long: node ids
    x0: torch.Tensor  # [n, ...] fp32, on the rollout's device
    prompt: torch.Tensor  # host [n] long: prompt index in the batch
    num_children: torch.Tensor | None = None  # host [n] long, once `keep` is called

    def keep(self, num_children: torch.Tensor) -> None:
        self.num_children = num_children.to(torch.long).cpu()


class Rollout:
    """One batch's rollout graph, grown depth by depth: `plan` for every prompt of `setup.noise.prompt_keys`, or one
    plan per prompt (dynamic allocation). `finish()` grows it to the end and returns the filled RolloutGraph. With
    `pause_at_splits`, `next_split()` grows it only up to the next split and returns that `Split` (guided expansion
    decides there which children are run), or None once the graph is grown to the end; the returned graph then holds
    the prompts' reduced plans.

    Split children (`shares_noise`) draw eps_k = sqrt(1 - r^2) xi_shared + r xi_k (paper Eq. 2, r =
    `branch_innovation`, a float or a map from the children's depth to r): each child alone is an ordinary SDE step,
    and siblings correlate by 1 - r^2. Latents are kept for the nodes training and rewards need (both ends of SDE
    edges, and leaves); all of them with `keep_all_latents`. Host syncs: none inside the depth loop (the layout is
    built and moved before it; log-probs are read back once at the end), except at the splits it pauses at.
    """

    def __init__(self, setup: RolloutSetup, plan: GraphPlan | Sequence[GraphPlan],
                 branch_innovation: float | Mapping[int, float] = 1.0, pause_at_splits: bool = False,
                 keep_all_latents: bool = False):
        self.setup, self.branch_innovation, self.pause_at_splits = setup, branch_innovation, pause_at_splits
        self.device = torch.device(setup.device)
        num_prompts = len(setup.noise.prompt_keys)
        self.shared_plan = isinstance(plan, GraphPlan)
        self.plans = [plan] * num_prompts if self.shared_plan else list(plan)
        assert len(self.plans) == num_prompts, (len(self.plans), num_prompts)
        self.nodes = expand_plans(self.plans)
        self.sigma32 = setup.sigmas.to(torch.float32)
        self.shape = tuple(setup.latent_shape)
        self.alive = torch.ones(self.nodes["parent"].numel(), dtype=torch.bool)
        self.levels, self.keep, self.by_depth = _prepare(self.plans, self.nodes, self.alive, self.sigma32,
                                                         branch_innovation, keep_all_latents, self.device,
                                                         cache=not pause_at_splits)
        roots = self.levels[0].ids
        root_keys = zip(self.nodes["prompt"][roots].tolist(), self.nodes["root_slot"][roots].tolist())
        self.level_x = torch.stack([keyed_normal(self.shape, setup.noise.root(b, slot), self.device)
                                    for b, slot in root_keys])
        self.stored, self.stored_ids, self.sde_out, self.sde_means = [], [], [], []
        self.forward_passes, self.depth, self.done = 0, 0, False
        self.paused: tuple | None = None  # (split, evaluated latents, velocities) while stopped at a split

    def next_split(self) -> Split | None:
        """Grow up to the next split (with `pause_at_splits`; else to the end): the split, or None at the end."""
        return self._grow(self.pause_at_splits)

    def finish(self) -> RolloutGraph:
        """Grow what is left, every child of the later splits kept, and return the graph."""
        self._grow(pause=False)
        return self._graph()

    @torch.no_grad()
    def _grow(self, pause: bool) -> Split | None:
        if self.paused is not None:
            split, ev_x, v = self.paused
            self.paused = None
            if split.num_children is not None and self._drop(split):  # some children dropped: lay out again
                d = self.depth
                self.levels[d:] = _layout(self.nodes, self.alive, self.keep, self.levels[d].ids, d, self.sigma32,
                                          self.branch_innovation, self.by_depth)
                to_device_once([lv.dev for lv in self.levels[d:]], self.device)
            self._step(ev_x, v)
        while not self.done:
            lv = self.levels[self.depth]
            self.stored.append(_rows(self.level_x, lv.dev, "keep"))
            self.stored_ids.append(lv.stored_ids)
            if lv.children is None:
                self.done = True
                break
            ev_x = _rows(self.level_x, lv.dev, "evaluated")
            v = _evaluate(self.setup.velocity_fn, ev_x, lv.dev["ev_sigma"], lv.dev["ev_prompt"], self.setup.batch_size)
            self.forward_passes += lv.ev_ids.numel()
            if pause and bool(self.nodes["shares_noise"][lv.children].any()):
                self.paused = (self._split(lv, ev_x, v), ev_x, v)
                return self.paused[0]
            self._step(ev_x, v)
        return None

    def _step(self, ev_x: torch.Tensor, v: torch.Tensor) -> None:
        """From the evaluated nodes of the current depth to their children (ODE and/or SDE steps)."""
        lv = self.levels[self.depth]
        xp, vp = _rows(ev_x, lv.dev, "rows"), _rows(v, lv.dev, "rows")
        s_from, s_to = lv.dev["s_from"], lv.dev["s_to"]
        if lv.kinds != "sde":
            self.level_x = sde.ode_step(xp, vp, s_from, s_to)
        if lv.kinds != "ode":
            eps = _edge_noise(lv, self.setup.noise, self.shape, self.device)
            rows = lv.dev.get("sde_rows")
            out = sde.sde_step(_rows(xp, lv.dev, "sde_rows"), _rows(vp, lv.dev, "sde_rows"),
                               _rows(s_from, lv.dev, "sde_rows"), _rows(s_to, lv.dev, "sde_rows"), self.setup.kernel,
                               noise=eps, std_scale=lv.dev["std_scale"])
            if rows is None:
                self.level_x = out.sample
            else:
                self.level_x[rows] = out.sample
            self.sde_out.append((lv.sde_ids, out.log_prob, out.std))
            if self.setup.keep_means:
                self.sde_means.append(out.mean)
        self.depth += 1

    def _split(self, lv: _Depth, ev_x: torch.Tensor, v: torch.Tensor) -> Split:
        """The split parents among the level's evaluated nodes, with their x0-predictions."""
        parent, step, prompt = self.nodes["parent"], self.nodes["step"], self.nodes["prompt"]
        children, ev_ids = lv.children, lv.ev_ids
        split_parents = torch.unique(parent[children[self.nodes["shares_noise"][children]]])
        rows = torch.nonzero(torch.isin(ev_ids, split_parents)).flatten()
        sigma = self.sigma32[step[ev_ids[rows]]].to(v.device)
        x0 = sde.predict_x0(ev_x[rows.to(ev_x.device)], v[rows.to(v.device)], sigma)
        return Split(ev_ids[rows], x0, prompt[ev_ids[rows]])

    def _drop(self, split: Split) -> bool:
        """Mark dead the children beyond each split parent's `num_children`; whether any was dropped."""
        parent, children = self.nodes["parent"], self.levels[self.depth].children
        limit = torch.full((self.alive.numel(),), 1 << 30, dtype=torch.long)
        limit[split.parents] = split.num_children.clamp(min=1)
        # rank of each child among its siblings (siblings are consecutive in node-id order)
        first = torch.ones_like(children, dtype=torch.bool)
        first[1:] = parent[children[1:]] != parent[children[:-1]]
        start = torch.cummax(torch.where(first, torch.arange(children.numel()), torch.zeros_like(children)), 0).values
        rank = torch.arange(children.numel()) - start
        live = rank < limit[parent[children]]
        self.alive[children[~live]] = False
        return not bool(live.all())

    def _graph(self) -> RolloutGraph:
        nodes, num_nodes = self.nodes, self.alive.numel()
        log_prob = torch.zeros(num_nodes, dtype=torch.float32)
        std = torch.zeros(num_nodes, dtype=torch.float32)
        if self.sde_out:  # one device-to-host copy for the whole rollout
            ids = torch.cat([i for i, _, _ in self.sde_out])
            values = torch.stack([torch.cat([lp for _, lp, _ in self.sde_out]),
                                  torch.cat([s for _, _, s in self.sde_out])]).cpu()
            log_prob[ids], std[ids] = values[0], values[1]
        complete = not self.pause_at_splits or bool(self.alive.all())
        latent_row = torch.full((num_nodes,), -1, dtype=torch.long)
        ids = torch.cat(self.stored_ids)
        latent_row[ids] = torch.arange(ids.numel())  # latents are stored level by level
        latents = torch.cat(self.stored)
        means = None
        if self.setup.keep_means:
            means = torch.zeros_like(latents)
            if self.sde_means:
                sde_ids = torch.cat([i for i, _, _ in self.sde_out])
                means[latent_row[sde_ids].to(means.device)] = torch.cat(self.sde_means)
        graph = RolloutGraph(
            plan=self.plans[0],
            num_prompts=len(self.plans),
            sigmas=self.setup.sigmas,
            parent=nodes["parent"],
            step=nodes["step"],
            depth=nodes["depth"],
            kind=nodes["kind"],
            prompt=nodes["prompt"],
            group=nodes["group"],
            log_prob=log_prob,
            std=std,
            latents=latents,
            latent_row=latent_row,
            means=means,
            num_forward_passes=self.forward_passes,
            prompt_plans=None if self.shared_plan and complete else tuple(self.plans),
        )
        return graph if complete else _alive_subgraph(graph, self.alive)


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
) -> RolloutGraph:
    """Execute `plan` (or one plan per prompt) for every prompt of `noise.prompt_keys` to the end (`Rollout`)."""
    setup = RolloutSetup(velocity_fn, sigmas, kernel, noise, latent_shape, device, batch_size)
    return setup.start(plan, branch_innovation, keep_all_latents=keep_all_latents).finish()


@torch.no_grad()
def multistep_rollout(setup: RolloutSetup, plan: GraphPlan) -> RolloutGraph:
    """Chains of a plan without stochastic edges (`group_plan(T, G, sde_steps=())`) sampled by the 2nd-order
    multistep DPM-Solver++ (`sde.dpm_solver_2m_step`) instead of Euler: one forward per chain and step, from the
    same keyed initial noise; only the final samples are kept. A multistep solver carries each chain's previous
    data prediction, which the depth-batched `Rollout` (one step per edge) has no place for."""
    assert bool((plan.kind != SDE).all()) and bool((plan.num_children <= 1).all()), "chains of ODE steps only"
    num_prompts = len(setup.noise.prompt_keys)
    nodes = expand_plans([plan] * num_prompts)
    roots = torch.nonzero(nodes["parent"] < 0).flatten()
    device = torch.device(setup.device)
    keys = zip(nodes["prompt"][roots].tolist(), nodes["root_slot"][roots].tolist())
    x = torch.stack([keyed_normal(tuple(setup.latent_shape), setup.noise.root(b, slot), device) for b, slot in keys])
    prompt = nodes["prompt"][roots].to(device)
    sigmas = setup.sigmas.tolist()
    previous = None
    for i in range(plan.num_steps):
        sigma_B = torch.full((x.shape[0],), sigmas[i], dtype=torch.float32, device=device)
        x0 = sde.predict_x0(x, _evaluate(setup.velocity_fn, x, sigma_B, prompt, setup.batch_size), sigma_B)
        x = sde.dpm_solver_2m_step(x, x0, previous, sigmas[i - 1] if i else None, sigmas[i], sigmas[i + 1])
        previous = x0
    n = nodes["parent"].numel()
    leaves = torch.nonzero(nodes["is_leaf"]).flatten()  # chain by chain, in the roots' order
    latent_row = torch.full((n,), -1, dtype=torch.long)
    latent_row[leaves] = torch.arange(leaves.numel())
    return RolloutGraph(plan=plan, num_prompts=num_prompts, sigmas=setup.sigmas, parent=nodes["parent"],
                        step=nodes["step"], depth=nodes["depth"], kind=nodes["kind"], prompt=nodes["prompt"],
                        group=nodes["group"], log_prob=torch.zeros(n), std=torch.zeros(n), latents=x,
                        latent_row=latent_row, num_forward_passes=plan.num_steps * roots.numel())


def _alive_subgraph(graph: RolloutGraph, alive: torch.Tensor) -> RolloutGraph:
    """The rollout graph without the nodes dropped at splits (never run): per-prompt reduced plans."""
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


def _edge_noise(lv: _Depth, noise: NoiseKeys, shape, device) -> torch.Tensor:
    """Noise of the SDE edges into the level's children (all at one depth, in node-id order, hence grouped by
    prompt): one keyed draw per (prompt, depth) for the children's own components, and one per (prompt, depth) for
    the components that the siblings of a split share; drawn straight into their rows."""
    d = lv.depth
    own = torch.empty((lv.sde_ids.numel(), *shape), dtype=torch.float32, device=device)
    _keyed_rows(own, [(noise.edge(b, d + 1), n) for b, n in lv.own_draws])
    if not lv.shared_draws:
        return own
    shared = torch.empty((sum(n for _, n in lv.shared_draws), *shape), dtype=torch.float32, device=device)
    _keyed_rows(shared, [(noise.split(b, d), n) for b, n in lv.shared_draws])
    r = lv.innovation
    if "mix_rows" not in lv.dev:
        return math.sqrt(1.0 - r * r) * shared[lv.dev["which"]] + r * own
    rows = lv.dev["mix_rows"]
    own[rows] = math.sqrt(1.0 - r * r) * shared[lv.dev["which"]] + r * own[rows]
    return own


def _keyed_rows(out: torch.Tensor, draws: list[tuple[int, int]]) -> None:
    """Fill consecutive row blocks of `out` with keyed standard normals: draws [(key, rows)]."""
    start = 0
    for key, n in draws:
        out[start : start + n].normal_(generator=keyed_generator(key, out.device))
        start += n
