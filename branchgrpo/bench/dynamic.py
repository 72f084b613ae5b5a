"""Dynamic branching benchmark (issue 13): fixed BranchGRPO (today's default flags: configs/toy_branchgrpo.yaml on the
toy) against each dynamic-branching policy of the `branchgrpo` unit and one combination, for the same number of
iterations over several seeds; eval reward against (a) rollout + training forward passes and (b) wall time.

    python -m branchgrpo.bench.dynamic --iterations 30 --seeds 0,1,2 --output_dir outputs/dynamic_branching
    (or `bash scripts/bench/dynamic_branching.sh`)

Each (method, seed) is a normal training run in `<output_dir>/runs/<method>/seed<k>/`, reused when finished with the
same flags (branchgrpo.bench.compare.run_method), so an interrupted benchmark resumes. Forward passes per iteration
come from each run's metrics (`rollout_nfe` x leaves, and `train_forward_passes`: distinct parents of trained edges);
evaluation forwards are the same for every method and are not counted. Results: table.{json,md,csv} and
reward_vs_compute.png. `forwards_to_baseline_reward`: per seed, the cumulative forward passes at the first
evaluation whose reward reaches the fixed tree's final eval reward (mean over seeds); the mean is over the seeds
that reach it (`reached` says how many), null if none does. Diversity: the reward-hacking monitor's within-prompt
diversity of the final eval samples (pixel features) and its ratio to the base model's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

from branchgrpo.bench.compare import builtin_embeddings, run_method
from branchgrpo.core.flags import parse_int_list

BASELINE = "branchgrpo"
# row -> flags added to the baseline's. The combinations: guided + allocation (chosen before measuring: the two that
# cut an iteration's compute) and guided + splits (chosen after the single policies' 20-iteration toy runs: the two
# with the fewest forward passes per eval-reward gain); neither tuned further.
POLICIES: dict[str, list[str]] = {
    "branchgrpo": [],
    "branchgrpo_allocation": ["--dynamic_allocation"],
    "branchgrpo_splits": ["--adaptive_splits"],
    "branchgrpo_innovation": ["--adaptive_innovation"],
    "branchgrpo_guided": ["--guided_expansion"],
    "branchgrpo_guided_allocation": ["--guided_expansion", "--dynamic_allocation"],
    "branchgrpo_guided_splits": ["--guided_expansion", "--adaptive_splits"],
}
REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("method", "seeds", "iterations", "forward_passes_total", "forward_passes_ratio", "wall_time_s",
           "eval_reward_before", "eval_reward_after", "eval_reward_ci95", "forwards_to_baseline_reward",
           "forwards_to_baseline_ratio", "reached", "diversity", "diversity_ratio")


def run_args(method: str, seed: int, iterations: int, eval_every: int, output_dir: Path, base: list[str],
             extra: list[str]) -> list[str]:
    return [*base, *POLICIES[method], "--seed", str(seed), "--max_train_steps", str(iterations),
            "--validation_steps", str(eval_every), "--checkpointing_steps", "0", "--checkpoints_total_limit", "1",
            "--save_rollout_samples", "0", "--report_to", "none",
            "--output_dir", str(output_dir / "runs" / method / f"seed{seed}"), *extra]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n - 1 degrees of freedom (n >= 2)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    return table.get(n - 1, 1.96)


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and half-width of its 95% interval over seeds (null with fewer than two values)."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, _t95(len(values)) * sd / math.sqrt(len(values))


def run_curve(run_dir: Path) -> dict:
    """One run's cumulative forward passes and wall time at each evaluation, and its eval figures."""
    entries, evals = _jsonl(run_dir / "metrics.jsonl"), _jsonl(run_dir / "eval.jsonl")
    per_it = [round(e["rollout_nfe"] * e["leaves"]) + e["train_forward_passes"] for e in entries]
    cum, wall, total_t = [0], [0.0], 0.0
    for f, e in zip(per_it, entries):
        cum.append(cum[-1] + f)
        total_t += e["iter_time_s"]
        wall.append(total_t)
    return {"steps": [e["step"] for e in evals], "reward": [e["eval_reward"] for e in evals],
            "forwards": [cum[e["step"]] for e in evals], "wall": [wall[e["step"]] for e in evals],
            "forwards_total": cum[-1], "wall_total": wall[-1], "diversity": evals[-1].get("monitor_diversity"),
            "diversity_ratio": evals[-1].get("monitor_diversity_ratio")}


def first_reach(curve: dict, target: float) -> int | None:
    return next((f for f, r in zip(curve["forwards"], curve["reward"]) if r >= target), None)


def table(curves: dict[str, list[dict]], iterations: int) -> list[dict]:
    base_final, _ = mean_ci([c["reward"][-1] for c in curves[BASELINE]])
    base_total, _ = mean_ci([c["forwards_total"] for c in curves[BASELINE]])
    rows = []
    for method, runs in curves.items():
        after, ci = mean_ci([c["reward"][-1] for c in runs])
        reach = [first_reach(c, base_final) for c in runs]
        got = [r for r in reach if r is not None]
        to_base, to_base_ci = mean_ci(got)
        total, _ = mean_ci([c["forwards_total"] for c in runs])
        div, _ = mean_ci([c["diversity"] for c in runs if c["diversity"] is not None])
        div_ratio, _ = mean_ci([c["diversity_ratio"] for c in runs if c["diversity_ratio"] is not None])
        rows.append({
            "method": method, "seeds": len(runs), "iterations": iterations, "forward_passes_total": total,
            "forward_passes_ratio": total / base_total, "wall_time_s": mean_ci([c["wall_total"] for c in runs])[0],
            "eval_reward_before": mean_ci([c["reward"][0] for c in runs])[0], "eval_reward_after": after,
            "eval_reward_ci95": ci, "forwards_to_baseline_reward": to_base, "forwards_to_baseline_ci95": to_base_ci,
            "forwards_to_baseline_ratio": None if to_base is None else to_base / base_total,
            "reached": f"{len(got)}/{len(runs)}", "diversity": div, "diversity_ratio": div_ratio,
        })
    return rows


def _fmt(v) -> str:
    if v is None:
        return "null"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_outputs(output_dir: Path, rows: list[dict], curves: dict, header: dict) -> None:
    (output_dir / "table.json").write_text(json.dumps({**header, "rows": rows, "curves": curves}, indent=1))
    with open(output_dir / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (output_dir / "table.md").write_text("\n".join(md) + "\n")
    plot(curves, output_dir / "reward_vs_compute.png")


def _band(runs: list[dict], key: str):
    """Mean curve over seeds and its 95% band, on the evaluation index (the seeds evaluate at the same steps)."""
    n = min(len(c["reward"]) for c in runs)
    xs = [sum(c[key][i] for c in runs) / len(runs) for i in range(n)]
    stats = [mean_ci([c["reward"][i] for c in runs]) for i in range(n)]
    return xs, [m for m, _ in stats], [h or 0.0 for _, h in stats]


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "forwards", "rollout + training forward passes (per rank)"),
                           (axes[1], "wall", "training wall time (s)")):
        for method, runs in curves.items():
            xs, mean, half = _band(runs, key)
            ax.plot(xs, mean, marker="o", ms=3, label=method)
            ax.fill_between(xs, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out eval reward (mean over seeds, 95% band)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from branchgrpo.runtime.entry import run_cli

    return run_cli(_main, argv)


def _main(argv) -> None:
    from branchgrpo.runtime.outputs import writable_folder

    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.dynamic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(POLICIES)} (the baseline is added)")
    p.add_argument("--eval_every", type=int, default=None, help="default: iterations // 6")
    p.add_argument("--output_dir", default="outputs/dynamic_branching")
    p.add_argument("--launcher", default="inprocess", choices=("inprocess", "torchrun"))
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--num_threads", type=int, default=1)
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    names = list(POLICIES) if args.methods == "all" else [BASELINE] + [m for m in args.methods.split(",") if m != BASELINE]
    unknown = [m for m in names if m not in POLICIES]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(POLICIES)}")
    for name, low in (("iterations", 1), ("nproc", 1), ("num_threads", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name}: need >= {low}, got {getattr(args, name)}")
    seeds = parse_int_list(args.seeds, "--seeds")
    out = writable_folder(args.output_dir, "--output_dir")
    every = args.eval_every or max(1, args.iterations // 6)
    preset = REPO / "configs" / f"{args.model}_branchgrpo.yaml"  # the backbone's shipped BranchGRPO preset, if any
    base = ["--config", str(preset)] if preset.is_file() else ["--model", args.model]
    emb = builtin_embeddings(args.model, out)
    if emb is not None:
        base += ["--data_json_path", str(emb[0]), "--eval_data_json_path", str(emb[1]), "--device", "cpu"]
    start, load = time.time(), list(os.getloadavg())
    curves: dict[str, list[dict]] = {}
    for method in names:
        for seed in seeds:
            a = run_args(method, seed, args.iterations, every, out, base, extra)
            run_method(f"{method}/seed{seed}", a, args.launcher, args.nproc, args.num_threads)
            curves.setdefault(method, []).append(run_curve(Path(a[a.index("--output_dir") + 1])))
    rows = table(curves, args.iterations)
    header = {"model": args.model, "iterations": args.iterations, "seeds": seeds, "eval_every": every,
              "load_average_start": load, "load_average_end": list(os.getloadavg()),
              "harness_wall_s": time.time() - start, "flags": {m: POLICIES[m] for m in names}}
    write_outputs(out, rows, curves, header)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
