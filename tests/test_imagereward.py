"""ImageReward rebuilt from transformers BLIP parts, loaded from a tiny checkpoint in the official key layout.

The reference below re-implements the ImageReward forward (BLIP ViT, BLIP's BERT with cross-attention, the MLP
head, the mean/std normalisation) with plain torch ops straight from the official-layout tensors, so it checks the
key renaming, the configs inferred from shapes and med_config, the attention masks and the preprocessing."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from branchgrpo.cli.make_tiny import make_tiny  # noqa: E402
from branchgrpo.rewards import available_rewards, build_reward  # noqa: E402
from branchgrpo.testing.imagereward_tiny import TINY, tiny_vocab  # noqa: E402

# ImageReward's own constants (ImageReward/ImageReward.py), written out independently of the module under test.
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("imagereward")
    make_tiny("imagereward", str(out), seed=0)
    return out


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return build_reward("imagereward", device="cpu", checkpoint=str(tiny_dir / "ImageReward.pt"), batch_size=2)


@pytest.fixture(scope="module")
def state(tiny_dir):
    return torch.load(tiny_dir / "ImageReward.pt", weights_only=True)


def _attention(q_in, kv_in, sd, prefix, num_heads, additive_mask=None):
    """BERT multi-head attention (med.py BertSelfAttention) from raw weights."""
    def heads(x):
        return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)
    q = heads(F.linear(q_in, sd[prefix + "query.weight"], sd[prefix + "query.bias"]))
    k = heads(F.linear(kv_in, sd[prefix + "key.weight"], sd[prefix + "key.bias"]))
    v = heads(F.linear(kv_in, sd[prefix + "value.weight"], sd[prefix + "value.bias"]))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def reference_scores(sd, pixels, input_ids, attention_mask):
    """ImageReward's forward written with torch ops on the official-layout state dict."""
    ve, te = "blip.visual_encoder.", "blip.text_encoder."
    width, heads, patch = TINY["vision_width"], TINY["vision_heads"], TINY["patch"]
    x = F.conv2d(pixels, sd[ve + "patch_embed.proj.weight"], sd[ve + "patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd[ve + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + sd[ve + "pos_embed"]
    for i in range(TINY["vision_depth"]):
        b = f"{ve}blocks.{i}."
        h = F.layer_norm(x, (width,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        x = x + F.linear(attn.transpose(1, 2).flatten(2), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    image = F.layer_norm(x, (width,), sd[ve + "norm.weight"], sd[ve + "norm.bias"], eps=1e-6)

    tw, length = TINY["text_width"], input_ids.shape[1]

    def ln(t, name):
        return F.layer_norm(t, (tw,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-12)

    t = sd[te + "embeddings.word_embeddings.weight"][input_ids]
    t = ln(t + sd[te + "embeddings.position_embeddings.weight"][:length], te + "embeddings.LayerNorm")
    pad_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(TINY["text_layers"]):
        b = f"{te}encoder.layer.{i}."
        a = _attention(t, t, sd, b + "attention.self.", TINY["text_heads"], pad_mask)
        t = ln(F.linear(a, sd[b + "attention.output.dense.weight"], sd[b + "attention.output.dense.bias"]) + t,
               b + "attention.output.LayerNorm")
        c = _attention(t, image, sd, b + "crossattention.self.", TINY["text_heads"])
        t = ln(F.linear(c, sd[b + "crossattention.output.dense.weight"], sd[b + "crossattention.output.dense.bias"])
               + t, b + "crossattention.output.LayerNorm")
        f = F.gelu(F.linear(t, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
        t = ln(F.linear(f, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"]) + t, b + "output.LayerNorm")
    feature = t[:, 0]
    for position in (0, 2, 4, 6, 7):
        feature = F.linear(feature, sd[f"mlp.layers.{position}.weight"], sd[f"mlp.layers.{position}.bias"])
    return (feature.squeeze(-1) - MEAN) / STD


def reference_pixels(images, size):
    """ImageReward's _transform (Resize(size, bicubic), CenterCrop(size), CLIP mean/std) via torchvision on tensors,
    clamped to [0, 1] as PIL's uint8 output is."""
    from torchvision.transforms.v2 import functional as TF

    resized = TF.resize(images, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return (TF.center_crop(resized, [size, size]).clamp(0, 1) - CLIP_MEAN) / CLIP_STD


def test_registered_and_official_key_layout(state):
    assert "imagereward" in available_rewards()
    for key in ("blip.visual_encoder.cls_token", "blip.visual_encoder.blocks.1.attn.qkv.weight",
                "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
                "blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "mlp.layers.7.bias"):
        assert key in state
    assert state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 48)


def test_tokenization_matches_imagereward(scorer):
    vocab = tiny_vocab()
    ids, mask = scorer.tokenize(["A red cat", "cats " * 40])
    expected = [vocab.index(tok) for tok in ("[CLS]", "a", "red", "cat", "[SEP]")]
    assert ids.shape == (2, 35) and ids[0, :5].tolist() == expected and ids[0, 5:].eq(0).all()
    assert mask[0].sum() == 5 and mask[1].sum() == 35 and ids[1, -1] == vocab.index("[SEP]")  # truncated
    assert scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(vocab), len(vocab) + 1]


def test_scores_match_reference_forward(scorer, state):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 40, 56, generator=gen)
    prompts = ["a red cat", "a photo of a dog on the ocean with birds", "zebra", "blue car, green sky.", "a cat"]
    scores = scorer(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (5,) and scores.device.type == "cpu"
    ids, mask = scorer.tokenize(prompts)
    expected = reference_scores(state, reference_pixels(images, TINY["image_size"]), ids, mask)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # the score depends on both inputs: same image, other prompt / same prompt, other image
    assert (scorer(images[:1], ["a dog"]) - scores[0]).abs() > 1e-4
    assert (scorer(images[1:2], ["a red cat"]) - scores[0]).abs() > 1e-4


def test_preprocess_close_to_pil_pipeline(scorer):
    """Our tensor preprocessing vs ImageReward's PIL pipeline on a uint8 image: within 1.5/255 (PIL rounds to uint8
    and its bicubic antialias kernel differs slightly from torch's)."""
    import numpy as np
    from PIL import Image

    gen = torch.Generator().manual_seed(2)
    smooth = F.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(60, 84), mode="bilinear")
    array = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    size = TINY["image_size"]
    pil = Image.fromarray(array).resize((int(size * 84 / 60), size), Image.BICUBIC)
    left = int(round((pil.width - size) / 2))
    pil = torch.from_numpy(np.array(pil.crop((left, 0, left + size, size)))).permute(2, 0, 1)[None] / 255.0
    ours = scorer.preprocess(torch.from_numpy(array).permute(2, 0, 1)[None] / 255.0)
    assert ((ours - (pil - CLIP_MEAN) / CLIP_STD) * CLIP_STD).abs().max() < 1.5 / 255


def test_preprocess_is_imagerewards_transform_on_non_square_images(scorer):
    """ImageReward's `_transform` is CLIP's, not BLIP's square resize: Resize(n_px, bicubic) of the shorter edge,
    CenterCrop(n_px) (torchvision: offsets rounded), ToTensor, Normalize. Built here from torchvision's own classes on
    PIL images: exact where no resize is needed (32 x 35: crop offset 1.5, rounded to 2; 35 x 32), within 1.5/255 of
    8-bit rounding after a resize (48 x 80, 80 x 48, 45 x 70)."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    size = TINY["image_size"]
    transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                           T.ToTensor(), T.Normalize(CLIP_MEAN.flatten().tolist(), CLIP_STD.flatten().tolist())])
    gen = torch.Generator().manual_seed(3)
    for (height, width), exact in [((32, 35), True), ((35, 32), True), ((48, 80), False), ((80, 48), False),
                                   ((45, 70), False)]:
        smooth = F.interpolate(torch.rand(2, 3, 6, 8, generator=gen), size=(height, width), mode="bilinear")
        arrays = (smooth.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        expected = torch.stack([transform(Image.fromarray(a)) for a in arrays])
        ours = scorer.preprocess(torch.from_numpy(arrays).permute(0, 3, 1, 2) / 255.0)
        error = ((ours - expected) * CLIP_STD).abs().max()
        assert error < (1e-6 if exact else 1.5 / 255), (height, width, error)


def _write_variant(tiny_dir, tmp_path, edit):
    sd = torch.load(tiny_dir / "ImageReward.pt", weights_only=True)
    edit(sd)
    path = tmp_path / "ImageReward.pt"
    torch.save(sd, path)
    return dict(checkpoint=str(path), med_config=str(tiny_dir / "med_config.json"),
                tokenizer=str(tiny_dir / "bert-base-uncased"))


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"),
     "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"),
    (lambda sd: sd.pop("blip.visual_encoder.blocks.0.attn.proj.weight"),
     "blip.visual_encoder.blocks.0.attn.proj.weight"),
    (lambda sd: sd.pop("mlp.layers.7.bias"), "mlp.layers.7.bias"),
    (lambda sd: sd.pop("blip.visual_encoder.pos_embed"), "blip.visual_encoder.pos_embed"),
    (lambda sd: sd.pop("mlp.layers.4.weight"), "mlp.layers.4.weight"),
    (lambda sd: sd.__setitem__("blip.text_encoder.pooler.dense.weight", torch.zeros(32, 32)),
     "blip.text_encoder.pooler.dense.weight"),
    (lambda sd: sd.__setitem__("blip.itm_head.weight", torch.zeros(2, 32)), "blip.itm_head.weight"),
    (lambda sd: sd.__setitem__("mlp.layers.1.weight", torch.zeros(3)), "mlp.layers.1.weight"),
    (lambda sd: sd.__setitem__("blip.visual_encoder.norm.bias", torch.zeros(47)), "blip.visual_encoder.norm.bias"),
])
def test_strict_loading_names_bad_keys(tiny_dir, tmp_path, edit, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        build_reward("imagereward", **_write_variant(tiny_dir, tmp_path, edit))


def test_missing_files_and_bad_options(tiny_dir, tmp_path):
    paths = dict(checkpoint=str(tiny_dir / "ImageReward.pt"), med_config=str(tiny_dir / "med_config.json"),
                 tokenizer=str(tiny_dir / "bert-base-uncased"))
    for option in paths:
        with pytest.raises(FileNotFoundError, match="imagereward"):
            build_reward("imagereward", **{**paths, option: str(tmp_path / "absent")})
    with pytest.raises(ValueError, match="unknown options"):
        build_reward("imagereward", **paths, bach_size=4)


def test_files_found_under_model_dir_by_their_released_names(tiny_dir, scorer, tmp_path):
    import shutil

    from branchgrpo.rewards import build_reward_set

    model_dir = tmp_path / "hps_ckpt"
    shutil.copytree(tiny_dir, model_dir / "ImageReward")  # ImageReward.pt, med_config.json, bert-base-uncased/
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cat", "a dog", "blue car"]
    found = build_reward("imagereward", model_dir=str(model_dir), batch_size=2)
    assert torch.equal(found(images, prompts), scorer(images, prompts))
    with pytest.raises(FileNotFoundError, match=r"other[/\\]med_config\.json"):  # the explicit checkpoint's folder
        build_reward("imagereward", model_dir=str(model_dir), checkpoint=str(tmp_path / "other" / "ImageReward.pt"))
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]ImageReward[/\\]"):
        build_reward("imagereward", model_dir=str(tmp_path / "empty"))
    skipped = build_reward_set("imagereward,toy", "sum", "cpu", model_dir=str(tmp_path / "empty"), skip_missing=True)
    assert list(skipped.models) == ["toy"] and "ImageReward" in skipped.skipped["imagereward"]
    (model_dir / "ImageReward" / "ImageReward.pt").write_bytes(b"\x00not a checkpoint")  # present but unreadable
    with pytest.raises(ValueError, match="cannot read"):
        build_reward_set("imagereward", "sum", "cpu", model_dir=str(model_dir), skip_missing=True)
