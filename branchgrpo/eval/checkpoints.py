"""Load a backbone for evaluation: the base model, or the weights of one of our training checkpoints.

A training checkpoint (`<output_dir>/checkpoints/checkpoint-N/`, see branchgrpo/runtime/checkpoint.py) holds the weights
users load in `model/` (and the EMA in `ema/`), in one of four layouts, detected here by their files:

    toy_full         transformer.safetensors + transformer.json (+ the text encoder files): the toy's export
    diffusers_full   transformer/ (diffusers: config.json + diffusion_pytorch_model.safetensors): FLUX, Wan
    peft_lora        adapter_model.safetensors + adapter_config.json (peft's own format): the toy's LoRA
    diffusers_lora   pytorch_lora_weights.safetensors (what FluxPipeline / WanPipeline.load_lora_weights read)

This module resolves `--checkpoint` to a weights folder, detects its layout, refuses a checkpoint of another
backbone and warns about a LoRA applied to another base; the backbone's spec loads it (`load_for_eval`: a LoRA on
top of `--pretrained_model_name_or_path`, a full export in place of the base's transformer, everything else from
the base folder). Only safetensors files are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.core.files import read_json

log = logging.getLogger(__name__)

# layout -> the files that identify it, checked in this order
LAYOUTS = {
    "toy_full": ("transformer.json",),
    "diffusers_full": ("transformer/config.json",),
    "peft_lora": ("adapter_model.safetensors", "adapter_config.json"),
    "diffusers_lora": ("pytorch_lora_weights.safetensors",),
}


@dataclass
class LoadedModel:
    adapter: object  # a FlowAdapter, in eval mode with gradients off
    description: str  # "base", "full weights from ...", "LoRA from ..."
    weights_dir: Path | None  # the checkpoint's weights folder (None: the base model)
    prompt_source: str | Path | None  # the folder whose text encoders encode the prompts


def resolve_weights_dir(checkpoint: str | Path, use_ema: bool) -> tuple[Path, dict]:
    """The folder holding the weights, and the training run's config if the checkpoint has one.

    Accepts a checkpoint folder (`checkpoint-N/`, taking `model/` or, with `use_ema`, `ema/`), a run's
    `checkpoints/` folder or output dir (its `latest` checkpoint), or a weights folder itself (`.../model`)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist")
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            path = root / latest.read_text().strip()
            break
    config = {}
    state = path / "trainer_state.json"
    if state.is_file():
        state_json = read_json(state, "--checkpoint")
        config = state_json.get("config", {}) if isinstance(state_json, dict) else {}
    if (path / "model").is_dir() or (path / "ema").is_dir():
        sub = "ema" if use_ema else "model"
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"--checkpoint {path}: no {sub}/ folder" +
                                    (" (the run was trained without --use_ema)" if use_ema else ""))
        return path / sub, config
    if use_ema:
        raise ValueError(f"--use_ema: {path} is a weights folder, not a checkpoint folder holding ema/")
    return path, config


def weights_layout(folder: Path) -> str:
    """The layout of a weights folder (a key of LAYOUTS); a clear error for anything else."""
    for layout, files in LAYOUTS.items():
        if all((folder / name).is_file() for name in files):
            return layout
    known = "; ".join(" + ".join(files) for files in LAYOUTS.values())
    raise FileNotFoundError(f"--checkpoint: {folder} holds no weights we know (expected one of: {known})")


def load_eval_model(spec, model_cfg, checkpoint: str | None, use_ema: bool, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The adapter to sample with: `spec` (a BackboneSpec) loads the base `model_cfg` describes (sizes not given take
    the spec's defaults), with the weights of `checkpoint` when given."""
    weights, config = (None, {}) if checkpoint is None else resolve_weights_dir(checkpoint, use_ema)
    if config.get("model", spec.name) != spec.name:
        raise ValueError(f"--checkpoint {checkpoint}: trained with --model {config['model']}, not {spec.name}")
    layout = None if weights is None else weights_layout(weights)
    if layout is not None and layout not in spec.eval_layouts:
        raise ValueError(f"--checkpoint {weights}: a {layout} checkpoint cannot be loaded into --model {spec.name} "
                         f"(it reads {' or '.join(spec.eval_layouts) or 'none'})")
    if layout is not None and layout.endswith("lora"):
        trained_on, base = config.get("pretrained_model_name_or_path"), model_cfg.pretrained_model_name_or_path
        if trained_on and base and Path(trained_on).resolve() != Path(base).resolve():
            log.warning("the LoRA in %s was trained on %s, but is applied to %s", weights, trained_on, base)
    adapter, description, prompt_source = spec.load_for_eval(model_cfg, weights, layout, device, dtype)
    adapter.transformer.eval().requires_grad_(False)
    return LoadedModel(adapter, description, weights, prompt_source)
