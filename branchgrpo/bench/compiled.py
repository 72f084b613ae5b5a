"""Eager vs `--compile` (each block torch.compile'd in place, batch dimension dynamic), through the training code:

    python -m branchgrpo.bench.compiled --model toy --num_prompts 8 --repeats 5 --num_threads 1 \\
        --output outputs/bench/compile_toy.json
    python -m branchgrpo.bench.compiled --model flux --random_shape tiny --h 64 --w 64 --text_tokens 16 \\
        --num_prompts 8 --repeats 5 --num_threads 1 --output outputs/bench/compile_flux_tiny.json

Two copies of the same transformer (the compiled one prepared as `--compile` does: activation checkpointing when
asked, then `apply_compile` on the blocks), measured in interleaved repeats after warm-up: (a) a 16-leaf tree
rollout (T 20, splits 0,3,6,9, K 2) of N prompts; (b) the real PolicyUpdate (learning rate 0) over that rollout's
trainable edges; (c) the one-off compile time: a first compiled call's wall minus an eager call's, for the rollout
and for the update (its backward graphs); (d) max |log-prob compiled - eager| of rollouts with the same noise keys;
(e) the first micro-batch's max |ratio - 1| of an update by the model that rolled out (compiled, without and with
--recompute_old_log_prob, and eager for comparison); (f) the graphs dynamo compiled (they must not grow with the
tree's depths: 1, 2, 4, ... nodes per prompt share one graph); (g) the speedups against the 1.5x target; (h) the
share of the eager run's wall in matrix multiplies and attention, which compiling leaves to the same kernels, so 1 /
share bounds its speed-up while they stay so (measure.gemm_attention_share), and how much of the rest compiling
removed; for the rollout also the bound for compiling the blocks alone (the time inside them that is not GEMM +
attention made free). Writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch._functorch.config
import torch._inductor.config

from branchgrpo.core import plans
from branchgrpo.bench.measure import (
    gemm_attention_share,
    interleaved_medians,
    machine_info,
    timed,
)
from branchgrpo.bench.report import md_table, write_result
from branchgrpo.bench.throughput import make_rollout, no_autocast
from branchgrpo.bench.throughput import make_update as tp_make_update
from branchgrpo.runtime.compile_stats import compiled_graphs, recompile_limit_hits
from branchgrpo.runtime.parallel import checkpoint_and_compile, using_module
from branchgrpo.runtime.update import ratio_deviation

TARGET = 1.5
SPLITS = (0, 3, 6, 9)


def prepared_copy(adapter, checkpointing: bool, compiled: bool) -> torch.nn.Module:
    """A deep copy of the adapter's transformer prepared as `prepare_model` does: checkpointing, then compile."""
    module = copy.deepcopy(adapter.transformer)
    with using_module(adapter, module):
        checkpoint_and_compile(module, adapter.blocks(), 1.0 if checkpointing else None, compiled)
    return module


def on(adapter, module, fn):
    """`fn` run with the adapter pointed at `module`."""
    def run():
        with using_module(adapter, module):
            return fn()
    return run


def make_update(backbone, module, graph, micro: int, device, autocast, recompute: bool = False):
    """The real PolicyUpdate of `module` (throughput.make_update: learning rate 0, so repeats train the same
    weights), run with the adapter pointed at `module`."""
    update, _, _ = tp_make_update(backbone, graph, micro, device, autocast, module=module, recompute=recompute)
    return on(backbone.adapter, module, update)


def headroom(shares: dict, speedups: dict) -> dict:
    """Each phase's gemm_attention_share with "removed": the fraction of the time compiling could remove (all but
    matrix multiplies and attention) that the compiled run did remove."""
    def removed(speedup: float, bound: float | None) -> float | None:
        return (1 - 1 / speedup) / (1 - 1 / bound) if bound and bound > 1 else None

    return {k: {**v, "removed": removed(speedups[k], v["bound"])} for k, v in shares.items()}


def bound_text(share: dict) -> str:
    """"1.62x (GEMM + attention 62% of eager)" for a gemm_attention_share result."""
    bound = "-" if share["bound"] is None else f"{share['bound']:.2f}x"
    return f"{bound} (GEMM + attention {share['share']:.0%} of eager)"


def blocks_line(share: dict) -> list[str]:
    """The rollout's bound for compiling its blocks alone (CPU runs), as a markdown line."""
    if "units_bound" not in share:
        return []
    return [f"- compiling the blocks alone can bring the rollout at most {share['units_bound']:.2f}x: "
            f"{share['units_share']:.0%} of its profiled wall is inside the blocks, {share['units_gemm_share']:.0%} "
            "of that in GEMM + attention (the rest inside them made free, all else unchanged)"]


def first_ratio_deviation(out: dict) -> float:
    return float(ratio_deviation(out["first_ratio_min"], out["first_ratio_max"]))


def compare(backbone, plan, num_prompts: int, steps: int, micro: int, device, autocast, repeats: int, warmup: int,
            checkpointing: bool = False, rollout_batch: int = 256) -> dict:
    """(a)-(g) of the module docstring for one backbone, eager and compiled copies of its transformer."""
    adapter = backbone.adapter
    eager, compiled = (prepared_copy(adapter, checkpointing, c).eval() for c in (False, True))
    rollouts = {name: on(adapter, m, make_rollout(backbone, plan, num_prompts, steps, rollout_batch, device, autocast))
                for name, m in (("eager", eager), ("compiled", compiled))}
    graphs_before = compiled_graphs()
    with torch.no_grad():
        eager_s, graph_e = timed(rollouts["eager"], device)  # same noise keys (iteration 1) for both first calls
        first_s, graph_c = timed(rollouts["compiled"], device)
        rollout_graphs = compiled_graphs() - graphs_before
        one_prompt = on(adapter, compiled, make_rollout(backbone, plan, 1, steps, rollout_batch, device, autocast))
        one_prompt()  # batch sizes 1, 2, 4, 8, 16 instead of N, 2N, ...: no new graph expected beyond batch 1
        graphs_after_one_prompt = compiled_graphs() - graphs_before
        rollout = interleaved_medians(rollouts, device, repeats, warmup)
        with using_module(adapter, eager):
            eager_blocks = adapter.blocks()
        rollout_share, _ = gemm_attention_share(rollouts["eager"], device, units=eager_blocks)
    sde_edges = graph_e.stochastic
    logprob_diff = float((graph_c.log_prob[sde_edges] - graph_e.log_prob[sde_edges]).abs().max())
    latent_diff = float((graph_c.latents - graph_e.latents).abs().max())
    # the update of each model over the rollout it made itself (the first ratio compares rollout and training
    # forwards of the same weights); timed on the eager rollout's graph for both, so both do the same work
    updates = {"eager": make_update(backbone, eager, graph_e, micro, device, autocast),
               "compiled": make_update(backbone, compiled, graph_e, micro, device, autocast)}
    own = make_update(backbone, compiled, graph_c, micro, device, autocast)
    before_update = compiled_graphs()
    eager_update_s, out_e = timed(updates["eager"], device)
    first_update_s, _ = timed(own, device)
    update_graphs = compiled_graphs() - before_update
    out_c = own()
    out_cr = make_update(backbone, compiled, graph_c, micro, device, autocast, recompute=True)()
    update = interleaved_medians(updates, device, repeats, warmup)
    speed = {k: r["eager"]["median_s"] / r["compiled"]["median_s"] for k, r in (("rollout", rollout),
                                                                                ("update", update))}
    shares = {"rollout": rollout_share, "update": gemm_attention_share(updates["eager"], device)[0]}
    return {
        "rollout_s": {k: v["median_s"] for k, v in rollout.items()},
        "update_s": {k: v["median_s"] for k, v in update.items()},
        "times_s": {"rollout": {k: v["times_s"] for k, v in rollout.items()},
                    "update": {k: v["times_s"] for k, v in update.items()}},
        "speedup": speed, "target": TARGET, "meets_target": {k: v >= TARGET for k, v in speed.items()},
        "gemm_attention": headroom(shares, speed),
        "compile_s": {"rollout": first_s - eager_s, "update": first_update_s - eager_update_s},
        "logprob_max_abs_diff": logprob_diff, "latent_max_abs_diff": latent_diff,
        "first_ratio_deviation": {"eager": first_ratio_deviation(out_e), "compiled": first_ratio_deviation(out_c),
                                  "compiled_recompute_old_log_prob": first_ratio_deviation(out_cr)},
        "graphs": {"rollout": rollout_graphs, "rollout_after_1_prompt": graphs_after_one_prompt,
                   "update": update_graphs, "total": compiled_graphs(), "recompile_limit_hits": recompile_limit_hits()},
        "forward_passes": graph_e.num_forward_passes, "trained_edges": int(sde_edges.sum()),
        "num_prompts": num_prompts, "micro_batch": micro, "activation_checkpointing": checkpointing,
    }


def markdown(r: dict) -> str:
    c, g = r["compare"], r["compare"]["graphs"]
    ga = c["gemm_attention"]
    rows = [[phase, f"{c[phase + '_s']['eager']:.4f}", f"{c[phase + '_s']['compiled']:.4f}",
             f"{c['speedup'][phase]:.2f}x", "yes" if c["meets_target"][phase] else "no",
             f"{c['compile_s'][phase]:.1f}", bound_text(ga[phase]),
             "-" if ga[phase]["removed"] is None else f"{ga[phase]['removed']:.0%}"] for phase in ("rollout", "update")]
    m = r["machine"]
    return "\n".join([
        f"# --compile vs eager: {r['backbone']}, {r['dtype']}", "",
        f"{c['num_prompts']} prompts x 16-leaf tree (T 20, splits 0,3,6,9, K 2), {c['forward_passes']} forward "
        f"passes; update over {c['trained_edges']} edges, micro-batch {c['micro_batch']}, activation checkpointing "
        f"{'on' if c['activation_checkpointing'] else 'off'}; medians of {r['args']['repeats']} interleaved repeats "
        f"after {r['args']['warmup']} warm-up; {m['torch_threads']} thread(s), torch {m['torch']}; load average "
        f"{m.get('load_average_1_5_15')} at start, {m.get('load_average_end')} at end.", "",
        md_table(["phase", "eager s", "compiled s", "speedup", f">= {TARGET}x", "one-off compile s", "bound",
                  "rest removed"], rows), "",
        f"- max |log-prob compiled - eager| (same noise keys): {c['logprob_max_abs_diff']:.3g} (latents "
        f"{c['latent_max_abs_diff']:.3g})",
        f"- first-ratio deviation max |ratio - 1|: compiled {c['first_ratio_deviation']['compiled']:.3g} (with "
        f"--recompute_old_log_prob {c['first_ratio_deviation']['compiled_recompute_old_log_prob']:.3g}), eager "
        f"{c['first_ratio_deviation']['eager']:.3g}",
        "- one-off compile: the first compiled call's wall minus an eager call's, inductor's on-disk caches off",
        "- bound: 1 / the share of one profiled eager run's wall in matrix multiplies and attention, which compiling "
        "leaves to the same kernels - the speed-up if all else became free; rest removed: the fraction of that "
        "other time the compiled run saved",
        *blocks_line(c["gemm_attention"]["rollout"]),
        f"- graphs compiled: rollout {g['rollout']} ({g['rollout_after_1_prompt']} after a 1-prompt rollout too), "
        f"update +{g['update']}, total {g['total']}; frames over the recompile limit: {g['recompile_limit_hits']}",
        ""])


def parse_args(argv):
    from branchgrpo.bench.backbones import add_model_flags
    from branchgrpo.core.distributed import resolve_device
    from branchgrpo.runtime.outputs import writable_file

    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.compiled", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--text_tokens", type=int, default=None)
    p.add_argument("--num_prompts", type=int, default=8, help="trees per rollout")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro_batch", type=int, default=8, help="parents per training forward (the trainer's default)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint the blocks of both copies")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 weights + autocast on CUDA (the GPU path), fp32 on CPU (CPU training's default)")
    p.add_argument("--output", default="outputs/bench/compile.json")
    args = p.parse_args(argv)
    for name, low in (("num_prompts", 1), ("repeats", 1), ("micro_batch", 1), ("steps", 11), ("warmup", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name}: need >= {low}, got {getattr(args, name)}" +
                             (" (the tree splits at steps 0, 3, 6, 9)" if name == "steps" else ""))
    resolve_device(args.device)
    writable_file(args.output, "--output")
    return args


def run(args) -> dict:
    from branchgrpo.bench.backbones import load_backbone, model_config
    from branchgrpo.core.distributed import resolve_device

    model_cfg = model_config(args, args.random_shape)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    if device.type == "cpu":  # as the trainer on CPU (--deterministic auto)
        torch.use_deterministic_algorithms(True, warn_only=True)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else no_autocast
    machine = machine_info(device)
    # the one-off compile time as a fresh run pays it: no graphs reused from inductor's on-disk caches
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    backbone = load_backbone(model_cfg, device, random_shape=args.random_shape, num_prompts=args.num_prompts,
                             text_tokens=args.text_tokens, dtype=torch.bfloat16 if bf16 else torch.float32)
    backbone.adapter.transformer.requires_grad_(True)
    plan = plans.tree_plan(args.steps, SPLITS, 2)
    print(f"compile vs eager: {backbone.description} on {device}", flush=True)
    result = compare(backbone, plan, args.num_prompts, args.steps, args.micro_batch, device, autocast, args.repeats,
                     args.warmup, args.gradient_checkpointing)
    machine["load_average_end"] = machine_info(device).get("load_average_1_5_15")
    return {"backbone": backbone.description, "dtype": "bf16" if bf16 else "fp32", "machine": machine,
            "args": vars(args), "compare": result}


def main(argv=None) -> int:
    from branchgrpo.runtime.entry import run_cli

    return run_cli(_main, argv)


def _main(argv) -> None:
    args = parse_args(argv)
    result = run(args)
    write_result(args.output, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
