"""What the diffusers backbones (FLUX, Wan) share: LoRA through diffusers' PeftAdapterMixin (the layout their
pipelines' `load_lora_weights` reads), exports in diffusers layout, state-dict hygiene (wrapper prefixes, LoRA
merging, refusing sharded tensors), loading a training checkpoint's weights for evaluation (`DiffusersSpec`), and
reading a checkpoint folder with one-line errors: its configs as JSON (`read_config`, for the size checks that run
before any weight is read), the transformer's weights checked against its config by their shapes (diffusers would
fill missing blocks with random weights and only warn), and diffusers' own loading errors (`load_part`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from branchgrpo.models.lora import merge_lora_state_dict
from branchgrpo.models.spec import BackboneSpec, EvalModel
from branchgrpo.core.state_dicts import shapes_of, state_dict_mismatch

LORA_FILE = "pytorch_lora_weights.safetensors"  # what `<Pipeline>.save_lora_weights` writes (export_lora)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what `save_pretrained` writes (sharded: + ".index.json")


def read_config(folder: Path, what: str, required: bool = True) -> dict | None:
    """`folder/config.json` as a dict (None when absent and not `required`): read as JSON before diffusers is asked,
    so that a missing or corrupt file is one line naming it, and sizes can be checked before weights load."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        if not required:
            return None
        raise FileNotFoundError(f"{path} does not exist; the {what} folder of a diffusers checkpoint holds "
                                f"{CONFIG_FILE} and its weights ({WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected the {what}'s diffusers config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (the {what}'s diffusers config), got {type(config).__name__}")
    return config


def weight_shapes(folder: Path, what: str) -> dict[str, tuple[int, ...]] | None:
    """name -> shape of the safetensors weights in `folder` (one file or an index of shards), read from the files'
    headers; None when the folder holds another format (diffusers then reads it and reports itself)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / (WEIGHTS_FILE + ".index.json")
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors shard index ({err!r})") from None
    elif (folder / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        return None
    shapes = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (listed in {index.name}); the {what}'s weights are "
                                    "incomplete")
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
        except Exception as err:  # safetensors' SafetensorError (truncated file, bad header) is not an OSError
            raise ValueError(f"{path}: cannot be read ({err}); expected the {what}'s safetensors weights (a "
                             "truncated download or copy?)") from None
    return shapes


def check_weights_match(model_class, folder: Path, config: dict, what: str,
                        describe: Callable[[Mapping[str, tuple]], str] | None = None, fix: str = "") -> None:
    """The weights in `folder` have exactly the tensors `model_class` built from `config` has (names and shapes,
    compared on the meta device: nothing is allocated). diffusers itself fills missing tensors with random values
    and only warns."""
    found = weight_shapes(folder, what)
    if found is None:
        return
    with torch.device("meta"):
        expected = shapes_of(model_class.from_config(config).state_dict())
    for attr, side in (("_keys_to_ignore_on_load_unexpected", found), ("_keys_to_ignore_on_load_missing", expected)):
        for pattern in getattr(model_class, attr, None) or ():
            for key in [k for k in side if re.search(pattern, k)]:
                del side[key]
    error = state_dict_mismatch(f"{folder} (its weights)", f"the {what} of {Path(folder) / CONFIG_FILE}", found,
                                expected, describe, fix)
    if error is not None:
        raise error


def load_pretrained(load: Callable[[], object], folder: Path, what: str, expected: str):
    """`load()` (a `from_pretrained` call of diffusers or transformers on local files) with the library's errors -
    raised deep inside and several lines long - turned into one line naming `folder` and what was `expected`."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        if isinstance(err, FileNotFoundError) and err.filename:  # already names the file
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"{folder}: cannot load the {what} ({reason}); expected {expected}") from None


def load_part(model_class, root: Path, subfolder: str, what: str, **kwargs):
    """`model_class.from_pretrained(root, subfolder=...)` from local files through `load_pretrained`."""
    return load_pretrained(
        lambda: model_class.from_pretrained(str(root), subfolder=subfolder, local_files_only=True, **kwargs),
        Path(root) / subfolder, what,
        f"a diffusers {model_class.__name__} folder ({CONFIG_FILE} + {WEIGHTS_FILE} as save_pretrained writes them)")

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


def lora_file_name(subfolder: str) -> str:
    """The LoRA file of a diffusers part: `pytorch_lora_weights.safetensors` for `transformer` (what the pipelines'
    `load_lora_weights` reads by default), `pytorch_lora_weights_<subfolder>.safetensors` for another (e.g. Wan2.2's
    `transformer_2`, read with `weight_name=...` and `load_into_transformer_2=True`)."""
    return LORA_FILE if subfolder == "transformer" else f"pytorch_lora_weights_{subfolder}.safetensors"


def _part_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The keys of one part of a state dict (those starting with `prefix`), the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class DiffusersExportMixin:
    """`add_lora`, `export` and `export_lora` for an adapter whose `transformer` is a diffusers ModelMixin, or a
    module holding several of them (`diffusers_parts`)."""

    transformer_class_name: str = ""  # e.g. "FluxTransformer2DModel", written into the exported config
    pipeline_class_name: str = ""  # e.g. "FluxPipeline", whose save_lora_weights writes the LoRA file

    def diffusers_parts(self) -> dict[str, tuple[str, nn.Module]]:
        """subfolder -> (its key prefix in the trained module's state dict, the diffusers model): each part takes
        LoRA, is exported to its own subfolder of the pipeline layout and has its own LoRA file (`lora_file_name`).
        One part by default: `transformer/`, the trained module itself."""
        return {"transformer": ("", _unwrap(self.transformer))}

    def add_lora(self, rank: int, alpha: float | None = None, target_modules=None, dropout: float = 0.0):
        """Inject peft LoRA layers (B = 0, so the model is unchanged) into every part and freeze everything else.
        Returns the config."""
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"--lora_rank must be >= 1, got {rank}")
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            target_modules=list(target_modules or self.default_lora_targets), init_lora_weights=True)
        for _, model in self.diffusers_parts().values():
            model.add_adapter(config)  # diffusers' PeftAdapterMixin: the layout load_lora_weights reads
        self.lora_config = config
        return config

    def export(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None,
               dtype: torch.dtype | None = None) -> Path:
        """Write `out_dir/<part>/` (config.json + diffusion_pytorch_model.safetensors) per part, for
        `<transformer class>.from_pretrained`; LoRA layers, if any, are merged into the weights. Returns the first
        part's folder."""
        state = state_dict if state_dict is not None else _unwrap(self.transformer).state_dict()
        state = _strip_wrapper_prefixes(state)
        _require_full(state, "export")
        folders = [write_diffusers_model(model, _part_state(state, prefix), Path(out_dir) / subfolder,
                                         self.transformer_class_name, dtype)
                   for subfolder, (prefix, model) in self.diffusers_parts().items()]
        return folders[0]

    def export_lora(self, out_dir: str, lora_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the LoRA file of every part (`lora_file_name`) into `out_dir`, for the pipeline's `load_lora_weights`.
        `lora_state_dict`: None (take it from the modules), a full state dict of the LoRA'd trained module, or
        peft-format LoRA weights. Returns the first part's file."""
        import diffusers

        state = None if lora_state_dict is None else _strip_wrapper_prefixes(lora_state_dict)
        pipeline = getattr(diffusers, self.pipeline_class_name)
        files = []
        for subfolder, (prefix, model) in self.diffusers_parts().items():
            lora = _lora_layers(model, None if state is None else _part_state(state, prefix))
            metadata = model.peft_config["default"].to_dict()  # rank and alpha, so the loader restores the scaling
            name = lora_file_name(subfolder)
            pipeline.save_lora_weights(out_dir, transformer_lora_layers=lora,
                                       transformer_lora_adapter_metadata=metadata, weight_name=name)
            files.append(Path(out_dir) / name)
        return files[0]


def write_diffusers_model(model: nn.Module, state: dict[str, torch.Tensor], folder: Path, class_name: str,
                          dtype: torch.dtype | None = None) -> Path:
    """`folder/` (config.json + diffusion_pytorch_model.safetensors) of `model` with the weights `state` (a full,
    plain state dict of it; a LoRA'd one is merged)."""
    import diffusers
    from safetensors.torch import save_file

    if any(".base_layer." in k or ".lora_" in k for k in state):  # a LoRA'd state dict: merge; plain: as is
        state = merge_lora_state_dict(model, state)
    folder.mkdir(parents=True, exist_ok=True)
    # Written by hand: under FSDP2 the class is renamed (FSDP<name>) and save_config would say so.
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return folder


def _lora_layers(model: nn.Module, lora_state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The LoRA tensors of one LoRA'd diffusers model in the pipelines' naming, on the CPU: from the module (None),
    from a full state dict of it, or from peft-format LoRA weights."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(model, "peft_config", None):
        raise ValueError("export_lora: the transformer has no LoRA adapter (call add_lora first)")
    if lora_state_dict is None:
        lora = get_peft_model_state_dict(model)
    elif any(".base_layer." in k or ".default." in k for k in lora_state_dict):
        lora = get_peft_model_state_dict(model, state_dict=lora_state_dict)
    else:
        lora = {k: v for k, v in lora_state_dict.items() if ".lora_" in k}
    _require_full(lora, "export_lora")
    return {k: v.detach().to("cpu").contiguous() for k, v in lora.items()}


def fuse_lora_files(adapter, folder: Path) -> None:
    """Apply the LoRA files that `export_lora` wrote into `folder`, one per diffusers part, and fuse them into the
    weights (sampling then costs what the base costs). diffusers' PeftAdapterMixin reads each, rank and alpha from
    the file's metadata."""
    for subfolder, (_, model) in adapter.diffusers_parts().items():
        model.load_lora_adapter(str(folder), prefix="transformer", adapter_name="checkpoint",
                                weight_name=lora_file_name(subfolder), use_safetensors=True)
        model.fuse_lora()


class DiffusersSpec(BackboneSpec):
    """Evaluation loading shared by the diffusers backbones. Their `load(model_cfg, device, dtype, transformer_path)`
    takes `transformer/` from `transformer_path` instead of the base folder when given."""

    eval_layouts = ("diffusers_full", "diffusers_lora")  # what `export` and `export_lora` write

    def check_files(self, model_cfg, transformer_root=None) -> None:
        root = model_cfg.pretrained_model_name_or_path
        if root is None or not Path(root).is_dir():
            return
        folder = Path(transformer_root or root) / "transformer"
        transformer = read_config(folder, "transformer", required=False)
        if transformer is not None:
            vae = read_config(Path(root) / "vae", "VAE", required=False) or {}
            self.check_config_sizes(model_cfg, transformer, vae, folder / CONFIG_FILE)

    def check_config_sizes(self, model_cfg, transformer: dict, vae: dict, config_path: Path) -> None:
        """The size flags (or their defaults) against the transformer's and VAE's configs (ValueError naming the
        flag and the config file)."""

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
        fuse_lora_files(adapter, Path(weights))
        return EvalModel(adapter, f"LoRA from {weights}", base)


def build_transformer(cls, config: dict, device, dtype: torch.dtype) -> nn.Module:
    """`cls(**config)` created directly on `device` in `dtype` (meta: no memory; no fp32 copy on the host first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**config)
    finally:
        torch.set_default_dtype(previous)
