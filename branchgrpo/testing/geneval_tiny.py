"""A tiny random GenEval reward setup in the real folder layout, built offline (for tests and smoke runs).

    out_dir/mask2former-swin-small-coco-instance/   tiny transformers Mask2Former (Swin backbone), COCO's 80 labels
    out_dir/clip-vit-large-patch14/                 tiny transformers CLIP (clip_tiny.make_tiny_clip)
    out_dir/evaluation_metadata.jsonl               one GenEval record per task type

Random weights detect nothing meaningful; tests steer the class head where they need known detections.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from branchgrpo.testing.clip_tiny import make_tiny_clip

DETECTOR_FOLDER = "mask2former-swin-small-coco-instance"
TINY_DETECTOR_SIZE = 64
# The 80 COCO instance labels in the order of the real checkpoint's config (detectron2's COCO thing classes).
COCO_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
SAMPLE_METADATA = (
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "tv remote", "count": 1}],
     "prompt": "a photo of a cat and a tv remote"},
    {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}],
     "prompt": "a photo of three dogs"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "cat", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a cat"},
    {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "blue"},
                                      {"class": "cup", "count": 1, "color": "white"}],
     "prompt": "a photo of a blue bench and a white cup"},
)


def tiny_mask2former(seed: int = 0, num_queries: int = 8):
    """A 2-decoder-layer Mask2Former on a 4-stage Swin 32 channels wide, with COCO's labels (about 1.3 M weights)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    swin = SwinConfig(image_size=TINY_DETECTOR_SIZE, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1],
                      num_heads=[1, 1, 1, 1], window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=num_queries,
        id2label=dict(enumerate(COCO_LABELS)), label2id={name: i for i, name in enumerate(COCO_LABELS)})
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config).eval()


def make_tiny_geneval(out_dir: str, seed: int = 0) -> Path:
    out = Path(out_dir)
    tiny_mask2former(seed).save_pretrained(str(out / DETECTOR_FOLDER))
    make_tiny_clip(str(out), seed=seed + 1)
    (out / "evaluation_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SAMPLE_METADATA))
    return out
