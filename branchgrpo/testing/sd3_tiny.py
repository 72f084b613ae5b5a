"""A tiny random Stable Diffusion 3.5-style pipeline in diffusers layout, built offline from configs (tests, CPU runs).

`StableDiffusion3Pipeline(...).save_pretrained(out_dir)` writes the folder layout of a real SD3.5 checkpoint
(model_index.json, transformer/, vae/, scheduler/, text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/
(OpenCLIP bigG), text_encoder_3/ + tokenizer_3/ (T5)), so the code that loads `./data/sd3` is exactly the code the
tests run. Kept from SD3.5-Medium: the transformer's structure (patch 2, 16 latent channels, RMS q/k norm, dual
attention in the first layers, a cropped positional table), a 16-channel VAE with 8x downsampling and the release's
latent shift and scaling factors, the scheduler config (FlowMatchEuler, static shift 3.0), two CLIP towers with
projections whose widths add up to the pooled width and whose hidden states, concatenated, are narrower than T5's (so
the zero padding is exercised), the real CLIP tokenizer (bigG's pads with "!", as the release's tokenizer_2 does) and
a T5-style tokenizer. Everything else is a few dozen channels wide.
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.testing.clip_tiny import clip_bpe_tokenizer, tiny_clip_text_config
from branchgrpo.testing.flux_tiny import t5_tokenizer

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 16, 24, 48  # SD3.5: 768, 1280, 4096
# SD3.5-Medium's transformer, scaled down: 3 layers of 2 x 16-dim heads, dual attention in layer 0 (Medium: 0-12 of
# 24), a positional table of 8 x 8 patches (Medium: 384; so --h/--w up to 128 px with the 8x VAE).
TRANSFORMER_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
    pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=8, dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
# The scheduler config of the SD3.5 releases.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
# The token ids of the releases' CLIP configs (eos_token_id 2: the pooled output is taken at the highest token id,
# the end-of-text token).
CLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)


def tiny_clip(width: int, hidden_act: str):
    """A 2-layer CLIPTextModelWithProjection over the real vocabulary, projecting to its own width."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = tiny_clip_text_config(hidden_size=width, projection_dim=width, hidden_act=hidden_act, **CLIP_IDS)
    return CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()


def build_tiny_sd3_pipeline(seed: int = 0):
    """The tiny StableDiffusion3Pipeline in memory (random weights drawn from `seed`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    )).eval()
    tokenizer_2 = clip_bpe_tokenizer()
    tokenizer_2.pad_token = "!"  # OpenCLIP bigG's tokenizer pads with "!" (id 0), not with the end-of-text token
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=tiny_clip(CLIP_L_WIDTH, "quick_gelu"),  # CLIP-L/14's activation
        tokenizer=clip_bpe_tokenizer(),
        text_encoder_2=tiny_clip(CLIP_G_WIDTH, "gelu"),  # OpenCLIP bigG/14's
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def make_tiny_sd3(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_sd3_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out
