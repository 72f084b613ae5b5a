"""The method comparison over several seeds: per method, means with 95% intervals (Student's t over the seeds) of
the final held-out reward, its gain, the training time and the diversity against the base model; the compute and
the time each method needs to reach the baseline's (DanceGRPO's) final reward; and the curves of held-out reward
against forward-pass equivalents and against wall time, mean and interval band per method (reward_vs_compute.png).
Built from the per-run rows of branchgrpo.bench.compare_report.collect."""

from __future__ import annotations

import json
import math
from pathlib import Path

from branchgrpo.bench.dynamic import mean_ci
from branchgrpo.bench.report import md_table

SEED_COLUMNS = (
    ("method", "method"), ("seeds", "seeds"), ("eval_reward_after", "eval reward after"),
    ("eval_reward_delta", "eval gain"), ("forwards_per_iteration", "forward-pass eq. / iteration"),
    ("train_wall_s", "training time s"), ("forwards_to_target", "forward-pass eq. to target"),
    ("time_to_target_s", "time to target s"), ("reached", "reached target"),
    ("diversity_ratio", "diversity / base"), ("kid", "KID to base"),
)
INTERVALS = ("eval_reward_after", "eval_reward_delta", "train_wall_s", "diversity_ratio", "kid",
             "forwards_to_target", "time_to_target_s")


def interval(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95% interval) over the known values (`bench.dynamic.mean_ci`: Student's t over the
    seeds); the half-width is None for fewer than two."""
    return mean_ci([v for v in values if v is not None and math.isfinite(v)])


def first_reaching(curve: dict, target: float) -> tuple[float | None, float | None]:
    """(cumulative forward-pass equivalents, cumulative training time) at the first evaluation whose reward is at
    least `target` (no interpolation between evaluations); (None, None) if none is."""
    for reward, compute, time_s in zip(curve["eval_reward"], curve["eval_compute"], curve["eval_time_s"]):
        if reward is not None and reward >= target:
            return compute, time_s
    return None, None


def aggregate(rows: list[dict], baseline: str) -> tuple[list[dict], float | None]:
    """Per method (in the rows' order): the seeds' means and intervals; and the target, the baseline's mean final
    held-out reward (None without a baseline run)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    target, _ = interval([r["eval_reward_after"] for r in rows if r["method"] == baseline])
    out = []
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        reach = [first_reaching(r["curve"], target) if target is not None else (None, None) for r in runs]
        values = {k: [r.get(k) for r in runs] for k in INTERVALS[:5]}
        values["forwards_to_target"] = [c for c, _ in reach]
        values["time_to_target_s"] = [t for _, t in reach]
        agg = {"method": method, "label": runs[0]["label"], "seeds": [r["seed"] for r in runs],
               "forwards_per_iteration": interval([r["forwards_per_iteration"] for r in runs])[0],
               "reached": f"{sum(c is not None for c, _ in reach)}/{len(runs)}", "curve": mean_curve(runs)}
        for key, vals in values.items():
            agg[key], agg[f"{key}_ci95"] = interval(vals)
        out.append(agg)
    return out, target


def mean_curve(runs: list[dict]) -> dict:
    """Held-out reward per evaluation step over the seeds (mean and interval), at the seeds' mean cumulative
    compute and time; steps that not every seed evaluated are left out."""
    steps = sorted(set.intersection(*(set(r["curve"]["eval_step"]) for r in runs)))
    out = {"step": steps, "compute": [], "time_s": [], "reward": [], "ci95": []}
    for step in steps:
        at = [r["curve"]["eval_step"].index(step) for r in runs]
        out["compute"].append(interval([r["curve"]["eval_compute"][i] for r, i in zip(runs, at)])[0])
        out["time_s"].append(interval([r["curve"]["eval_time_s"][i] for r, i in zip(runs, at)])[0])
        mean, half = interval([r["curve"]["eval_reward"][i] for r, i in zip(runs, at)])
        out["reward"].append(mean)
        out["ci95"].append(half)
    return out


def _cell(agg: dict, key: str):
    value, half = agg.get(key), agg.get(f"{key}_ci95")
    if isinstance(value, float) and half is not None:
        digits = 0 if abs(value) >= 100 else 4
        return f"{value:.{digits}f} ± {half:.{digits}f}"
    if key == "seeds":
        return ",".join(str(s) for s in value)
    return value


def seed_summary(output_dir: Path, rows: list[dict], baseline: str) -> list[str]:
    """seeds.json and reward_vs_compute.png; returns the table.md lines of the seeds' summary."""
    aggregates, target = aggregate(rows, baseline)
    (output_dir / "seeds.json").write_text(json.dumps({"target": target, "baseline": baseline,
                                                       "methods": aggregates}, indent=1))
    plot_seed_curves(aggregates, output_dir / "reward_vs_compute.png")
    return ["## Over seeds", "",
            f"Means ± 95% intervals (Student's t over the seeds). Target: {baseline}'s mean final held-out reward "
            f"({'-' if target is None else format(target, '.4f')}); compute and time to it are taken at the first "
            "evaluation at or above it, averaged over the seeds that reach it.", "",
            md_table([h for _, h in SEED_COLUMNS], [[_cell(a, k) for k, _ in SEED_COLUMNS] for a in aggregates]), "",
            "![eval reward vs compute and time](reward_vs_compute.png)", ""]


def plot_seed_curves(aggregates: list[dict], path: Path) -> Path:
    """Held-out reward (mean over seeds, 95% band) against forward-pass equivalents and against training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for agg in aggregates:
        c = agg["curve"]
        low = [m - (h or 0.0) for m, h in zip(c["reward"], c["ci95"])]
        high = [m + (h or 0.0) for m, h in zip(c["reward"], c["ci95"])]
        for ax, x in zip(axes, (c["compute"], c["time_s"])):
            (line,) = ax.plot(x, c["reward"], "o-", label=agg["label"])
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    for ax, label in zip(axes, ("forward-pass equivalents per rank (rollout + 3 x training + no-backward forwards)",
                                "training wall-clock time (s, evaluation excluded)")):
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("held-out eval reward (mean over seeds, 95% band)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
