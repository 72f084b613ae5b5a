"""PickScore (Kirstain et al. 2023) and the transformers-CLIP scorer the "clip" reward reuses.

PickScore_v1 is a transformers `CLIPModel` (ViT-H-14 fine-tuned on Pick-a-Pic); its processor is the one of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K. Both are read from local folders (`local_files_only=True`, nothing downloaded).

Which number: the paper ranks images by logit_scale * cosine (logit_scale = exp(4.6) = 100 for PickScore_v1); the
official BranchGRPO code and its Table 1 report the raw cosine (0.227 for base FLUX.1-dev). We default to the raw
cosine so that our numbers compare with Table 1 (DESIGN section 9); `use_logit_scale=True` gives the paper's scale,
which is only a factor of ~100 and changes nothing after GRPO's group normalisation.

Images are preprocessed in torch from the processor's own config (shorter-edge bicubic resize, centre crop, mean/std),
so the batch stays on the device (see `_image.py`). As in transformers' CLIPImageProcessor (torchvision and PIL
backends alike, and transformers 4's), the crop offsets are floored, not rounded as torchvision's CenterCrop rounds
them: on some non-square sizes the two crops are one pixel apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from branchgrpo.core.files import read_json
from branchgrpo.rewards._image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_images, clip_preprocess
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward
from branchgrpo.rewards.hps import resolve_dtype

# Folder names under --reward_model_dir.
PICKSCORE_MODEL = "PickScore_v1"
PICKSCORE_PROCESSOR = "CLIP-ViT-H-14-laion2B-s32B-b79K"
BICUBIC = 3  # PIL's resample code, as preprocessor_config.json stores it


def _edge(value, key_order: Sequence[str]) -> int:
    """A processor size entry: an int or a dict such as {"shortest_edge": 224} / {"height": 224, "width": 224}."""
    if isinstance(value, int):
        return value
    for key in key_order:
        if key in value:
            return int(value[key])
    raise ValueError(f"unsupported size entry {value}")


def read_image_processor(folder: Path, reward: str) -> dict:
    """Resize size, crop size and mean/std from `preprocessor_config.json` (read as JSON: we do the transform)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"reward '{reward}': {path} does not exist; the processor folder must hold a CLIP "
                                "preprocessor_config.json and tokenizer files (see docs/flux.md)")
    cfg = read_json(path)
    if cfg.get("resample", BICUBIC) != BICUBIC:
        raise ValueError(f"reward '{reward}': {path} asks for resample={cfg['resample']}; only bicubic ({BICUBIC}, "
                         "the CLIP processors' setting) is implemented")
    size = _edge(cfg.get("size", 224), ("shortest_edge", "height"))
    crop = _edge(cfg.get("crop_size", size), ("height", "shortest_edge")) if cfg.get("do_center_crop", True) else size
    return {"size": size, "crop_size": crop, "mean": cfg.get("image_mean", OPENAI_CLIP_MEAN),
            "std": cfg.get("image_std", OPENAI_CLIP_STD)}


def load_hf_clip(model_path: str | Path, processor_path: str | Path, reward: str, dtype: torch.dtype):
    """A transformers CLIPModel, its tokenizer and image-processor settings, from local folders, validated."""
    from transformers import AutoTokenizer, CLIPModel

    model_path, processor_path = Path(model_path), Path(processor_path)
    config_path = model_path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"reward '{reward}': {config_path} does not exist; model folder {model_path} must be "
                                "a transformers CLIPModel folder (config.json + model.safetensors)")
    model_type = read_json(config_path).get("model_type")
    if model_type != "clip":
        raise ValueError(f"reward '{reward}': {config_path} has model_type '{model_type}', expected a transformers "
                         "CLIPModel ('clip')")
    try:
        model = CLIPModel.from_pretrained(str(model_path), local_files_only=True).to(dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"reward '{reward}': cannot load CLIPModel weights from {model_path} ({err})") from None
    processor = read_image_processor(processor_path, reward)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(processor_path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"reward '{reward}': cannot load a CLIP tokenizer from {processor_path} ({err})") from None
    return model.eval().requires_grad_(False), tokenizer, processor


class HFClipScorer:
    """Cosine (optionally x logit_scale, or any `transform`) of a transformers CLIPModel's normalised embeddings."""

    def __init__(self, name: str, model, tokenizer, processor: dict, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 16, transform=None):
        if batch_size < 1:
            raise ValueError(f"reward '{name}': batch_size must be >= 1, got {batch_size}")
        self.name, self.tokenizer, self.processor = name, tokenizer, processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.model = model.to(device=device, dtype=dtype)
        self.max_length = min(int(model.config.text_config.max_position_embeddings), 77)
        self.transform = transform or (lambda cos: cos)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the processor's normalised [B, 3, S, S] pixel values, on the device."""
        p = self.processor
        return clip_preprocess(images.to(self.device), p["size"], p["crop_size"], p["mean"], p["std"], self.dtype,
                               crop_offset="floor")  # transformers' centre crop floors its offsets

    @torch.no_grad()
    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised fp32 image and text embeddings [B, D]. CLIPModel's forward returns both already projected
        (the same call on transformers 4 and 5, unlike get_*_features whose return type changed)."""
        pixels = self.preprocess(images)
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        out = self.model(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"), pixel_values=pixels)
        normalize = torch.nn.functional.normalize
        return normalize(out.image_embeds.float(), dim=-1), normalize(out.text_embeds.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(media, self.name)
        if len(prompts) != media.shape[0]:
            raise ValueError(f"reward '{self.name}': {media.shape[0]} images but {len(prompts)} prompts")
        scores = []
        for i in range(0, media.shape[0], self.batch_size):
            image_f, text_f = self.features(media[i : i + self.batch_size], prompts[i : i + self.batch_size])
            scores.append(self.transform((image_f * text_f).sum(dim=-1)))
        return torch.cat(scores).float().cpu()


@register_reward("pickscore")
def build_pickscore(
    device: torch.device | str = "cpu",
    model_dir: str = DEFAULT_MODEL_DIR,
    model_path: LocalPath | None = None,
    processor_path: LocalPath | None = None,
    use_logit_scale: bool = False,
    dtype: str = "auto",
    batch_size: int = 16,
) -> HFClipScorer:
    """PickScore_v1: raw cosine by default (Table 1's scale); `use_logit_scale=True`: the paper's logit_scale * cosine.
    `model_path` defaults to `model_dir`/PickScore_v1, `processor_path` to
    `model_dir`/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    model_path = model_path or os.path.join(model_dir, PICKSCORE_MODEL)
    processor_path = processor_path or os.path.join(model_dir, PICKSCORE_PROCESSOR)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device, "pickscore")
    model, tokenizer, processor = load_hf_clip(model_path, processor_path, "pickscore", torch_dtype)
    transform = None
    if use_logit_scale:
        scale = float(model.logit_scale.exp())
        transform = lambda cos: scale * cos  # noqa: E731
    return HFClipScorer("pickscore", model, tokenizer, processor, device, torch_dtype, batch_size, transform)
