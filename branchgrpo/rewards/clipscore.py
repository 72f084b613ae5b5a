"""CLIP score: image-text alignment of a plain CLIP model, from a local transformers folder or open_clip file.

Backends (picked from what `model_path` is, so users point at what they have):
- a folder: a transformers CLIPModel (e.g. a local copy of openai/clip-vit-large-patch14, the model CLIPScore was
  defined with); its tokenizer and preprocessor_config.json from `processor_path` (default: the same folder);
- a file: an open_clip checkpoint (a raw state dict, or {'state_dict': ...}) for architecture `arch`
  (OpenAI weights need the "-quickgelu" variants, e.g. ViT-L-14-quickgelu).

Preprocessing is each backend's own reference: the transformers processor's (shorter-edge bicubic resize, centre crop
with floored offsets, the processor's mean/std) or open_clip's eval transform for a model built with
`pretrained=None` (shorter-edge bicubic resize, centre crop, OpenAI mean/std: open_clip's defaults; a pretrained tag's
own preprocessing, e.g. SigLIP's, is not known without the tag and not reproduced).

Forms: "cosine" (default) is the raw cosine of normalised embeddings, on the same scale as HPS and PickScore here;
"clipscore" is CLIPScore of Hessel et al. 2021, 2.5 * max(cosine, 0), the number papers usually report.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward
from branchgrpo.rewards.hps import OpenClipScorer, load_open_clip, resolve_dtype
from branchgrpo.rewards.pickscore import HFClipScorer, load_hf_clip

CLIP_MODEL = "clip-vit-large-patch14"  # folder under --reward_model_dir
FORMS = {
    "cosine": None,
    "clipscore": lambda cos: 2.5 * cos.clamp(min=0.0),
}


@register_reward("clip")
def build_clipscore(
    device: torch.device | str = "cpu",
    model_dir: str = DEFAULT_MODEL_DIR,
    model_path: LocalPath | None = None,
    processor_path: LocalPath | None = None,
    arch: str = "ViT-L-14-quickgelu",
    model_config_dir: LocalPath | None = None,
    form: str = "cosine",
    dtype: str = "auto",
    batch_size: int = 16,
):
    """CLIP score. `model_path`: transformers CLIP folder or open_clip checkpoint file (default
    `model_dir`/clip-vit-large-patch14); `processor_path`: tokenizer and preprocessor folder for the transformers
    backend (default `model_path`); `arch`/`model_config_dir`: the open_clip backend's architecture; `form`: cosine |
    clipscore; `dtype`: auto | fp32 | bf16 | fp16."""
    if form not in FORMS:
        raise ValueError(f"reward 'clip': form must be one of {', '.join(FORMS)}; got '{form}'")
    model_path = model_path or os.path.join(model_dir, CLIP_MODEL)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device, "clip")
    path = Path(model_path)
    if path.is_dir():
        model, tokenizer, processor = load_hf_clip(path, processor_path or path, "clip", torch_dtype)
        return HFClipScorer("clip", model, tokenizer, processor, device, torch_dtype, batch_size, FORMS[form])
    if path.is_file():
        model, tokenizer = load_open_clip(arch, path, "clip", model_config_dir)
        return OpenClipScorer("clip", model, tokenizer, device, torch_dtype, batch_size, FORMS[form])
    raise FileNotFoundError(f"reward 'clip': {model_path} does not exist; expected a transformers CLIPModel folder "
                            "(config.json, model.safetensors, tokenizer, preprocessor_config.json) or an open_clip "
                            f"checkpoint file for architecture '{arch}'")
