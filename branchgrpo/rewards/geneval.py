"""GenEval as a reward, without mmdet: a transformers Mask2Former instance segmenter and CLIP colours, GenEval's rules.

Per image: the Mask2Former COCO instance model detects objects (binary masks, boxes from the masks, confidence =
class probability x mean mask probability inside the mask, as mmdet's Mask2Former scores them); the rules of
`geneval_rules.py` keep detections by GenEval's thresholds (0.3, 0.9 for counting, at most 16 per class); CLIP
classifies the colour of each detection whose colour the prompt asks about, zero-shot: the object's mask pasted on
GenEval's grey (#999) and cropped to its box, against GenEval's 10 colours, each embedded with its 3 templates
("a photo of a {color} {class}", "a photo of a {color}-colored {class}", "a photo of a {color} object"; text
embeddings normalised, averaged over the templates, normalised again). The reward is one of the three scores
(`score`: "partial", what Flow-GRPO trains on (default); "strict"; "correct", GenEval's binary score); all three
of the last call are in `last_scores`.

Each image's metadata is found by its prompt in GenEval's metadata JSONL (option `metadata`): a prompt it does not
list is an input error, naming the prompt and the file. GenEval's class names map to the detector's COCO labels by
name; three differ (GENEVAL_CLASS_ALIASES).

Files (under --reward_model_dir unless an option points elsewhere; nothing downloaded):
- `detector_path`, default `mask2former-swin-small-coco-instance/`: a local copy of
  facebook/mask2former-swin-small-coco-instance (config.json + weights). GenEval ships mmdet's
  mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco checkpoint instead, a different training run of the same
  architecture, so scores can differ slightly from the official evaluator's (docs/rewards.md);
- `clip_path`, default `clip-vit-large-patch14/` (the "clip" reward's folder): a transformers CLIP folder of
  openai/clip-vit-large-patch14, the weights GenEval's open_clip ViT-L-14 "openai" loads; or an open_clip state-dict
  file of architecture `clip_arch` (ViT-L-14-quickgelu for the OpenAI weights).

Detector input: mmdet's test pipeline for that checkpoint, in torch - resize keeping the aspect ratio so that the
image fits (1333, 800) (longer side <= 1333, shorter side <= 800, one side reaching its bound), bilinear, ImageNet
mean/std, zero padding to a multiple of 32; masks resized back to the image size before thresholding at logit 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from branchgrpo.rewards._image import check_images
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward
from branchgrpo.rewards.geneval_rules import (COLORS, THRESHOLD, Detection, GenEvalPrompt, GenEvalScore,
                                              needs_color, read_metadata, score_geneval, select_detections)

DETECTOR_FOLDER = "mask2former-swin-small-coco-instance"  # under --reward_model_dir
CLIP_FOLDER = "clip-vit-large-patch14"
GENEVAL_CLASS_ALIASES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")
BACKGROUND_GREY = 0x99 / 255  # GenEval's bgcolor "#999"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MULTIPLE = 32
MAX_PER_IMAGE = 100  # mmdet's Mask2Former test_cfg: the best (query, class) pairs considered per image
SCORES = ("partial", "strict", "correct")


def fit_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmdet's keep-ratio rescale: the largest size with longer side <= max(scale) and shorter side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def boxes_from_masks(masks_NHW: torch.Tensor) -> torch.Tensor:
    """[N, 4] (x0, y0, x1, y1) float on the CPU: the smallest box holding each mask's pixels, x1/y1 one past the
    last pixel (mmdet's mask2bbox); zeros for an empty mask."""
    edges = []
    for filled_NL in (masks_NHW.any(dim=1), masks_NHW.any(dim=2)):  # columns (x), then rows (y) holding a pixel
        index_L = torch.arange(filled_NL.shape[1], device=filled_NL.device)
        first = torch.where(filled_NL, index_L, filled_NL.shape[1]).min(dim=1).values
        last = torch.where(filled_NL, index_L, -1).max(dim=1).values
        edges.append((first, last + 1))
    (x0, x1), (y0, y1) = edges
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(masks_NHW.flatten(1).any(dim=1, keepdim=True), boxes, 0.0).cpu()


def instances_from_logits(class_logits_QK: torch.Tensor, mask_logits_Qhw: torch.Tensor, resized_hw, image_hw,
                          labels: Sequence[str], floor: float = THRESHOLD) -> dict[str, list[Detection]]:
    """One image's Mask2Former outputs -> {label: detections with confidence > floor}. `class_logits_QK`: [Q, K+1]
    (the last class is "no object"); `mask_logits_Qhw`: at a quarter of the padded input size; `resized_hw`: the
    unpadded input size; `image_hw`: the image's own size (masks and boxes in its pixels)."""
    probs_QK = class_logits_QK.float().softmax(dim=-1)[:, :-1]
    num_classes = probs_QK.shape[1]
    top_probs, top_index = probs_QK.flatten().topk(min(MAX_PER_IMAGE, probs_QK.numel()))
    keep = top_probs > floor  # the confidence is at most the class probability: nothing else can pass
    top_probs, top_index = top_probs[keep], top_index[keep]
    if top_index.numel() == 0:
        return {}
    query, label = top_index // num_classes, top_index % num_classes
    padded_hw = (mask_logits_Qhw.shape[-2] * 4, mask_logits_Qhw.shape[-1] * 4)
    logits = F.interpolate(mask_logits_Qhw[query][None].float(), size=padded_hw, mode="bilinear", align_corners=False)
    logits = logits[..., : resized_hw[0], : resized_hw[1]]
    logits = F.interpolate(logits, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = top_probs * mask_scores
    boxes = boxes_from_masks(masks)
    out: dict[str, list[Detection]] = {}
    for i in torch.where(scores > floor)[0].tolist():
        box = tuple(float(v) for v in boxes[i])
        out.setdefault(labels[int(label[i])], []).append(Detection(box, float(scores[i]), mask=masks[i]))
    return out


class Mask2FormerDetector:
    """A transformers Mask2FormerForUniversalSegmentation from a local folder, run with mmdet's test pipeline."""

    def __init__(self, folder: str | Path, device: torch.device, image_scale: Sequence[int]):
        from transformers import Mask2FormerForUniversalSegmentation

        config = Path(folder) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"reward 'geneval': {config} does not exist; detector_path must be a transformers "
                                    f"Mask2Former folder (a local copy of facebook/{DETECTOR_FOLDER})")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "mask2former":
            raise ValueError(f"reward 'geneval': {config} has model_type {model_type!r}, expected 'mask2former'")
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), local_files_only=True)
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.image_scale = device, tuple(image_scale)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def label_of(self, geneval_class: str) -> str | None:
        """The detector's label for a GenEval class name, or None if it has none."""
        for name in (geneval_class, GENEVAL_CLASS_ALIASES.get(geneval_class)):
            if name in self.labels:
                return name
        return None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[dict[str, list[Detection]]]:
        """Images [B, 3, H, W] in [0, 1] -> per image {detector label: detections above GenEval's lowest threshold}."""
        height, width = images.shape[-2:]
        resized_hw = fit_size(height, width, self.image_scale)
        pixels = F.interpolate(images.to(self.device, torch.float32), size=resized_hw, mode="bilinear",
                               align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
        pad_h, pad_w = (-resized_hw[0]) % PAD_MULTIPLE, (-resized_hw[1]) % PAD_MULTIPLE
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
        out = self.model(pixel_values=pixels)
        return [instances_from_logits(out.class_queries_logits[b], out.masks_queries_logits[b], resized_hw,
                                      (height, width), self.labels) for b in range(images.shape[0])]


def mask_crop(image_CHW: torch.Tensor, mask_HW: torch.Tensor, box) -> torch.Tensor:
    """The object on GenEval's grey background (pixels outside its mask replaced), cropped to its box (rounded)."""
    composite = torch.where(mask_HW.to(image_CHW.device), image_CHW, torch.full_like(image_CHW, BACKGROUND_GREY))
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return composite[:, y0:y1, x0:x1]


class ColorClassifier:
    """Zero-shot colour of object crops with a CLIP scorer of the "clip" reward (open_clip or transformers)."""

    def __init__(self, scorer):
        from branchgrpo.rewards.hps import OpenClipScorer

        self.scorer, self.is_open_clip = scorer, isinstance(scorer, OpenClipScorer)
        self.weights: dict[str, torch.Tensor] = {}  # class -> [10, D] colour embeddings

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        s = self.scorer
        if self.is_open_clip:
            return s.model.encode_text(s.tokenizer(texts).to(s.device)).float()
        tokens = s.tokenizer(texts, padding=True, truncation=True, max_length=s.max_length, return_tensors="pt")
        tokens = tokens.to(s.device)
        pooled = s.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return s.model.text_projection(pooled.pooler_output).float()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.scorer
        if self.is_open_clip:
            return s.model.encode_image(pixels).float()
        return s.model.visual_projection(s.model.vision_model(pixel_values=pixels).pooler_output).float()

    def class_weights(self, cls: str) -> torch.Tensor:
        """[10, D]: per colour, the normalised mean of its normalised template embeddings."""
        if cls not in self.weights:
            texts = [t.format(color=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
            per_text = F.normalize(self.encode_texts(texts), dim=-1).view(len(COLORS), len(COLOR_TEMPLATES), -1)
            self.weights[cls] = F.normalize(per_text.mean(dim=1), dim=-1)
        return self.weights[cls]

    @torch.no_grad()
    def logits(self, image_CHW: torch.Tensor, detections: Sequence[Detection], cls: str) -> torch.Tensor:
        """[N, 10] cosines of each detection's crop with the colour embeddings of class `cls`."""
        crops = [self.scorer.preprocess(mask_crop(image_CHW, d.mask, d.box)[None]) for d in detections]
        features = F.normalize(self.encode_images(torch.cat(crops)), dim=-1)
        return features @ self.class_weights(cls).T

    def __call__(self, image_CHW: torch.Tensor, detections: Sequence[Detection], cls: str) -> list[str]:
        return [COLORS[i] for i in self.logits(image_CHW, detections, cls).argmax(dim=1).tolist()]


class GenEvalReward:
    """GenEval's scores of each image for its prompt's metadata (module docstring)."""

    name = "geneval"
    reward_max = 1.0

    def __init__(self, detector: Mask2FormerDetector, colors: ColorClassifier, metadata: dict[str, GenEvalPrompt],
                 metadata_path: str, score: str):
        self.detector, self.colors, self.metadata = detector, colors, metadata
        self.metadata_path, self.score = metadata_path, score
        self.last_scores: list[GenEvalScore] = []

    def check_prompts(self, prompts: Sequence[str], source: str | None = None) -> list[GenEvalPrompt]:
        """The metadata of every prompt, or a ValueError naming the first prompt the metadata file does not list
        (and `source`:line, when the prompts are the lines of the file `source`)."""
        for line, prompt in enumerate(prompts, start=1):
            if prompt not in self.metadata:
                where = f"{source}:{line}: " if source else ""
                raise ValueError(f"reward 'geneval': {where}prompt {prompt!r} is not in the metadata file "
                                 f"{self.metadata_path}; GenEval scores only the prompts its metadata describes")
        return [self.metadata[p] for p in prompts]

    def evaluate(self, media: torch.Tensor, prompts: Sequence[str]) -> list[GenEvalScore]:
        check_images(media, self.name)
        if len(prompts) != media.shape[0]:
            raise ValueError(f"reward 'geneval': {media.shape[0]} images but {len(prompts)} prompts")
        specs = self.check_prompts(prompts)
        results = []
        for image, spec, found in zip(media, specs, self.detector(media)):
            by_class = {cls: found.get(self.detector.label_of(cls), []) for cls in spec.classes}
            kept = select_detections(by_class, spec.tag)
            for cls, num in needs_color(spec, kept).items():
                top = kept[cls][:num]
                colored = [replace(d, color=c) for d, c in zip(top, self.colors(image, top, cls))]
                kept[cls] = colored + kept[cls][num:]
            results.append(score_geneval(spec, kept))
        return results

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.last_scores = self.evaluate(media, prompts)
        return torch.tensor([float(getattr(s, self.score)) for s in self.last_scores], dtype=torch.float32)


@register_reward("geneval")
def build_geneval(
    device: torch.device | str = "cpu",
    model_dir: str = DEFAULT_MODEL_DIR,
    metadata: LocalPath | None = None,
    score: str = "partial",
    detector_path: LocalPath | None = None,
    clip_path: LocalPath | None = None,
    clip_arch: str = "ViT-L-14-quickgelu",
    clip_model_config_dir: LocalPath | None = None,
    image_scale: Sequence[int] = (1333, 800),
) -> GenEvalReward:
    """GenEval (module docstring). `metadata`: GenEval's evaluation_metadata.jsonl (or one in its format) listing
    every prompt; `score`: partial | strict | correct; `detector_path` / `clip_path` (+ `clip_arch`,
    `clip_model_config_dir` for an open_clip file): the models; `image_scale`: the detector's (long, short) bound."""
    from branchgrpo.rewards.clipscore import build_clipscore

    if score not in SCORES:
        raise ValueError(f"reward 'geneval': score must be one of {', '.join(SCORES)}, got {score!r}")
    if not metadata:
        raise ValueError("reward 'geneval': option metadata must name GenEval's evaluation_metadata.jsonl (or a file "
                         'in its format), e.g. --reward_options \'{"geneval": {"metadata": "path.jsonl"}}\'')
    if len(image_scale) != 2 or min(image_scale) < PAD_MULTIPLE:
        raise ValueError(f"reward 'geneval': image_scale must be two sizes >= {PAD_MULTIPLE}, got {image_scale}")
    specs = read_metadata(metadata)
    device = torch.device(device)
    detector = Mask2FormerDetector(detector_path or os.path.join(model_dir, DETECTOR_FOLDER), device, image_scale)
    unknown = sorted({cls for spec in specs.values() for cls in spec.classes if detector.label_of(cls) is None})
    if unknown:
        raise ValueError(f"reward 'geneval': {metadata} names classes the detector does not know: "
                         f"{', '.join(map(repr, unknown))} (its labels: {', '.join(detector.labels[:10])}, ...)")
    scorer = build_clipscore(device=device, model_path=clip_path or os.path.join(model_dir, CLIP_FOLDER),
                             arch=clip_arch, model_config_dir=clip_model_config_dir, dtype="fp32")
    return GenEvalReward(detector, ColorClassifier(scorer), specs, str(metadata), score)
