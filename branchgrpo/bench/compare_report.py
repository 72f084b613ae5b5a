"""Tables and the plot of the method comparison, built only from the files each training run wrote
(metrics.jsonl, eval.jsonl, summary.json, config.json), so a table can be rebuilt at any time (`--collect_only`).

Per-iteration times are means over the iterations after the first (the first carries one-off warm-up: allocator,
lazy imports, caches); the NFE columns are means over all iterations and are cross-checked against
`branchgrpo.plan`'s counts for each method's flags at every iteration (`plan_*` columns).
"""

from __future__ import annotations

import json
from pathlib import Path

from branchgrpo.bench.compare import method_of
from branchgrpo.core.files import read_json
from branchgrpo.bench.report import md_table, write_csv
from branchgrpo.runtime.outputs import read_jsonl

TIME_KEYS = ("iter_time_s", "rollout_time_s", "reward_time_s", "train_time_s")
TABLE_COLUMNS = (
    ("method", "method"), ("seed", "seed"), ("label", "Table 1 row"), ("leaves_per_prompt", "leaves / prompt"),
    ("rollout_nfe", "NFE pi_old (rollout forwards / leaf)"), ("train_nfe", "NFE pi_theta (trained edges / leaf)"),
    ("rollout_forwards_per_prompt", "rollout forwards / prompt"), ("trained_edges_per_prompt",
                                                                    "trained edges / prompt"),
    ("iter_time_s", "iter. time s"), ("iter_time_ratio", "iter. time / DanceGRPO tf1.0"),
    ("rollout_time_s", "rollout s"), ("reward_time_s", "reward s"), ("train_time_s", "train s"),
    ("eval_reward_before", "eval reward before"), ("eval_reward_after", "eval reward after"),
    ("eval_reward_delta", "eval gain"), ("train_wall_s", "training time s"),
    ("forwards_per_iteration", "forward-pass equivalents / iteration"),
    ("diversity_ratio", "diversity / base"), ("kid", "KID to base"),
)


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _mean(values: list[float]) -> float | None:
    """The mean of the finite-reported values (None entries are iterations without data), None if there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def plan_nfe(run_dir: Path, iterations: int) -> tuple[float, float]:
    """Mean over iterations of the per-leaf rollout forwards and trained edges that `branchgrpo.plan` counts for the
    run's own flags (config.json), without running a model."""
    from branchgrpo.planner.counts import count
    from branchgrpo.config import config_from_flags

    cfg = config_from_flags(read_json(run_dir / "config.json"), validate="none")
    counts = [count(cfg, it) for it in range(iterations)]
    return (_mean([c["forward_passes_per_leaf"] for c in counts]),
            _mean([c["trained_edges_per_leaf"] for c in counts]))


def forward_equivalents(entry: dict, sizes: dict) -> float:
    """One iteration's compute on a rank in forward-pass equivalents: the rollout's forwards, each training forward
    with its backward as 3, and the forwards without a backward (KL reference, theta_old, recomputed log-probs)."""
    rollout = entry["rollout_nfe"] * sizes["leaves"] * sizes["prompts_per_rank"]
    return rollout + 3 * entry["train_forward_rows"] + entry["extra_forward_rows"]


def collect(output_dir: Path, runs: dict[str, list[str]], methods: dict, flags: dict[str, list[str]],
            baseline: str) -> list[dict]:
    """One row per run (`runs`: run id -> trainer arguments; the id is the method's name or `<method>/seed<s>`)."""
    rows = []
    for run, args in runs.items():
        name = method_of(run)
        run_dir = Path(args[args.index("--output_dir") + 1])
        entries = _jsonl(run_dir / "metrics.jsonl")
        if not (run_dir / "summary.json").is_file() or not entries:
            print(f"[compare] {run}: no finished run in {run_dir}; left out of the table")
            continue
        summary = read_json(run_dir / "summary.json")
        evals = _jsonl(run_dir / "eval.jsonl")
        timed = entries[1:] if len(entries) > 1 else entries
        leaves = summary["sizes"]["leaves"]  # per prompt, as the NFEs count them (G2RPO's anchor leaf included)
        forwards = [forward_equivalents(e, summary["sizes"]) for e in entries]
        final = evals[-1] if evals else {}
        row = {"method": name, "run": run, "seed": read_json(run_dir / "config.json")["seed"],
               "label": methods[name][0], "flags": " ".join(flags[name]),
               "forwards_per_iteration": _mean(forwards),
               # against the base model's samples of the same prompts and seeds (the step-0 evaluation)
               "diversity_ratio": final.get("monitor_diversity_ratio"), "kid": final.get("monitor_kid"),
               "iterations": len(entries), "leaves_per_prompt": leaves,
               "rollout_nfe": _mean([e["rollout_nfe"] for e in entries]),
               "train_nfe": _mean([e["train_nfe"] for e in entries])}
        row["rollout_forwards_per_prompt"] = row["rollout_nfe"] * leaves
        row["trained_edges_per_prompt"] = row["train_nfe"] * leaves
        row["plan_rollout_nfe"], row["plan_train_nfe"] = plan_nfe(run_dir, len(entries))
        row.update({k: _mean([e[k] for e in timed]) for k in TIME_KEYS})
        row.update(eval_reward_before=summary["eval_reward_before"], eval_reward_after=summary["eval_reward_after"],
                   eval_reward_delta=_difference(summary["eval_reward_after"], summary["eval_reward_before"]),
                   reward_first=entries[0]["reward_mean"], reward_last=entries[-1]["reward_mean"],
                   train_wall_s=sum(e["iter_time_s"] for e in entries), wall_time_s=summary["wall_time_s"],
                   peak_memory_mb=summary.get("peak_memory_mb"), world_size=summary.get("world_size"),
                   curve=_curve(entries, evals, forwards))
        rows.append(row)
    base = next((r for r in rows if r["method"] == baseline), None)  # its first seed's run
    for row in rows:
        row["iter_time_ratio"] = row["iter_time_s"] / base["iter_time_s"] if base else None
    return rows


def _curve(entries: list[dict], evals: list[dict], forwards: list[float]) -> dict:
    """Reward against cumulative training time (iteration times summed; evaluation time left out) and cumulative
    compute (forward-pass equivalents)."""
    elapsed, clock, compute, total = [0.0], 0.0, [0.0], 0.0
    for e, f in zip(entries, forwards):
        clock += e["iter_time_s"]
        total += f
        elapsed.append(clock)
        compute.append(total)
    at = [min(v["step"], len(entries)) for v in evals]
    return {"time_s": elapsed[1:], "reward_mean": [e["reward_mean"] for e in entries],
            "eval_step": [v["step"] for v in evals], "eval_time_s": [elapsed[i] for i in at],
            "eval_compute": [compute[i] for i in at], "eval_reward": [v["eval_reward"] for v in evals]}


def write_outputs(output_dir: Path, rows: list[dict], runs: dict, methods: dict, header: dict) -> None:
    keys = [k for k, _ in TABLE_COLUMNS]
    table = [[row.get(k) for k in keys] for row in rows]
    (output_dir / "table.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=1))
    write_csv(output_dir / "table.csv", keys + ["plan_rollout_nfe", "plan_train_nfe", "iterations", "flags"],
              [t + [r["plan_rollout_nfe"], r["plan_train_nfe"], r["iterations"], r["flags"]]
               for t, r in zip(table, rows)])
    (output_dir / "methods.json").write_text(json.dumps(
        {run: {"label": methods[method_of(run)][0], "trainer_args": args} for run, args in runs.items()}, indent=1))
    lines = [f"# Method comparison: {header['model']}, {header['iterations']} iterations per method", "",
             f"Same model, prompts, seeds, learning rate, batch and evaluation for every method (common flags: "
             f"`{' '.join(header['common_flags'])}`" + (f"; extra: `{' '.join(header['extra_flags'])}`"
                                                       if header["extra_flags"] else "") + "). "
             f"Times are means over iterations 2..N; held-out evaluation every {header['eval_every']} iterations. "
             "Forward-pass equivalents per iteration and rank: rollout forwards + 3 x training forwards (forward and "
             "backward) + forwards without a backward (KL reference, DiffusionNFT's theta_old); diversity and KID: "
             "the last evaluation's samples against the base model's (step 0) of the same prompts and seeds.",
             "", md_table([h for _, h in TABLE_COLUMNS], table), "", "Method flags:", "",
             md_table(["method", "flags"], [(r["method"], f"`{r['flags']}`") for r in rows
                                            if r is next(q for q in rows if q["method"] == r["method"])]), "",
             "![reward vs wall-clock time](reward_vs_time.png)", ""]
    if len({r["seed"] for r in rows}) > 1:
        from branchgrpo.bench.compare_seeds import seed_summary

        lines += seed_summary(output_dir, rows, header["baseline"])
    (output_dir / "table.md").write_text("\n".join(lines))
    plot_reward_vs_time(rows, output_dir / "reward_vs_time.png")


def plot_reward_vs_time(rows: list[dict], path: Path) -> Path:
    """One figure, two panels: held-out eval reward, and rollout (training) reward, against training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_roll) = plt.subplots(1, 2, figsize=(12, 4.5))
    window = max(1, max((len(r["curve"]["reward_mean"]) for r in rows), default=1) // 10)
    for row in rows:
        c = row["curve"]
        evals = [float("nan") if v is None else v for v in c["eval_reward"]]
        label = row["label"] + (f" (seed {row['seed']})" if row["run"] != row["method"] else "")
        (line,) = ax_eval.plot(c["eval_time_s"], evals, "o-", label=label)
        ax_roll.plot(c["time_s"], _moving_average(c["reward_mean"], window), "-", color=line.get_color(),
                     label=label)
    rollout_title = "rollout reward, mean over leaves" + (f" ({window}-iteration moving average)" if window > 1
                                                          else "")
    for ax, title in ((ax_eval, "held-out eval reward (ODE sampler)"), (ax_roll, rollout_title)):
        ax.set_xlabel("training wall-clock time (s, evaluation excluded)")
        ax.set_ylabel("reward")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax_eval.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _moving_average(values: list[float | None], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): rollout rewards are noisy per iteration.
    Iterations without a finite reward (None) are left out of the mean; a window without any gives NaN (a gap)."""
    out = []
    for i in range(len(values)):
        known = [v for v in values[max(0, i + 1 - window) : i + 1] if v is not None]
        out.append(sum(known) / len(known) if known else float("nan"))
    return out
