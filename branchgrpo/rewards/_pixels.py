"""Rollout images as 8-bit RGB arrays, for the rewards whose scorers read 8-bit images (OCR, judges over HTTP)."""

from __future__ import annotations

import numpy as np
import torch

from branchgrpo.rewards._image import check_images


def to_uint8_images(media: torch.Tensor, reward: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [B, 3, H, W] in [0, 1] -> (uint8 [B, H, W, 3] RGB, finite [B] bool). An image holding a non-finite
    pixel (a diverged decode) cannot be quantised meaningfully: it comes back black and flagged False, for the
    reward to score 0 and count."""
    check_images(media, reward)
    media = media.detach().float().cpu()
    finite_B = torch.isfinite(media).flatten(1).all(dim=1)
    media = torch.where(finite_B.view(-1, 1, 1, 1), media, torch.zeros(()))
    pixels = (media.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)  # what a saved PNG holds
    return pixels.permute(0, 2, 3, 1).contiguous().numpy(), finite_B.numpy()
