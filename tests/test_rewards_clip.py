"""CLIP-family rewards (hps, pickscore, clip) on tiny random checkpoints in the real file layouts (CPU, offline).

Random tiny CLIPs give no meaningful "matched pair beats mismatched pair" signal, so each reward is checked against an
independent direct computation with the reference libraries (open_clip's own eval transform, transformers' own
CLIPProcessor), plus the checkpoint validation errors.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil

import numpy as np
import pytest
import torch

from branchgrpo.rewards import available_rewards, build_reward
from branchgrpo.rewards._image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from branchgrpo.testing.clip_tiny import TINY_HPS_ARCH, TINY_IMAGE_SIZE, TINY_OPEN_CLIP_CONFIG, make_tiny_clip, \
    make_tiny_hps, make_tiny_pickscore

PROMPTS = ["a red cat on a table", "a castle in the clouds", "a red cat on a table", "an old map", "a blue robot"]


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


def _hpsv2_pixels(images, size):
    """HPSv2's eval transform (its bundled open_clip's image_transform with resize_longest_max=True) on float images,
    step by step with torchvision: ToTensor (already done: floats in [0, 1]), ResizeMaxSize (bicubic resize of the
    longer edge to `size`, the other to round(side * size / longer), no clamp; zero padding to a square, left/top
    = pad // 2), then Normalize with the OpenAI CLIP mean/std."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for image in images:
        height, width = image.shape[-2:]
        scale = size / max(height, width)
        new_h, new_w = round(height * scale), round(width * scale)
        image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        out.append(TF.normalize(image, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)))
    return torch.stack(out)


def _open_clip_model(ckpt):
    import open_clip

    open_clip.add_model_config(str(ckpt / "open_clip_configs"))
    model, _, preprocess_val = open_clip.create_model_and_transforms(TINY_HPS_ARCH, pretrained=None)
    state = torch.load(ckpt / "HPS_v2.1_compressed.pt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    return model.eval(), preprocess_val, open_clip.get_tokenizer(TINY_HPS_ARCH)


def _on_tensors(transform):
    """open_clip's eval transform without its PIL-only steps (RGB conversion, ToTensor), which open_clip >= 3.3 skips
    for tensors itself and older releases apply and fail on: the same pixels on float images."""
    steps = [t for t in transform.transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor",
                                                                         "MaybeConvertMode")
             and getattr(t, "__name__", "") != "_convert_to_rgb"]
    return type(transform)(steps)


def _open_clip_cosine(ckpt, pixels, prompts):
    """encode_image/encode_text of the tiny open_clip model, raw cosine (HPS-v2.1's score)."""
    model, _, tokenizer = _open_clip_model(ckpt)
    with torch.no_grad():
        image_f = model.encode_image(pixels)
        text_f = model.encode_text(tokenizer(prompts))
    image_f = image_f / image_f.norm(dim=-1, keepdim=True)
    text_f = text_f / text_f.norm(dim=-1, keepdim=True)
    return (image_f @ text_f.T).diag()


@pytest.mark.parametrize("size", [(72, 56), (48, 80), (32, 32), (48, 48)])
@pytest.mark.slow
def test_hps_equals_hpsv2_eval_transform_and_open_clip(ckpt, size):
    import open_clip

    images = _images(*size)
    reward = _hps(ckpt, batch_size=2)  # batch 2 over 5 images: the chunking is exercised too
    scores = reward(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(reward.preprocess(images), _hpsv2_pixels(images, TINY_IMAGE_SIZE), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, _open_clip_cosine(ckpt, _hpsv2_pixels(images, TINY_IMAGE_SIZE), PROMPTS),
                               atol=1e-5, rtol=0)
    # open_clip's own letterbox transform (resize_mode="longest": resize on PIL, CenterCropOrPad with black):
    # equal up to PIL's 8-bit rounding after the resize.
    longest = open_clip.image_transform(TINY_IMAGE_SIZE, is_train=False, resize_mode="longest")
    torch.testing.assert_close(scores, _open_clip_cosine(ckpt, torch.stack([longest(_pil(im)) for im in images]),
                                                         PROMPTS), atol=5e-3, rtol=0)
    assert scores[0] != scores[1]


def _letterbox(images):
    """Black bars to a square by hand: the image centred in a max(H, W) square of zeros (odd pixel right/bottom)."""
    height, width = images.shape[-2:]
    side = max(height, width)
    out = torch.zeros(*images.shape[:-2], side, side)
    top, left = (side - height) // 2, (side - width) // 2
    out[..., top : top + height, left : left + width] = images
    return out


@pytest.mark.slow
def test_hps_scores_a_non_square_image_as_its_letterboxed_square(ckpt):
    """HPSv2 letterboxes: scoring an image = scoring it padded with black to a square by hand. Exact where no resize
    is needed (longer edge = the model's size); to interpolation error otherwise (the letterboxed square's resize
    blurs the black bars into the border pixels; on these images at most 0.018 where scores spread over 0.15). A
    centre crop of the shorter edge (open_clip's default transform, and this reward before) scores a different image:
    0.14 away here, several times the tolerance."""
    from branchgrpo.rewards._image import center_crop

    hps = _hps(ckpt)
    for size in [(20, 32), (19, 32), (32, 23)]:  # longer edge = 32: pad only, even and odd
        images = _images(*size, seed=11)
        torch.testing.assert_close(hps(images, PROMPTS), hps(_letterbox(images), PROMPTS), atol=1e-6, rtol=0)
    for size in [(48, 80), (80, 48)]:
        images = _images(*size, seed=0)
        scores, letterboxed = hps(images, PROMPTS), hps(_letterbox(images), PROMPTS)
        torch.testing.assert_close(scores, letterboxed, atol=0.03, rtol=0)
        cropped = hps(center_crop(images, min(size)), PROMPTS)
        assert (cropped - letterboxed).abs().max() > 0.1


def test_letterbox_of_a_square_is_the_resize_of_the_crop_path():
    """Squares take the same resize in both geometries (no crop, no pad); the crop path clamps bicubic overshoot as
    PIL's uint8 output does, HPSv2's float resize does not. So square images score as before wherever the resize
    does not overshoot [0, 1], and differ by the clamp where it does."""
    from branchgrpo.rewards._image import resize_center_crop, resize_longer_edge_and_pad

    smooth = _images(48, 48, seed=13)
    assert torch.equal(resize_longer_edge_and_pad(smooth, 32), resize_center_crop(smooth, 32))
    blocks = (torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(14)) > 0.5).float()
    sharp = torch.nn.functional.interpolate(blocks, size=(48, 48), mode="nearest")  # black/white edges
    letterboxed = resize_longer_edge_and_pad(sharp, 32)
    assert letterboxed.min() < 0 and letterboxed.max() > 1  # overshoot, not clamped (HPSv2's ToTensor-first order)
    assert torch.equal(letterboxed.clamp(0, 1), resize_center_crop(sharp, 32))
    at_size = _images(32, 32, seed=15)
    assert torch.equal(resize_longer_edge_and_pad(at_size, 32), at_size)  # no resize, no pad


@pytest.mark.slow
def test_clip_reward_open_clip_backend_is_cosine_and_clipscore(ckpt):
    images = _images(48, 48, seed=3)
    hps = _hps(ckpt)(images, PROMPTS)
    common = dict(model_path=str(ckpt / "HPS_v2.1_compressed.pt"), arch=TINY_HPS_ARCH,
                  model_config_dir=str(ckpt / "open_clip_configs"))
    torch.testing.assert_close(build_reward("clip", **common)(images, PROMPTS), hps)
    torch.testing.assert_close(build_reward("clip", form="clipscore", **common)(images, PROMPTS),
                               2.5 * hps.clamp(min=0))


@pytest.mark.slow
def test_clip_reward_open_clip_backend_uses_open_clips_own_eval_transform(ckpt):
    """The "clip" reward on an open_clip file keeps open_clip's default eval transform (shorter edge, centre crop with
    torchvision's rounded offsets), unlike HPS on the same file. 32 x 35 needs no resize and crops at offset 1.5,
    rounded to 2 (half to even), so that case is exact."""
    reward = build_reward("clip", model_path=str(ckpt / "HPS_v2.1_compressed.pt"), **_tiny_hps_options(ckpt))
    _, preprocess_val, _ = _open_clip_model(ckpt)
    for size in [(32, 35), (35, 32), (48, 80), (80, 48), (45, 70)]:
        images = _images(*size, seed=16)
        ours = reward.preprocess(images)
        on_tensors = torch.stack([_on_tensors(preprocess_val)(im) for im in images])  # floats: no 8-bit rounding
        torch.testing.assert_close(ours, on_tensors, atol=1e-5, rtol=0)
        on_pil = torch.stack([preprocess_val(_pil(im)) for im in images])
        assert ((ours - on_pil) * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)).abs().max() < 1.5 / 255, size
    assert not torch.equal(reward.preprocess(images), _hps(ckpt).preprocess(images))


def _image_processors(folder):
    """transformers' CLIPImageProcessor from `folder`, with each of its backends (torchvision: the default in
    transformers 5; PIL: transformers 4's slow processor, which the PickScore release used)."""
    from transformers import CLIPImageProcessor

    processors = {"torchvision": CLIPImageProcessor.from_pretrained(str(folder))}
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        return processors
    processors["pil"] = CLIPImageProcessorPil.from_pretrained(str(folder))
    return processors


@pytest.mark.parametrize("reward_name", ["pickscore", "clip"])
@pytest.mark.slow
def test_transformers_backends_preprocess_as_clip_image_processor(ckpt, reward_name):
    """PickScore and the transformers CLIP backend see the pixels their processor gives: exactly where no resize is
    needed - including 32 x 35, whose crop offset 1.5 transformers floors to 1 (torchvision's CenterCrop would
    round it to 2: a one-pixel shift) - and to 8-bit rounding after a resize."""
    if reward_name == "pickscore":
        reward, folder = _pickscore(ckpt), ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    else:
        folder = ckpt / "clip-vit-large-patch14"
        reward = build_reward("clip", model_path=str(folder))
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    for backend, processor in _image_processors(folder).items():
        for size, exact in [((32, 35), True), ((35, 32), True), ((32, 37), True), ((48, 80), False),
                            ((80, 48), False), ((45, 70), False)]:
            images = _images(*size, seed=17)
            expected = processor(images=[_pil(im) for im in images], return_tensors="pt")["pixel_values"]
            ours = reward.preprocess(images)
            if exact:
                torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=f"{backend} {size}")
            else:
                assert ((ours - expected) * std).abs().max() < 1.5 / 255, (backend, size)


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


@pytest.mark.slow
def test_pickscore_equals_direct_transformers(ckpt):
    images = _images(32, 32, seed=4)  # at the model's size: no resize, so the PIL path is exact
    direct, logit_scale = _transformers_direct(ckpt / "PickScore_v1", ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K",
                                               images, PROMPTS)
    scores = _pickscore(ckpt, batch_size=3)(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, direct, atol=1e-5, rtol=0)
    scaled = _pickscore(ckpt, use_logit_scale=True)(images, PROMPTS)
    torch.testing.assert_close(scaled, logit_scale * direct, atol=1e-4, rtol=1e-5)
    odd = _images(32, 35, seed=4)  # no resize, crop offset 1.5: transformers floors it
    direct_odd, _ = _transformers_direct(ckpt / "PickScore_v1", ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K", odd, PROMPTS)
    torch.testing.assert_close(_pickscore(ckpt)(odd, PROMPTS), direct_odd, atol=1e-5, rtol=0)
    resized = _images(80, 64, seed=4)  # resize + crop path, against PIL: equal up to 8-bit rounding
    direct_resized, _ = _transformers_direct(ckpt / "PickScore_v1", ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K",
                                             resized, PROMPTS)
    torch.testing.assert_close(_pickscore(ckpt)(resized, PROMPTS), direct_resized, atol=5e-3, rtol=0)


@pytest.mark.slow
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
    bilinear = tmp_path / "bilinear"  # a processor we would not reproduce is refused, not approximated
    shutil.copytree(ckpt / "CLIP-ViT-H-14-laion2B-s32B-b79K", bilinear)
    config = json.loads((bilinear / "preprocessor_config.json").read_text())
    (bilinear / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}))
    with pytest.raises(ValueError, match="resample=2; only bicubic"):
        build_reward("pickscore", model_path=str(ckpt / "PickScore_v1"), processor_path=str(bilinear))


@pytest.mark.slow
def test_rewards_reject_bad_media(ckpt):
    reward = _pickscore(ckpt)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        reward(torch.rand(2, 3, 2, 32, 32), PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward(torch.rand(2, 3, 32, 32), PROMPTS[:3])


# ----- where factories look for their files --------------------------------------------------------------------------

# The released names under --reward_model_dir (hps_ckpt/README.md), written out here independently of the factories.
RELEASED = {"hps": "HPS_v2.1_compressed.pt", "pickscore": "PickScore_v1", "clip": "clip-vit-large-patch14"}


def _tiny_hps_options(ckpt):
    return {"arch": TINY_HPS_ARCH, "model_config_dir": str(ckpt / "open_clip_configs")}


@pytest.mark.slow
def test_factories_find_their_files_under_model_dir(ckpt):
    images = _images(40, 48, seed=6)
    from_dir = build_reward("hps", model_dir=str(ckpt), **_tiny_hps_options(ckpt))(images, PROMPTS)
    assert torch.equal(from_dir, _hps(ckpt)(images, PROMPTS))
    from_dir = build_reward("pickscore", model_dir=str(ckpt))(images, PROMPTS)
    assert torch.equal(from_dir, _pickscore(ckpt)(images, PROMPTS))
    from_dir = build_reward("clip", model_dir=str(ckpt))(images, PROMPTS)
    assert torch.equal(from_dir, build_reward("clip", model_path=str(ckpt / RELEASED["clip"]))(images, PROMPTS))


def test_missing_files_are_named_under_model_dir_and_hps_ckpt_by_default(ckpt, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, released in RELEASED.items():
        with pytest.raises(FileNotFoundError, match=f"empty[/\\\\]{released}".replace(".", r"\.")):
            build_reward(name, model_dir=str(empty))
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]CLIP-ViT-H-14-laion2B-s32B-b79K[/\\]preprocessor_config"):
        build_reward("pickscore", model_dir=str(empty), model_path=str(ckpt / "PickScore_v1"))  # the processor's
    monkeypatch.chdir(tmp_path)  # no hps_ckpt/ here, whatever the repository's holds
    for name, released in RELEASED.items():
        with pytest.raises(FileNotFoundError, match=f"hps_ckpt[/\\\\]{released}".replace(".", r"\.")):
            build_reward(name)


@pytest.mark.slow
def test_explicit_options_override_model_dir(ckpt, tmp_path):
    """model_dir holds valid files, the explicit option points elsewhere: the explicit one is read (and missing)."""
    with pytest.raises(FileNotFoundError, match=r"other\.pt does not exist"):
        build_reward("hps", model_dir=str(ckpt), checkpoint=str(tmp_path / "other.pt"), **_tiny_hps_options(ckpt))
    with pytest.raises(FileNotFoundError, match=r"other_model[/\\]config\.json does not exist"):
        build_reward("pickscore", model_dir=str(ckpt), model_path=str(tmp_path / "other_model"))
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        build_reward("pickscore", model_dir=str(ckpt), processor_path=str(tmp_path))
    images = _images(32, 32, seed=7)  # the clip reward on the HPS file: the open_clip backend, not the default folder
    overridden = build_reward("clip", model_dir=str(ckpt), model_path=str(ckpt / RELEASED["hps"]),
                              **_tiny_hps_options(ckpt))(images, PROMPTS)
    torch.testing.assert_close(overridden, _hps(ckpt)(images, PROMPTS))


# ----- reward sets -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_set_skips_missing_files_and_says_why(ckpt, tmp_path):
    from branchgrpo.rewards import build_reward_set

    model_dir = tmp_path / "only_hps"
    model_dir.mkdir()
    shutil.copy(ckpt / RELEASED["hps"], model_dir / RELEASED["hps"])
    options = {"hps": _tiny_hps_options(ckpt)}
    rewards = build_reward_set("hps,pickscore,clip", "sum", "cpu", options, model_dir=str(model_dir),
                               skip_missing=True)
    assert list(rewards.models) == ["hps"] and rewards.weights == {"hps": 1.0}
    assert set(rewards.skipped) == {"pickscore", "clip"}
    assert all("\n" not in reason for reason in rewards.skipped.values())
    assert "PickScore_v1" in rewards.skipped["pickscore"] and RELEASED["clip"] in rewards.skipped["clip"]
    images = _images(32, 32, seed=8)
    assert torch.equal(rewards.score(images, PROMPTS)["hps"], _hps(ckpt)(images, PROMPTS))
    with pytest.raises(FileNotFoundError, match="PickScore_v1"):  # the default: a missing file is an error
        build_reward_set("hps,pickscore,clip", "sum", "cpu", options, model_dir=str(model_dir))
    # per-reward options win over model_dir; toy rewards need no file at all
    mixed = build_reward_set("toy=2,hps=0.5", "advantage", "cpu",
                             {"hps": {"checkpoint": str(ckpt / RELEASED["hps"]), **_tiny_hps_options(ckpt)}},
                             model_dir=str(tmp_path / "absent"), skip_missing=True)
    assert list(mixed.models) == ["toy", "hps"] and mixed.skipped == {} and mixed.mode == "advantage"
    assert mixed.reward_max is None  # hps states no maximum


def test_reward_set_with_nothing_left_and_corrupt_files(ckpt, tmp_path):
    from branchgrpo.rewards import RewardSet, build_reward_set

    nothing = build_reward_set("pickscore,clip", "sum", "cpu", model_dir=str(tmp_path), skip_missing=True)
    assert nothing.models == {} and set(nothing.skipped) == {"pickscore", "clip"} and nothing.reward_max is None
    with pytest.raises(ValueError, match="no reward models"):
        RewardSet(models={}, weights={})
    (tmp_path / RELEASED["hps"]).write_text("version https://git-lfs.github.com/spec/v1\n")  # exists, unreadable
    with pytest.raises(ValueError, match="cannot read"):
        build_reward_set("hps", "sum", "cpu", {"hps": _tiny_hps_options(ckpt)}, model_dir=str(tmp_path),
                         skip_missing=True)
    with pytest.raises(ValueError, match="--reward_combine"):
        build_reward_set("toy", "mean", "cpu")


def test_reward_max_is_the_weighted_sum_of_the_models_maxima():
    from branchgrpo.rewards import build_reward_set

    assert build_reward_set("toy=2,toy_digit=0.5", "sum", "cpu").reward_max == 2.5


# ----- decode_and_score ------------------------------------------------------------------------------------------------


def _tiny_decoder(seed=0):
    """A real (if tiny) per-sample decoder: 1x1 conv 4 -> 3 channels, 4x bicubic upsampling to 40x48, sigmoid."""
    conv = torch.nn.Conv2d(4, 3, kernel_size=1)
    with torch.no_grad():
        weights = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(seed))
        conv.weight.copy_(weights)
        conv.bias.zero_()

    def decode(latents_N4hw, conditions=None):  # decode_and_score hands each chunk's conditions
        with torch.no_grad():
            up = torch.nn.functional.interpolate(conv(latents_N4hw), scale_factor=4, mode="bicubic")
        return torch.sigmoid(up).to(torch.float16)  # decode's dtype is not float32: decode_and_score casts

    return decode


@pytest.mark.slow
def test_decode_and_score_equals_decode_all_then_score_in_chunks(ckpt):
    from branchgrpo.rewards import RewardSet, decode_and_score

    hps = _hps(ckpt, batch_size=2)
    clip = build_reward("clip", model_path=str(ckpt / RELEASED["hps"]), form="clipscore", **_tiny_hps_options(ckpt))
    rewards = RewardSet({"hps": hps, "clip": clip}, {"hps": 1.0, "clip": 0.5})
    decode = _tiny_decoder()
    latents = torch.randn(7, 4, 10, 12, generator=torch.Generator().manual_seed(9))
    prompts = [f"{p} number {i}" for i, p in enumerate(PROMPTS + PROMPTS[:2])]
    chunk = 3  # does not divide 7: the last chunk holds one sample
    scores, media = decode_and_score(decode, latents, prompts, rewards, chunk)
    # the trainer's order: decode every chunk and concatenate, then score slices of the same size
    all_media = torch.cat([decode(latents[i : i + chunk]).float() for i in range(0, 7, chunk)])
    parts = [rewards.score(all_media[i : i + chunk], prompts[i : i + chunk]) for i in range(0, 7, chunk)]
    assert media.dtype == torch.float32 and torch.equal(media, all_media)
    assert list(scores) == ["hps", "clip"]
    for name in ("hps", "clip"):
        expected = torch.cat([part[name] for part in parts])
        assert scores[name].shape == (7,) and scores[name].dtype == torch.float32
        assert torch.equal(scores[name], expected), name
    assert scores["hps"].unique().numel() == 7  # prompts and images differ: a misalignment would show
    # no reward left (an evaluation whose checkpoints are all missing): media only
    none_left = RewardSet({}, {}, skipped={"hps": "missing"})
    nothing, media_only = decode_and_score(decode, latents, prompts, none_left, chunk)
    assert nothing == {} and torch.equal(media_only, all_media)


def test_decode_and_score_checks_counts(ckpt):
    from branchgrpo.rewards import RewardSet, decode_and_score

    hps = _hps(ckpt)

    def drops_one(media, prompts):  # a broken reward: one score short
        return hps(media, prompts)[:-1]

    drops_one.name = "drops_one"
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    with pytest.raises(RuntimeError, match="'drops_one' returned 2 scores for 3 inputs"):
        decode_and_score(_tiny_decoder(), latents, PROMPTS, RewardSet({"drops_one": drops_one}, {"drops_one": 1.0}), 3)
    with pytest.raises(ValueError, match="5 latents but 4 prompts"):
        decode_and_score(_tiny_decoder(), latents, PROMPTS[:4], RewardSet({"hps": hps}, {"hps": 1.0}), 3)
