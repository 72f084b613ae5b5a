"""Video rewards on tiny checkpoints (CPU, offline): frame_reward, temporal_consistency, VideoAlign.

VideoAlign is checked against an independent computation that follows VideoAlign's own code path: the checkpoint's
keys mapped by a separately written rule into a peft-wrapped transformers Qwen2VLForConditionalGeneration (LoRA kept
as adapters, not merged), the language model called with its default positions, the reward tokens pooled by position,
the released normalisation constants. Tolerance 1e-4 (fp32; scores are O(1)).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import pytest
import torch

from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.rewards import available_rewards, build_reward
from branchgrpo.testing.clip_tiny import TINY_HPS_ARCH
from branchgrpo.rewards.videoalign import frame_size, sample_frame_indices

PROMPTS = ["a cat walks on a wooden table at sunset", "a red kite flies over a hill"]


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    make_tiny("hps", str(folder))
    return folder


@pytest.fixture(scope="module")
def hps_options(hps_dir):
    return dict(checkpoint=str(hps_dir / "HPS_v2.1_compressed.pt"), arch=TINY_HPS_ARCH,
                model_config_dir=str(hps_dir / "open_clip_configs"))


def _videos(batch=2, frames=5, height=32, width=48, seed=0):
    """Smooth random videos: a random image drifting in brightness over time (so frames differ)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 1, height, width, generator=g)
    ramp = torch.linspace(0.0, 0.4, frames).view(1, 1, frames, 1, 1)
    return (base * 0.6 + ramp * torch.rand(batch, 3, 1, 1, 1, generator=g)).clamp(0, 1)


def test_video_rewards_are_registered():
    assert {"frame_reward", "temporal_consistency", "videoalign"} <= set(available_rewards())


# ----- frame_reward ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_frame_reward_is_the_mean_of_per_frame_image_scores(hps_options):
    videos = _videos(frames=5)
    hps = build_reward("hps", **hps_options)
    per_frame = torch.stack([hps(videos[:, :, f], PROMPTS) for f in range(5)], dim=1)  # [B, F]
    assert per_frame.std(dim=1).min() > 0  # frames score differently: the mean is not trivial
    reward = build_reward("frame_reward", image_reward="hps", **hps_options)
    torch.testing.assert_close(reward(videos, PROMPTS), per_frame.mean(dim=1), atol=1e-6, rtol=1e-5)
    subset = build_reward("frame_reward", image_reward="hps", num_frames=3, **hps_options)  # frames 0, 2, 4
    torch.testing.assert_close(subset(videos, PROMPTS), per_frame[:, [0, 2, 4]].mean(dim=1), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_frame_reward_with_hps_letterboxes_wide_frames(hps_options):
    """Wan's frames are wide (480 x 832); HPS-v2.1 scores them letterboxed with black, as HPSv2 does, not centre-
    cropped. Frames 18 x 32 need no resize at the tiny model's 32 px, so the hand-letterboxed video scores exactly
    the same (7 black rows above, 7 below)."""
    videos = _videos(frames=3, height=18, width=32, seed=3)
    letterboxed = torch.zeros(*videos.shape[:3], 32, 32)
    letterboxed[..., 7:25, :] = videos
    reward = build_reward("frame_reward", image_reward="hps", **hps_options)
    torch.testing.assert_close(reward(videos, PROMPTS), reward(letterboxed, PROMPTS), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_frame_reward_passes_model_dir_to_its_image_reward(hps_dir, hps_options, tmp_path):
    videos = _videos(frames=3)
    tiny = {k: v for k, v in hps_options.items() if k != "checkpoint"}
    from_dir = build_reward("frame_reward", image_reward="hps", model_dir=str(hps_dir), **tiny)
    explicit = build_reward("frame_reward", image_reward="hps", **hps_options)
    assert torch.equal(from_dir(videos, PROMPTS), explicit(videos, PROMPTS))
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]HPS_v2\.1_compressed\.pt"):
        build_reward("frame_reward", image_reward="hps", model_dir=str(tmp_path / "empty"), **tiny)
    # temporal_consistency needs no file (pixel score) or reads clip_checkpoint: model_dir is ignored
    pixel = build_reward("temporal_consistency", model_dir=str(tmp_path / "empty"))
    assert pixel(videos, PROMPTS).shape == (2,)


def test_frame_reward_errors(hps_options):
    with pytest.raises(ValueError, match="image_reward must be an image reward"):
        build_reward("frame_reward", image_reward="videoalign")
    reward = build_reward("frame_reward", image_reward="hps", **hps_options)
    with pytest.raises(ValueError, match=r"expected videos \[B, 3, F, H, W\]"):
        reward(torch.rand(2, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        reward(_videos(), PROMPTS[:1])


# ----- temporal_consistency ----------------------------------------------------------------------------------------


def _static_and_shuffled_noisy(frames=6):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 1, 32, 32, generator=g)
    static = image.expand(1, 3, frames, 32, 32)
    drifting = (image + 0.05 * torch.arange(frames).view(1, 1, -1, 1, 1) / frames).clamp(0, 1)
    shuffled = drifting[:, :, torch.randperm(frames, generator=g)]
    noisy = (shuffled + 0.3 * torch.randn(shuffled.shape, generator=g)).clamp(0, 1)
    return torch.cat([static, noisy])


@pytest.mark.parametrize("with_clip", [False, True])
def test_temporal_consistency_prefers_a_static_video(with_clip, hps_options):
    options = {}
    if with_clip:  # any open_clip checkpoint works; the tiny HPS one is an open_clip state dict
        options = dict(clip_checkpoint=hps_options["checkpoint"], clip_arch=TINY_HPS_ARCH,
                       model_config_dir=hps_options["model_config_dir"])
    reward = build_reward("temporal_consistency", **options)
    scores = reward(_static_and_shuffled_noisy(), ["a still image", "noise"])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # identical consecutive frames
    assert scores[1] < scores[0] - (1e-3 if with_clip else 0.05)
    if not with_clip:  # the pixel score is 1 - mean |frame difference|: check on a two-frame video by hand
        two = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.25)], dim=1)[None]
        assert reward(two, ["x"]).item() == pytest.approx(0.75)


# ----- VideoAlign --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videoalign_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videoalign")
    make_tiny("videoalign", str(folder))
    return folder


@pytest.fixture(scope="module")
def scorer(videoalign_dir):
    return build_reward("videoalign", checkpoint=str(videoalign_dir / "VideoReward"), dimension="MQ")


def test_frame_sampling_and_resizing_follow_qwen_vl_utils():
    # 81 frames at 16 fps, sampled at 2 fps: 81 / 16 * 2 = 10.1 -> 10 frames spread over the clip
    assert sample_frame_indices(81, 16.0, 2.0) == torch.linspace(0, 80, 10).round().long().tolist()
    assert sample_frame_indices(9, 16.0, 2.0) == [0, 3, 5, 8]  # at least 4 frames
    assert sample_frame_indices(3, 16.0, 2.0) == [0, 2]  # never more than the clip has, always even
    assert frame_size(480, 832, 128 * 28 * 28, 200704) == (336, 588)  # shrunk under max_frame_pixels
    assert frame_size(32, 48, 128 * 28 * 28, 200704) == (280, 392)  # grown over the minimum


def _reference_scores(folder: Path, videos: torch.Tensor, prompts, source_fps=16.0):
    """VideoAlign's recipe written independently of branchgrpo.rewards.videoalign (see the module docstring)."""
    from peft import LoraConfig, get_peft_model
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize
    from transformers import (AutoImageProcessor, AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from branchgrpo.rewards.videoalign import DETAILED_SPECIAL_TEMPLATE

    reward_dir, base = folder / "VideoReward", folder / "Qwen2-VL-2B-Instruct"
    config = json.loads((reward_dir / "model_config.json").read_text())
    ckpt = next(reward_dir.glob("checkpoint-*"))
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"), padding_side="right")
    processor = Qwen2VLProcessor(image_processor=AutoImageProcessor.from_pretrained(str(base)), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor.from_pretrained(str(base)),
                                 chat_template=tokenizer.chat_template)
    model_config = Qwen2VLConfig.from_pretrained(str(base))
    model_config.text_config.vocab_size = len(tokenizer)
    model = Qwen2VLForConditionalGeneration(model_config).float()
    model.rm_head = torch.nn.Linear(model_config.text_config.hidden_size, 1, bias=False)
    lora = config["peft_lora_config"]
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not any(x in n for x in lora["lora_namespan_exclude"])]
    model = get_peft_model(model, LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"], target_modules=targets,
                                             task_type="CAUSAL_LM"))
    state = {}
    for key, value in torch.load(str(ckpt / "model.pth"), weights_only=True).items():
        if key.startswith("base_model.model.visual."):
            key = "base_model.model.model.visual." + key[len("base_model.model.visual."):]
        elif key.startswith("base_model.model.model."):
            key = "base_model.model.model.language_model." + key[len("base_model.model.model."):]
        state[key] = value
    model.load_state_dict(state, strict=True)
    model.eval()
    inner = model.base_model.model

    frames = []
    for video in videos:  # uint8 frames, fps sampling (9 frames at 16 fps -> 4), smart-resized on uint8
        clip = (video.permute(1, 0, 2, 3).clamp(0, 1) * 255).round().to(torch.uint8)
        clip = clip[[0, 3, 5, 8]] if clip.shape[0] == 9 else clip
        frames.append(resize(clip, [280, 392], interpolation=InterpolationMode.BICUBIC, antialias=True))
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text",
              "text": DETAILED_SPECIAL_TEMPLATE.format(text_prompt=p)}]}] for p in prompts]
    batch = processor(text=processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True),
                      videos=frames, padding=True, return_tensors="pt", do_resize=False, do_rescale=True,
                      cap_pixels_per_frame=False)
    with torch.no_grad():
        ids = batch["input_ids"]
        embeds = inner.model.get_input_embeddings()(ids)
        video_embeds = inner.model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"]).pooler_output
        mask = (ids == model_config.video_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, video_embeds)
        hidden = inner.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])[0]
        logits = inner.rm_head(hidden)
        special = torch.zeros_like(ids, dtype=torch.bool)
        for token in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"):
            special |= ids == tokenizer.convert_tokens_to_ids(token)
        raw = logits[special].view(ids.shape[0], 3)
    mean = torch.tensor([3.6757, 1.1646, 2.8105])
    std = torch.tensor([2.2476, 1.3811, 2.5121])
    return raw, (raw - mean) / std


@pytest.mark.slow
def test_videoalign_scores_equal_an_independent_computation(videoalign_dir, scorer):
    videos = _videos(frames=9, seed=3)
    raw_ref, normalised_ref = _reference_scores(videoalign_dir, videos, PROMPTS)
    mq = scorer(videos, PROMPTS)
    assert mq.dtype == torch.float32 and mq.shape == (2,)
    torch.testing.assert_close(mq, normalised_ref[:, 1], atol=1e-4, rtol=1e-4)
    dims = torch.stack([scorer.last_scores[d] for d in ("VQ", "MQ", "TA")], dim=1)
    torch.testing.assert_close(dims, normalised_ref, atol=1e-4, rtol=1e-4)
    assert (normalised_ref[0] - normalised_ref[1]).abs().max() > 1e-3  # different videos, different scores
    raw = build_reward("videoalign", checkpoint=str(videoalign_dir / "VideoReward"), normalize=False,
                       weights="VQ=1,TA=0.5", batch_size=1)
    torch.testing.assert_close(raw(videos, PROMPTS), raw_ref[:, 0] + 0.5 * raw_ref[:, 2], atol=1e-4, rtol=1e-4)


def test_videoalign_dimension_options(videoalign_dir):
    with pytest.raises(ValueError, match="dimension must be one of"):
        build_reward("videoalign", checkpoint=str(videoalign_dir / "VideoReward"), dimension="XQ")
    with pytest.raises(ValueError, match="weights must name"):
        build_reward("videoalign", checkpoint=str(videoalign_dir / "VideoReward"), weights="MQ=1,motion=2")


def test_videoalign_rejects_reward_tokens_in_prompts(scorer):
    with pytest.raises(ValueError, match="must occur once"):
        scorer(_videos(batch=1, frames=9), ["a cat <|MQ_reward|>"])


def test_videoalign_found_under_model_dir(videoalign_dir, scorer, tmp_path):
    found = build_reward("videoalign", model_dir=str(videoalign_dir), dimension="MQ")  # VideoReward/ + its base
    videos = _videos(batch=1, frames=9)
    assert torch.equal(found(videos, PROMPTS[:1]), scorer(videos, PROMPTS[:1]))
    with pytest.raises(FileNotFoundError, match="other/model_config.json does not exist"):  # explicit option wins
        build_reward("videoalign", model_dir=str(videoalign_dir), checkpoint=str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="empty/VideoReward/model_config.json does not exist"):
        build_reward("videoalign", model_dir=str(tmp_path / "empty"))


def test_videoalign_missing_or_unsupported_checkpoints(videoalign_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir/model_config.json does not exist"):
        build_reward("videoalign", checkpoint=str(tmp_path / "no_such_dir"))
    copy = tmp_path / "copy"
    shutil.copytree(videoalign_dir / "VideoReward", copy / "VideoReward")
    with pytest.raises(FileNotFoundError, match="base model 'Qwen/Qwen2-VL-2B-Instruct' not found"):
        build_reward("videoalign", checkpoint=str(copy / "VideoReward"))
    base = str(videoalign_dir / "Qwen2-VL-2B-Instruct")
    with pytest.raises(FileNotFoundError, match="no checkpoint-7"):
        build_reward("videoalign", checkpoint=str(copy / "VideoReward"), base_model=base, step=7)
    config_path = copy / "VideoReward" / "model_config.json"
    config = json.loads(config_path.read_text())
    config["data_config"]["prompt_template_type"] = "simple"
    config_path.write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="prompt_template_type='simple'"):
        build_reward("videoalign", checkpoint=str(copy / "VideoReward"), base_model=base)
    for pth in (copy / "VideoReward").glob("checkpoint-*/model.pth"):
        pth.unlink()
    config["data_config"]["prompt_template_type"] = "detailed_special"
    config_path.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.pth does not exist"):
        build_reward("videoalign", checkpoint=str(copy / "VideoReward"), base_model=base)
