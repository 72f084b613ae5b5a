"""A tiny random VideoAlign (VideoReward) checkpoint in the real folder layout, built offline (tests, smoke runs).

    python -m branchgrpo.make_tiny videoalign hps_ckpt

writes what `hps_ckpt/` holds for the real reward (docs/wan.md):

    VideoReward/model_config.json                  data/model/peft/inference configs of the VideoAlign trainer
    VideoReward/checkpoint-<step>/model.pth        the full state dict of the LoRA-wrapped reward model, saved the
                                                   way VideoAlign saves it (peft `base_model.model.` prefix, LoRA
                                                   factors `lora_A.default` / `lora_B.default`, and the flat Qwen2-VL
                                                   key layout of transformers 4.45: `visual.*`, `model.layers.*`)
    VideoReward/checkpoint-<step>/tokenizer/       Qwen2 tokenizer + the three reward tokens + chat template
    Qwen2-VL-2B-Instruct/                          the base model's config.json (flat, as on the hub),
                                                   preprocessor_config.json and tokenizer (no reward tokens)

Scaled down: a 2-layer, 32-wide Qwen2-VL (vision tower 2 x 32) and a byte-level BPE of a few hundred tokens trained
in-process; LoRA rank 4, alpha 16 (the real one: 64, 128), so a wrong scaling would show. Kept: special tokens and
their order, reward tokens appended after the vocabulary, the normalisation constants, the data config (2 fps,
200,704 max pixels per frame, "detailed_special" template), tied word embeddings, the MRoPE section layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from branchgrpo.rewards.videoalign import DETAILED_SPECIAL_TEMPLATE, NORMALISATION, REWARD_TOKENS

# Qwen2-VL's special tokens in its vocabulary order (the tiny BPE puts them first: ids differ from the real ones,
# which is fine - the scorer reads every id from the tokenizer and config).
QWEN2VL_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TINY_STEP = 11352  # the step of the released VideoReward checkpoint, so that the folder names match
LORA_RANK, LORA_ALPHA = 4, 16
LORA_EXCLUDE = ["lm_head", "rm_head", "embed_tokens", "visual"]
# A minimal chat template producing Qwen2-VL's chat format for text and video turns (the real checkpoint ships the
# full Qwen2-VL template in its tokenizer).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
# Qwen2-VL-2B-Instruct's preprocessor_config.json values (image/video patching and CLIP normalisation).
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def _tiny_qwen2_tokenizer():
    """A byte-level BPE (Qwen2-style) trained in-process on the reward prompt, with Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    corpus = [DETAILED_SPECIAL_TEMPLATE, "You are a helpful assistant.", "a cat walks on a wooden table at sunset"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(QWEN2VL_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, bos_token=None, model_max_length=32768)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _base_config(tokenizer) -> dict:
    """Qwen2-VL-2B-Instruct's flat config.json, scaled down (head_dim 8: MRoPE sections 2 + 1 + 1 = 8 / 2)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|vision_pad|>"), ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"), ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"))}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
        "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
        "max_position_embeddings": 32768, "max_window_layers": 2, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
        "use_sliding_window": False, "vocab_size": len(tokenizer), **ids,
        "vision_config": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    }


def _model_config() -> dict:
    """model_config.json as VideoAlign's trainer writes it (the keys the scorer reads, with the released values)."""
    return {
        "data_config": {"meta_data": None, "data_dir": None, "meta_data_test": None, "max_frame_pixels": 200704,
                        "num_frames": None, "fps": 2.0, "p_shuffle_frames": 0.0, "p_color_jitter": 0.0,
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                        "add_noise": False, "sample_type": "uniform", "use_tied_data": True},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "model_revision": "main",
                         "output_dim": 1, "use_special_tokens": True, "freeze_vision_tower": False,
                         "freeze_llm": False, "tune_merger": True, "torch_dtype": "bfloat16",
                         "reward_token": "special", "loss_type": "btt"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": LORA_RANK, "lora_alpha": LORA_ALPHA,
                             "lora_dropout": 0.05, "lora_target_modules": None,
                             "lora_namespan_exclude": LORA_EXCLUDE, "lora_modules_to_save": None,
                             "lora_task_type": "CAUSAL_LM", "use_rslora": False, "num_lora_modules": -1},
        "inference_config": dict(NORMALISATION),
    }


def build_tiny_reward_model(base_config: dict, vocab_size: int, seed: int = 0):
    """The LoRA-wrapped reward model as VideoAlign builds it: Qwen2-VL + `rm_head` (hidden -> 1, no bias), peft LoRA on
    every Linear outside the excluded names, random LoRA factors (B != 0) so that the adapter matters."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(**{k: v for k, v in base_config.items() if k != "transformers_version"})
    config.text_config.vocab_size = vocab_size
    model = Qwen2VLForConditionalGeneration(config).float()
    model.rm_head = torch.nn.Linear(config.text_config.hidden_size, 1, bias=False)
    linear_types = (torch.nn.Linear, torch.nn.Embedding)  # VideoAlign's target search; its exclusions keep Linears
    targets = [name for name, module in model.named_modules()
               if isinstance(module, linear_types) and not any(x in name for x in LORA_EXCLUDE)]
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                             target_modules=targets, task_type="CAUSAL_LM", bias="none"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def legacy_key(key: str) -> str:
    """A transformers-5 peft key in the layout VideoAlign saved under transformers 4.45, where the vision tower sat
    beside a flat language model: `model.visual.*` -> `visual.*`, `model.language_model.*` -> `model.*`."""
    prefix = "base_model.model."
    assert key.startswith(prefix), key
    rest = key[len(prefix):]
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if rest.startswith(new):
            return prefix + old + rest[len(new):]
    return key


def make_tiny_videoalign(out_dir: str, seed: int = 0) -> Path:
    """Write `out_dir/VideoReward/` and `out_dir/Qwen2-VL-2B-Instruct/`; returns the VideoReward folder."""
    out = Path(out_dir)
    base, reward = out / "Qwen2-VL-2B-Instruct", out / "VideoReward"
    checkpoint = reward / f"checkpoint-{TINY_STEP}"
    tokenizer = _tiny_qwen2_tokenizer()
    base.mkdir(parents=True, exist_ok=True)
    base_config = _base_config(tokenizer)
    (base / "config.json").write_text(json.dumps(base_config, indent=2))
    (base / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(str(base))
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    tokenizer.save_pretrained(str(checkpoint / "tokenizer"))
    (reward / "model_config.json").write_text(json.dumps(_model_config(), indent=2))
    model = build_tiny_reward_model(base_config, len(tokenizer), seed)
    state = {legacy_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, checkpoint / "model.pth")
    return reward
