"""Rewards for instruction-based image editing: how faithful the result stays to its source image, and how far it
moved in the direction the instruction asks.

Both read, through the conditioning extension of the reward call (rewards/base.py), each sample's source image: the
per-prompt `source_image` tensor ([B, 3, h, w] uint8, the source resized to the size the editing backbone encodes it
at) that the edit preprocessing stores beside the text embeddings (models/flux_kontext.py). A source of another
size than the result is compared at the result's size. They return float32 [B] on the CPU.

- "source_consistency": similarity of the result to its source, 1 when they are equal:
  - with `clip_checkpoint` (a local open_clip checkpoint of `clip_arch`, e.g. an HPS-v2.1 or OpenAI ViT-L-14 file):
    the cosine of the two images' CLIP image embeddings (branchgrpo.rewards.features.ClipFeatures), in [-1, 1] -
    faithful in content, tolerant of small shifts;
  - without one (the default, needs no file): `metric` "l1", 1 - mean |result - source| over pixels and channels
    (in [0, 1]), or "ssim", the mean structural similarity (Gaussian window 11, sigma 1.5, per channel), in [-1, 1].
  With `masked`, it reads `edit_mask` as well ([B, 1, h, w] uint8, 1 inside the region the instruction may change,
  stored when the JSONL line gives a "mask"; all 0 when it gives none): the pixel metrics average outside the
  region only, and CLIP sees both images with the region filled with grey.
- "clip_directional": CLIP directional similarity (StyleGAN-NADA, InstructPix2Pix's metric), the cosine between the
  image direction E_img(result) - E_img(source) and the text direction E_txt(instruction) - E_txt(`source_text`), in
  [-1, 1]; 0 when the result is the source (no image direction). The instruction stands in for the edited image's
  caption and `source_text` (default "a photo") for the source's: an offline stand-in for instruction following. Its
  CLIP model is the "clip" reward's (`model_path`: a transformers CLIP folder or an open_clip file).

Neither is safe alone (docs/editing.md): the unchanged source maximises consistency, and an over-edited image that
drifts toward the instruction's words maximises the directional score. Combine them, e.g.
`--reward clip_directional=1.0,source_consistency=0.5`, or add the VLM judge's "edit10" template
(rewards/vlm_judge.py), which sees both images.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from branchgrpo.rewards._image import as_unit_images, check_images, resized_to
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward

SOURCE_KEY = "source_image"  # the per-prompt source image the edit preprocessing stores
MASK_KEY = "edit_mask"  # the per-prompt edit region (1 inside), stored beside it
METRICS = ("l1", "ssim")
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # (k L)^2 for pixels in [0, 1] (Wang et al. 2004)


def source_images(media: torch.Tensor, conditions: dict[str, torch.Tensor] | None, reward: str) -> torch.Tensor:
    """Each sample's source image as float [B, C, H, W] in [0, 1] at the media's size, on its device."""
    images = _condition(media, conditions, reward, SOURCE_KEY, media.shape[1])
    return resized_to(as_unit_images(images), *media.shape[-2:])


def kept_region(media: torch.Tensor, conditions: dict[str, torch.Tensor] | None, reward: str) -> torch.Tensor:
    """float [B, 1, H, W] at the media's size: 1 outside each sample's edit region (`edit_mask` > 0), 0 inside."""
    mask = _condition(media, conditions, reward, MASK_KEY, 1)
    return 1.0 - F.interpolate((mask > 0).float(), size=media.shape[-2:], mode="nearest")


def _condition(media, conditions, reward: str, key: str, channels: int) -> torch.Tensor:
    if not conditions or key not in conditions:
        raise ValueError(f"reward '{reward}': needs each image's conditions['{key}'], stored by the edit "
                         "preprocessing (--model flux_kontext)")
    value = conditions[key].to(media.device)
    if value.dim() != 4 or value.shape[0] != media.shape[0] or value.shape[1] != channels:
        raise ValueError(f"reward '{reward}': expected {media.shape[0]} tensors [B, {channels}, H, W] in "
                         f"conditions['{key}'], got {tuple(value.shape)}")
    return value


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel, per-channel structural similarity of images [B, C, H, W] in [0, 1] (Gaussian window, edges
    reflected so the map has the images' size)."""
    channels = a.shape[1]
    x = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=a.device) - SSIM_WINDOW // 2
    g = torch.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:
        pad = SSIM_WINDOW // 2
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_a ** 2 + mu_b ** 2 + SSIM_C1)
                                                                  * (var_a + var_b + SSIM_C2))


class SourceConsistency:
    """Similarity of each edited image to its source (module docstring)."""

    reward_max = 1.0

    def __init__(self, features=None, metric: str = "l1", masked: bool = False, name: str = "source_consistency"):
        if metric not in METRICS:
            raise ValueError(f"reward '{name}': metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.name, self.features, self.metric, self.masked = name, features, metric, masked
        self.conditioning = (SOURCE_KEY, MASK_KEY) if masked else (SOURCE_KEY,)  # what it reads (rewards/base.py)

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str],
                 conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        result = check_images(media, self.name).float()
        source = source_images(result, conditions, self.name)
        keep = kept_region(result, conditions, self.name) if self.masked else torch.ones_like(result[:, :1])
        if self.features is not None:
            grey = 0.5 * (1.0 - keep)  # the edit region filled with grey in both images
            pair = torch.cat([result * keep + grey, source * keep + grey]).cpu()
            embeds = F.normalize(torch.as_tensor(self.features(pair), dtype=torch.float32), dim=-1)
            return (embeds[: len(result)] * embeds[len(result):]).sum(dim=-1)
        similarity = 1.0 - (result - source).abs() if self.metric == "l1" else ssim_map(result, source)
        weight = keep.expand_as(similarity)
        return ((similarity * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1.0)).cpu()


class ClipDirectional:
    """CLIP directional similarity between the image edit and the instruction (module docstring)."""

    conditioning = (SOURCE_KEY,)
    reward_max = 1.0

    def __init__(self, scorer, source_text: str = "a photo", name: str = "clip_directional"):
        self.name, self.scorer, self.source_text = name, scorer, source_text

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str],
                 conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        result = check_images(media, self.name).float()
        if len(prompts) != result.shape[0]:
            raise ValueError(f"reward '{self.name}': {result.shape[0]} images but {len(prompts)} prompts")
        source = source_images(result, conditions, self.name)
        scores, step = [], self.scorer.batch_size
        for i in range(0, len(result), step):
            image_r, text_r = self.scorer.features(result[i : i + step], list(prompts[i : i + step]))
            image_s, text_s = self.scorer.features(source[i : i + step], [self.source_text] * len(image_r))
            image_dir, text_dir = F.normalize(image_r - image_s, dim=-1), F.normalize(text_r - text_s, dim=-1)
            scores.append((image_dir * text_dir).sum(dim=-1))  # a zero image direction normalises to 0
        return torch.cat(scores).float().cpu()


@register_reward("source_consistency")
def build_source_consistency(device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                             clip_checkpoint: LocalPath | None = None, clip_arch: str = "ViT-H-14",
                             model_config_dir: LocalPath | None = None, metric: str = "l1", masked: bool = False,
                             batch_size: int = 32) -> SourceConsistency:
    """Similarity of the edited image to its source. `clip_checkpoint` (a local open_clip state dict) selects CLIP
    image features of `clip_arch`; None (default) the pixel `metric` (l1 | ssim). `masked`: compare outside each
    sample's `edit_mask` only. `model_dir` is not used: the pixel score needs no file, the CLIP one reads the file
    `clip_checkpoint` names."""
    del model_dir
    if clip_checkpoint is None:
        return SourceConsistency(None, metric, bool(masked))
    from branchgrpo.rewards.features import REWARD_OPTION_FLAGS, ClipFeatures

    features = ClipFeatures(clip_arch, clip_checkpoint, model_config_dir, normalize=True, device=device,
                            batch_size=batch_size, flags=REWARD_OPTION_FLAGS)
    return SourceConsistency(features, metric, bool(masked))


@register_reward("clip_directional")
def build_clip_directional(device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                           model_path: LocalPath | None = None, processor_path: LocalPath | None = None,
                           arch: str = "ViT-L-14-quickgelu", model_config_dir: LocalPath | None = None,
                           source_text: str = "a photo", dtype: str = "auto",
                           batch_size: int = 16) -> ClipDirectional:
    """CLIP directional similarity. The CLIP model as the "clip" reward finds it (`model_path`: a transformers CLIP
    folder or an open_clip file, default `model_dir`/clip-vit-large-patch14; `processor_path`, `arch`,
    `model_config_dir`, `dtype` as there); `source_text`: the text whose embedding the instruction's is taken from
    (the source image's stand-in caption)."""
    from branchgrpo.rewards.clipscore import build_clipscore

    scorer = build_clipscore(device, model_dir, model_path, processor_path, arch, model_config_dir, "cosine", dtype,
                             batch_size)
    return ClipDirectional(scorer, source_text)
