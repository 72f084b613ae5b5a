"""Markdown (and CSV) renderings of the benchmark and comparison results."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def bench_markdown(r: dict) -> str:
    m = r["machine"]
    load = m.get("load_average_1_5_15")
    out = [f"### {r['backbone']}", "",
           f"{r['num_params'] / 1e6:.4g}M parameters, {r['tokens_per_sample']} tokens per sample, {r['dtype']}; "
           f"{m['device']}" + (f" ({m['gpu']})" if "gpu" in m else f", {m['cpu_count']} CPU cores, "
                                                               f"{m['torch_threads']} torch thread(s)")
           + (f"; load average at start {load[0]:.2f}, at end {m['load_average_end'][0]:.2f}" if load else ""), ""]
    curve = r["forward_cost"]
    out += ["Backbone cost per call against batch size (fit t(b) = a + c b: "
            f"a = {curve[0].get('fit_fixed_ms', float('nan')):.3g} ms fixed, "
            f"c = {curve[0].get('fit_per_sample_ms', float('nan')):.3g} ms per sample):", "",
            md_table(["batch", "ms per call", "ms per sample"],
                     [(c["batch"], c["ms_per_call"], c["ms_per_sample"]) for c in curve]), ""]
    d = r["depth_batching"]
    out += [f"Depth batching, {d['num_prompts']} prompt(s) x {d['leaves_per_prompt']}-leaf tree "
            f"(target: >= {d['target']:g}x forward passes per second):", "",
            md_table(["mode", "forward passes", "backbone calls", "median s", "forward passes / s",
                      "backbone share of wall", "peak MB"],
                     [(x["mode"], x["forward_passes"], x["velocity_calls"], x["median_s"], x["forward_passes_per_s"],
                       x["backbone_share"], x["peak_memory_mb"]) for x in d["rows"]]),
            "", f"Speed-up of depth batching: **{d['speedup']:.2f}x** ({'meets' if d['meets_target'] else 'MISSES'} "
                f"the {d['target']:g}x target).", ""]
    out += ["Tree vs sequential chains for the same leaves (both depth-batched; target: tree <= 1.15 x its "
            "compute-proportional share (F_tree / F_seq) x t_seq):", "",
            md_table(["prompts", "tree forwards", "sequential forwards", "tree s", "sequential s",
                      "proportional share s", "tree vs share", "within 15%", "backbone share (tree / seq)",
                      "tree vs share, backbone time only"],
                     [(t["num_prompts"], t["tree_forward_passes"], t["sequential_forward_passes"], t["tree_s"],
                       t["sequential_s"], t["proportional_share_s"], f"{100 * t['deviation']:+.1f}%",
                       t["within_tolerance"], f"{t['tree_backbone_share']:.2f} / {t['sequential_backbone_share']:.2f}",
                       f"{100 * t['deviation_backbone_only']:+.1f}%")
                      for t in r["tree_vs_sequential"]]), ""]
    if "host_syncs" in r:
        h = r["host_syncs"]
        where = lambda d: "; ".join(f"{k}: {n}" for k, n in d.items()) or "-"  # noqa: E731
        out += [f"Host syncs (branchgrpo.bench.syncs; conservative on a CPU): one rollout of {h['num_prompts']} "
                f"trees ({h['rollout']['depths']} depths), one update in micro-batches of "
                f"{h['micro_batch_parents']} parents ({h['update']['micro_batches']} micro-batches, 1 optimizer step); "
                "'in the loop' leaves out host-side layout functions and the optimizer's step counters:", "",
                md_table(["phase", "all own", "in the loop", "per depth / micro-batch", "inside the backbone",
                          "own, by where (kind)"],
                         [("rollout", h["rollout"]["own"], h["rollout"]["in_loop"], h["rollout"]["in_loop_per_depth"],
                           h["rollout"]["backbone"], where(h["rollout"]["own_by_where"])),
                          ("update", h["update"]["own"], h["update"]["in_loop"],
                           h["update"]["in_loop_per_micro_batch"], h["update"]["backbone"],
                           where(h["update"]["own_by_where"]))]), ""]
    if r["training"]:
        out += ["Training (the real PolicyUpdate over every trainable edge of the tree; micro-batch = distinct "
                "parent latents per forward):", "",
                md_table(["micro-batch", "act. checkpointing", "edges", "training forwards", "micro-batches",
                          "median s", "edges / s", "peak MB"],
                         [(t["micro_batch_parents"], t["activation_checkpointing"], t["edges"], t["training_forwards"],
                           t["micro_batches"], t["median_s"], t["edges_per_s"], t["peak_memory_mb"])
                          for t in r["training"]]), ""]
        kinds = {t["memory_kind"] for t in r["training"]}
        out += [f"Peak memory: {', '.join(sorted(kinds))}.", ""]
    mfu = r["mfu"]
    if mfu.get("peak_tflops"):
        out += [f"MFU at a peak of {mfu['peak_tflops']:g} TFLOP/s ({mfu['formula']}):", "",
                md_table(["phase", "MFU"], [(k, v) for k, v in mfu.items() if k not in ("peak_tflops", "formula")]),
                ""]
    return "\n".join(out)


def write_result(output: str, result: dict, text: str) -> None:
    """`result` as JSON at `output` and the markdown `text` next to it (.md), both printed about."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.md')}")

