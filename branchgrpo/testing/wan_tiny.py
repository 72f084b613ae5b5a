"""A tiny random Wan2.1-style text-to-video pipeline in diffusers layout, built offline from configs (tests, CPU runs).

`WanPipeline(...).save_pretrained(out_dir)` writes the folder layout of a real Wan2.1-T2V-1.3B-Diffusers checkpoint
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/), so the code that loads `./data/wan` is
exactly the code the tests run. Kept from the real model: the video VAE's factors (temporal 4, spatial 8, 16 latent
channels) and its per-channel latent normalisation constants (diffusers' defaults are Wan2.1's), the patch size
(1, 2, 2), raw-timestep conditioning, a UMT5 text encoder whose width is the transformer's `text_dim`, a T5-style
tokenizer, and the scheduler config of the real checkpoint (UniPC, flow prediction, flow_shift 3.0). Sizes are the
diffusers test configs (notes/ecosystem.md): 2 transformer layers of 2 x 12-dim heads, a VAE with base_dim 3.
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.testing.flux_tiny import t5_tokenizer

# diffusers' test-sized WanTransformer3DModel; text_dim equals the tiny UMT5's d_model.
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
# diffusers' test-sized AutoencoderKLWan: same temporal/spatial factors and latent statistics as Wan2.1's VAE.
VAE_CONFIG = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
# The scheduler shipped with Wan2.1-T2V-1.3B-Diffusers (diffusers docs: "The default value is 3.0 for Wan").
SCHEDULER_CONFIG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                        flow_shift=3.0)


def tiny_umt5(tokenizer):
    """A 2-layer UMT5 encoder whose width is the tiny transformer's `text_dim` (random weights: seed first)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TRANSFORMER_CONFIG["text_dim"], d_kv=8, d_ff=64, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1,
    )).eval()


def build_tiny_wan_pipeline(seed: int = 0):
    """The tiny WanPipeline in memory (random weights drawn from `seed`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    tokenizer = t5_tokenizer()
    text_encoder = tiny_umt5(tokenizer)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae.eval(),
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
        transformer=transformer,
    )


def make_tiny_wan(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_wan_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out
