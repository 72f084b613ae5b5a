"""Throughput benchmark of the rollout and the update, in one run: `python -m branchgrpo.bench`.

    python -m branchgrpo.bench --model toy --output outputs/bench/toy.json
    python -m branchgrpo.bench --model flux --random_shape tiny --h 64 --w 64 --output outputs/bench/flux_tiny.json
    python -m branchgrpo.bench --model flux --random_shape full --h 720 --w 720 --device cuda --lora_rank 64 \\
        --peak_tflops 989 --output outputs/bench/flux_full_h100.json          # one GPU, FLUX.1-dev's shape
    python -m branchgrpo.bench --model wan --pretrained_model_name_or_path data/wan_tiny --h 32 --w 48 \\
        --num_frames 9 --text_tokens 16 --output outputs/bench/wan_tiny.json

Measures (medians of interleaved repeats after warm-up; see docs/benchmarks.md):
1. the backbone's cost per call against its batch size, t(b) = a + c b (why the ratios below are what they are);
2. a 16-leaf tree rollout (T 20, splits 0,3,6,9, K 2) depth-batched vs one node at a time (batch 1, the official
   code's way): forward passes per second and their ratio (target >= 3x);
3. the tree vs 16 sequential chains for the same leaves: wall times, forward-pass counts, and whether the tree
   takes at most 15% more than its compute-proportional share (F_tree / F_seq) x t_seq;
4. training edges per second of the real update over the tree's 202 trainable edges, per micro-batch size, with and
   without activation checkpointing; peak memory (CUDA max allocated, CPU peak RSS) of each phase;
5. MFU = 2 N tokens forwards/s / peak (rollout) and 6 N tokens training-forwards/s / peak (update), when
   --peak_tflops is given.
Writes --output (JSON) and the same tables as markdown next to it (.md), and prints them. The measurements are in
branchgrpo/bench/ (throughput.py, measure.py, report.py), the backbones in branchgrpo/bench/backbones.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.core.flags import parse_int_list
from branchgrpo.bench.backbones import add_model_flags, model_config
from branchgrpo.core.distributed import resolve_device
from branchgrpo.runtime.outputs import writable_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--text_tokens", type=int, default=None, help="text tokens per prompt (random conditioning: "
                   "default 512 for 4096-wide FLUX, 16 for tiny ones; encoded prompts: --max_sequence_length)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 weights + autocast on CUDA, fp32 on CPU")
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--lora_rank", type=int, default=0, help="train LoRA adapters of this rank (0: full model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tree_split_points", default="0,3,6,9")
    p.add_argument("--branch_factor", type=int, default=2)
    p.add_argument("--num_prompts", type=int, default=1, help="trees per rollout in the depth-batching and training "
                   "measurements (1: one 16-leaf tree)")
    p.add_argument("--tree_prompts", default="1,8", help="prompts per rollout for the tree-vs-sequential check")
    p.add_argument("--rollout_batch_size", type=int, default=256, help="latents per call when depth-batched")
    p.add_argument("--forward_batches", default="1,2,4,8,16,32,64", help="batch sizes of the forward-cost curve")
    p.add_argument("--micro_batch_sizes", default="1,8,32", help="parents per training micro-batch")
    p.add_argument("--checkpointing", choices=("both", "off", "on"), default="both",
                   help="activation checkpointing in the training measurement")
    p.add_argument("--skip_training", action="store_true")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per rollout variant (median reported)")
    p.add_argument("--train_repeats", type=int, default=3, help="timed repeats per training variant")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds before timing")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak dense TFLOP/s of the device in the "
                   "benchmark's dtype, for MFU (e.g. 989 for an H100/H200 SXM in bf16); omitted: no MFU")
    p.add_argument("--output", default="outputs/bench/bench.json", help="JSON result; the markdown goes next to it")
    add_debug_flag(p)
    return p


def run(args) -> dict:
    from branchgrpo.bench import throughput as tp
    from branchgrpo.bench.backbones import load_backbone
    from branchgrpo.bench.measure import machine_info
    from branchgrpo.bench.report import bench_markdown, write_result

    model_cfg = model_config(args, args.random_shape)  # before anything is loaded
    if args.num_threads < 0:
        raise ValueError(f"--num_threads: need >= 0 (0 = torch's default), got {args.num_threads}")
    for name, low in (("steps", 2), ("num_prompts", 1), ("rollout_batch_size", 1), ("repeats", 1),
                      ("train_repeats", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name}: need >= {low}, got {getattr(args, name)}")
    writable_file(args.output, "--output")
    args.split_points = parse_int_list(args.tree_split_points, "--tree_split_points")
    args.micro_batch_sizes = parse_int_list(args.micro_batch_sizes, "--micro_batch_sizes")
    tree_prompts = parse_int_list(args.tree_prompts, "--tree_prompts")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    if device.type == "cpu":  # what the trainer does on CPU (--deterministic auto), so the update costs the same
        torch.use_deterministic_algorithms(True, warn_only=True)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else tp.no_autocast
    max_prompts = max([args.num_prompts, *tree_prompts])
    backbone = load_backbone(model_cfg, device, random_shape=args.random_shape, num_prompts=max_prompts,
                             text_tokens=args.text_tokens, dtype=weight_dtype)
    if args.lora_rank > 0:
        backbone.adapter.add_lora(args.lora_rank, 2 * args.lora_rank)
    backbone.adapter.transformer.eval()
    print(f"benchmarking {backbone.description}: {backbone.num_params / 1e6:.3g}M parameters, "
          f"{backbone.tokens_per_sample} tokens per sample, on {device}", flush=True)
    result = {"backbone": backbone.description, "num_params": backbone.num_params,
              "tokens_per_sample": backbone.tokens_per_sample, "dtype": "bf16" if bf16 else "fp32",
              "machine": machine_info(device), "args": {k: v for k, v in vars(args).items()}}
    result["forward_cost"] = tp.forward_cost_curve(backbone, parse_int_list(args.forward_batches, "--forward_batches"),
                                                   device, autocast, args.repeats, args.warmup)
    print("forward cost measured", flush=True)
    depth = tp.depth_batching(backbone, args, device, autocast)
    graph = depth.pop("graph")
    result["depth_batching"] = depth
    print(f"depth batching: {depth['speedup']:.2f}x", flush=True)
    result["tree_vs_sequential"] = [tp.tree_vs_sequential(backbone, args, device, autocast, n) for n in tree_prompts]
    print("tree vs sequential measured", flush=True)
    result["host_syncs"] = tp.host_syncs(backbone, args, device, autocast, max(tree_prompts))
    result["training"] = []
    if not args.skip_training:
        from branchgrpo.runtime.parallel import apply_activation_checkpointing

        modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
        for checkpointing in modes:
            if checkpointing:  # in place, so after the runs without it
                apply_activation_checkpointing(backbone.adapter.transformer, backbone.adapter.blocks(), 1.0)
            result["training"] += tp.training_throughput(backbone, graph, args, device, autocast, checkpointing)
            print(f"training measured (checkpointing {checkpointing})", flush=True)
    result["mfu"] = _mfu(result, backbone, args.peak_tflops)
    result["machine"]["load_average_end"] = machine_info(device).get("load_average_1_5_15")
    write_result(args.output, result, bench_markdown(result))
    return result


def _mfu(result: dict, backbone, peak_tflops: float | None) -> dict:
    from branchgrpo.bench.throughput import mfu

    batched = result["depth_batching"]["rows"][0]
    out = {"peak_tflops": peak_tflops, "formula": "flops_factor * params * tokens_per_sample * sample_forwards_per_s "
           "/ peak; flops_factor 2 (rollout) or 6 (training); attention's quadratic term not counted",
           "rollout_depth_batched": mfu(backbone.num_params, backbone.tokens_per_sample,
                                        batched["forward_passes_per_s"], peak_tflops, 2)}
    for row in result["training"]:
        key = f"training_micro{row['micro_batch_parents']}_ckpt{int(row['activation_checkpointing'])}"
        out[key] = mfu(backbone.num_params, backbone.tokens_per_sample, row["training_forwards_per_s"],
                       peak_tflops, 6)
    return out


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
