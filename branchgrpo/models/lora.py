"""LoRA (peft) helpers shared by every adapter: inject, toggle (the KL reference is the base model, i.e. the
adapters switched off), and turn a full state dict of a LoRA'd network back into plain merged weights or into the
adapter weights alone."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

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


def merged_weights(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain weights of the base network: W + scaling * B @ A for every adapted Linear, base_layer keys renamed."""
    out = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = state_dict[f"{prefix}.lora_A.default.weight"].float()
                b = state_dict[f"{prefix}.lora_B.default.weight"].float()
                value = (value.float() + scaling * (b @ a)).to(value.dtype)
            key = f"{prefix}.{leaf}"
        out[key] = value
    return out


def save_adapter(out_dir: str | Path, weights: dict[str, torch.Tensor], config) -> Path:
    """peft's own on-disk format (adapter_model.safetensors + adapter_config.json), for backbones without a
    diffusers LoRA loader (the toy)."""
    from safetensors.torch import save_file

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / LORA_WEIGHTS))
    (folder / LORA_CONFIG).write_text(json.dumps(config.to_dict(), indent=1, default=list))
    return folder / LORA_WEIGHTS
