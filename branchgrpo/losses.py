"""The clipped GRPO surrogate over edges (paper Eq. 5), the optional KL to a reference, and diagnostics. Pure."""

from __future__ import annotations

import torch

from branchgrpo.sde import gaussian_kl_equal_std


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
def policy_stats(ratio: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float) -> dict:
    """Sums and extremes over a micro-batch, to be reduced over an iteration (see `merge_stats`)."""
    log_ratio = log_prob.float() - old_log_prob.float()
    return {
        "num_edges": float(ratio.numel()),
        "clipped": float(((ratio - 1.0).abs() > clip_range).sum()),
        "approx_kl_sum": float(((ratio - 1.0) - log_ratio).sum()),  # k3 estimator of KL(old || new), >= 0
        "ratio_min": float(ratio.min()) if ratio.numel() else 1.0,
        "ratio_max": float(ratio.max()) if ratio.numel() else 1.0,
    }


def merge_stats(acc: dict, new: dict) -> dict:
    if not acc:
        return dict(new)
    out = {k: acc[k] + new[k] for k in ("num_edges", "clipped", "approx_kl_sum")}
    out["ratio_min"] = min(acc["ratio_min"], new["ratio_min"])
    out["ratio_max"] = max(acc["ratio_max"], new["ratio_max"])
    return out
