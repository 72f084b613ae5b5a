"""The backbones the throughput benchmark runs, plus the conditioning and the counts MFU needs.

Any registered backbone loads through its spec (`spec.load` from --pretrained_model_name_or_path, or the toy's
shipped checkpoint) and is conditioned on prompts of its default prompt file, encoded by its own text encoders
(`spec.prompt_encoder`). A backbone listed in `STAND_INS` instead gets random conditioning of the right widths (its
real text encoders - FLUX's T5-XXL - would take memory the benchmark is not about), and can be built as a transformer
of a named shape with random weights (`--random_shape`), no files needed: FLUX.1-dev's geometry is public, its
weights are not needed to time it.

Random weights are fine for throughput: the cost of a forward does not depend on the values (no data-dependent
control flow in FLUX). `full` builds the real FLUX.1-dev geometry (19 double + 38 single blocks, width 3072, about
11.9B parameters): on a GPU it is created directly on the device in bf16, never materialised in fp32 on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from branchgrpo.models.spec import read_shipped_config

# FLUX.1-dev's transformer/config.json (public architecture numbers; weights are not needed), as shipped for the planner
FLUX_DEV_CONFIG = read_shipped_config("flux1-dev", ("flux1-dev",))
T5_XXL_DIM = 4096


@dataclass
class BenchBackbone:
    adapter: object  # FlowAdapter
    cond: dict[str, torch.Tensor]  # per-prompt conditioning, [P, ...] on the device
    num_params: int  # transformer parameters (all, trained or not): the N of MFU's 2 N tokens
    tokens_per_sample: int  # tokens one sample puts through the transformer (image + text)
    description: str


@dataclass
class StandIn:
    """How the benchmark builds a backbone without its real files."""

    #: `--random_shape` values
    shapes: tuple[str, ...]
    #: (shape, model_cfg, device, dtype, seed) -> adapter with random weights
    adapter: Callable
    #: (adapter, num_prompts, text_tokens or None, device, dtype, seed) -> (cond, text tokens)
    cond: Callable


def _flux_vae_stub_config():
    """A 4-level, 8-channel AutoencoderKL: the adapter reads its scale factor (8) and latent constants; the
    benchmark never decodes, so the VAE's size is irrelevant."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         scaling_factor=0.3611, shift_factor=0.1159)


def random_flux_transformer(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides):
    """A FluxTransformer2DModel of FLUX.1-dev's shape ('full') or of the test-sized tiny shape ('tiny'), random
    weights drawn on `device` in `dtype` (std 0.02 normal for matrices, as a freshly initialised model);
    `overrides` replace config values (e.g. fewer blocks: num_layers, num_single_layers)."""
    from diffusers import FluxTransformer2DModel

    from branchgrpo.models.diffusers_backbone import build_transformer
    from branchgrpo.testing.flux_tiny import TRANSFORMER_CONFIG

    config = {**{"full": FLUX_DEV_CONFIG, "tiny": TRANSFORMER_CONFIG}[shape], **overrides}
    torch.manual_seed(seed)
    # already on `device` in `dtype` (a .to() here would also make diffusers warn)
    return build_transformer(FluxTransformer2DModel, config, device, dtype)


def _random_flux_adapter(shape, model_cfg, device, dtype, seed):
    from branchgrpo.models.flux import FluxAdapter

    spec = model_cfg.spec
    transformer = random_flux_transformer(shape, device, dtype, seed)
    return FluxAdapter(transformer, _flux_vae_stub_config(), spec.size(model_cfg, "h"), spec.size(model_cfg, "w"),
                       spec.size(model_cfg, "guidance_scale")).to(device)


def _random_flux_cond(adapter, num_prompts, text_tokens, device, dtype, seed):
    config = adapter.transformer.config
    if text_tokens is None:  # the real T5-XXL context for real-width models, the tiny tests' 16 otherwise
        text_tokens = 512 if config.joint_attention_dim == T5_XXL_DIM else 16
    gen = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(num_prompts, text_tokens, config.joint_attention_dim, generator=gen),
            "pooled_prompt_embeds": torch.randn(num_prompts, config.pooled_projection_dim, generator=gen)}
    return {k: v.to(device=device, dtype=dtype) for k, v in cond.items()}


# backbone name -> its random-weights stand-in and random conditioning
STAND_INS = {"flux": StandIn(("tiny", "full"), _random_flux_adapter, _random_flux_cond)}


def encoded_prompts(spec, model_path, num_prompts: int, text_tokens: int | None, device,
                    model_cfg=None) -> dict[str, torch.Tensor]:
    """The first `num_prompts` prompts of the backbone's default prompt file (cycled), encoded by its own encoders
    (`text_tokens`: their --max_sequence_length, where they take one; the sizes of `model_cfg`, where they read
    some), extras expanded per prompt."""
    from branchgrpo.data.embeddings import with_extras
    from branchgrpo.data.preprocess import read_prompts

    items = read_prompts(spec.default_prompts(), spec.prompt_format).items
    items = [items[i % len(items)] for i in range(num_prompts)]
    settings = SimpleNamespace(dtype="auto", **({} if text_tokens is None else {"max_sequence_length": text_tokens}),
                               **(spec.encoder_sizes(model_cfg) if model_cfg is not None else {}))
    encode = spec.prompt_encoder(model_path, device, settings)
    cond = encode(items)
    return with_extras(cond, encode.extras() if hasattr(encode, "extras") else {}, device)


def load_backbone(model_cfg, device: torch.device, *, random_shape: str | None = None, num_prompts: int = 1,
                  text_tokens: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> BenchBackbone:
    """The backbone `model_cfg` names (a ModelConfig: sizes not given take the spec's defaults), loaded through its
    spec or, with `random_shape`, its stand-in with random weights."""
    spec, pretrained = model_cfg.spec, model_cfg.pretrained_model_name_or_path
    stand_in = STAND_INS.get(spec.name)
    if random_shape is not None:
        if stand_in is None or random_shape not in stand_in.shapes:
            offered = "; ".join(f"--model {name}: {', '.join(s.shapes)}" for name, s in STAND_INS.items())
            raise ValueError(f"--random_shape {random_shape}: not offered for --model {spec.name} ({offered})")
        if pretrained is not None:
            raise ValueError("--random_shape: give either it or --pretrained_model_name_or_path, not both")
        adapter = stand_in.adapter(random_shape, model_cfg, device, dtype, seed)
        description = f"{spec.name} transformer of the {random_shape} shape, random weights"
    else:
        if spec.needs_pretrained and pretrained is None:
            raise ValueError(f"--model {spec.name}: give --pretrained_model_name_or_path" +
                             (" or --random_shape" if stand_in is not None else ""))
        adapter = spec.load(model_cfg, device, dtype)
        description = f"{spec.name} ({pretrained or 'shipped checkpoint'})"
    if stand_in is not None:
        cond = stand_in.cond(adapter, num_prompts, text_tokens, device, dtype, seed)
    else:
        cond = encoded_prompts(spec, pretrained, num_prompts, text_tokens, device, model_cfg)
    tokens = spec.tokens_per_sample(adapter, cond)
    sizes = "x".join(str(getattr(adapter, a)) for a in ("num_frames", "height", "width") if hasattr(adapter, a))
    return BenchBackbone(adapter, cond, _count(adapter.transformer), tokens,
                         f"{description}{', ' + sizes if sizes else ''}")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_config(args):
    """The model section (sizes not given: the backbone's defaults); flags that do not apply are refused."""
    from branchgrpo.config.sections import ModelConfig

    model_cfg = ModelConfig(model=args.model, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                            h=args.h, w=args.w, num_frames=args.num_frames, guidance_scale=args.guidance_scale)
    spec = model_cfg.spec
    for name in spec.inapplicable_flags(model_cfg):
        raise ValueError(f"--{name}: does not apply to --model {spec.name}")
    spec.check_flags(model_cfg)
    return model_cfg
