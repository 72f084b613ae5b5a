"""A tiny random Qwen-Image-style pipeline in diffusers layout, built offline from configs (tests, CPU smoke runs).

`QwenImagePipeline(...).save_pretrained(out_dir)` writes the folder layout of the real Qwen/Qwen-Image checkpoint
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/), so the code that loads
`./data/qwen_image` is exactly the code the tests run. Kept from Qwen-Image: packed latents with 64 = 4 x 16
channels, the 16-channel AutoencoderKLQwenImage with spatial factor 8 and its per-channel latent statistics
(diffusers' defaults are Qwen-Image's), no guidance embedding, a Qwen2.5-VL text encoder (text and vision towers;
its width is the transformer's `joint_attention_dim`), a byte-level BPE tokenizer with the chat special tokens under
which the pipeline's system template is exactly the 34 tokens the pipeline drops, and the real scheduler config
(exponential dynamic shift, max_shift 0.9 at 8192 tokens, shift_terminal 0.02). Everything else is a few dozen
channels wide.
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.models.qwen_image import PROMPT_TEMPLATE, TINY_TRANSFORMER_CONFIG
from branchgrpo.testing.flux_tiny import _T5_WORDS

# Qwen/Qwen-Image's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)
# A Wan-style 3D VAE a few channels wide; 3 temporal stages make the spatial factor 2^3 = 8, as in Qwen-Image's.
VAE_CONFIG = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
# Qwen2.5-VL's chat tokens; <|endoftext|> (the tokenizer's pad, unk and eos) comes with Qwen2Tokenizer itself.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen_tokenizer(template: str = PROMPT_TEMPLATE):
    """A Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer) whose merges are trained on the system `template` and
    a small English vocabulary, so that the template's words are single tokens as in the real 151k-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    corpus = [template.format(" ".join(_T5_WORDS))]
    for token in CHAT_TOKENS:
        corpus = [text.replace(token, "") for text in corpus]
    bpe.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=2000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=_merges(bpe), additional_special_tokens=list(CHAT_TOKENS))


def _merges(bpe) -> list:
    """The trained merges, in rank order (read from the serialised model: the Python API does not expose them)."""
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ") if isinstance(m, str) else m) for m in merges]


def tiny_text_encoder(tokenizer):
    """A 2-layer Qwen2.5-VL (text tower 32 wide = the transformer's joint_attention_dim, a 1-block vision tower),
    random weights: seed first. The multimodal rotary sections sum to half the head width (16 / 2), as 16 + 24 + 24
    do for Qwen2.5-VL-7B's 128."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (*CHAT_TOKENS, "<|endoftext|>")}
    special = dict(vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                   eos_token_id=ids["<|im_end|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TINY_TRANSFORMER_CONFIG["joint_attention_dim"], intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                         max_position_embeddings=2048, **special),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=TINY_TRANSFORMER_CONFIG["joint_attention_dim"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **special,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image_pipeline(seed: int = 0):
    """The tiny QwenImagePipeline in memory (random weights drawn from `seed`)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    vae = AutoencoderKLQwenImage(**VAE_CONFIG)
    tokenizer = qwen_tokenizer()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae.eval(),
                             text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)


def make_tiny_qwen_image(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_qwen_image_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out
