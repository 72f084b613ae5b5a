"""What the diffusers backbones (FLUX, Wan) share: LoRA through diffusers' PeftAdapterMixin (the layout their
pipelines' `load_lora_weights` reads), exports in diffusers layout, state-dict hygiene (wrapper prefixes, LoRA
merging, refusing sharded tensors), and loading a training checkpoint's weights for evaluation (`DiffusersSpec`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from branchgrpo.models.lora import merge_lora_state_dict
from branchgrpo.models.spec import BackboneSpec, EvalModel

LORA_FILE = "pytorch_lora_weights.safetensors"  # what `<Pipeline>.save_lora_weights` writes (export_lora)


def _unwrap(module: nn.Module) -> nn.Module:
    """The model behind DDP (`.module`) or torch.compile (`._orig_mod`); FSDP2 keeps the module itself."""
    for attr in ("module", "_orig_mod"):
        while hasattr(module, attr) and isinstance(getattr(module, attr), nn.Module):
            module = getattr(module, attr)
    return module


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _require_full(state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Sharded (FSDP2 DTensor) state dicts must be gathered first; saving local shards would corrupt the export."""
    if any(type(v).__name__ == "DTensor" for v in state_dict.values()):
        raise ValueError(f"{what}: got sharded DTensor weights; pass a full state dict (e.g. torch.distributed."
                         "checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                         "full_state_dict=True, cpu_offload=True)))")


class DiffusersExportMixin:
    """`add_lora`, `export` and `export_lora` for an adapter whose `transformer` is a diffusers ModelMixin."""

    transformer_class_name: str = ""  # e.g. "FluxTransformer2DModel", written into the exported config
    pipeline_class_name: str = ""  # e.g. "FluxPipeline", whose save_lora_weights writes the LoRA file

    def add_lora(self, rank: int, alpha: float | None = None, target_modules=None, dropout: float = 0.0):
        """Inject peft LoRA layers (B = 0, so the model is unchanged) and freeze everything else. Returns the config."""
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"--lora_rank must be >= 1, got {rank}")
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            target_modules=list(target_modules or self.default_lora_targets), init_lora_weights=True)
        _unwrap(self.transformer).add_adapter(config)  # diffusers' PeftAdapterMixin: the layout load_lora_weights reads
        self.lora_config = config
        return config

    def export(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None,
               dtype: torch.dtype | None = None) -> Path:
        """Write `out_dir/transformer/` (config.json + diffusion_pytorch_model.safetensors) for
        `<transformer class>.from_pretrained`. LoRA layers, if any, are merged into the weights."""
        import diffusers
        from safetensors.torch import save_file

        model = _unwrap(self.transformer)
        state = _strip_wrapper_prefixes(state_dict if state_dict is not None else model.state_dict())
        _require_full(state, "export")
        if any(".base_layer." in k or ".lora_" in k for k in state):  # a LoRA'd state dict: merge; plain: as is
            state = merge_lora_state_dict(model, state)
        folder = Path(out_dir) / "transformer"
        folder.mkdir(parents=True, exist_ok=True)
        # Written by hand: under FSDP2 the class is renamed (FSDP<name>) and save_config would say so.
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        config = {"_class_name": self.transformer_class_name, "_diffusers_version": diffusers.__version__, **config}
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
        tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        return folder

    def export_lora(self, out_dir: str, lora_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `out_dir/pytorch_lora_weights.safetensors` for the pipeline's `load_lora_weights`. `lora_state_dict`:
        None (take it from the module), a full state dict of the LoRA'd transformer, or peft-format LoRA weights."""
        import diffusers
        from peft.utils import get_peft_model_state_dict

        model = _unwrap(self.transformer)
        if not getattr(model, "peft_config", None):
            raise ValueError("export_lora: the transformer has no LoRA adapter (call add_lora first)")
        if lora_state_dict is None:
            lora = get_peft_model_state_dict(model)
        else:
            lora_state_dict = _strip_wrapper_prefixes(lora_state_dict)
            if any(".base_layer." in k or ".default." in k for k in lora_state_dict):
                lora = get_peft_model_state_dict(model, state_dict=lora_state_dict)
            else:
                lora = {k: v for k, v in lora_state_dict.items() if ".lora_" in k}
        _require_full(lora, "export_lora")
        lora = {k: v.detach().to("cpu").contiguous() for k, v in lora.items()}
        metadata = model.peft_config["default"].to_dict()  # rank and alpha, so the loader restores the scaling
        pipeline = getattr(diffusers, self.pipeline_class_name)
        pipeline.save_lora_weights(out_dir, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata)
        return Path(out_dir) / LORA_FILE


def fuse_lora_file(transformer: nn.Module, folder: Path) -> None:
    """Apply the LoRA that `export_lora` wrote into `folder` and fuse it into the weights (sampling then costs what
    the base costs). diffusers' PeftAdapterMixin reads it, rank and alpha from the file's metadata."""
    transformer.load_lora_adapter(str(folder), prefix="transformer", adapter_name="checkpoint", weight_name=LORA_FILE,
                                  use_safetensors=True)
    transformer.fuse_lora()


class DiffusersSpec(BackboneSpec):
    """Evaluation loading shared by the diffusers backbones. Their `load(model_cfg, device, dtype, transformer_path)`
    takes `transformer/` from `transformer_path` instead of the base folder when given."""

    eval_layouts = ("diffusers_full", "diffusers_lora")  # what `export` and `export_lora` write

    def load_for_eval(self, model_cfg, weights, layout, device, dtype=torch.float32) -> EvalModel:
        """A full export replaces the base's transformer (the base transformer is never loaded); a LoRA is fused
        into the base transformer. VAE, text encoders and scheduler config always come from the base folder."""
        base = model_cfg.pretrained_model_name_or_path
        if layout == "diffusers_full":
            return EvalModel(self.load(model_cfg, device, dtype, transformer_path=weights),
                             f"full weights from {weights}", base)
        adapter = self.load(model_cfg, device, dtype)
        if layout is None:
            return EvalModel(adapter, "base", base)
        fuse_lora_file(adapter.transformer, Path(weights))
        return EvalModel(adapter, f"LoRA from {weights}", base)
