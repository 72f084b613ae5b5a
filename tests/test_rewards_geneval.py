"""The GenEval reward's model path: Mask2Former post-processing on hand-made logits, GenEval's crop on grey against
PIL, CLIP colours against open_clip's own pipeline, and the whole reward on tiny random models written by
branchgrpo.testing.geneval_tiny (transformers Mask2Former and CLIP built from configs, CPU, offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch

from branchgrpo.rewards import available_rewards, build_reward
from branchgrpo.rewards.geneval import ColorClassifier, boxes_from_masks, fit_size, instances_from_logits, mask_crop
from branchgrpo.rewards.geneval_rules import COLORS, Detection, select_detections
from branchgrpo.testing.geneval_tiny import COCO_LABELS, make_tiny_geneval

LABELS = ("cat", "dog", "car", "cup")
METADATA = (
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "single_object", "include": [{"class": "tv remote", "count": 1}], "prompt": "a photo of a tv remote"},
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
)
PROMPTS = [record["prompt"] for record in METADATA]


def _pil(image_CHW):
    from PIL import Image

    return Image.fromarray((image_CHW.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _image(height, width, seed=0):
    return (torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


def test_fit_size_is_mmdets_keep_ratio_rescale():
    assert fit_size(512, 512, (1333, 800)) == (800, 800)
    assert fit_size(768, 1024, (1333, 800)) == (800, 1067)
    assert fit_size(2000, 500, (1333, 800)) == (1333, 333)  # the longer side's bound binds
    assert fit_size(1024, 1024, (800, 1333)) == (800, 800)  # the order of the bounds does not matter


def test_boxes_from_masks_against_numpy():
    masks = torch.rand(6, 17, 23, generator=torch.Generator().manual_seed(1)) > 0.97
    masks[5] = False
    for mask, box in zip(masks, boxes_from_masks(masks)):
        ys, xs = np.nonzero(mask.numpy())
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        assert box.tolist() == [float(v) for v in expected]


def test_instances_from_hand_made_logits():
    """Query 0: a confident cat whose mask covers everything; query 1: a confident dog whose mask is the block of
    quarter-resolution cells rows 2-3, columns 1-2; query 2: "no object". A 32 x 32 input (no padding)."""
    class_logits = torch.zeros(3, len(LABELS) + 1)
    class_logits[0, 0] = class_logits[1, 1] = class_logits[2, -1] = 8.0
    mask_logits = torch.full((3, 8, 8), -6.0)
    mask_logits[0] = 3.0
    mask_logits[1, 2:4, 1:3] = 6.0
    p = float(torch.tensor(8.0).exp() / (torch.tensor(8.0).exp() + len(LABELS)))  # the class probability
    found = instances_from_logits(class_logits, mask_logits, (32, 32), (32, 32), LABELS)
    assert sorted(found) == ["cat", "dog"] and len(found["cat"]) == len(found["dog"]) == 1
    cat, dog = found["cat"][0], found["dog"][0]
    assert cat.box == (0.0, 0.0, 32.0, 32.0) and cat.score == pytest.approx(p * torch.tensor(3.0).sigmoid().item())
    assert dog.box == (4.0, 8.0, 12.0, 16.0)  # cells [1, 3) x [2, 4) at 4 pixels per cell
    assert 0.5 * p < dog.score < p and dog.mask.sum() == 8 * 8 - 4  # bilinear upsampling rounds the corners off
    # drawn at twice the size: boxes in the image's own pixels
    assert instances_from_logits(class_logits, mask_logits, (32, 32), (64, 64), LABELS)["dog"][0].box == \
        (8.0, 16.0, 24.0, 32.0)
    # padding is cropped off: the same logits for a 24 x 32 input padded to 32 x 32, drawn at 48 x 64
    cropped = instances_from_logits(class_logits, mask_logits, (24, 32), (48, 64), LABELS)
    assert cropped["dog"][0].box == (8.0, 16.0, 24.0, 32.0) and cropped["cat"][0].box == (0.0, 0.0, 64.0, 48.0)
    assert instances_from_logits(class_logits, mask_logits, (32, 32), (32, 32), LABELS, floor=0.999) == {}


def test_mask_crop_matches_pil_composite_on_grey():
    from PIL import Image

    image = _image(20, 30)
    mask = torch.rand(20, 30, generator=torch.Generator().manual_seed(2)) > 0.5
    box = (3.0, 4.0, 17.0, 15.0)
    reference = Image.composite(_pil(image), Image.new("RGB", (30, 20), "#999"), Image.fromarray(mask.numpy()))
    reference = torch.from_numpy(np.array(reference.crop(box))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(mask_crop(image, mask, box), reference, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    make_tiny_geneval(str(root), seed=0)
    (root / "test_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METADATA))
    return root


def _reward(tiny, **options):
    return build_reward("geneval", model_dir=str(tiny), metadata=str(tiny / "test_metadata.jsonl"),
                        image_scale=[64, 64], **options)


def _steer(reward, label: str) -> None:
    """Make every query of the detector's class head say `label` with probability ~1."""
    head = reward.detector.model.class_predictor
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[COCO_LABELS.index(label)] = 10.0


@pytest.mark.slow
def test_color_classifier_matches_open_clip_reference(tmp_path):
    """GenEval's colour classification done by hand: PIL composite on #999 + crop, open_clip's own eval transform,
    template embeddings normalised, averaged, normalised."""
    import open_clip

    from branchgrpo.rewards.clipscore import build_clipscore
    from branchgrpo.testing.clip_tiny import TINY_HPS_ARCH, make_tiny_hps

    checkpoint = make_tiny_hps(str(tmp_path), seed=3)
    scorer = build_clipscore(model_path=str(checkpoint), arch=TINY_HPS_ARCH,
                             model_config_dir=str(tmp_path / "open_clip_configs"), dtype="fp32")
    classifier = ColorClassifier(scorer)
    image = _image(40, 48, seed=4)
    masks = torch.rand(2, 40, 48, generator=torch.Generator().manual_seed(5)) > 0.4
    detections = [Detection((2.0, 3.0, 30.0, 36.0), 0.9, mask=masks[0]), Detection((20.0, 0.0, 48.0, 17.0), 0.8,
                                                                                  mask=masks[1])]
    logits = classifier.logits(image, detections, "car")

    model, _, transform = open_clip.create_model_and_transforms(TINY_HPS_ARCH, pretrained=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    from PIL import Image

    crops = [Image.composite(_pil(image), Image.new("RGB", (48, 40), "#999"), Image.fromarray(d.mask.numpy()))
             .crop(d.box) for d in detections]
    tokenizer = open_clip.get_tokenizer(TINY_HPS_ARCH)
    with torch.no_grad():
        image_f = torch.nn.functional.normalize(model.encode_image(torch.stack([transform(c) for c in crops])), dim=-1)
        texts = [t for c in COLORS for t in (f"a photo of a {c} car", f"a photo of a {c}-colored car",
                                             f"a photo of a {c} object")]
        text_f = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).view(10, 3, -1)
        weights = torch.nn.functional.normalize(text_f.mean(dim=1), dim=-1)
    torch.testing.assert_close(classifier.class_weights("car"), weights, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, image_f @ weights.T, atol=5e-3, rtol=0)  # PIL's uint8 resize vs float


@pytest.mark.slow
def test_geneval_reward_on_tiny_models(tiny):
    assert "geneval" in available_rewards()
    reward = _reward(tiny)
    images = torch.stack([_image(64, 64, seed=s) for s in range(4)])
    _steer(reward, "dog")
    raw = reward.detector(images)
    num_dogs = [len(select_detections({"dog": found.get("dog", [])}, "single_object").get("dog", [])) for found in raw]
    assert min(num_dogs) >= 1 and all(set(found) == {"dog"} for found in raw)  # every query says dog
    scores = reward(images, PROMPTS)
    results = reward.last_scores
    assert results[0].correct and results[0].partial == pytest.approx(1.0 - abs(1 - num_dogs[0]))
    assert scores[0] == pytest.approx(results[0].partial)
    assert not results[1].correct and results[1].partial == 0.0  # no cat
    assert not results[2].correct
    top_dog = select_detections({"dog": raw[3]["dog"]}, "colors")["dog"][:1]
    assert results[3].correct == (reward.colors(images[3], top_dog, "dog") == ["red"])

    _steer(reward, "remote")  # GenEval's "tv remote" is COCO's "remote"
    results = reward.evaluate(images, PROMPTS)
    assert results[2].correct and not results[0].correct


@pytest.mark.slow
def test_geneval_reward_refuses_bad_input(tiny):
    reward = _reward(tiny, score="correct")
    with pytest.raises(ValueError, match=r"prompt 'a photo of a zebra' is not in the metadata file .*test_metadata"):
        reward(torch.rand(2, 3, 64, 64), ["a photo of a dog", "a photo of a zebra"])
    with pytest.raises(ValueError, match=r"prompts\.txt:2: prompt 'a photo'"):
        reward.check_prompts(["a photo of a dog", "a photo"], source="prompts.txt")
    bad = tiny / "bad_metadata.jsonl"
    bad.write_text(json.dumps({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}],
                               "prompt": "a unicorn"}) + "\n")
    with pytest.raises(ValueError, match="classes the detector does not know: 'unicorn'"):
        build_reward("geneval", model_dir=str(tiny), metadata=str(bad))
    with pytest.raises(FileNotFoundError, match="missing/config.json does not exist"):
        _reward(tiny, detector_path=str(tiny / "missing"))
    with pytest.raises(ValueError, match="score must be one of"):
        _reward(tiny, score="best")
    with pytest.raises(ValueError, match="option metadata must name"):
        build_reward("geneval", model_dir=str(tiny))
