"""CLIP-family rewards (hps, pickscore, clip) on tiny random checkpoints in the real file layouts (CPU, offline).

Random tiny CLIPs give no meaningful "matched pair beats mismatched pair" signal, so each reward is checked against an
independent direct computation with the reference libraries (open_clip's own eval transform, transformers' own
CLIPProcessor), plus the checkpoint validation errors.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch

from branchgrpo.rewards import available_rewards, build_reward
from branchgrpo.rewards.clip_tiny import TINY_HPS_ARCH, TINY_OPEN_CLIP_CONFIG, make_tiny_clip, make_tiny_hps, \
    make_tiny_pickscore

PROMPTS = ["a red cat on a table", "a castle in the clouds", "a red cat on a table", "an old map", "a blue robot"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one intra-op thread on busy 2-core machines; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps_ckpt")
    make_tiny_hps(str(root), seed=0)
    make_tiny_pickscore(str(root), seed=1)
    make_tiny_clip(str(root), seed=2)
    return root


def _hps(ckpt, **options):
    options = {"checkpoint": str(ckpt / "HPS_v2.1_compressed.pt"), **options}
    return build_reward("hps", arch=TINY_HPS_ARCH, model_config_dir=str(ckpt / "open_clip_configs"), **options)


def _pickscore(ckpt, **options):
    return build_reward("pickscore", model_path=str(ckpt / "PickScore_v1"),
                        processor_path=str(ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K"), **options)


def _images(height, width, seed=0, batch=len(PROMPTS)):
    """Smooth images (upsampled coarse noise) on the 8-bit grid: a bicubic resize does not overshoot [0, 1]."""
    coarse = torch.rand(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return (torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") * 255).round() / 255


def _pil(image):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_rewards_are_registered():
    assert {"hps", "pickscore", "clip"} <= set(available_rewards())


def _open_clip_direct(ckpt, images, prompts, use_pil):
    """HPS-v2.1 written out with open_clip alone: its eval transform, encode_image/encode_text, raw cosine."""
    import open_clip

    open_clip.add_model_config(str(ckpt / "open_clip_configs"))
    model, _, preprocess_val = open_clip.create_model_and_transforms(TINY_HPS_ARCH, pretrained=None)
    state = torch.load(ckpt / "HPS_v2.1_compressed.pt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_HPS_ARCH)
    pixels = torch.stack([preprocess_val(_pil(im) if use_pil else im) for im in images])
    with torch.no_grad():
        image_f = model.encode_image(pixels)
        text_f = model.encode_text(tokenizer(prompts))
    image_f = image_f / image_f.norm(dim=-1, keepdim=True)
    text_f = text_f / text_f.norm(dim=-1, keepdim=True)
    return (image_f @ text_f.T).diag()


@pytest.mark.parametrize("size", [(72, 56), (32, 32)])
def test_hps_equals_direct_open_clip(ckpt, size):
    images = _images(*size)
    scores = _hps(ckpt, batch_size=2)(images, PROMPTS)  # batch 2 over 5 images: the chunking is exercised too
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, _open_clip_direct(ckpt, images, PROMPTS, use_pil=False), atol=1e-5, rtol=0)
    # Against the PIL path hpsv2 uses: equal up to PIL's 8-bit rounding after the resize.
    torch.testing.assert_close(scores, _open_clip_direct(ckpt, images, PROMPTS, use_pil=True), atol=5e-3, rtol=0)
    assert scores[0] != scores[1]


def test_clip_reward_open_clip_backend_is_cosine_and_clipscore(ckpt):
    images = _images(48, 48, seed=3)
    hps = _hps(ckpt)(images, PROMPTS)
    common = dict(model_path=str(ckpt / "HPS_v2.1_compressed.pt"), arch=TINY_HPS_ARCH,
                  model_config_dir=str(ckpt / "open_clip_configs"))
    torch.testing.assert_close(build_reward("clip", **common)(images, PROMPTS), hps)
    torch.testing.assert_close(build_reward("clip", form="clipscore", **common)(images, PROMPTS),
                               2.5 * hps.clamp(min=0))


def _transformers_direct(folder, processor_folder, images, prompts):
    """Cosine of a transformers CLIPModel's embeddings with its own CLIPProcessor, and the logit scale."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    pixels = CLIPImageProcessor.from_pretrained(str(processor_folder))(
        images=[_pil(im) for im in images], return_tensors="pt")["pixel_values"]
    text = CLIPTokenizer.from_pretrained(str(processor_folder))(
        prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    image_f = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text_f = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    return (image_f * text_f).sum(-1), model.logit_scale.exp().item()


def test_pickscore_equals_direct_transformers(ckpt):
    images = _images(32, 32, seed=4)  # at the model's size: no resize, so the PIL path is exact
    direct, logit_scale = _transformers_direct(ckpt / "PickScore_v1", ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K",
                                               images, PROMPTS)
    scores = _pickscore(ckpt, batch_size=3)(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, direct, atol=1e-5, rtol=0)
    scaled = _pickscore(ckpt, use_logit_scale=True)(images, PROMPTS)
    torch.testing.assert_close(scaled, logit_scale * direct, atol=1e-4, rtol=1e-5)
    resized = _images(80, 64, seed=4)  # resize + crop path, against PIL: equal up to 8-bit rounding
    direct_resized, _ = _transformers_direct(ckpt / "PickScore_v1", ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K",
                                             resized, PROMPTS)
    torch.testing.assert_close(_pickscore(ckpt)(resized, PROMPTS), direct_resized, atol=5e-3, rtol=0)


def test_clip_reward_transformers_backend(ckpt):
    folder = ckpt / "clip-vit-large-patch14"
    images = _images(32, 32, seed=5)
    direct, _ = _transformers_direct(folder, folder, images, PROMPTS)
    torch.testing.assert_close(build_reward("clip", model_path=str(folder))(images, PROMPTS), direct, atol=1e-5, rtol=0)
    clipscore = build_reward("clip", model_path=str(folder), form="clipscore")(images, PROMPTS)
    torch.testing.assert_close(clipscore, 2.5 * direct.clamp(min=0), atol=1e-5, rtol=0)


def test_hps_checkpoint_errors(ckpt, tmp_path):
    import open_clip

    with pytest.raises(FileNotFoundError, match=r"missing\.pt does not exist.*'state_dict'.*ViT-H-14"):
        build_reward("hps", checkpoint=str(tmp_path / "missing.pt"))
    raw = tmp_path / "raw.pt"  # a bare state dict is not an HPS file
    torch.save(torch.load(ckpt / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"], raw)
    with pytest.raises(ValueError, match=r"raw\.pt is not a dict with key 'state_dict'"):
        _hps(ckpt, checkpoint=str(raw))
    not_torch = tmp_path / "pointer.pt"
    not_torch.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="cannot read"):
        _hps(ckpt, checkpoint=str(not_torch))
    wider = dict(TINY_OPEN_CLIP_CONFIG, embed_dim=24)  # same layer names, different shapes
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ViT-H-14-tiny-wide.json").write_text(json.dumps(wider))
    with pytest.raises(ValueError, match="does not match open_clip ViT-H-14-tiny-wide"):
        build_reward("hps", checkpoint=str(ckpt / "HPS_v2.1_compressed.pt"), arch="ViT-H-14-tiny-wide",
                     model_config_dir=str(tmp_path / "configs"))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        build_reward("hps", checkpoint=str(ckpt / "HPS_v2.1_compressed.pt"), arch="no-such-arch")
    assert "ViT-H-14" in open_clip.list_models()  # the real architecture stays registered


def test_hf_clip_errors(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope[/\\]config\.json does not exist"):
        build_reward("pickscore", model_path=str(tmp_path / "nope"), processor_path=str(ckpt / "PickScore_v1"))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        build_reward("pickscore", model_path=str(ckpt / "PickScore_v1"), processor_path=str(tmp_path))
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type 't5'"):
        build_reward("pickscore", model_path=str(tmp_path / "t5"))
    with pytest.raises(FileNotFoundError, match="does not exist; expected a transformers CLIPModel folder"):
        build_reward("clip", model_path=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="form must be one of"):
        build_reward("clip", model_path=str(ckpt / "clip-vit-large-patch14"), form="logits")


def test_rewards_reject_bad_media(ckpt):
    reward = _pickscore(ckpt)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        reward(torch.rand(2, 3, 2, 32, 32), PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward(torch.rand(2, 3, 32, 32), PROMPTS[:3])
