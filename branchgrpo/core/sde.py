"""Flow-matching SDE math: schedules, ODE and SDE steps, log-probs, KL. Pure functions of tensors (DESIGN section 2).

Notation: x_sigma = (1 - sigma) x0 + sigma eps; sigma = 1 is noise, 0 is data; the model predicts v = eps - x0, so
x0_hat = x - sigma v. A step goes from sigma to sigma_next < sigma; d = sigma_next - sigma < 0.

The reverse SDE that keeps the flow's marginals, with diffusion coefficient g(sigma), discretised by Euler-Maruyama:

    mean = x + d [ v + g^2 / (2 sigma) (x + (1 - sigma) v) ],    std = g sqrt(-d),    x' = mean + std xi

(the bracket is v - g^2/2 * score, with score = -(x + (1 - sigma) v) / sigma for this interpolation).
Two diffusion kernels share the formula: "dance" (DanceGRPO / BranchGRPO) g = eta; "flow" (Flow-GRPO / MixGRPO /
G2RPO) g = eta sqrt(sigma / (1 - sigma)). A third kernel, "cps" (coefficients-preserving sampling), is not an
Euler-Maruyama step: with s = sigma, s' = sigma_next, std = s' sin(eta pi / 2), x0_hat = x - s v, x1_hat = x + (1 - s) v,

    mean = (1 - s') x0_hat + sqrt(s'^2 - std^2) x1_hat,    x' = mean + std xi

so that, given the true x0 and noise, x' = (1 - s') x0 + (noise of total variance s'^2): the coefficients of the
flow's interpolation at s' are kept exactly. With eta = 0 every kernel's step is exactly the Euler ODE step.

Log-probs are Gaussian densities of x' under N(mean, std^2), averaged over the latent elements (not summed) and
computed in fp32, as every peer does: the PPO clip ranges of 1e-5..1e-3 are calibrated for that normalisation.
The peers' CPS code scores a transition as -mean((x' - mean)^2) instead (no 1 / (2 std^2), no constants): its log-ratios
are 2 std^2 times ours, so a clip range eps_ref of theirs acts like eps_ref / (2 std^2) here - a different value at
every step (about 2.2x eps_ref at std 0.48, 55x at std 0.095). `Kernel(log_prob="reference")` (`--cps_log_prob
reference`) scores on their scale, to reproduce their runs with their clip ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

KERNELS = ("dance", "flow", "cps")
LOG_PROB_SCALES = ("gaussian", "reference")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


def static_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift: shift * s / (1 + (shift - 1) * s) (DanceGRPO / BranchGRPO use shift 3)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def dynamic_shift(s: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's resolution-dependent shift: exp(mu) / (exp(mu) + (1 / s - 1)); s = 0 maps to 0."""
    e = math.exp(mu)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, e / (e + (1.0 / safe - 1.0)), torch.zeros_like(s))


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The mu FluxPipeline uses for `image_seq_len` packed latent tokens (linear in the token count)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Stretch a shifted schedule (its nonzero sigmas, the final 0 excluded) about sigma = 1 so that its last
    nonzero sigma is `terminal`: 1 - sigma scales by (1 - terminal) / (1 - sigma_last). The `shift_terminal` of
    diffusers' FlowMatchEulerDiscreteScheduler (LTX-Video, Qwen-Image: 0.02)."""
    one_minus = 1.0 - sigmas
    if one_minus[-1] == 0:  # a one-step schedule is the single sigma 1: nothing to stretch (diffusers divides by 0)
        return sigmas
    return 1.0 - one_minus * ((1.0 - terminal) / one_minus[-1])


def make_sigmas(num_steps: int, shift: float = 1.0, mu: float | None = None,
                shift_terminal: float | None = None) -> torch.Tensor:
    """sigma_0 = 1 > ... > sigma_T = 0 (float64, T + 1 values): linspace(1, 0, T + 1) warped by a shift.

    `mu` given: FLUX's dynamic shift; otherwise the static shift (1.0 = no shift). `shift_terminal` given: the
    shifted sigma_0 .. sigma_{T-1} are then stretched so that sigma_{T-1} = shift_terminal (`stretch_to_terminal`).
    """
    if num_steps < 1:
        raise ValueError(f"--sampling_steps must be >= 1, got {num_steps}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = dynamic_shift(s, mu) if mu is not None else static_shift(s, shift)
    if shift_terminal is not None:
        sigmas[:-1] = stretch_to_terminal(sigmas[:-1], shift_terminal)
    sigmas[-1] = 0.0
    return sigmas


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """The transition kernel of an SDE step: the diffusion coefficient g(sigma) of the reverse SDE ("dance",
    "flow"), or coefficients-preserving sampling ("cps"), and the scale its log-probs are reported on."""

    kind: str = "dance"
    eta: float = 0.3
    #: "gaussian": the element-averaged Gaussian log-density; "reference": the peers' CPS score -mean((x' - mean)^2)
    log_prob: str = "gaussian"

    def __post_init__(self) -> None:
        if self.kind not in KERNELS:
            raise ValueError(f"--sde_kernel: expected one of {KERNELS}, got '{self.kind}'")
        if not (self.eta >= 0.0 and math.isfinite(self.eta)):
            raise ValueError(f"--eta must be a finite number >= 0, got {self.eta}")
        if self.kind == "cps" and self.eta > 1.0:  # std = s' sin(eta pi / 2) must stay <= s'
            raise ValueError(f"--eta: the cps kernel needs a value in [0, 1], got {self.eta}")
        if self.log_prob not in LOG_PROB_SCALES:
            raise ValueError(f"--cps_log_prob: expected one of {LOG_PROB_SCALES}, got '{self.log_prob}'")
        if self.log_prob == "reference" and self.kind != "cps":
            raise ValueError(f"--cps_log_prob reference: only the cps kernel has it (--sde_kernel is {self.kind})")

    def diffusion(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """g(sigma) per sample. The "flow" kernel diverges at sigma = 1; there (only at the first step of a
        schedule) its denominator uses the next sigma instead, as Flow-GRPO does."""
        assert self.kind != "cps", "the cps kernel is not an Euler-Maruyama step (see cps_mean_std)"
        if self.kind == "dance":
            return torch.full_like(sigma, self.eta)
        denom = 1.0 - torch.where(sigma >= 1.0, sigma_next, sigma)
        return self.eta * torch.sqrt(sigma / denom)


class StepResult(NamedTuple):
    sample: torch.Tensor  # x', fp32
    mean: torch.Tensor  # mean of the transition kernel, fp32
    std: torch.Tensor  # [B] std of the transition kernel (0 for ODE steps)
    log_prob: torch.Tensor  # [B] element-averaged log N(x'; mean, std^2) (0 for ODE steps)


def _per_sample(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] tensor as fp32 [B] on x's device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def _bcast(t_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t_B.reshape(-1, *([1] * (x.dim() - 1)))


def predict_x0(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    x, v = x.float(), v.float()
    return x - _bcast(_per_sample(sigma, x), x) * v


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler step of the probability-flow ODE, x' = x + d v (the step to sigma = 0 gives x0_hat)."""
    x, v = x.float(), v.float()
    d = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return x + _bcast(d, x) * v


def sde_mean_std(
    x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, kernel: Kernel, std_scale=1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ([B]) of the Euler-Maruyama transition; `std_scale` multiplies the kernel's std (a split
    step's lambda) - the scaled std is the std of the transition, used for sampling and for every log-prob."""
    if kernel.kind == "cps":
        mean, std_B = cps_mean_std(x, v, sigma, sigma_next, kernel.eta)
        return mean, std_B * _per_sample(std_scale, x)
    x, v = x.float(), v.float()
    sigma_B, sigma_next_B = _per_sample(sigma, x), _per_sample(sigma_next, x)
    d_B = sigma_next_B - sigma_B
    g_B = kernel.diffusion(sigma_B, sigma_next_B)
    drift = v + _bcast(g_B * g_B / (2.0 * sigma_B), x) * (x + _bcast(1.0 - sigma_B, x) * v)
    mean = x + _bcast(d_B, x) * drift
    std_B = g_B * torch.sqrt(torch.clamp(-d_B, min=0.0)) * _per_sample(std_scale, x)
    return mean, std_B


def cps_mean_std(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients-preserving sampling: mean (1 - s') x0_hat + sqrt(s'^2 - std^2) x1_hat and std ([B])
    s' sin(eta pi / 2), with x0_hat = x - s v and x1_hat = x + (1 - s) v the data and noise predictions.

    Computed as the Euler ODE step minus k x1_hat, k = s' - sqrt(s'^2 - std^2) = std^2 / (s' + sqrt(s'^2 - std^2))
    (the same mean: (1 - s') x0_hat + s' x1_hat is the ODE step), so that eta = 0 is exactly the ODE step."""
    x, v = x.float(), v.float()
    sigma_B, sigma_next_B = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std_B = sigma_next_B * math.sin(eta * math.pi / 2.0)
    x1_hat = x + _bcast(1.0 - sigma_B, x) * v
    root_B = torch.sqrt(torch.clamp(sigma_next_B * sigma_next_B - std_B * std_B, min=0.0))
    k_B = torch.where(std_B > 0, std_B * std_B / (sigma_next_B + root_B).clamp(min=1e-30), torch.zeros_like(std_B))
    return ode_step(x, v, sigma_B, sigma_next_B) - _bcast(k_B, x) * x1_hat, std_B


def _log_snr(sigma: float) -> float:
    """lambda = log((1 - sigma) / sigma) of x_sigma = (1 - sigma) x0 + sigma eps (-inf at sigma = 1)."""
    return math.log(1.0 - sigma) - math.log(sigma) if sigma < 1.0 else -math.inf


def dpm_solver_2m_step(x: torch.Tensor, x0_pred: torch.Tensor, x0_prev: torch.Tensor | None, sigma_prev: float | None,
                       sigma: float, sigma_next: float) -> torch.Tensor:
    """One step of the 2nd-order multistep DPM-Solver++ (data prediction) from sigma to sigma_next, for a schedule
    shared by the batch: x' = (s'/s) x + (1 - s') (1 - e^-h) D, h = lambda(s') - lambda(s), with D the data
    prediction corrected by the previous step's, D = (1 + 1/(2 r)) x0 - 1/(2 r) x0_prev, r = h_prev / h. The first
    step (no previous prediction, or one from sigma = 1 where lambda is -inf) is first order - from sigma = 1 exactly
    the Euler step - and the step to sigma = 0 returns the data prediction (first order, as DPM-Solver++ ends)."""
    x, x0_pred = x.float(), x0_pred.float()
    if sigma_next <= 0.0:
        return x0_pred
    h = _log_snr(sigma_next) - _log_snr(sigma)
    data = x0_pred
    if x0_prev is not None and sigma_prev is not None and sigma_prev < 1.0:
        half_inv_r = 0.5 * h / (_log_snr(sigma) - _log_snr(sigma_prev))
        data = (1.0 + half_inv_r) * x0_pred - half_inv_r * x0_prev.float()
    return (sigma_next / sigma) * x + (1.0 - sigma_next) * (-math.expm1(-h)) * data


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2) averaged over all non-batch elements, in fp32 -> [B]."""
    sample, mean = sample.float(), mean.float()
    std_B = _per_sample(std, sample)
    z = (sample - mean) / _bcast(std_B, sample)
    per_element_mean = (-0.5 * z * z).flatten(1).mean(dim=1)
    return per_element_mean - torch.log(std_B) - _LOG_SQRT_2PI


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    kernel: Kernel,
    noise: torch.Tensor | None = None,
    sample: torch.Tensor | None = None,
    std_scale=1.0,
) -> StepResult:
    """One SDE transition. Draws x' = mean + std * noise, or - given `sample` - re-scores that stored x' under the
    current mean (training). Exactly one of `noise` / `sample` is given. Where std is 0 (eta = 0) the step is the
    ODE step and the log-prob is 0."""
    if (noise is None) == (sample is None):
        raise ValueError("sde_step: pass exactly one of noise (sampling) or sample (re-scoring)")
    mean, std_B = sde_mean_std(x, v, sigma, sigma_next, kernel, std_scale)
    if sample is None:
        sample = mean + _bcast(std_B, mean) * noise.float()
    sample = sample.float()
    stochastic = std_B > 0
    safe_std = torch.where(stochastic, std_B, torch.ones_like(std_B))
    log_prob = torch.where(stochastic, transition_log_prob(sample, mean, safe_std, kernel), torch.zeros_like(std_B))
    return StepResult(sample, mean, std_B, log_prob)


def transition_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """The kernel's log-prob of `sample` ([B]): the Gaussian one, or the peers' CPS scale -mean((x' - mean)^2)."""
    if kernel.log_prob == "reference":
        return -((sample.float() - mean.float()) ** 2).flatten(1).mean(dim=1)
    return gaussian_log_prob(sample, mean, std)


def gaussian_kl_equal_std(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_a, std^2) || N(mean_b, std^2)) per element, averaged like the log-prob -> [B]."""
    mean_a, mean_b = mean_a.float(), mean_b.float()
    std_B = _per_sample(std, mean_a)
    sq = ((mean_a - mean_b) ** 2).flatten(1).mean(dim=1)
    return sq / (2.0 * std_B * std_B)
