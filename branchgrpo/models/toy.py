"""The embedded default backbone: a tiny text-conditioned flow model of real 8x8 digits (see branchgrpo/toy/).

    adapter = load_toy()                       # the checkpoint shipped in branchgrpo/toy/assets/
    encode = build_prompt_encoder(None, "cpu", None)
    cond = encode(["a bold seven"])            # {"prompt_embeds": [1, 8, 32], "pooled_prompt_embeds": [1, 32]}
    v = adapter.velocity(latents_B188, sigmas_B, gather_cond(cond, prompt_index_B))

A checkpoint folder (the shipped assets, or what `export` writes) holds four files, safetensors + JSON only:
`transformer.safetensors` + `transformer.json` (the trained flow network and its FlowConfig) and
`text_encoder.safetensors` + `text_encoder.json` (the frozen word-level text encoder, config and vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from branchgrpo.models import register_backbone
from branchgrpo.models.base import FlowAdapter
from branchgrpo.models.lora import merge_saved_adapter
from branchgrpo.models.spec import BackboneSpec, EvalModel
from branchgrpo.models.support import BenchSupport, PlannerModel, PlannerSupport
from branchgrpo.core.state_dicts import load_strict
from branchgrpo.toy.data import ASSETS_DIR, IMAGE_SIZE, VOCAB, latents_to_images
from branchgrpo.toy.network import (
    FlowConfig,
    TextEncoderConfig,
    ToyFlowTransformer,
    ToyTextEncoder,
    _config_from_dict,
)

FORMAT = "branchgrpo-toy/1"
TRANSFORMER_WEIGHTS, TRANSFORMER_CONFIG = "transformer.safetensors", "transformer.json"
TEXT_ENCODER_WEIGHTS, TEXT_ENCODER_CONFIG = "text_encoder.safetensors", "text_encoder.json"


def _unwrap(module: nn.Module) -> nn.Module:
    """The bare network under a DDP / torch.compile wrapper (FSDP2 shards in place and needs no unwrapping)."""
    while True:
        if hasattr(module, "module"):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def _checkpoint_dir(model_path: str | Path | None, default: Path = ASSETS_DIR) -> Path:
    folder = Path(model_path) if model_path is not None else default
    if not folder.is_dir():
        raise FileNotFoundError(f"--model_path: toy checkpoint folder {folder} does not exist")
    return folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a toy checkpoint folder holds {TRANSFORMER_WEIGHTS}, "
                                f"{TRANSFORMER_CONFIG}, {TEXT_ENCODER_WEIGHTS} and {TEXT_ENCODER_CONFIG}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected the config a toy export writes") from None


def _load_weights(module: nn.Module, path: Path, config_path: Path) -> None:
    """Fill `module` strictly from a safetensors file; an unreadable file or a mismatch is one line naming it."""
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors' own SafetensorError for a truncated file or a bad header
        raise ValueError(f"{path}: cannot be read ({err}); expected the safetensors weights of a toy export") from None
    load_strict(module, state, str(path), f"the {type(module).__name__} of {config_path}",
                fix=f"{config_path.name} and {path.name} must come from the same export")


def _save_module(folder: Path, weights: str, config_file: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
              str(folder / weights), metadata={"format": FORMAT})
    (folder / config_file).write_text(json.dumps({"format": FORMAT, **config}, indent=1) + "\n")


def save_text_encoder(encoder: ToyTextEncoder, out_dir: str | Path) -> None:
    config = {**asdict(encoder.config), "vocab": list(encoder.tokenizer.vocab)}
    _save_module(Path(out_dir), TEXT_ENCODER_WEIGHTS, TEXT_ENCODER_CONFIG, config, encoder.state_dict())


def load_text_encoder(model_path: str | Path | None = None, device: torch.device | str = "cpu",
                      kind: type["ToyAdapter"] | None = None) -> ToyTextEncoder:
    """The frozen text encoder of a toy checkpoint folder (None: the shipped one of `kind`, default ToyAdapter), in
    eval mode."""
    kind = kind or ToyAdapter
    folder = _checkpoint_dir(model_path, kind.assets_dir)
    config = _read_json(folder / TEXT_ENCODER_CONFIG)
    config.pop("format", None)
    vocab = config.pop("vocab")
    if tuple(vocab) != kind.vocab:
        raise ValueError(f"{folder / TEXT_ENCODER_CONFIG}: its vocabulary differs from this version's "
                         f"{kind.name} grammar")
    encoder = ToyTextEncoder(_config_from_dict(TextEncoderConfig, config), kind.vocab)
    _load_weights(encoder, folder / TEXT_ENCODER_WEIGHTS, folder / TEXT_ENCODER_CONFIG)
    encoder.requires_grad_(False)
    return encoder.eval().to(device)


def build_prompt_encoder(model_path, device, args=None, kind: type["ToyAdapter"] | None = None):
    """For `python -m branchgrpo.cli.preprocess --model toy`: encode(texts) -> {prompt_embeds [n, L, D],
    pooled_prompt_embeds [n, D]} in fp32. Unknown words raise ValueError naming the word and the vocabulary."""
    encoder = load_text_encoder(model_path, device, kind)

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return encoder.encode(texts)

    return encode


class ToyAdapter(FlowAdapter):
    """FlowAdapter of the toy: latents `[B, 1, 8, 8]` are the pixels mapped to [-1, 1] (there is no VAE)."""

    name = "toy"
    assets_dir = ASSETS_DIR  # the checkpoint folder shipped in the package (a `model_path` of None)
    vocab = VOCAB  # the words its text encoder knows
    latent_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    embedding_keys = ("prompt_embeds", "pooled_prompt_embeds")
    #: every Linear of the repeated blocks (module-name suffixes, as peft's target_modules takes them)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out", "ff_in", "ff_out")

    def __init__(self, transformer: ToyFlowTransformer, text_encoder: ToyTextEncoder | None = None):
        self.transformer = transformer
        self.text_encoder = text_encoder  # frozen; only used to encode prompts, never trained
        self.config: FlowConfig = transformer.config

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v `[B, 1, 8, 8]` fp32; bitwise the same for a sample whatever batch it is computed in (CPU, fp32)."""
        if sigmas.dim() != 1 or sigmas.shape[0] != latents.shape[0]:
            raise ValueError(f"toy velocity: sigmas must be [B] = [{latents.shape[0]}], got {tuple(sigmas.shape)}")
        v = self.transformer(latents, sigmas, cond["prompt_embeds"], cond["pooled_prompt_embeds"],
                             self.image_condition(cond))
        return v.float()

    def image_condition(self, cond: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The image latents the network is conditioned on by channel concatenation (FlowConfig.cond_channels);
        None: the text-to-image toy has none."""
        return None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents_to_images(latents)

    def blocks(self) -> list[nn.Module]:
        return list(_unwrap(self.transformer).blocks)

    def to(self, device: torch.device | str) -> "ToyAdapter":
        self.transformer.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.text_encoder is None:
            raise RuntimeError("this ToyAdapter was built without its text encoder")
        return self.text_encoder.encode(texts)

    def export(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a complete toy checkpoint folder (flow network + text encoder) that `load_toy(out_dir)` loads.

        `state_dict` must be the full, plain state dict of the flow network (merge LoRA first); it is checked
        against a fresh network of the same config so that a wrong dict fails here, not at load time."""
        if state_dict is None:
            state_dict = _unwrap(self.transformer).state_dict()
        fresh = ToyFlowTransformer(self.config)
        missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"toy export: state dict does not match the toy network (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); pass a plain, merged state dict")
        _save_module(Path(out_dir), TRANSFORMER_WEIGHTS, TRANSFORMER_CONFIG, asdict(self.config), state_dict)
        if self.text_encoder is not None:
            save_text_encoder(self.text_encoder, out_dir)


def load_toy(model_path: str | Path | None = None, device: torch.device | str = "cpu",
             kind: type[ToyAdapter] = ToyAdapter) -> ToyAdapter:
    """The toy adapter (of class `kind`: ToyAdapter, or the edit toy's) from a checkpoint folder (None: the one
    shipped in the package, `kind.assets_dir`).

    The flow network is returned trainable (requires_grad) in eval mode (it has no dropout or batch norm, so the
    mode changes nothing); the text encoder is frozen."""
    folder = _checkpoint_dir(model_path, kind.assets_dir)
    config = _read_json(folder / TRANSFORMER_CONFIG)
    config.pop("format", None)
    transformer = ToyFlowTransformer(_config_from_dict(FlowConfig, config))
    _load_weights(transformer, folder / TRANSFORMER_WEIGHTS, folder / TRANSFORMER_CONFIG)
    text_encoder = load_text_encoder(folder, device, kind)
    return kind(transformer.eval().to(device), text_encoder)


@register_backbone
class ToySpec(BackboneSpec, PlannerSupport, BenchSupport):
    """The embedded default: 0.26M parameters, shipped in the package, no flags of its own."""

    name = "toy"
    adapter_class: type[ToyAdapter] = ToyAdapter  # what it loads (and whose shipped checkpoint a None path means)
    needs_pretrained = False
    default_parallel = "ddp"  # replicating 0.26M parameters is cheaper than sharding them
    is_large = False
    eval_rewards = ("toy", "toy_digit", "toy_style")
    eval_layouts = ("toy_full", "peft_lora")  # what `export` and `export_lora` (peft's own format) write
    # the settings of configs/toy_*.yaml
    comparison_flags = ("--sampling_steps", "20", "--shift", "3", "--reward", "toy", "--train_batch_size", "8",
                        "--learning_rate", "3e-4", "--max_grad_norm", "1.0", "--clip_range", "1e-3", "--adv_clip_max",
                        "5", "--rollout_batch_size", "512", "--train_micro_batch_size", "256",
                        "--gradient_accumulation_steps", "0", "--reward_batch_size", "512", "--num_eval_prompts",
                        "20", "--eval_samples_per_prompt", "4", "--device", "cpu", "--seed", "42")

    def load(self, model_cfg, device, dtype=torch.float32) -> ToyAdapter:
        adapter = load_toy(model_cfg.pretrained_model_name_or_path, device, self.adapter_class)
        adapter.transformer.to(dtype)
        return adapter

    def load_for_eval(self, model_cfg, weights, layout, device, dtype=torch.float32) -> EvalModel:
        """A full export is a complete toy folder (text encoder included: prompts are encoded from it); a LoRA is
        merged into the base's weights. The toy stays in fp32 whatever `dtype` (0.26M weights: nothing to save)."""
        base = model_cfg.pretrained_model_name_or_path
        if layout == "toy_full":
            return EvalModel(load_toy(weights, device, self.adapter_class), f"full weights from {weights}", weights)
        adapter = load_toy(base, device, self.adapter_class)
        if layout is None:
            return EvalModel(adapter, "base", base)
        merge_saved_adapter(adapter.transformer, weights)
        return EvalModel(adapter, f"LoRA from {weights}", base)

    def tokens_per_sample(self, adapter: ToyAdapter, cond) -> int:
        return adapter.config.num_patches + cond["prompt_embeds"].shape[1]

    def prompt_encoder(self, model_path, device, settings=None):
        return build_prompt_encoder(model_path, device, settings, self.adapter_class)

    def default_prompts(self) -> Path:
        return self.builtin_prompts()[1]

    def builtin_prompts(self) -> tuple[Path, Path]:
        from branchgrpo.toy.data import eval_prompts_path, train_prompts_path

        return Path(train_prompts_path()), Path(eval_prompts_path())

    def planner_config(self, model_cfg, name=None) -> tuple[dict, str]:
        if name is not None:
            return super().planner_config(model_cfg, name)
        path = _checkpoint_dir(getattr(model_cfg, "pretrained_model_name_or_path", None),
                               self.adapter_class.assets_dir) / TRANSFORMER_CONFIG
        config = _read_json(path)
        config.pop("format", None)
        return config, str(path)

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=8) -> PlannerModel:
        flow = _config_from_dict(FlowConfig, config)
        with torch.device(device):
            transformer = ToyFlowTransformer(flow).to(dtype)

        def inputs(batch: int) -> dict:
            with torch.device(device):
                side = flow.image_size
                cond = (dict(cond_latents_BCHW=torch.randn(batch, flow.cond_channels, side, side, dtype=dtype))
                        if flow.cond_channels else {})
                return dict(latents_BCHW=torch.randn(batch, flow.in_channels, side, side, dtype=dtype),
                            sigmas_B=torch.ones(batch), prompt_embeds_BLD=torch.randn(batch, text_tokens, flow.text_dim,
                                                                               dtype=dtype),
                            pooled_BD=torch.randn(batch, flow.text_dim, dtype=dtype), **cond)

        return PlannerModel(transformer, list(transformer.blocks), inputs, ToyAdapter.default_lora_targets,
                            flow.in_channels * flow.image_size ** 2, f"8x8 digits: {flow.num_patches} patch + "
                            f"{text_tokens} text tokens")
