"""A tiny random Wan2.2-TI2V-5B-style pipeline in diffusers layout, built offline from configs (tests, CPU runs).

`WanPipeline(..., expand_timesteps=True).save_pretrained(out_dir)` writes the folder layout of the real
Wan2.2-TI2V-5B-Diffusers checkpoint (model_index.json with `expand_timesteps: true`, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/); WanImageToVideoPipeline reads the same folder for image-to-video. Kept from
the real model: a transformer taking and predicting 48 channels with per-token timesteps and no image tokens, the
Wan2.2 VAE's structure (z_dim 48, residual blocks, 2x2 pixel patches on 12 input channels, 16x spatial and 4x
temporal compression) with per-channel latent statistics of its own (seeded values here; the real ones are
Wan2.2's), the UMT5 text encoder of the Wan2.1 stand-in, and the release's scheduler (UniPC, flow_shift 5.0).
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.testing.flux_tiny import t5_tokenizer
from branchgrpo.testing.wan_tiny import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, tiny_umt5

Z_DIM = 48  # the Wan2.2 VAE's latent channels
SHIFT = 5.0  # Wan2.2's ti2v_5B sample_shift
TI2V_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, in_channels=Z_DIM, out_channels=Z_DIM)


def ti2v_vae_config(seed: int = 0) -> dict:
    """A test-sized Wan2.2 VAE: the real one's structure and factors, base_dim 3, one residual block per stage, and
    latent statistics drawn from `seed` (means around 0, stds in [0.5, 1.5]) so that normalisation is exercised."""
    stats = torch.Generator().manual_seed(seed + 1)
    mean = (torch.randn(Z_DIM, generator=stats) * 0.5).tolist()
    std = (torch.rand(Z_DIM, generator=stats) + 0.5).tolist()
    return dict(base_dim=3, decoder_base_dim=4, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                latents_mean=[round(v, 4) for v in mean], latents_std=[round(v, 4) for v in std])


def build_tiny_wan22_ti2v_pipeline(seed: int = 0):
    """The tiny TI2V WanPipeline in memory (random weights drawn from `seed`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TI2V_TRANSFORMER_CONFIG)
    vae = AutoencoderKLWan(**ti2v_vae_config(seed))
    tokenizer = t5_tokenizer()
    return WanPipeline(tokenizer=tokenizer, text_encoder=tiny_umt5(tokenizer), vae=vae.eval(),
                       scheduler=UniPCMultistepScheduler(**{**SCHEDULER_CONFIG, "flow_shift": SHIFT}),
                       transformer=transformer, expand_timesteps=True)


def make_tiny_wan22_ti2v(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder (it serves
    `--model wan22_ti2v` and `--model wan22_ti2v_i2v` alike, as the real checkpoint does)."""
    out = Path(out_dir)
    build_tiny_wan22_ti2v_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out
