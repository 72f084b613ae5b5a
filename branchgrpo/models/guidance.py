"""Classifier-free guidance for backbones that are not guidance-distilled (Wan; Qwen-Image-style "true CFG"):

    v = v_neg + s (v_cond - v_neg)

computed from ONE forward over 2B rows, the conditional rows first and the negative (unconditional) rows after
them: half the kernel launches of two forwards, and on a GPU the larger batch uses the device better. The scale is
an argument of every call, so a backbone may choose it per call (e.g. per expert of a two-expert model).

`rescale_dim`, when given, rescales each token of the guided prediction to the norm of the conditional prediction's
token (the norm over `rescale_dim`, the channels of a token), as Qwen-Image's true CFG does: guidance then changes
a token's direction but not its magnitude.
"""

from __future__ import annotations

from typing import Callable

import torch


def guidance_on(scale: float) -> bool:
    """Guidance runs only when the scale exceeds 1 (s = 1 is the conditional prediction itself; the pipelines'
    rule): below it a backbone runs the conditional rows alone and needs no negative conditioning."""
    return scale > 1.0


def combine(cond: torch.Tensor, neg: torch.Tensor, scale: float, rescale_dim: int | None = None) -> torch.Tensor:
    """neg + scale (cond - neg), optionally rescaled per token to the conditional prediction's norm."""
    guided = neg + scale * (cond - neg)
    if rescale_dim is None:
        return guided
    return guided * (cond.norm(dim=rescale_dim, keepdim=True) / guided.norm(dim=rescale_dim, keepdim=True))


def guided_prediction(forward: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor],
                      negative: dict[str, torch.Tensor], scale: float,
                      rescale_dim: int | None = None) -> torch.Tensor:
    """`forward(**rows)` -> a prediction [rows, ...] run once over [conditional; negative] rows: every input of
    `inputs` [B, ...] is stacked over itself, except those `negative` replaces on the negative rows (e.g. the
    negative prompt's text embedding), which are stacked under it. Then `combine`d with `scale`."""
    assert set(negative) <= set(inputs), (sorted(negative), sorted(inputs))
    batched = {key: torch.cat([value, negative.get(key, value)]) for key, value in inputs.items()}
    cond, neg = forward(**batched).chunk(2)
    return combine(cond, neg, scale, rescale_dim)
