"""One-command GPU check (`bash scripts/bench/gpu_check.sh`; `--tiny`: the same code on the tiny shape on CPU).

Builds the backbone's transformer (`--model`, by default FLUX.1-dev from its shipped config,
branchgrpo/models/configs/flux1-dev.json) with random weights in bf16 - no download; the spec's stand-in,
models/support.py `StandInSupport` - and measures, through the training code itself (`run_rollout`, `PolicyUpdate`):
1. a 16-leaf tree rollout (T steps, splits 0,3,6,9, K 2) at the backbone's size: time, forward passes/s, MFU;
2. the update over the tree's trainable edges with activation checkpointing (and FSDP2 over all processes when
   launched with more than one): time, MFU (6 N tokens per training forward; recomputation not counted);
3. the bf16 first-ratio deviation: the first micro-batch's ratio exp(log pi_theta - log pi_old) should be exactly 1
   (same weights), but the rollout's batched bf16 forwards and the update's differ in layout and rounding;
   `max |ratio - 1|` without and with --recompute_old_log_prob (which re-scores pi_old with the training forward);
4. peak memory of the update against the memory planner's prediction for the same configuration;
5. eager vs `--compile` (unless --skip_compile): a fresh model of the same weights prepared as the trainer does
   (activation checkpointing -> torch.compile of each block -> FSDP2), the same rollout and update timed after their
   first calls (whose extra wall is the one-off compile time), the compiled first-ratio deviation, max |log-prob
   compiled - eager| (same noise keys) and the graphs dynamo compiled (branchgrpo/bench/compiled.py has the CPU
   version, interleaved);
6. the most compiling can bring: 1 / the share of matrix multiplies and attention in an eager rollout and update,
   profiled (one more rollout; the update is 3.'s --recompute_old_log_prob run, which is not timed).
Writes gpu_check.json and gpu_check.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from branchgrpo.core import distributed, plans
from branchgrpo.bench.backbones import media_size
from branchgrpo.bench.compiled import bound_text, first_ratio_deviation, headroom
from branchgrpo.bench.measure import (
    PeakMemory,
    gemm_attention_share,
    machine_info,
    sync,
    timed,
)
from branchgrpo.bench.report import md_table
from branchgrpo.bench.throughput import make_rollout, make_update, mfu

SPLITS = (0, 3, 6, 9)


def parse_args(argv):
    from branchgrpo.bench.backbones import model_config, random_shapes
    from branchgrpo.config.train import add_backbone_flags

    checked = [name for name, shapes in random_shapes().items() if {"tiny", "full"} <= set(shapes)]
    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=checked, default=checked[0], help="backbone (a spec with tiny and full random "
                   "shapes)")
    p.add_argument("--tiny", action="store_true", help="the tiny shape on CPU (CI); sizes default to the tiny "
                   "shape's (64 px for FLUX)")
    p.add_argument("--output_dir", default="outputs/gpu_check")
    add_backbone_flags(p)
    p.add_argument("--steps", type=int, default=14, help="sampling steps of the tree (>= 11: splits at 0,3,6,9; "
                   "14: 107 forward passes, sized for the whole check in < 8 min on one H100, docs/benchmarks.md)")
    p.add_argument("--num_layers", type=int, default=None, help="cut the transformer config's num_layers (FLUX.1-dev: "
                   "19 double blocks)")
    p.add_argument("--num_single_layers", type=int, default=None, help="cut the transformer config's "
                   "num_single_layers (FLUX.1-dev: 38 single blocks)")
    p.add_argument("--micro_batch", type=int, default=4, help="parents per training forward")
    p.add_argument("--lora_rank", type=int, default=64, help="train LoRA of this rank (0: full fine-tune)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU (H100/H200)")
    p.add_argument("--text_tokens", type=int, default=None, help="text tokens (default 512; --tiny: 16)")
    p.add_argument("--skip_compile", action="store_true", help="eager only (the compile comparison builds the "
                   "model again and compiles its forward and backward: about 3 minutes for --tiny on one CPU core)")
    args = p.parse_args(argv)
    args.shape = "tiny" if args.tiny else "full"
    args.model_cfg = model_config(args, args.shape)
    if args.steps < 11:
        raise ValueError(f"--steps {args.steps}: need >= 11 (the tree splits at steps {SPLITS})")
    if args.micro_batch < 1 or args.lora_rank < 0:
        raise ValueError("--micro_batch: need >= 1; --lora_rank: need >= 0")
    args.text_tokens = args.text_tokens or (16 if args.tiny else 512)
    return args


def build(args, device):
    """The backbone's stand-in of the run's shape with random weights in bf16, and random conditioning."""
    spec = args.model_cfg.spec
    overrides = {k: getattr(args, k) for k in ("num_layers", "num_single_layers") if getattr(args, k) is not None}
    adapter = spec.random_adapter(args.shape, args.model_cfg, device, torch.bfloat16, 0, **overrides)
    cond = spec.random_cond(adapter, 1, args.text_tokens, device, torch.bfloat16, 0)
    if args.lora_rank:
        adapter.add_lora(args.lora_rank)
    else:
        adapter.transformer.requires_grad_(True)
    return adapter, cond, adapter.transformer.config


def update_once(adapter, cond, graph, micro: int, device, autocast, recompute: bool, lr: float = 0.0) -> dict:
    """The real PolicyUpdate over every trainable edge (learning rate 0 by default: weights unchanged, so repeats
    train the same weights): time, first-ratio deviation, peak memory, the update's own metrics."""
    update, edges, _ = make_update(SimpleNamespace(adapter=adapter, cond=cond), graph, micro, device, autocast,
                                   recompute=recompute, lr=lr)
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        out = update()
        sync(device)
        seconds = time.perf_counter() - start
    adapter.transformer.eval()
    return {"seconds": seconds, "edges": int(edges.child.numel()),
            "training_forwards": int(torch.unique(edges.parent).numel()),
            "first_ratio_deviation": first_ratio_deviation(out),
            "peak_memory_gb": memory.peak_mb / 1024 if memory.peak_mb else None, "memory_kind": memory.kind,
            "loss": out.get("loss"), "grad_norm": out.get("grad_norm")}


def predicted_memory_gb(args, counts: dict, world: int, config) -> dict:
    """The memory planner's prediction for this check's configuration (no reward model is loaded here)."""
    from branchgrpo.planner import memory
    from branchgrpo.planner.gpu_memory import memory_model
    from branchgrpo.config import config_from_flags

    flags = {"model": args.model, **dataclasses.asdict(args.model_cfg.backbone), "gradient_checkpointing": True,
             "train_batch_size": 1,
             "mixed_precision": "bf16", "master_weight_type": "bf16", "train_micro_batch_size": args.micro_batch,
             "use_lora": args.lora_rank > 0, "lora_rank": max(args.lora_rank, 1), "parallel": "fsdp"}
    cfg = config_from_flags(flags, validate="none")
    path = Path(args.output_dir) / "transformer_config.json"
    path.write_text(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))
    m, _ = memory_model(cfg, counts, world, 0.0, str(path), text_tokens=args.text_tokens)
    total, parts = memory.total_bytes(m, args.micro_batch)
    return {"predicted_total_gb": total / memory.GB,
            "predicted_without_margin_gb": (total - parts["margin"]) / memory.GB}


def tree_rollout(adapter, cond, plan, args, device, autocast):
    return make_rollout(SimpleNamespace(adapter=adapter, cond=cond), plan, 1, args.steps, 32, device, autocast)


def measure_rollout(adapter, cond, plan, args, device, autocast) -> tuple[float, float, object]:
    """(first call's seconds, a second call's seconds, the second call's graph) of a 16-leaf tree rollout."""
    rollout = tree_rollout(adapter, cond, plan, args, device, autocast)
    with torch.no_grad():
        first_s, _ = timed(rollout, device)  # warm-up (kernels, allocator; compiling, if compiled)
        seconds, graph = timed(rollout, device)
    return first_s, seconds, graph


def prepare(adapter, info, compiled: bool) -> int:
    """As the trainer's prepare_model: activation checkpointing -> compile (when asked) -> FSDP2 (several ranks)."""
    from branchgrpo.runtime.parallel import apply_fsdp, checkpoint_and_compile

    blocks = adapter.blocks()
    units = checkpoint_and_compile(adapter.transformer, blocks, 1.0, compiled)
    if info.world_size > 1:
        apply_fsdp(adapter.transformer, units, torch.bfloat16)
    return len(blocks)


def compiled_check(args, info, device, autocast, plan, eager_rollout_s: float, eager_graph, eager_update: dict,
                   shares: dict):
    """Section 5: the same weights again (the eager model is freed first: two full FLUX copies need not fit),
    compiled, measured like the eager one."""
    from branchgrpo.runtime.compile_stats import compiled_graphs, recompile_limit_hits

    adapter, cond, _ = build(args, device)
    prepare(adapter, info, compiled=True)
    before = compiled_graphs()
    first_s, rollout_s, graph = measure_rollout(adapter, cond, plan, args, device, autocast)
    rollout_graphs = compiled_graphs() - before
    first_update = update_once(adapter, cond, graph, args.micro_batch, device, autocast, recompute=False)
    update = update_once(adapter, cond, graph, args.micro_batch, device, autocast, recompute=False)
    sde = eager_graph.stochastic
    speed = {"rollout": eager_rollout_s / rollout_s, "update": eager_update["seconds"] / update["seconds"]}
    return {"rollout_s": rollout_s, "rollout_speedup": speed["rollout"],
            "update_s": update["seconds"], "update_speedup": speed["update"],
            "gemm_attention": headroom(shares, speed),
            "compile_s": {"rollout": first_s - rollout_s, "update": first_update["seconds"] - update["seconds"]},
            "first_ratio_deviation": first_update["first_ratio_deviation"],
            "logprob_max_abs_diff": float((graph.log_prob[sde] - eager_graph.log_prob[sde]).abs().max()),
            "graphs": {"rollout": rollout_graphs, "total": compiled_graphs(),
                       "recompile_limit_hits": recompile_limit_hits()},
            "update_peak_memory_gb": update["peak_memory_gb"]}


def run(args) -> dict:
    info = distributed.init_distributed("cpu" if args.tiny else "auto")
    device = info.device
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731 - the GPU path's autocast
    adapter, cond, config = build(args, device)
    plan = plans.tree_plan(args.steps, SPLITS, 2)
    num_params = sum(p.numel() for p in adapter.transformer.parameters())
    tokens = args.model_cfg.spec.tokens_per_sample(adapter, cond)
    _, rollout_s, graph = measure_rollout(adapter, cond, plan, args, device, autocast)
    num_blocks = prepare(adapter, info, compiled=False)
    plain = update_once(adapter, cond, graph, args.micro_batch, device, autocast, recompute=False)
    # the --recompute_old_log_prob run is not timed: profiled, it gives the update's share of matrix multiplies and
    # attention (its extra no-grad forwards included), for the bound on what compiling can bring
    update_share, recomputed = gemm_attention_share(
        lambda: update_once(adapter, cond, graph, args.micro_batch, device, autocast, recompute=True), device)
    with torch.no_grad():
        rollout_share, _ = gemm_attention_share(tree_rollout(adapter, cond, plan, args, device, autocast), device)
    shares = {"rollout": rollout_share, "update": update_share}
    compiled = "skipped (--skip_compile)"
    if not args.skip_compile:
        del adapter, cond
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        compiled = compiled_check(args, info, device, autocast, plan, rollout_s, graph, plain, shares)
    fwd_per_s = graph.num_forward_passes / rollout_s
    train_fwd_per_s = plain["training_forwards"] / plain["seconds"]  # sample forwards (+ backward) per second
    peak = None if device.type == "cpu" else args.peak_tflops
    return {
        "machine": machine_info(device), "world_size": info.world_size, "tiny": args.tiny,
        "config": f"{args.model} {args.shape} shape (random bf16 weights)",
        "blocks": num_blocks, "transformer_parameters": num_params, "size": media_size(adapter),
        "tokens_per_sample": tokens, "steps": args.steps, "lora_rank": args.lora_rank,
        "rollout": {"leaves": int(plan.is_leaf.sum()), "forward_passes": graph.num_forward_passes,
                    "seconds": rollout_s, "forward_passes_per_s": fwd_per_s,
                    "mfu": mfu(num_params, tokens, fwd_per_s, peak, 2)},
        "update": {**plain, "micro_batch": args.micro_batch, "activation_checkpointing": True,
                   "fsdp2": info.world_size > 1, "mfu": mfu(num_params, tokens, train_fwd_per_s, peak, 6)},
        "bf16_first_ratio_deviation": plain["first_ratio_deviation"],
        "bf16_first_ratio_deviation_recompute_old_log_prob": recomputed["first_ratio_deviation"],
        "memory": {"measured_update_peak_gb": plain["peak_memory_gb"], "kind": plain["memory_kind"],
                   **predicted_memory_gb(args, {"nodes": plan.num_nodes,
                                                "train_forward_passes": plain["training_forwards"]},
                                         info.world_size, config)},
        "gemm_attention": shares, "compile": compiled, "is_main": info.is_main,
    }


def markdown(r: dict) -> str:
    u, ro, m = r["update"], r["rollout"], r["memory"]
    rows = [["rollout (16-leaf tree)", f"{ro['forward_passes']} forwards", f"{ro['seconds']:.3f}",
             f"{ro['forward_passes_per_s']:.2f} fwd/s", ro["mfu"]],
            ["update (act. ckpt" + (", FSDP2)" if u["fsdp2"] else ")"), f"{u['edges']} edges, "
             f"{u['training_forwards']} forwards", f"{u['seconds']:.3f}", f"micro-batch {u['micro_batch']}", u["mfu"]]]
    c = r["compile"]
    compiled = [f"- --compile: {c}"]
    if isinstance(c, dict):
        rows += [[f"{phase} --compile", "the same", f"{c[phase + '_s']:.3f}", f"{c[phase + '_speedup']:.2f}x eager",
                  f"compile {c['compile_s'][phase]:.1f} s"] for phase in ("rollout", "update")]
        compiled = [f"- --compile: first-ratio deviation {c['first_ratio_deviation']:.3g}; max |log-prob compiled - "
                    f"eager| {c['logprob_max_abs_diff']:.3g}; graphs: rollout {c['graphs']['rollout']}, total "
                    f"{c['graphs']['total']}, over the recompile limit {c['graphs']['recompile_limit_hits']}"]
    return "\n".join([
        f"# GPU check: {r['config']}, {r['size']}, {r['world_size']} process(es), {r['machine'].get('device', '')}",
        "", f"{r['transformer_parameters'] / 1e9:.4f}B parameters, {r['blocks']} blocks, {r['tokens_per_sample']} "
        f"tokens per sample, T = {r['steps']}, LoRA rank {r['lora_rank']}.", "",
        md_table(["phase", "work", "seconds", "rate", "MFU"], rows), "", *compiled,
        "- what compiling can bring if matrix multiplies and attention keep their kernels (1 / their share of a "
        "profiled eager run; the update's is the --recompute_old_log_prob run's): rollout "
        f"{bound_text(r['gemm_attention']['rollout'])}, update {bound_text(r['gemm_attention']['update'])}",
        f"- bf16 first-ratio deviation max |ratio - 1|: {r['bf16_first_ratio_deviation']:.3g}; with "
        f"--recompute_old_log_prob: {r['bf16_first_ratio_deviation_recompute_old_log_prob']:.3g}",
        f"- update peak memory ({m['kind']}): {m['measured_update_peak_gb']} GB; planner: "
        f"{m['predicted_without_margin_gb']:.3f} GiB without margin, {m['predicted_total_gb']:.3f} GiB with it", ""])


def main(argv=None) -> int:
    from branchgrpo.runtime.entry import run_cli

    return run_cli(_main, argv)


def _main(argv) -> None:
    from branchgrpo.runtime.outputs import writable_folder

    args = parse_args(argv)
    out = writable_folder(args.output_dir, "--output_dir")
    result = run(args)
    if result.pop("is_main"):
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    import sys

    sys.exit(main())
