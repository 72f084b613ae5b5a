"""The image-editing rewards (rewards/edit.py) on real computed values: source consistency (pixel L1 and SSIM, masked
or not; CLIP image features from a tiny open_clip checkpoint) and CLIP directional similarity (a tiny transformers
CLIP): a result equal to its source scores consistency 1 and directional similarity 0; the hacks the docs warn about
score as documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.rewards import build_reward
from branchgrpo.rewards.base import RewardSet
from branchgrpo.rewards.edit import ssim_map

PROMPTS = ["make it red", "make it blue"]


def _sources(seed=0, size=(32, 48)) -> torch.Tensor:
    """Two smooth uint8 source images [2, 3, H, W] (a blurred random field: SSIM has structure to compare)."""
    noise = torch.rand(2, 3, size[0] // 4, size[1] // 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(noise, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def test_pixel_consistency_is_one_for_the_source_and_falls_with_the_change():
    sources = _sources()
    l1, ssim = build_reward("source_consistency"), build_reward("source_consistency", metric="ssim")
    assert l1.conditioning == ("source_image",)
    for reward in (l1, ssim):
        torch.testing.assert_close(reward(_unit(sources), PROMPTS, {"source_image": sources}), torch.ones(2))
    shifted = (_unit(sources) + 0.1).clamp(0, 1)
    expected = 1 - (shifted - _unit(sources)).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(l1(shifted, PROMPTS, {"source_image": sources}), expected)
    assert bool((ssim(_unit(sources.flip(0)), PROMPTS, {"source_image": sources}) < 0.9).all())
    # a source stored at another size is compared at the result's
    bigger = F.interpolate(sources.float(), size=(64, 96), mode="nearest").round().to(torch.uint8)
    assert bool((l1(_unit(sources), PROMPTS, {"source_image": bigger}) > 0.97).all())
    with pytest.raises(ValueError, match="source_image"):
        l1(_unit(sources), PROMPTS)
    with pytest.raises(ValueError, match="metric must be one of l1, ssim"):
        build_reward("source_consistency", metric="lpips")


def test_ssim_matches_its_definition_on_constant_images():
    """For constant images a and b the windowed statistics are exact: SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = torch.full((1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), 0.7)
    expected = (2 * 0.3 * 0.7 + 1e-4) / (0.09 + 0.49 + 1e-4)
    # float32 variances E[a^2] - E[a]^2 cancel to ~1e-7, against C2 = 9e-4
    torch.testing.assert_close(ssim_map(a, b), torch.full_like(a, expected), atol=3e-4, rtol=0)
    assert ssim_map(a, a).eq(1).all()


def test_masked_consistency_ignores_the_edit_region():
    sources = _sources(1)
    mask = torch.zeros(2, 1, 32, 48, dtype=torch.uint8)
    mask[:, :, 8:24, 12:36] = 1  # the region the instruction may change
    edited = _unit(sources).clone()
    edited[:, :, 8:24, 12:36] = 1.0 - edited[:, :, 8:24, 12:36]  # changed inside the region only
    for metric in ("l1", "ssim"):
        masked = build_reward("source_consistency", masked=True, metric=metric)
        assert masked.conditioning == ("source_image", "edit_mask")
        inside = masked(edited, PROMPTS, {"source_image": sources, "edit_mask": mask})
        plain = build_reward("source_consistency", metric=metric)(edited, PROMPTS, {"source_image": sources})
        assert bool((plain < 0.97).all()) and bool((inside > plain + 0.03).all())
        if metric == "l1":
            torch.testing.assert_close(inside, torch.ones(2))  # exactly unchanged outside the region
        no_mask = masked(edited, PROMPTS, {"source_image": sources, "edit_mask": torch.zeros_like(mask)})
        torch.testing.assert_close(no_mask, plain)  # an all-zero mask (no region given): the plain score


@pytest.mark.slow
def test_clip_consistency_and_directional_similarity(tmp_path):
    from branchgrpo.testing.clip_tiny import TINY_HPS_ARCH

    make_tiny("hps", str(tmp_path))
    make_tiny("clip", str(tmp_path))
    consistency = build_reward("source_consistency", clip_checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"),
                               clip_arch=TINY_HPS_ARCH, model_config_dir=str(tmp_path / "open_clip_configs"))
    directional = build_reward("clip_directional", model_dir=str(tmp_path))
    sources = _sources(2, (64, 64))
    same = {"source_image": sources}
    torch.testing.assert_close(consistency(_unit(sources), PROMPTS, same), torch.ones(2), atol=1e-5, rtol=0)
    assert bool((consistency(_unit(sources.flip(0)), PROMPTS, same) < 1 - 1e-4).all())
    assert directional(_unit(sources), PROMPTS, same).tolist() == [0.0, 0.0]  # no edit, no direction
    # an edited result: the cosine of the two directions, from the CLIP model's own features
    edited = _unit(sources).roll(8, dims=3) * torch.tensor([1.0, 0.6, 0.6]).view(1, 3, 1, 1)
    scores = directional(edited, PROMPTS, same)
    image_r, text_r = directional.scorer.features(edited, PROMPTS)
    image_s, text_s = directional.scorer.features(_unit(sources), ["a photo"] * 2)
    expected = F.cosine_similarity(image_r - image_s, text_r - text_s, dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert bool((scores.abs() > 1e-4).all()) and bool((scores.abs() <= 1).all())
    # the two together, as a run combines them: the unchanged source gains consistency but loses the direction
    rewards = RewardSet({"clip_directional": directional, "source_consistency": consistency},
                        {"clip_directional": 1.0, "source_consistency": 0.5})
    assert rewards.condition_keys == ("source_image",)
    raw = rewards.score(_unit(sources), PROMPTS, rewards.conditions(same))
    assert raw["clip_directional"].tolist() == [0.0, 0.0] and torch.allclose(raw["source_consistency"], torch.ones(2))
