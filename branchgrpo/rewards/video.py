"""Video rewards built from frame-level signals: any image reward averaged over frames, and temporal consistency.

Both take videos [B, 3, F, H, W] in [0, 1] and their prompts and return float32 [B] on the CPU.

- "frame_reward": the mean over frames of a registered image reward (`image_reward="hps"`, "pickscore", "clip",
  "imagereward", ...); every other option is passed to that reward's factory. `num_frames` scores evenly spaced
  frames only (an 81-frame Wan video is 81 image-reward calls per sample otherwise).
- "temporal_consistency": the mean similarity of consecutive frames. With `clip_checkpoint` (any local open_clip
  checkpoint, e.g. HPS_v2.1_compressed.pt with arch ViT-H-14): mean cosine of consecutive frames' normalised image
  embeddings (branchgrpo.rewards.features.ClipFeatures), in [-1, 1]. Without one (the default, needs no download): the
  pixel-space score 1 - mean |x_{t+1} - x_t| over frames and pixels, in [0, 1]. Both are maximal for a frozen video,
  so use this reward as a regulariser next to a reward that values motion (VideoAlign MQ penalises static videos),
  never alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, build_reward, register_reward

VIDEO_ONLY = ("frame_reward", "temporal_consistency", "videoalign", "first_frame_consistency")


def check_videos(media: torch.Tensor, prompts: Sequence[str], reward: str) -> torch.Tensor:
    """Video rewards take [B, 3, F, H, W] in [0, 1] with one prompt per video; images are a caller bug."""
    if media.dim() != 5 or media.shape[1] != 3:
        raise ValueError(f"reward '{reward}': expected videos [B, 3, F, H, W] in [0, 1], "
                         f"got shape {tuple(media.shape)}")
    if len(prompts) != media.shape[0]:
        raise ValueError(f"reward '{reward}': {media.shape[0]} videos but {len(prompts)} prompts")
    return media


def frame_indices(total: int, num_frames: int | None) -> torch.Tensor:
    """All frames, or `num_frames` evenly spaced ones including the first and the last."""
    if num_frames is None or num_frames >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, num_frames).round().long()


class FrameReward:
    """An image reward applied to (a subset of) the frames of each video, averaged over frames."""

    def __init__(self, image_reward, num_frames: int | None = None, name: str = "frame_reward"):
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"reward '{name}': num_frames must be >= 1 or None (all frames), got {num_frames}")
        self.name, self.image_reward, self.num_frames = name, image_reward, num_frames

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_videos(media, prompts, self.name)
        batch, _, total, height, width = media.shape
        index = frame_indices(total, self.num_frames).to(media.device)
        frames = media.index_select(2, index).permute(0, 2, 1, 3, 4).reshape(-1, 3, height, width)  # video-major
        per_frame = [p for p in prompts for _ in range(index.numel())]
        scores = torch.as_tensor(self.image_reward(frames, per_frame), dtype=torch.float32).cpu()
        return scores.reshape(batch, index.numel()).mean(dim=1)


class TemporalConsistency:
    """Mean similarity of consecutive frames: CLIP embedding cosine (`features` given) or 1 - mean |pixel
    difference| (pixels in [0, 1])."""

    def __init__(self, features=None, name: str = "temporal_consistency"):
        self.name, self.features = name, features

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_videos(media, prompts, self.name)
        if media.shape[2] < 2:
            raise ValueError(f"reward '{self.name}': needs at least 2 frames, got {media.shape[2]}")
        frames = media.float().permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
        if self.features is None:
            step = (frames[:, 1:] - frames[:, :-1]).abs().flatten(2).mean(dim=2)  # [B, F - 1]
            return (1.0 - step.mean(dim=1)).cpu()
        batch, num_frames = frames.shape[:2]
        embeds = torch.as_tensor(self.features(frames.reshape(-1, *frames.shape[2:])), dtype=torch.float32)
        embeds = torch.nn.functional.normalize(embeds.reshape(batch, num_frames, -1), dim=-1)
        return (embeds[:, 1:] * embeds[:, :-1]).sum(dim=-1).mean(dim=1).cpu()


@register_reward("frame_reward")
def build_frame_reward(device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                       image_reward: str = "hps", num_frames: int | None = None, **options) -> FrameReward:
    """Per-frame `image_reward` (any registered image reward) averaged over frames; `model_dir` and `options` go to
    its factory."""
    if image_reward in VIDEO_ONLY:
        raise ValueError(f"reward 'frame_reward': image_reward must be an image reward, got '{image_reward}'")
    return FrameReward(build_reward(image_reward, device=device, model_dir=model_dir, **options), num_frames)


@register_reward("temporal_consistency")
def build_temporal_consistency(device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                               clip_checkpoint: LocalPath | None = None, clip_arch: str = "ViT-H-14",
                               model_config_dir: LocalPath | None = None, batch_size: int = 32) -> TemporalConsistency:
    """Consecutive-frame similarity. `clip_checkpoint` (a local open_clip state dict, e.g. HPS_v2.1_compressed.pt)
    selects CLIP features of `clip_arch`; None (default) selects the pixel-space score. `model_dir` is not used:
    the pixel score needs no file, and the CLIP one reads the file `clip_checkpoint` names."""
    if clip_checkpoint is None:
        return TemporalConsistency(None)
    from branchgrpo.rewards.features import REWARD_OPTION_FLAGS, ClipFeatures

    return TemporalConsistency(ClipFeatures(clip_arch, clip_checkpoint, model_config_dir, normalize=True,
                                            device=device, batch_size=batch_size, flags=REWARD_OPTION_FLAGS))
