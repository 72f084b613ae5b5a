"""A tiny random Wan2.1-style image-to-video pipeline in diffusers layout, built offline from configs (tests, CPU runs).

`WanImageToVideoPipeline(...).save_pretrained(out_dir)` writes the folder layout of a real
Wan2.1-I2V-14B-480P-Diffusers checkpoint (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
image_encoder/, image_processor/, scheduler/). The text-to-video stand-in's parts (branchgrpo/testing/wan_tiny.py:
VAE, UMT5, tokenizer, scheduler, transformer sizes) are reused; what makes it image-to-video is kept from the real
model: the transformer takes 16 + 4 + 16 = 36 input channels (latents, first-frame mask, first-frame latents) and CLIP
image tokens (`image_dim` = the CLIP tower's width, `added_kv_proj_dim` = the transformer's width, as 1280 / 5120 in
the 14B), a CLIPVisionModel whose penultimate hidden states are those tokens, and a CLIPImageProcessor (shorter side,
centre crop, CLIP normalisation) at its image size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.testing.flux_tiny import t5_tokenizer
from branchgrpo.testing.wan_tiny import SCHEDULER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, tiny_umt5

# A 2-layer CLIP vision tower on 32 x 32 images in 8 x 8 patches: 16 + 1 image tokens of width 8.
CLIP_VISION_CONFIG = dict(hidden_size=8, intermediate_size=16, projection_dim=8, num_hidden_layers=2,
                          num_attention_heads=2, image_size=32, patch_size=8)
WIDTH = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
I2V_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, in_channels=36, image_dim=CLIP_VISION_CONFIG["hidden_size"],
                              added_kv_proj_dim=WIDTH)


def build_tiny_wan_i2v_pipeline(seed: int = 0):
    """The tiny WanImageToVideoPipeline in memory (random weights drawn from `seed`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**I2V_TRANSFORMER_CONFIG)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    tokenizer = t5_tokenizer()
    text_encoder = tiny_umt5(tokenizer)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_CONFIG)).eval()
    side = CLIP_VISION_CONFIG["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae.eval(),
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


def make_tiny_wan_i2v(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_wan_i2v_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out
