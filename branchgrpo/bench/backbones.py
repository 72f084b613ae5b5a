"""The backbones the throughput benchmark runs: the shipped toy, a FLUX folder, or a FLUX.1-dev-SHAPED transformer
with random weights built from a config (no download), plus the conditioning and the counts MFU needs.

Random weights are fine for throughput: the cost of a forward does not depend on the values (no data-dependent
control flow in FLUX). `full` builds the real FLUX.1-dev geometry (19 double + 38 single blocks, width 3072, about
11.9B parameters): on a GPU it is created directly on the device in bf16, never materialised in fp32 on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# FLUX.1-dev's transformer/config.json (public architecture numbers; weights are not needed).
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)
T5_XXL_DIM = 4096


@dataclass
class BenchBackbone:
    adapter: object  # FlowAdapter
    cond: dict[str, torch.Tensor]  # per-prompt conditioning, [P, ...] on the device
    num_params: int  # transformer parameters (all, trained or not): the N of MFU's 2 N tokens
    tokens_per_sample: int  # tokens one sample puts through the transformer (image + text)
    description: str


def _flux_vae_stub_config():
    """A 4-level, 8-channel AutoencoderKL: the adapter reads its scale factor (8) and latent constants; the
    benchmark never decodes, so the VAE's size is irrelevant."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         scaling_factor=0.3611, shift_factor=0.1159)


def random_flux_transformer(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A FluxTransformer2DModel of FLUX.1-dev's shape ('full') or of the test-sized tiny shape ('tiny'), random
    weights drawn on `device` in `dtype` (std 0.02 normal for matrices, as a freshly initialised model)."""
    from diffusers import FluxTransformer2DModel

    from branchgrpo.models.flux_tiny import TRANSFORMER_CONFIG

    config = {"full": FLUX_DEV_CONFIG, "tiny": TRANSFORMER_CONFIG}[shape]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model  # already on `device` in `dtype` (a .to() here would also make diffusers warn)


def load_backbone(model: str, device: torch.device, *, pretrained: str | None = None, random_shape: str | None = None,
                  height: int = 64, width: int = 64, num_prompts: int = 1, text_tokens: int | None = None,
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> BenchBackbone:
    if model == "toy":
        from branchgrpo.models.toy import load_toy

        adapter = load_toy(pretrained, device)
        words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        cond = adapter.encode_prompts([f"a bold {words[p % 10]}" for p in range(num_prompts)])
        cond = {k: v.to(device) for k, v in cond.items()}
        tokens = adapter.transformer.config.num_patches + cond["prompt_embeds"].shape[1]
        return BenchBackbone(adapter, cond, _count(adapter.transformer), tokens,
                             "toy (shipped checkpoint)" if pretrained is None else f"toy ({pretrained})")
    if model != "flux":
        raise ValueError(f"--model: '{model}' is not benchmarked (toy or flux)")
    from branchgrpo.models.flux import FluxAdapter, load_flux

    if (pretrained is None) == (random_shape is None):
        raise ValueError("--model flux: give exactly one of --pretrained_model_name_or_path and --random_flux_shape")
    if random_shape is not None:
        transformer = random_flux_transformer(random_shape, device, dtype, seed)
        adapter = FluxAdapter(transformer, _flux_vae_stub_config(), height, width).to(device)
        description = f"FLUX.1-dev-shaped transformer, random weights ({random_shape})"
    else:
        adapter = load_flux(pretrained, device, dtype=dtype, height=height, width=width)
        description = f"FLUX from {pretrained}"
    config = adapter.transformer.config
    if text_tokens is None:  # the real T5-XXL context for real-width models, the tiny tests' 16 otherwise
        text_tokens = 512 if config.joint_attention_dim == T5_XXL_DIM else 16
    gen = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(num_prompts, text_tokens, config.joint_attention_dim, generator=gen),
            "pooled_prompt_embeds": torch.randn(num_prompts, config.pooled_projection_dim, generator=gen)}
    cond = {k: v.to(device=device, dtype=dtype) for k, v in cond.items()}
    tokens = adapter.latent_shape[0] + text_tokens
    return BenchBackbone(adapter, cond, _count(adapter.transformer), tokens, f"{description}, {height}x{width}, "
                         f"{adapter.latent_shape[0]} image + {text_tokens} text tokens")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
