"""The metrics of one iteration, from what the iteration produced, without side effects: nothing is logged, stored or
changed (but the stall watchdog's progress mark, which every collective sets); the same results give the same
metrics. The figures are the same on every rank (gathered or reduced over all of them), so the guards that read them
take the same decision everywhere.

Rewards are averaged over the leaves with a finite reward (null when there is none); the update's figures are null
when no edge had a finite advantage to train on. A leaf has no finite reward either because the reward model failed
on a finite sample or because the sample itself is not finite (the policy's failure): the counts keep the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.core import distributed
from branchgrpo.core.graph import RolloutGraph
from branchgrpo.runtime.outputs import json_safe

# the update's figures that do not exist when no edge had a finite advantage (every reward non-finite): null then
UPDATE_FIGURES = ("loss", "grad_norm", "clip_fraction", "approx_kl", "kl", "ratio_min", "ratio_max", "first_ratio_min",
                  "first_ratio_max")
# the update's rank-local figures that become whole-iteration ones: means over ranks, sums, extremes
MEANS, SUMS = ("loss", "clip_fraction", "approx_kl", "kl"), ("nonfinite_edges",)
# the update's results that are not figures of the entry: the guards read them from the counts
NOT_FIGURES = ("loss", "grad_norm", "applied_steps")


def finite_samples(graph: RolloutGraph) -> torch.Tensor:
    """bool [L] over `graph.leaves`: the leaf's sample (its latent) is finite everywhere."""
    return torch.isfinite(graph.node_latents(graph.leaves)).flatten(1).all(1).cpu()


@dataclass(frozen=True)
class IterationResults:
    """What one iteration produced, on this rank: the inputs of its metrics."""

    step: int
    graph: RolloutGraph
    scores: dict[str, torch.Tensor]  # per reward model, [L] over graph.leaves
    total: torch.Tensor  # the weighted sum of the rewards [L]
    finite_samples: torch.Tensor  # bool [L] (finite_samples)
    trained: torch.Tensor  # bool [N]: the edges trained
    update: dict  # PolicyUpdate.run's results
    live_edges: float  # trained edges with a finite advantage
    times: tuple[float, float, float, float]  # start, rollout done, rewards done, update done (time.time())
    lr: float
    peak_memory_mb: float


@dataclass(frozen=True)
class IterationMetrics:
    entry: dict  # what metrics.jsonl gets (JSON-safe: null for non-finite numbers)
    counts: dict  # over all ranks, for the guards: leaves scored, without a finite reward, ... (see _counts)


def iteration_metrics(results: IterationResults, world_size: int) -> IterationMetrics:
    """The iteration's metrics entry and counts (collective: every rank calls it)."""
    r = results
    leaves = r.graph.leaves
    scored = r.graph.group[leaves] >= 0
    mean, std, num_finite = _reward_moments(r.total, scored)
    over_ranks, counts = _over_ranks(r.update, _local_counts(r, scored), world_size)
    t0, t1, t2, t3 = r.times
    entry = {
        "step": r.step,
        "reward_mean": mean if num_finite else None,
        "reward_std": std if num_finite > 1 else None,
        "loss": r.update["loss"],
        "rollout_nfe": r.graph.num_forward_passes / leaves.numel(),
        "train_nfe": int(r.trained.sum()) / leaves.numel(),
        "iter_time_s": t3 - t0,
        "rollout_time_s": t1 - t0,
        "reward_time_s": t2 - t1,
        "train_time_s": t3 - t2,
        "lr": r.lr,
        "grad_norm": r.update["grad_norm"],
    }
    entry.update({k: v for k, v in r.update.items() if k not in NOT_FIGURES})
    entry.update(over_ranks, nonfinite_rewards=counts["nonfinite_rewards"],
                 nonfinite_samples=counts["nonfinite_samples"])
    entry.update({f"reward_{name}": float(v[scored & torch.isfinite(v)].nanmean())
                  for name, v in r.scores.items() if len(r.scores) > 1})
    entry["trained_edges"] = int(r.trained.sum())
    entry["train_forward_passes"] = int(torch.unique(r.graph.parent[r.trained]).numel())  # siblings share one
    entry["leaves"] = int(scored.sum())
    entry["peak_memory_mb"] = r.peak_memory_mb
    if counts["live_edges"] == 0:
        entry.update(dict.fromkeys(UPDATE_FIGURES))
    counts["applied_steps"] = list(r.update["applied_steps"])  # the same on every rank: the norm is all-reduced
    return IterationMetrics(json_safe(entry), counts)


def _reward_moments(total: torch.Tensor, scored: torch.Tensor) -> tuple[float, float, int]:
    """Mean and standard deviation of the finite rewards of the scored leaves of every rank, and their number."""
    finite = torch.isfinite(total) & scored
    gathered = distributed.all_gather_cat(torch.where(finite, total, torch.zeros_like(total)).double())
    mask = distributed.all_gather_cat(finite.double())
    n = mask.sum().clamp(min=1)
    mean = float((gathered * mask).sum() / n)
    std = float((((gathered - mean) * mask) ** 2).sum().div((n - 1).clamp(min=1)).sqrt())
    return mean, std, int(mask.sum())


def _local_counts(r: IterationResults, scored: torch.Tensor) -> dict[str, float]:
    """This rank's counts over the scored leaves: without a finite reward, with a non-finite sample, with a finite
    sample but no finite reward (overall and per reward model); and the live edges."""
    sound = r.finite_samples & scored
    counts = {"scored": scored.sum(), "nonfinite_rewards": (~torch.isfinite(r.total) & scored).sum(),
              "nonfinite_samples": (~r.finite_samples & scored).sum(),
              "reward_failures": (~torch.isfinite(r.total) & sound).sum(), "live_edges": r.live_edges}
    counts.update({f"reward:{name}": (~torch.isfinite(v) & sound).sum() for name, v in r.scores.items()})
    return {k: float(v) for k, v in counts.items()}


def _over_ranks(update: dict, counts: dict[str, float], world_size: int) -> tuple[dict, dict]:
    """The update's rank-local figures as whole-iteration ones: means over ranks of the loss, clip fraction and KL
    estimates, sums of the non-finite counts, extremes of the ratios; and `counts` summed over ranks (integers, but
    the live edges; the per-reward counts under `per_reward`). The gradient norm needs nothing: it is computed from
    the all-reduced gradients."""
    values = torch.tensor([update[k] for k in MEANS + SUMS] + list(counts.values()), dtype=torch.float64)
    values = distributed.all_reduce_sum(values).tolist()
    out = {k: v / world_size for k, v in zip(MEANS, values)}
    out.update(zip(SUMS, values[len(MEANS):]))
    summed = dict(zip(counts, values[len(MEANS + SUMS):]))
    extremes = torch.tensor([-update["ratio_min"], update["ratio_max"], -update["first_ratio_min"],
                             update["first_ratio_max"]], dtype=torch.float64)
    lo, hi, first_lo, first_hi = distributed.all_reduce_max(extremes).tolist()
    out.update(ratio_min=-lo, ratio_max=hi, first_ratio_min=-first_lo, first_ratio_max=first_hi)
    totals = {k: int(v) for k, v in summed.items() if k != "live_edges" and not k.startswith("reward:")}
    totals["live_edges"] = summed["live_edges"]
    totals["per_reward"] = {k[len("reward:"):]: int(v) for k, v in summed.items() if k.startswith("reward:")}
    return out, totals
