"""The measurements of `python -m branchgrpo.bench` (see branchgrpo/bench/__main__.py for the command line).

All timings go through the training code itself - `run_rollout` for rollouts, `PolicyUpdate.run` for the update -
so what is measured is what a training iteration costs, not a re-implementation of it.
"""

from __future__ import annotations

import contextlib
import time

import torch

from branchgrpo.core import plans, sde
from branchgrpo.bench.measure import PeakMemory, interleaved_medians, sync, timed
from branchgrpo.models.base import gather_cond
from branchgrpo.core.rollout import NoiseKeys, run_rollout
from branchgrpo.core.seeding import keyed_normal, mix_key

KERNEL = sde.Kernel("dance", 0.3)  # the BranchGRPO / DanceGRPO kernel; its value does not change the cost


class TimedVelocity:
    """The velocity function of a rollout, accumulating the time spent inside the backbone (the rest of the
    rollout's wall time is our Python/tensor overhead: scheduling, noise, SDE steps)."""

    def __init__(self, backbone, device: torch.device, autocast):
        self.backbone, self.device, self.autocast = backbone, device, autocast
        self.inside_s, self.calls = 0.0, 0

    def __call__(self, x, sigma, prompt):
        sync(self.device)
        start = time.perf_counter()
        with self.autocast():
            v = self.backbone.adapter.velocity(x, sigma, gather_cond(self.backbone.cond, prompt)).float()
        sync(self.device)
        self.inside_s += time.perf_counter() - start
        self.calls += 1
        return v


def make_rollout(backbone, plan, num_prompts: int, steps: int, batch_size: int, device, autocast, seed: int = 0):
    """A closure running one rollout of `plan` for `num_prompts` prompts; it records its last velocity timer."""
    sigmas = sde.make_sigmas(steps, 3.0)
    state = {"iteration": 0}

    def run():
        state["timer"] = timer = TimedVelocity(backbone, device, autocast)
        state["iteration"] += 1  # fresh noise every run, as in training
        noise = NoiseKeys(seed, state["iteration"], tuple(range(num_prompts)))
        return run_rollout(plan, timer, sigmas, KERNEL, noise, backbone.adapter.latent_shape, device, batch_size)

    run.state = state
    return run


def forward_cost_curve(backbone, batch_sizes: list[int], device, autocast, repeats: int, warmup: int) -> list[dict]:
    """Time of one velocity call against its batch size: the fixed per-call cost a and the per-sample cost c of
    t(b) = a + c b decide how much depth batching and prefix sharing can save."""
    adapter = backbone.adapter
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, *adapter.latent_shape, device=device)
        sigma = torch.rand(b, device=device)
        prompt = torch.arange(b, device=device) % next(iter(backbone.cond.values())).shape[0]

        def call():
            with torch.no_grad(), autocast():
                return adapter.velocity(x, sigma, gather_cond(backbone.cond, prompt))

        median = interleaved_medians({"call": call}, device, repeats, warmup)["call"]["median_s"]
        rows.append({"batch": b, "ms_per_call": 1e3 * median, "ms_per_sample": 1e3 * median / b})
    if len(rows) >= 2:  # least-squares fit of t(b) = a + c b
        bs = torch.tensor([r["batch"] for r in rows], dtype=torch.float64)
        ts = torch.tensor([r["ms_per_call"] for r in rows], dtype=torch.float64)
        design = torch.stack([torch.ones_like(bs), bs], dim=1)
        a, c = torch.linalg.lstsq(design, ts[:, None]).solution.flatten().tolist()
        for r in rows:
            r["fit_fixed_ms"], r["fit_per_sample_ms"] = a, c
    return rows


def _profiled_run(name: str, fn, median: dict, device) -> dict:
    """One more run of a rollout variant, for its counts, its backbone share of the time and its peak memory."""
    with PeakMemory(device) as memory:
        wall, graph = timed(fn, device)
    timer = fn.state["timer"]
    return {"mode": name, "forward_passes": graph.num_forward_passes, "velocity_calls": timer.calls,
            "median_s": median["median_s"], "forward_passes_per_s": graph.num_forward_passes / median["median_s"],
            "backbone_share": timer.inside_s / wall, "peak_memory_mb": memory.peak_mb, "memory_kind": memory.kind,
            "times_s": median["times_s"], "graph": graph}


def depth_batching(backbone, args, device, autocast) -> dict:
    """Depth-batched rollout of a 16-leaf tree vs the same tree one node at a time (batch 1, the official code)."""
    plan = plans.tree_plan(args.steps, args.split_points, args.branch_factor)
    P = args.num_prompts
    batched = make_rollout(backbone, plan, P, args.steps, args.rollout_batch_size, device, autocast)
    single = make_rollout(backbone, plan, P, args.steps, 1, device, autocast)
    result = interleaved_medians({"depth_batched": batched, "one_node_at_a_time": single}, device, args.repeats,
                                 args.warmup)
    rows = [_profiled_run(name, fn, result[name], device)
            for name, fn in (("depth_batched", batched), ("one_node_at_a_time", single))]
    graph = rows[0].pop("graph")
    rows[1].pop("graph")
    ratio = rows[0]["forward_passes_per_s"] / rows[1]["forward_passes_per_s"]
    return {"num_prompts": P, "leaves_per_prompt": int(plan.is_leaf.sum()),
            "rollout_batch_size": args.rollout_batch_size,
            "rows": rows, "speedup": ratio, "target": 3.0, "meets_target": ratio >= 3.0, "graph": graph}


def tree_vs_sequential(backbone, args, device, autocast, num_prompts: int) -> dict:
    """The tree and 16 independent chains (DanceGRPO's group) for the same leaves, both depth-batched; the tree
    should cost its share of forward passes: t_tree ~ (F_tree / F_seq) t_seq."""
    tree = plans.tree_plan(args.steps, args.split_points, args.branch_factor)
    leaves = int(tree.is_leaf.sum())
    seq = plans.group_plan(args.steps, leaves)
    runs = {"tree": make_rollout(backbone, tree, num_prompts, args.steps, args.rollout_batch_size, device, autocast),
            "sequential": make_rollout(backbone, seq, num_prompts, args.steps, args.rollout_batch_size, device,
                                       autocast)}
    result = interleaved_medians(runs, device, args.repeats, args.warmup)
    profiled = {name: _profiled_run(name, fn, result[name], device) for name, fn in runs.items()}
    f_tree, f_seq = profiled["tree"]["forward_passes"], profiled["sequential"]["forward_passes"]
    t_tree, t_seq = result["tree"]["median_s"], result["sequential"]["median_s"]
    share = f_tree / f_seq * t_seq
    deviation = t_tree / share - 1.0
    return {"num_prompts": num_prompts, "leaves_per_prompt": leaves, "tree_forward_passes": f_tree,
            "sequential_forward_passes": f_seq, "tree_s": t_tree, "sequential_s": t_seq,
            "proportional_share_s": share, "deviation": deviation, "tolerance": 0.15,
            "within_tolerance": deviation <= 0.15,
            # the same comparison on the time spent inside the backbone only: what the deviation would be if the
            # rollout's own bookkeeping (noise, SDE steps, indexing) cost nothing
            "deviation_backbone_only": (profiled["tree"]["backbone_share"] * t_tree)
            / (f_tree / f_seq * profiled["sequential"]["backbone_share"] * t_seq) - 1.0,
            "tree_velocity_calls": profiled["tree"]["velocity_calls"],
            "tree_backbone_share": profiled["tree"]["backbone_share"],
            "sequential_backbone_share": profiled["sequential"]["backbone_share"],
            "times_s": {k: v["times_s"] for k, v in result.items()}}


def make_update(backbone, graph, micro: int, device, autocast, module=None, recompute: bool = False,
                lr: float = 0.0):
    """The trainer's update (its defaults: one optimizer step per update, clipping 1.0, clip range 1e-3, no KL) of
    `module` (default: the backbone's transformer) over every trainable edge of `graph`, at learning rate `lr` (0:
    every repeat trains the same weights (AdamW still does all its work): returns (a closure running it, the
    edges, the number of micro-batches)."""
    from branchgrpo.config.sections import LossConfig, OptimConfig
    from branchgrpo.runtime.update import PolicyUpdate, plan_micro_batches, select_edges

    model = module if module is not None else backbone.adapter.transformer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    advantages = keyed_normal((graph.num_nodes,), mix_key(0, "bench-advantages")).double()
    edges = select_edges(graph, graph.stochastic, advantages, LossConfig().adv_clip_max)
    optim_cfg = OptimConfig(train_micro_batch_size=micro, gradient_accumulation_steps=0, max_grad_norm=1.0,
                            recompute_old_log_prob=recompute)
    updater = PolicyUpdate(backbone.adapter, model, optimizer, scheduler, optim_cfg,
                           LossConfig(clip_range=1e-3, kl_coef=0.0), 0, KERNEL, device, autocast, None, 0)
    return (lambda: updater.run(graph, backbone.cond, edges, 0)), edges, len(plan_micro_batches(edges.parent, micro, 0))


def training_throughput(backbone, graph, args, device, autocast, checkpointing: bool) -> list[dict]:
    """Edges per second of the real PolicyUpdate over every trainable edge of a rollout graph, for each
    micro-batch size (distinct parent latents per forward; sibling edges share their parent's forward)."""
    rows = []
    for micro in args.micro_batch_sizes:
        update, edges, num_micro = make_update(backbone, graph, micro, device, autocast)
        with PeakMemory(device) as memory:
            result = interleaved_medians({"update": update}, device, args.train_repeats, args.warmup)["update"]
        median = result["median_s"]
        forwards = int(torch.unique(edges.parent).numel())
        rows.append({"micro_batch_parents": micro, "activation_checkpointing": checkpointing,
                     "edges": int(edges.child.numel()), "training_forwards": forwards, "micro_batches": num_micro,
                     "median_s": median, "edges_per_s": edges.child.numel() / median,
                     "training_forwards_per_s": forwards / median, "peak_memory_mb": memory.peak_mb,
                     "memory_kind": memory.kind, "times_s": result["times_s"]})
    backbone.adapter.transformer.eval()
    return rows


def host_syncs(backbone, args, device, autocast, num_prompts: int) -> dict:
    """Host syncs of a rollout of `num_prompts` 16-leaf trees and of the update over its edges (micro-batches of
    the largest --micro_batch_sizes), own and inside the backbone (branchgrpo.bench.syncs)."""
    from branchgrpo.bench.syncs import rollout_and_update_syncs

    plan = plans.tree_plan(args.steps, args.split_points, args.branch_factor)
    rollout = make_rollout(backbone, plan, num_prompts, args.steps, args.rollout_batch_size, device, autocast)
    graph = rollout()
    micro = max(args.micro_batch_sizes)
    update, _, num_micro = make_update(backbone, graph, micro, device, autocast)
    update()  # warm-up: AdamW creates its state on the first step
    result = rollout_and_update_syncs(backbone.adapter, rollout, update, int(graph.depth.max()), num_micro, 1)
    backbone.adapter.transformer.eval()
    return {"num_prompts": num_prompts, "micro_batch_parents": micro, **result}


def mfu(num_params: int, tokens: int, sample_forwards_per_s: float, peak_tflops: float | None,
        flops_factor: int = 2) -> float | None:
    """Model FLOPs utilisation = flops_factor * params * tokens per forward * forwards per second / peak FLOP/s.
    flops_factor 2 for inference (a multiply-add per weight and token), 6 for training (forward + backward); the
    attention's sequence-quadratic FLOPs and activation-checkpointing recomputation are not counted."""
    if not peak_tflops:
        return None
    return flops_factor * num_params * tokens * sample_forwards_per_s / (peak_tflops * 1e12)


@contextlib.contextmanager
def no_autocast():
    yield
