"""HPS-v2.1 (the paper's training reward) on plain open_clip, plus the open_clip scorer the "clip" reward reuses.

Why not the `hpsv2` package: as shipped on PyPI (1.2.0) it pins pytest 7.2 and protobuf < 4, its wheel lacks the BPE
vocabulary file its bundled open_clip needs, and `hpsv2.score()` always downloads the 3.9 GB laion ViT-H-14 weights,
even when handed a local checkpoint (notes/ecosystem.md). HPS-v2.1 is an open_clip ViT-H-14 with fine-tuned weights,
and hpsv2's bundled open_clip and open_clip 3.x share the state-dict layout, so we build `ViT-H-14` with
`pretrained=None` (no download) and load `HPS_v2.1_compressed.pt['state_dict']` into it.

Score = cosine(normalised image features, normalised text features) with no logit scale, as hpsv2 and the official
BranchGRPO code compute it (about 0.31 for base FLUX.1-dev, 0.36 after training: DESIGN section 9).

Preprocessing is HPSv2's evaluation transform, not open_clip's default: the longer edge resized to 224 and the image
letterboxed with black to a square (`resize_mode="longest"`, `_image.py`). A centre crop of the shorter edge gives
other scores on non-square images (480 x 832: -0.033 official vs +0.016 cropped, notes/ecosystem.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from branchgrpo.rewards._image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_images, clip_preprocess, image_size_of
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward
from branchgrpo.core.state_dicts import count_blocks, shapes_of, state_dict_mismatch

HPS_FILE = "HPS_v2.1_compressed.pt"  # under --reward_model_dir
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device, reward: str) -> torch.dtype:
    """"auto": fp16 on CUDA (what hpsv2 and the official code run under autocast), fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"reward '{reward}': dtype must be one of auto, {', '.join(DTYPES)}; got '{name}'")
    return DTYPES[name]


def _load_checkpoint(path: Path, reward: str, expected: str, require_key: bool) -> dict[str, torch.Tensor]:
    """Read a state dict from `path` (weights only), unwrapping {'state_dict': ...} and a DDP 'module.' prefix."""
    if not path.is_file():
        raise FileNotFoundError(f"reward '{reward}': checkpoint {path} does not exist; expected {expected} "
                                "(see docs/flux.md for where to get it)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled code, git-lfs pointer...
        raise ValueError(f"reward '{reward}': cannot read {path} as a torch checkpoint ({err}); expected {expected}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif require_key or not isinstance(obj, dict):
        raise ValueError(f"reward '{reward}': {path} is not {expected} (found {type(obj).__name__} with keys "
                         f"{sorted(obj)[:5] if isinstance(obj, dict) else '-'})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_open_clip(
    arch: str, checkpoint: str | Path, reward: str, model_config_dir: str | None = None, require_state_dict_key=False
):
    """An open_clip model of architecture `arch` with the weights of a local file, and its tokenizer. Nothing is
    downloaded (`pretrained=None`); a mismatch between file and architecture is a ValueError naming both."""
    import open_clip

    if model_config_dir is not None:
        if not Path(model_config_dir).is_dir():
            raise FileNotFoundError(f"reward '{reward}': model_config_dir {model_config_dir} is not a folder of "
                                    "open_clip model-config json files")
        open_clip.add_model_config(str(model_config_dir))
    if arch not in open_clip.list_models():
        raise ValueError(f"reward '{reward}': unknown open_clip architecture '{arch}' (register a config json with "
                         "the model_config_dir option)")
    expected = (f"a dict with key 'state_dict' holding an open_clip {arch} state dict" if require_state_dict_key
                else f"an open_clip {arch} state dict")
    state_dict = _load_checkpoint(Path(checkpoint), reward, expected, require_state_dict_key)
    error = open_clip_mismatch(arch, state_dict, f"reward '{reward}': {checkpoint}",
                               f"set `arch` (and `model_config_dir` for an architecture open_clip does not ship) in "
                               f'--reward_options, e.g. {{"{reward}": {{"arch": ..., "model_config_dir": ...}}}}')
    if error is not None:  # before the real model is built: ViT-H-14 is a billion randomly initialised weights
        raise error
    model = open_clip.create_model(arch, pretrained=None)
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(arch)


def describe_open_clip(shapes) -> str:
    """Depth and width of an open_clip CLIP's towers, read from its tensor shapes (ViT image tower)."""
    conv = shapes.get("visual.conv1.weight")
    if conv is not None and len(conv) == 4:
        pos = shapes.get("visual.positional_embedding")
        tokens = pos[0] - 1 if pos is not None else 0  # the class token, then a square grid of patches
        grid = math.isqrt(max(tokens, 0))
        size = f", {grid * conv[-1]} px" if tokens > 0 and grid * grid == tokens else ""
        image = (f"image tower {count_blocks(shapes, 'visual.transformer.resblocks.')} blocks x width {conv[0]} "
                 f"(patch {conv[-1]}{size})")
    else:
        image = "image tower " + ("of a non-ViT layout" if any(k.startswith("visual.") for k in shapes) else "absent")
    token = shapes.get("token_embedding.weight")
    text = (f"text tower {count_blocks(shapes, 'transformer.resblocks.')} blocks x width {token[1]}"
            if token is not None and len(token) == 2 else "text tower absent")
    projection = shapes.get("text_projection")
    embed = f", embedding {projection[-1]}" if projection is not None and len(projection) == 2 else ""
    return f"{image}, {text}{embed}"


def open_clip_mismatch(arch: str, state_dict: dict[str, torch.Tensor], source: str, fix: str) -> ValueError | None:
    """The one-line error when `state_dict` does not fit open_clip `arch` (None when it does), comparing with the
    architecture built on the meta device (no memory, no initialisation)."""
    import open_clip

    with torch.device("meta"):
        expected = open_clip.create_model(arch, pretrained=None, device="meta").state_dict()
    return state_dict_mismatch(source, f"open_clip {arch}", shapes_of(state_dict), shapes_of(expected),
                               describe_open_clip, fix)


class OpenClipScorer:
    """Cosine similarity of an open_clip model's normalised image and text features, batched, under no_grad.
    `resize_mode`: "shortest" (resize + centre crop, open_clip's default eval transform) or "longest" (resize +
    black letterbox, HPSv2's)."""

    def __init__(self, name: str, model, tokenizer, device: torch.device, dtype: torch.dtype, batch_size: int = 16,
                 transform=None, resize_mode: str = "shortest"):
        if batch_size < 1:
            raise ValueError(f"reward '{name}': batch_size must be >= 1, got {batch_size}")
        self.name, self.tokenizer, self.device, self.dtype, self.batch_size = name, tokenizer, device, dtype, batch_size
        self.resize_mode = resize_mode
        self.model = model.to(device=device, dtype=dtype)
        self.image_size = image_size_of(model.visual.image_size)
        self.mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        self.std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
        self.transform = transform or (lambda cos: cos)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the model's normalised [B, 3, S, S] input, on the device, in its dtype."""
        return clip_preprocess(images.to(self.device), self.image_size, mean=self.mean, std=self.std, dtype=self.dtype,
                               resize_mode=self.resize_mode)

    @torch.no_grad()
    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised fp32 image and text features [B, D]; each distinct prompt is encoded once."""
        image_f = self.model.encode_image(self.preprocess(images)).float()
        unique = sorted(set(prompts))
        tokens = self.tokenizer(unique).to(self.device)
        text_u = self.model.encode_text(tokens).float()
        text_f = text_u[torch.tensor([unique.index(p) for p in prompts], device=self.device)]
        return torch.nn.functional.normalize(image_f, dim=-1), torch.nn.functional.normalize(text_f, dim=-1)

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(media, self.name)
        if len(prompts) != media.shape[0]:
            raise ValueError(f"reward '{self.name}': {media.shape[0]} images but {len(prompts)} prompts")
        scores = []
        for i in range(0, media.shape[0], self.batch_size):
            image_f, text_f = self.features(media[i : i + self.batch_size], list(prompts[i : i + self.batch_size]))
            scores.append(self.transform((image_f * text_f).sum(dim=-1)))
        return torch.cat(scores).float().cpu()


@register_reward("hps")
def build_hps(
    device: torch.device | str = "cpu",
    model_dir: str = DEFAULT_MODEL_DIR,
    checkpoint: LocalPath | None = None,
    arch: str = "ViT-H-14",
    model_config_dir: LocalPath | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
) -> OpenClipScorer:
    """HPS-v2.1. `checkpoint`: HPS_v2.1_compressed.pt ({'state_dict': open_clip ViT-H-14 weights}), default
    `model_dir`/HPS_v2.1_compressed.pt; `arch`: the open_clip architecture (a tiny one registered from
    `model_config_dir` in tests); `dtype`: auto | fp32 | bf16 | fp16."""
    checkpoint = checkpoint or os.path.join(model_dir, HPS_FILE)
    device = torch.device(device)
    model, tokenizer = load_open_clip(arch, checkpoint, "hps", model_config_dir, require_state_dict_key=True)
    return OpenClipScorer("hps", model, tokenizer, device, resolve_dtype(dtype, device, "hps"), batch_size,
                          resize_mode="longest")  # HPSv2's ResizeMaxSize
