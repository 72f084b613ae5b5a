"""DiffusionNFT's math (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"):
pure functions of tensors. DiffusionNFT trains on the forward process of final samples, not on rollout transitions:

- each sample's optimality probability r = clip(A / (2 A_max) + 0.5, 0, 1) from its group-standardised reward A;
- x_t = (1 - t) x0 + t eps with fresh noise, at timesteps t of the sampler's own grid;
- implicit positive and negative policies, v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old -
  beta v_theta: pulling v+ towards the data of good samples and v- towards the data of bad ones moves v_theta
  away from the bad ones without a likelihood or a ratio;
- the loss in x0 space, x0+- = x_t - t v+-, each term's squared error divided by its own stop-gradient mean absolute
  error (an adaptive weight that evens out timesteps), combined as (r L+ + (1 - r) L-) / beta and scaled by A_max;
- theta_old, the data-collecting policy, follows theta softly: theta_old <- d theta_old + (1 - d) theta.
"""

from __future__ import annotations

import torch

# the stop-gradient normaliser's floor: samples already on target would otherwise divide by ~0
NORMALISER_FLOOR = 1e-5
# d of theta_old <- d theta_old + (1 - d) theta after `step` iterations: 0 until `flat`, then rising by `rate` per
# iteration up to `cap` (the reference recipes: "linear" for most rewards, "delayed" for OCR)
DECAY_SCHEDULES = {"linear": (0, 0.001, 0.5), "delayed": (75, 0.0075, 0.999), "none": (0, 0.0, 0.0)}


def optimality_probability(advantages: torch.Tensor, adv_max: float) -> torch.Tensor:
    """r = clip(A / (2 A_max) + 0.5, 0, 1): A = 0 gives 1/2, A = +-A_max gives 1 / 0."""
    return torch.clamp(advantages / (2.0 * adv_max) + 0.5, 0.0, 1.0)


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward process x_t = (1 - t) x0 + t eps, t [B]."""
    t = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * eps


def implicit_velocities(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v+, v-) = (beta v_theta + (1 - beta) v_old, (1 + beta) v_old - beta v_theta)."""
    return beta * v_theta + (1.0 - beta) * v_old, (1.0 + beta) * v_old - beta * v_theta


def normalised_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per sample: mean((x0_pred - x0)^2) / sg(mean |x0_pred - x0|), the normaliser in float64 and floored at
    NORMALISER_FLOOR -> float64 [B]."""
    error = x0_pred - x0
    with torch.no_grad():
        scale = error.double().abs().flatten(1).mean(dim=1).clamp(min=NORMALISER_FLOOR)
    return (error.double() ** 2).flatten(1).mean(dim=1) / scale


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
             r: torch.Tensor, beta: float, adv_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (float64 [B]): A_max (r L+ + (1 - r) L-) / beta, and the two terms L+ and L-."""
    v_pos, v_neg = implicit_velocities(v_theta, v_old, beta)
    t = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    positive = normalised_x0_error(x_t - t * v_pos, x0)
    negative = normalised_x0_error(x_t - t * v_neg, x0)
    r = r.double()
    return adv_max * (r * positive + (1.0 - r) * negative) / beta, positive, negative


def velocity_penalty(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """The KL-like penalty to the base model: mean((v_theta - v_ref)^2) per sample -> [B]."""
    return ((v_theta - v_ref) ** 2).flatten(1).mean(dim=1)


def old_policy_decay(step: int, schedule: str = "linear") -> float:
    """d after `step` training iterations (DECAY_SCHEDULES): linear d = min(0.001 step, 0.5)."""
    flat, rate, cap = DECAY_SCHEDULES[schedule]
    return 0.0 if step < flat else min((step - flat) * rate, cap)
