"""The clipped GRPO surrogate over edges (paper Eq. 5), GRPO-Guard's normalised log-ratio, the optional KL to a
reference, and diagnostics. Pure."""

from __future__ import annotations

import math

import torch

from branchgrpo.core.sde import gaussian_kl_equal_std


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-edge loss max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = exp(log_prob - old_log_prob); returns
    (loss [E], ratio [E]). With r = 1 the loss is -A; the clip only acts outside [1 - eps, 1 + eps]."""
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def step_mean_std(std: torch.Tensor, step: torch.Tensor, num_bins: int) -> torch.Tensor:
    """s_t [E]: the mean of `std` over the edges of the same `step` (< num_bins), for each edge; no host sync."""
    total = torch.zeros(num_bins, dtype=std.dtype, device=std.device).index_add(0, step, std)
    count = torch.zeros(num_bins, dtype=std.dtype, device=std.device).index_add(0, step, torch.ones_like(std))
    return (total / count.clamp(min=1))[step]


def normalized_log_ratio(mean: torch.Tensor, old_mean: torch.Tensor, sample: torch.Tensor, std: torch.Tensor,
                         step_std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's RatioNorm [E]: s [ (log p - log p_old) + mean((mu - mu_old)^2) / (2 s^2) ], with s = `step_std`
    (the step's mean std) and the Gaussian log-probs of `sample` x' = mu_old + std eps under the current and the
    behaviour means. Expanded, log p - log p_old = mean(eps d) / std - mean(d^2) / (2 std^2) with d = mu - mu_old, so
    the ratio's drift term is taken out and, where s = std, the result is mean(eps d) exactly: that closed form is
    what is computed (no difference of two nearly equal log-densities), whatever scale the kernel reports its
    log-probs on. At theta_old (d = 0) it is 0: ratio 1."""
    delta = (mean.float() - old_mean.float()).flatten(1)
    std_B, s_B = std.float(), step_std.float()
    eps = (sample.float() - old_mean.float()).flatten(1) / std_B[:, None]
    cross = (eps * delta).mean(dim=1)
    square = (delta * delta).mean(dim=1)
    return (s_B / std_B) * cross + 0.5 * square * (1.0 / s_B - s_B / (std_B * std_B))


def guard_non_finite(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob to train on, finite mask [E]). Edges whose log-prob or ratio is not finite get the old log-prob
    instead (ratio 1), so that neither the loss nor its gradient sees an inf: masking the loss alone is not enough,
    since 0 x d(inf)/d(theta) is NaN in the backward. A NaN inside the model's output still reaches the gradient
    through the mean; the update's non-finite gradient-norm check catches that case."""
    with torch.no_grad():
        ok = torch.isfinite(log_prob) & torch.isfinite(torch.exp(log_prob.float() - old_log_prob.float()))
    return torch.where(ok, log_prob, old_log_prob.to(log_prob.dtype)), ok


def kl_penalty(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Closed-form KL between the policy's and the reference's Gaussian transitions (same std) -> [E]."""
    return gaussian_kl_equal_std(mean, reference_mean, std)


@torch.no_grad()
def policy_stats(ratio: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float,
                 live: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums (float64) and extremes over a micro-batch's edges - those of bool mask `live`, all if None - as 0-d
    tensors on their device: nothing is read back to the host here (`read_stats` does, once per iteration)."""
    deviation = ratio.float() - 1.0
    kl = deviation - (log_prob.float() - old_log_prob.float())  # k3 estimator of KL(old || new), >= 0
    clipped = deviation.abs() > clip_range
    lowest, highest = ratio.float(), ratio.float()
    if live is not None:
        kl = torch.where(live, kl, torch.zeros_like(kl))
        clipped = clipped & live
        lowest = torch.where(live, lowest, torch.full_like(lowest, math.inf))
        highest = torch.where(live, highest, torch.full_like(highest, -math.inf))
    none = ratio.numel() == 0
    return {
        "num_edges": (live.sum() if live is not None else torch.tensor(ratio.numel(), device=ratio.device)).double(),
        "clipped": clipped.sum().double(),
        "approx_kl_sum": kl.sum().double(),
        "ratio_min": lowest.new_tensor(math.inf) if none else lowest.min(),
        "ratio_max": highest.new_tensor(-math.inf) if none else highest.max(),
    }


def merge_stats(acc: dict, new: dict) -> dict:
    if not acc:
        return dict(new)
    out = {k: acc[k] + new[k] for k in ("num_edges", "clipped", "approx_kl_sum")}
    out["ratio_min"] = torch.minimum(acc["ratio_min"], new["ratio_min"])
    out["ratio_max"] = torch.maximum(acc["ratio_max"], new["ratio_max"])
    return out


def read_stats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """`stats` as Python floats in one device-to-host copy; extremes over no edge at all read as 1.0."""
    if not stats:
        return {}
    values = dict(zip(stats, torch.stack([t.double() for t in stats.values()]).tolist()))
    for name, value in values.items():
        if name.endswith(("ratio_min", "ratio_max")) and math.isinf(value):
            values[name] = 1.0
    return values
