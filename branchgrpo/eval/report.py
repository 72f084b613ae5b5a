"""Summary statistics of per-sample scores and the tables an evaluation leaves: results.json / .csv / .md and
scores.csv (one row per sample).

Two 95% confidence intervals of the mean are reported for every metric, because they answer different questions:
- `ci95_normal`: mean +- 1.96 * std / sqrt(n) over all n samples (normal approximation, samples treated as
  independent). Seeds of one prompt are correlated, so this one is too narrow when prompts differ a lot.
- `ci95_bootstrap`: percentile bootstrap over PROMPTS (each resample draws prompts with replacement and keeps all
  seeds of a drawn prompt), which accounts for that correlation; this is the one to quote when comparing models
  on a prompt set. Seeded, so reruns give the same interval.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

Z95 = 1.959963984540054


def summarize(values: torch.Tensor, prompt_index: torch.Tensor, num_bootstrap: int = 1000, seed: int = 0) -> dict:
    """n, mean, std (ddof 1), sem and both 95% CIs of the finite values; non-finite ones are counted, not used."""
    x = values.double().numpy()
    prompts = prompt_index.numpy()
    finite = np.isfinite(x)
    x, prompts = x[finite], prompts[finite]
    n = int(x.size)
    out = {"n": n, "nonfinite": int((~finite).sum())}
    if n == 0:
        return {**out, "mean": None, "std": None, "sem": None, "ci95_normal": None, "ci95_bootstrap": None}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    sem = std / math.sqrt(n)
    out.update(mean=mean, std=std, sem=sem, ci95_normal=[mean - Z95 * sem, mean + Z95 * sem])
    out["ci95_bootstrap"] = _prompt_bootstrap(x, prompts, num_bootstrap, seed)
    return out


def _prompt_bootstrap(x: np.ndarray, prompts: np.ndarray, num_bootstrap: int, seed: int) -> list[float] | None:
    ids, inverse = np.unique(prompts, return_inverse=True)
    if num_bootstrap <= 0 or ids.size < 2:
        return None
    sums = np.bincount(inverse, weights=x)
    counts = np.bincount(inverse).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, ids.size, size=(num_bootstrap, ids.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"
    return f"{value:.{digits}f}"


def metrics_table(metrics: dict[str, dict]) -> str:
    """The markdown table of results.md (one row per metric)."""
    lines = ["| metric | n | mean | std | 95% CI, normal approx. | 95% CI, bootstrap over prompts |",
             "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['n']} | {_fmt(m['mean'])} | {_fmt(m['std'])} | {_fmt(m['ci95_normal'])} | "
                     f"{_fmt(m['ci95_bootstrap'])} |")
    return "\n".join(lines)


def write_results(out_dir: Path, header: dict, metrics: dict[str, dict], skipped: dict[str, str],
                  texts: list[str], scores: dict[str, torch.Tensor], prompt_index: torch.Tensor,
                  seed_index: torch.Tensor, sample_ids: list[int], image_files: list[str],
                  video_files: list[str] | None = None) -> dict:
    """results.json (everything), results.csv (metrics), scores.csv (per sample) and results.md. `image_files`,
    `video_files`: the per-sample files written (empty: none), listed with each sample."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(scores)
    samples = []
    for i in range(prompt_index.numel()):
        row = {"sample": sample_ids[i], "prompt_index": int(prompt_index[i]), "seed_index": int(seed_index[i]),
               "prompt": texts[int(prompt_index[i])],
               "scores": {n: _finite_or_none(float(scores[n][i])) for n in names}}
        if image_files:
            row["image"] = image_files[i]
        if video_files:
            row["video"] = video_files[i]
        samples.append(row)
    per_prompt = []
    for p, text in enumerate(texts):
        mask = prompt_index == p
        per_prompt.append({"prompt_index": p, "prompt": text,
                           "mean": {n: _finite_or_none(float(scores[n][mask].double().nanmean())) for n in names}})
    result = {**header, "ci_methods": {"ci95_normal": "mean +- 1.96 std/sqrt(n), samples treated as independent",
                                       "ci95_bootstrap": "percentile bootstrap resampling prompts (all seeds of a "
                                                         "drawn prompt kept)"},
              "metrics": metrics, "skipped_rewards": skipped, "per_prompt": per_prompt, "samples": samples}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "n", "mean", "std", "sem", "ci95_normal_low", "ci95_normal_high",
                         "ci95_bootstrap_low", "ci95_bootstrap_high"])
        for name, m in metrics.items():
            normal, boot = m["ci95_normal"] or [None, None], m["ci95_bootstrap"] or [None, None]
            writer.writerow([name, m["n"], m["mean"], m["std"], m["sem"], *normal, *boot])
    with open(out_dir / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample", "prompt_index", "seed_index", "prompt", *names])
        for row in samples:
            writer.writerow([row["sample"], row["prompt_index"], row["seed_index"], row["prompt"],
                             *[row["scores"][n] for n in names]])
    (out_dir / "results.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# Evaluation: {result['model']} ({result['weights']})", "",
             f"{result['num_prompts']} prompts x {result['samples_per_prompt']} seeds = {result['num_samples']} "
             f"samples; sampler {result['sampler']}, {result['steps']} steps, seed {result['seed']}.", "",
             metrics_table(result["metrics"]) if result["metrics"] else "(no reward was available)", ""]
    for name, reason in result["skipped_rewards"].items():
        lines.append(f"- skipped `{name}`: {reason}")
    for name, backend in result.get("video_metrics", {}).items():
        lines.append(f"- `{name}`: {backend}")
    for name, reason in result.get("skipped_video_metrics", {}).items():
        lines.append(f"- skipped video metric `{name}`: {reason}")
    lines += ["", "Normal-approximation CI: mean +- 1.96 std / sqrt(n) over samples. Bootstrap CI: percentile "
              "bootstrap over prompts (seeds of a prompt are correlated, so this is the one to compare models with).",
              ""]
    return "\n".join(lines)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
