"""A tiny random FLUX.1-style pipeline in diffusers layout, built offline from configs (tests, CPU smoke runs).

`FluxPipeline(...).save_pretrained(out_dir)` writes the folder layout of a real FLUX.1-dev checkpoint
(model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), so the
code that loads `./data/flux` is exactly the code the tests run. What is kept from FLUX.1-dev: packed latents with
64 = 4 x 16 channels, a VAE with 16 latent channels and spatial factor 8 (so --h/--w are multiples of 16), its
latent normalisation constants, guidance embeddings, the CLIP tokenizer (real 49,408-token BPE), a T5-style
Unigram tokenizer and the dynamic-shift scheduler config. Everything else is a few dozen channels wide.
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.models.flux import TINY_TRANSFORMER_CONFIG
from branchgrpo.testing.clip_tiny import clip_bpe_tokenizer, tiny_clip_text_config

# A small English vocabulary for the T5 stand-in: whole words (with SentencePiece's "▁" word-start marker) tokenise
# as one piece, anything else falls back to single characters, then to <unk>.
_T5_WORDS = (
    "a an the of and with in on at by from to for under over near behind above inside into through is are "
    "photo painting portrait drawing sketch illustration render image picture close-up view landscape scene poster "
    "cat dog bird horse fox owl fish dragon robot astronaut knight wizard girl boy woman man child person people "
    "city street forest mountain river lake sea ocean beach desert snow sky cloud clouds sun moon stars night morning "
    "sunset sunrise rain storm fog light shadow house castle tower bridge garden room kitchen library market ship "
    "car train bicycle boat tree trees flower flowers field grass rock stone water fire ice glass wood metal "
    "red blue green yellow orange purple pink black white golden silver dark bright old young small big tiny giant "
    "beautiful detailed realistic cinematic colorful soft sharp highly style oil watercolor digital art anime "
    "fantasy futuristic ancient vintage cozy quiet busy wearing holding riding sitting standing flying walking "
    "reading playing cup book table chair window door hat coat dress umbrella lantern map clock"
).split()
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/"

# FLUX.1-dev's scheduler config (diffusers FlowMatchEulerDiscreteScheduler, resolution-dependent shift).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
# the tiny transformer's config lives with the backbone, whose benchmark stand-in builds the same shape
TRANSFORMER_CONFIG = TINY_TRANSFORMER_CONFIG


def t5_tokenizer():
    """A T5 tokenizer (Unigram, T5's special tokens <pad>=0, </s>=1, <unk>=2) over a small fixed vocabulary."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in dict.fromkeys(_T5_WORDS)]
    pieces += [("▁", -3.0)] + [(c, -5.0) for c in _T5_CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_tiny_flux_pipeline(seed: int = 0):
    """The tiny FluxPipeline in memory (random weights drawn from `seed`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(hidden_size=32)))
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    ))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=clip_bpe_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def make_tiny_flux(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_flux_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out
