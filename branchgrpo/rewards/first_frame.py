"""First-frame consistency: how faithful an image-to-video sample stays to the image it was conditioned on.

"first_frame_consistency" takes videos [B, 3, F, H, W] in [0, 1], their prompts, and - through the conditioning
extension of the reward call (rewards/base.py) - each sample's conditioning image: the per-prompt `first_frame`
tensor ([B, 3, H, W] uint8, the image resized to the video size) that the image-to-video preprocessing stores beside
the text embeddings. It returns float32 [B] on the CPU:

- with `clip_checkpoint` (any local open_clip checkpoint, e.g. HPS_v2.1_compressed.pt with arch ViT-H-14): the mean
  over frames of the cosine between each frame's CLIP image embedding and the conditioning image's
  (branchgrpo.rewards.features.ClipFeatures), in [-1, 1] - faithful in content, tolerant of motion;
- without one (the default, needs no download): 1 - mean |frame - image| over frames and pixels (both in [0, 1]),
  in [0, 1] - faithful pixel by pixel, so it also penalises camera motion.

`num_frames` scores evenly spaced frames only (first and last included); default all. Both scores are highest for a
video that never leaves its first frame: use this reward as a regulariser next to one that values motion
(VideoAlign MQ), never alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from branchgrpo.rewards._image import as_unit_images, resized_to
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward
from branchgrpo.rewards.video import check_videos, frame_indices

CONDITION_KEY = "first_frame"


class FirstFrameConsistency:
    """Similarity of (a subset of) each video's frames to its conditioning image: CLIP embedding cosine (`features`
    given) or 1 - mean |pixel difference|."""

    conditioning = (CONDITION_KEY,)  # the per-prompt tensor it reads (rewards/base.py)

    def __init__(self, features=None, num_frames: int | None = None, name: str = "first_frame_consistency"):
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"reward '{name}': num_frames must be >= 1 or None (all frames), got {num_frames}")
        self.name, self.features, self.num_frames = name, features, num_frames

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str],
                 conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        check_videos(media, prompts, self.name)
        if not conditions or CONDITION_KEY not in conditions:
            raise ValueError(f"reward '{self.name}': needs each video's conditioning image (conditions"
                             f"['{CONDITION_KEY}'], stored by image-to-video preprocessing)")
        batch, _, total, height, width = media.shape
        image = as_unit_images(conditions[CONDITION_KEY]).to(media.device)
        if image.shape[0] != batch or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"reward '{self.name}': expected {batch} conditioning images [B, 3, H, W], got "
                             f"{tuple(image.shape)}")
        index = frame_indices(total, self.num_frames).to(media.device)
        frames = media.float().index_select(2, index).permute(0, 2, 1, 3, 4)  # [B, K, 3, H, W]
        image = resized_to(image, height, width)  # stored at the video's size; another size is compared at it
        if self.features is None:
            return (1.0 - (frames - image[:, None]).abs().flatten(2).mean(dim=2).mean(dim=1)).cpu()
        num = index.numel()
        embeds = torch.as_tensor(self.features(torch.cat([frames.reshape(-1, 3, height, width), image]).cpu()),
                                 dtype=torch.float32)
        embeds = F.normalize(embeds, dim=-1)
        frame_embeds, image_embeds = embeds[: batch * num].reshape(batch, num, -1), embeds[batch * num:]
        return (frame_embeds * image_embeds[:, None]).sum(dim=-1).mean(dim=1)


@register_reward("first_frame_consistency")
def build_first_frame_consistency(device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                                  clip_checkpoint: LocalPath | None = None, clip_arch: str = "ViT-H-14",
                                  model_config_dir: LocalPath | None = None, batch_size: int = 32,
                                  num_frames: int | None = None) -> FirstFrameConsistency:
    """Similarity of the generated frames to the conditioning image. `clip_checkpoint` (a local open_clip state dict,
    e.g. HPS_v2.1_compressed.pt) selects CLIP features of `clip_arch`; None (default) the pixel-space score.
    `model_dir` is not used: the pixel score needs no file, and the CLIP one reads the file `clip_checkpoint` names."""
    if clip_checkpoint is None:
        return FirstFrameConsistency(None, num_frames)
    from branchgrpo.rewards.features import REWARD_OPTION_FLAGS, ClipFeatures

    features = ClipFeatures(clip_arch, clip_checkpoint, model_config_dir, normalize=True, device=device,
                            batch_size=batch_size, flags=REWARD_OPTION_FLAGS)
    return FirstFrameConsistency(features, num_frames)
