"""Load a backbone for evaluation: the base model, or the weights of one of our training checkpoints.

A training checkpoint (`<output_dir>/checkpoints/checkpoint-N/`, see branchgrpo/checkpoint.py) holds the weights
users load in `model/` (and the EMA in `ema/`), in one of three layouts:

    full export, toy     transformer.safetensors + transformer.json (+ the text encoder files)
    full export, flux    transformer/ (diffusers: config.json + diffusion_pytorch_model.safetensors)
    LoRA, toy            adapter_model.safetensors + adapter_config.json (peft's own format)
    LoRA, flux           pytorch_lora_weights.safetensors (diffusers' format, what FluxPipeline.load_lora_weights reads)

A LoRA checkpoint is applied on top of `--pretrained_model_name_or_path` (the base it was trained from); a full
export replaces the base's transformer. Everything else (FLUX's VAE and text encoders, the schedule config) always
comes from the base folder. Only safetensors files are read.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TOY_FULL = "transformer.json"
PEFT_LORA = ("adapter_model.safetensors", "adapter_config.json")
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


@dataclass
class LoadedModel:
    adapter: object  # a FlowAdapter
    description: str  # "base", "full weights from ...", "LoRA from ..."
    weights_dir: Path | None
    training_config: dict  # the checkpoint run's flags ({} for the base model)


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
        config = json.loads(state.read_text()).get("config", {})
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
    """'toy_full', 'flux_full', 'peft_lora' or 'diffusers_lora' (a clear error for anything else)."""
    if (folder / TOY_FULL).is_file():
        return "toy_full"
    if (folder / "transformer" / "config.json").is_file():
        return "flux_full"
    if all((folder / name).is_file() for name in PEFT_LORA):
        return "peft_lora"
    if (folder / DIFFUSERS_LORA).is_file():
        return "diffusers_lora"
    raise FileNotFoundError(f"--checkpoint: {folder} holds no weights we know (expected {TOY_FULL}, transformer/, "
                            f"{' + '.join(PEFT_LORA)} or {DIFFUSERS_LORA})")


def load_eval_model(model: str, pretrained: str | None, checkpoint: str | None, use_ema: bool,
                    device: torch.device, *, height: int | None = None, width: int | None = None,
                    guidance_scale: float | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The adapter to sample with, in eval mode with gradients off."""
    weights, config = (None, {}) if checkpoint is None else resolve_weights_dir(checkpoint, use_ema)
    if config and config.get("model") not in (None, model):
        raise ValueError(f"--checkpoint {checkpoint}: trained with --model {config['model']}, not {model}")
    if config and weights is not None and weights_layout(weights).endswith("lora"):
        trained_on = config.get("pretrained_model_name_or_path")
        if trained_on and pretrained and Path(trained_on).resolve() != Path(pretrained).resolve():
            log.warning("the LoRA in %s was trained on %s, but is applied to %s", weights, trained_on, pretrained)
    if model == "toy":
        adapter, description = _load_toy(pretrained, weights, device)
    elif model == "flux":
        adapter, description = _load_flux(pretrained, weights, device, height or 720, width or 720,
                                          3.5 if guidance_scale is None else guidance_scale, dtype)
    else:
        raise ValueError(f"--model: '{model}' is not supported for evaluation (toy or flux)")
    adapter.transformer.eval().requires_grad_(False)
    return LoadedModel(adapter, description, weights, config)


# ---------------------------------------------------------------------------------------------------------------
# Toy
# ---------------------------------------------------------------------------------------------------------------


def _load_toy(pretrained, weights: Path | None, device):
    from branchgrpo.models.toy import load_toy

    if weights is None:
        return load_toy(pretrained, device), "base"
    layout = weights_layout(weights)
    if layout == "toy_full":
        return load_toy(weights, device), f"full weights from {weights}"
    if layout != "peft_lora":
        raise ValueError(f"--checkpoint {weights}: a {layout} checkpoint cannot be loaded into the toy model")
    adapter = load_toy(pretrained, device)
    merge_peft_lora(adapter.transformer, weights)
    return adapter, f"LoRA from {weights}"


def merge_peft_lora(module: torch.nn.Module, folder: Path) -> int:
    """Fold a peft adapter (adapter_model.safetensors + adapter_config.json) into `module`'s Linear weights:
    W += scaling * B @ A with scaling = lora_alpha / r (lora_alpha / sqrt(r) for rsLoRA), as peft computes it.
    Merging, rather than injecting LoRA layers, keeps the evaluated network exactly the base architecture.
    Returns the number of merged layers; fails naming the key when a layer is missing or a pair incomplete."""
    from safetensors.torch import load_file

    config = json.loads((folder / PEFT_LORA[1]).read_text())
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = {}
    for key, value in load_file(str(folder / PEFT_LORA[0])).items():
        key = key.removeprefix("base_model.model.").replace(".default.", ".")
        tensors[key] = value
    params = dict(module.named_parameters())
    prefixes = sorted({k.split(".lora_")[0] for k in tensors if ".lora_" in k})
    if not prefixes:
        raise ValueError(f"{folder / PEFT_LORA[0]}: no LoRA tensors (keys containing '.lora_A' / '.lora_B')")
    with torch.no_grad():
        for prefix in prefixes:
            a, b = tensors.get(f"{prefix}.lora_A.weight"), tensors.get(f"{prefix}.lora_B.weight")
            if a is None or b is None:
                raise ValueError(f"{folder / PEFT_LORA[0]}: incomplete LoRA pair for layer '{prefix}'")
            target = params.get(f"{prefix}.weight")
            if target is None or tuple(target.shape) != (b.shape[0], a.shape[1]):
                raise ValueError(f"{folder}: LoRA layer '{prefix}' does not match the model "
                                 f"(no weight of shape {(b.shape[0], a.shape[1])}); "
                                 "wrong --pretrained_model_name_or_path?")
            target += (scaling * (b.float() @ a.float())).to(target.dtype)
    return len(prefixes)


# ---------------------------------------------------------------------------------------------------------------
# FLUX
# ---------------------------------------------------------------------------------------------------------------


def _load_flux(pretrained, weights: Path | None, device, height, width, guidance, dtype):
    from branchgrpo.models.flux import FluxAdapter, check_flux_folder, check_image_size, load_flux

    if pretrained is None:
        raise ValueError("--pretrained_model_name_or_path: required for --model flux (the base FLUX folder: VAE, "
                         "text encoders and, for LoRA checkpoints, the base transformer)")
    layout = None if weights is None else weights_layout(weights)
    if layout in ("toy_full", "peft_lora"):
        raise ValueError(f"--checkpoint {weights}: a {layout} checkpoint cannot be loaded into FLUX")
    if layout != "flux_full":
        adapter = load_flux(pretrained, device, dtype=dtype, height=height, width=width, guidance_scale=guidance)
        if layout is None:
            return adapter, "base"
        # diffusers' PeftAdapterMixin reads the file FluxPipeline.save_lora_weights wrote (rank/alpha metadata)
        adapter.transformer.load_lora_adapter(str(weights), prefix="transformer", adapter_name="checkpoint",
                                              weight_name=DIFFUSERS_LORA, use_safetensors=True)
        adapter.transformer.fuse_lora()  # plain Linear weights again: sampling costs what the base costs
        return adapter, f"LoRA from {weights}"
    # full export: the checkpoint's transformer, everything else from the base (the base transformer is not loaded)
    check_image_size(height, width)
    root = check_flux_folder(pretrained, ("vae",))
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(weights), subfolder="transformer", torch_dtype=dtype,
                                                         local_files_only=True)
    vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=vae_dtype, local_files_only=True)
    scheduler = root / "scheduler" / "scheduler_config.json"
    adapter = FluxAdapter(transformer, vae, height, width, guidance,
                          json.loads(scheduler.read_text()) if scheduler.is_file() else {})
    return adapter.to(device), f"full weights from {weights}"
