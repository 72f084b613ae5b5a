"""CLIP-style image preprocessing on tensor batches (no PIL round trip), shared by the CLIP-family rewards.

Rollout images arrive as float tensors in [0, 1] on the device. Each reward's reference pipeline works on PIL images;
doing the same in torch keeps the images on the GPU, avoids the 8-bit quantisation of a PIL round trip, and batches.
`torch.nn.functional.interpolate(mode="bicubic", antialias=True)` implements the same filter family as PIL's bicubic
resize (and is what torchvision's tensor `resize` calls); the results differ from PIL only by PIL's uint8 rounding.

Two geometries, named as open_clip's `PreprocessCfg.resize_mode` names them (docs/evaluation.md has the table of
which reward uses which, and why):
- "shortest": resize the shorter edge to `size`, centre-crop a square. open_clip's default eval transform,
  transformers' CLIPImageProcessor (PickScore, CLIP score) and ImageReward's `_transform`. These references resize
  the PIL image, so their resized pixels are clamped to [0, 1] by the uint8 output; so are ours. The crop offset is
  rounded as torchvision's CenterCrop rounds it (`crop_offset="round"`) or floored as transformers' processors do
  (`"floor"`): the two differ by one pixel when the resized long edge exceeds the crop by 4k + 3 pixels.
- "longest": resize the longer edge to `size`, pad the shorter one with black to a square, centred (the extra pixel,
  if any, at the right/bottom). HPSv2's evaluation transform (`ResizeMaxSize` in its bundled open_clip, used by
  `hpsv2.score` via `light_augmentation=True`): ToTensor first, then the float resize (so NOT clamped), then the pad
  with 0 before the normalisation. Its sizes are `round(side * size / longest_side)`.
A square image takes the same resize in both (no crop, no pad); only the clamp differs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# The OpenAI CLIP normalisation (open_clip's OPENAI_DATASET_MEAN/STD; also in CLIPImageProcessor configs).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest")
CROP_OFFSETS = ("round", "floor")


def check_images(media: torch.Tensor, reward: str) -> torch.Tensor:
    """Rewards take images [B, 3, H, W] in [0, 1]; anything else (videos, wrong channels) is a caller bug."""
    if media.dim() != 4 or media.shape[1] != 3:
        raise ValueError(f"reward '{reward}': expected images [B, 3, H, W] in [0, 1], got shape {tuple(media.shape)}")
    return media


def _bicubic(images: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)


def resize_shorter_edge(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize so that the shorter edge is `size` (the longer edge keeps the aspect ratio, rounded
    down as torchvision's Resize(int) and transformers' shortest_edge do). The result is clamped to [0, 1] against
    bicubic overshoot, as PIL's uint8 output is; an image already at that size is returned unchanged (not clamped:
    inputs are in [0, 1])."""
    height, width = images.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_h, new_w) == (height, width):
        return images
    return _bicubic(images, new_h, new_w).clamp(0.0, 1.0)


def center_crop(images: torch.Tensor, size: int, crop_offset: str = "round") -> torch.Tensor:
    """Square centre crop; offsets rounded as torchvision's CenterCrop ("round", Python's half-to-even) or floored as
    transformers' image processors ("floor")."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"center_crop: image {height}x{width} is smaller than the crop {size}")
    if crop_offset not in CROP_OFFSETS:
        raise ValueError(f"center_crop: crop_offset must be one of {', '.join(CROP_OFFSETS)}, got '{crop_offset}'")
    if crop_offset == "round":
        top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_center_crop(images: torch.Tensor, size: int, crop_size: int | None = None,
                       crop_offset: str = "round") -> torch.Tensor:
    """torchvision's `Resize(size)` + `CenterCrop(crop_size or size)` on a float batch (antialiased bicubic)."""
    return center_crop(resize_shorter_edge(images, size), crop_size or size, crop_offset)


def resize_longer_edge_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's eval geometry on a float batch: bicubic antialiased resize of the longer edge to `size` (the shorter
    edge to round(side * size / longer side)), not clamped, then zero (black) padding to `size` x `size`, centred,
    the odd pixel at the right/bottom. Unlike HPSv2's ResizeMaxSize, an image whose longer edge already is `size` is
    padded too (HPSv2 would hand the model a non-square input, which a ViT rejects)."""
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))  # the same float arithmetic as HPSv2, so the same rounding
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        images = _bicubic(images, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:  # F.pad takes (left, right, top, bottom) for the last two dims
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return images


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
    resize_mode: str = "shortest",
    crop_offset: str = "round",
) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised pixel values [B, 3, S, S] in `dtype` (resize in fp32). `resize_mode`
    "shortest": resize + centre crop to `crop_size or size` (offsets per `crop_offset`); "longest": resize + black
    letterbox to `size` (crop_size and crop_offset do not apply). Padding happens before the normalisation, so a
    padded pixel becomes -mean / std, as in HPSv2."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"clip_preprocess: resize_mode must be one of {', '.join(RESIZE_MODES)}, got '{resize_mode}'")
    images = images.float()
    if resize_mode == "longest":
        images = resize_longer_edge_and_pad(images, size)
    else:
        images = resize_center_crop(images, size, crop_size, crop_offset)
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


def as_unit_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (as conditioning images are stored) or float in [0, 1] -> float32 in [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def resized_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images at (height, width) (bilinear, antialiased), unchanged when they already are: conditioning images are
    stored at their own size and compared with media of another at the media's."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
