"""CLIP-style image preprocessing on tensor batches (no PIL round trip), shared by the CLIP-family rewards.

Rollout images arrive as float tensors in [0, 1] on the device. The reference pipelines (open_clip's eval transform
used by HPS-v2, transformers' CLIPImageProcessor used by PickScore) work on PIL images: resize the shorter edge with
an antialiased bicubic filter, centre-crop a square, scale to [0, 1], normalise with the OpenAI CLIP mean/std.
Doing the same in torch keeps the images on the GPU, avoids the 8-bit quantisation of a PIL round trip, and batches.
`torch.nn.functional.interpolate(mode="bicubic", antialias=True)` implements the same filter family as PIL's bicubic
resize; the results differ from PIL only by PIL's uint8 rounding (notes/ecosystem.md: matched hpsv2 on square images).

The same functions serve the evaluation feature extractors (branchgrpo.eval.features) and ImageReward, so every
CLIP-style transform in the package is this one. On float tensors they equal open_clip's own eval transform
(`image_transform(size, is_train=False)`: Resize(size, bicubic, antialias) + CenterCrop) up to the clamp of bicubic
overshoot, square or not.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# The OpenAI CLIP normalisation (open_clip's OPENAI_DATASET_MEAN/STD; also in CLIPImageProcessor configs).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_images(media: torch.Tensor, reward: str) -> torch.Tensor:
    """Rewards take images [B, 3, H, W] in [0, 1]; anything else (videos, wrong channels) is a caller bug."""
    if media.dim() != 4 or media.shape[1] != 3:
        raise ValueError(f"reward '{reward}': expected images [B, 3, H, W] in [0, 1], got shape {tuple(media.shape)}")
    return media


def resize_shorter_edge(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize so that the shorter edge is `size` (the longer edge keeps the aspect ratio, rounded
    down as torchvision's Resize(int) does). The result is clamped to [0, 1] against bicubic overshoot, as PIL's
    uint8 output is; an image already at that size is returned unchanged (not clamped: inputs are in [0, 1])."""
    height, width = images.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_h, new_w) == (height, width):
        return images
    out = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square centre crop with torchvision's rounding of the offsets."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"center_crop: image {height}x{width} is smaller than the crop {size}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def resize_center_crop(images: torch.Tensor, size: int, crop_size: int | None = None) -> torch.Tensor:
    """torchvision's `Resize(size)` + `CenterCrop(crop_size or size)` on a float batch (antialiased bicubic)."""
    return center_crop(resize_shorter_edge(images, size), crop_size or size)


def to_rgb(images_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] -> [B, 3, H, W] (grey images are repeated, like PIL's convert('RGB'))."""
    if images_BCHW.ndim != 4 or images_BCHW.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images_BCHW.shape)}")
    return images_BCHW.expand(-1, 3, -1, -1) if images_BCHW.shape[1] == 1 else images_BCHW


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    crop_size: int | None = None,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised pixel values [B, 3, crop, crop] in `dtype` (resize in fp32)."""
    images = images.float()
    images = resize_center_crop(images, size, crop_size)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return ((images - mean_t) / std_t).to(dtype)


def image_size_of(size) -> int:
    """open_clip stores the visual input size as an int or an (h, w) pair; CLIP models are square."""
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square CLIP input size {size} is not supported")
        return int(size[0])
    return int(size)
