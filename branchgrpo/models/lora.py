"""LoRA (peft) helpers shared by every adapter: inject, toggle (the KL reference is the base model, i.e. the
adapters switched off), save the adapter weights alone, and merge LoRA into plain weights - from a LoRA'd network's
state dict (full exports) or from a saved adapter (evaluation) - with one merge formula (`merged_weight`)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from branchgrpo.core.files import read_json

LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"


def inject_lora(module: nn.Module, rank: int, alpha: float, target_modules: Sequence[str]):
    """Add LoRA layers (B = 0 at start, so the network is unchanged) and freeze every non-LoRA parameter."""
    from peft import LoraConfig, inject_adapter_in_model

    if not target_modules:
        raise ValueError("--lora_target_modules: empty; name the Linear layers to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    try:
        inject_adapter_in_model(config, module)
    except ValueError as err:
        raise ValueError(f"--lora_target_modules {list(target_modules)}: {err}") from None
    for name, param in module.named_parameters():
        param.requires_grad_(".lora_" in name)
    return config


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """The base model inside the block: every LoRA layer off, then back on."""
    layers = lora_layers(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a full state dict, in peft's saved naming (adapter name dropped)."""
    return {k.replace(".default.", "."): v for k, v in state_dict.items() if ".lora_" in k}


def merged_weight(weight: torch.Tensor, factors: Iterable[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """The one LoRA merge of the package: W + sum of scaling * B @ A over `factors` (A [r, in], B [out, r], scaling),
    computed in fp32 and returned in W's dtype."""
    out = weight.float()
    for lora_a, lora_b, scaling in factors:
        out = out + scaling * (lora_b.float() @ lora_a.float())
    return out.to(weight.dtype)


def merge_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the peft LoRA layers of `model` into plain weights, given a full state dict of it: W + scaling * B @ A
    per active adapter, keys without `.base_layer` / `lora_*`, i.e. the state dict of the network without LoRA."""
    out = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "scaling")):
            continue
        if any(f"{name}.lora_magnitude_vector" in k for k in state_dict):
            raise ValueError(f"export: DoRA layer {name} cannot be merged; export the LoRA with export_lora instead")
        base_key = f"{name}.base_layer.weight"
        factors = [] if getattr(module, "merged", False) else [
            (state_dict[f"{name}.lora_A.{adapter}.weight"], state_dict[f"{name}.lora_B.{adapter}.weight"],
             module.scaling[adapter]) for adapter in module.active_adapters]
        out[f"{name}.weight"] = merged_weight(state_dict[base_key], factors)
        del out[base_key]
    return {k.replace(".base_layer.", "."): v for k, v in out.items()}


def merge_saved_adapter(module: nn.Module, folder: Path) -> int:
    """Fold a saved peft adapter (`save_adapter`'s adapter_model.safetensors + adapter_config.json) into `module`'s
    Linear weights, in place: scaling = lora_alpha / r (lora_alpha / sqrt(r) for rsLoRA), as peft computes it.
    Merging, rather than injecting LoRA layers, keeps the network exactly the base architecture. Returns the number
    of merged layers; fails naming the key when a layer is missing or a pair incomplete."""
    from safetensors.torch import load_file

    config = read_json(folder / LORA_CONFIG)
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = {}
    for key, value in load_file(str(folder / LORA_WEIGHTS)).items():
        tensors[key.removeprefix("base_model.model.").replace(".default.", ".")] = value
    params = dict(module.named_parameters())
    prefixes = sorted({k.split(".lora_")[0] for k in tensors if ".lora_" in k})
    if not prefixes:
        raise ValueError(f"{folder / LORA_WEIGHTS}: no LoRA tensors (keys containing '.lora_A' / '.lora_B')")
    with torch.no_grad():
        for prefix in prefixes:
            a, b = tensors.get(f"{prefix}.lora_A.weight"), tensors.get(f"{prefix}.lora_B.weight")
            if a is None or b is None:
                raise ValueError(f"{folder / LORA_WEIGHTS}: incomplete LoRA pair for layer '{prefix}'")
            target = params.get(f"{prefix}.weight")
            if target is None or tuple(target.shape) != (b.shape[0], a.shape[1]):
                raise ValueError(f"{folder}: LoRA layer '{prefix}' does not match the model "
                                 f"(no weight of shape {(b.shape[0], a.shape[1])}); "
                                 "wrong --pretrained_model_name_or_path?")
            target.copy_(merged_weight(target, [(a, b, scaling)]))
    return len(prefixes)


def save_adapter(out_dir: str | Path, weights: dict[str, torch.Tensor], config) -> Path:
    """peft's own on-disk format (adapter_model.safetensors + adapter_config.json), for backbones without a
    diffusers LoRA loader (the toy)."""
    from safetensors.torch import save_file

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / LORA_WEIGHTS))
    (folder / LORA_CONFIG).write_text(json.dumps(config.to_dict(), indent=1, default=list))
    return folder / LORA_WEIGHTS
