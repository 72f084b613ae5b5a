"""Tiny random Wan2.2-A14B-style pipelines (two experts; text-to-video, and image-to-video at the end) in diffusers
layout, built offline from configs (tests, CPU runs).

`WanPipeline(..., transformer_2=..., boundary_ratio=0.875).save_pretrained(out_dir)` writes the folder layout of the
real Wan2.2-T2V-A14B-Diffusers checkpoint (model_index.json with `boundary_ratio`, transformer/, transformer_2/, vae/,
text_encoder/, tokenizer/, scheduler/). The parts are the Wan2.1 stand-in's (branchgrpo/testing/wan_tiny.py: the
A14B experts have Wan2.1-14B's architecture and the Wan2.1 VAE); what makes it Wan2.2 A14B is kept from the real
model: two experts of one architecture with different weights, the boundary ratio 0.875 of T2V-A14B, and the
official recipe's shift 12.0 in the scheduler config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.testing.flux_tiny import t5_tokenizer
from branchgrpo.testing.wan_tiny import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, tiny_umt5

BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's (model_index.json)
SHIFT = 12.0  # Wan2.2's t2v_A14B sample_shift


def build_tiny_wan22_pipeline(seed: int = 0):
    """The tiny two-expert WanPipeline in memory (random weights drawn from `seed`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    high, low = WanTransformer3DModel(**TRANSFORMER_CONFIG), WanTransformer3DModel(**TRANSFORMER_CONFIG)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    tokenizer = t5_tokenizer()
    return WanPipeline(tokenizer=tokenizer, text_encoder=tiny_umt5(tokenizer), vae=vae.eval(),
                       scheduler=UniPCMultistepScheduler(**{**SCHEDULER_CONFIG, "flow_shift": SHIFT}),
                       transformer=high, transformer_2=low, boundary_ratio=BOUNDARY_RATIO)


def make_tiny_wan22(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_wan22_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out


I2V_BOUNDARY_RATIO = 0.9  # Wan2.2-I2V-A14B's
I2V_SHIFT = 5.0  # Wan2.2's i2v_A14B sample_shift


def make_tiny_wan22_i2v(out_dir: str, seed: int = 0) -> Path:
    """The tiny two-expert WanImageToVideoPipeline of Wan2.2 I2V-A14B's layout: experts taking 16 + 4 + 16 = 36
    channels (latents, first-frame mask, first-frame latents) and no CLIP image tokens (no image_encoder/)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    config = dict(TRANSFORMER_CONFIG, in_channels=36)
    high, low = WanTransformer3DModel(**config), WanTransformer3DModel(**config)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    tokenizer = t5_tokenizer()
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=tiny_umt5(tokenizer), vae=vae.eval(),
        scheduler=UniPCMultistepScheduler(**{**SCHEDULER_CONFIG, "flow_shift": I2V_SHIFT}), image_processor=None,
        image_encoder=None, transformer=high, transformer_2=low, boundary_ratio=I2V_BOUNDARY_RATIO)
    out = Path(out_dir)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out
