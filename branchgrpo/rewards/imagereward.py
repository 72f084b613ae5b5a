"""ImageReward (Xu et al. 2023, THUDM/ImageReward v1.0) without the `image-reward` package.

The package cannot be installed beside current diffusers (notes/ecosystem.md), so the model is rebuilt here from
transformers' BLIP components and the official `ImageReward.pt` is loaded by renaming its keys.

Architecture (read from ImageReward/ImageReward.py and its BLIP_Pretrain, BLIP's vit.py and med.py):
- image encoder: BLIP's ViT-L/16 at 224 px (width 1024, 24 blocks, 16 heads, pre-LayerNorm blocks with eps 1e-6,
  exact GELU, a final LayerNorm over all 197 tokens) = transformers `BlipVisionModel` (`last_hidden_state`);
- text encoder: BLIP's BERT-base (`med_config.json`: 12 layers, width 768, 12 heads, no token-type embeddings) with
  a cross-attention block after each self-attention block, attending to all image tokens (key/value width = the ViT
  width, 1024) = transformers `BlipTextModel` built with `is_decoder=True` (which creates the cross-attention
  blocks) and called with `is_decoder=False` (bidirectional self-attention, as ImageReward's "multimodal" mode);
- head: the text encoder's first-token state -> `mlp.layers` = Linear(768, 1024), Linear(1024, 128),
  Linear(128, 64), Linear(64, 16), Linear(16, 1) at Sequential positions 0, 2, 4, 6, 7 (dropouts between, and the
  ReLUs are commented out in the original, so the head is affine); then reward = (raw - mean) / std with ImageReward's
  constants mean 0.16717362830052426, std 1.0333394966054072 (stored in its code, not in the checkpoint);
- text input: bert-base-uncased WordPiece with BLIP's two added special tokens [DEC] (bos, id 30522) and [ENC]
  (id 30523), so the vocabulary has 30524 entries; prompts are tokenised with padding to 35 tokens and truncation.
  ImageReward's `score` keeps [CLS] as the first token (BLIP's image-text matching swaps it for [ENC];
  ImageReward does not), so neither added token appears unless a prompt contains its literal text;
- preprocessing: Resize(224, bicubic) of the short side, CenterCrop(224), OpenAI-CLIP mean/std (ImageReward's
  `_transform`), done here in torch on the tensor batch (antialiased bicubic, like PIL) by the CLIP-family rewards'
  `clip_preprocess` (`_image.py`), the same transform.

The checkpoint is a plain state dict (`torch.save(model.state_dict())`). Besides the weights used above it holds
`blip.vision_proj.*` / `blip.text_proj.*` (BLIP's contrastive projections, unused by the score) and the buffer
`blip.text_encoder.embeddings.position_ids` (checked to be 0..L-1); every other key must map onto a parameter and
every parameter must be filled, else loading fails with the offending official key names.

What users put where (defaults: `<model_dir>/ImageReward/`, model_dir = --reward_model_dir, default hps_ckpt):
- `checkpoint`: `ImageReward.pt` from the THUDM/ImageReward model repo;
- `med_config`: its `med_config.json` (default: next to the checkpoint);
- `tokenizer`: a folder with bert-base-uncased's tokenizer files (`vocab.txt`, `tokenizer_config.json`; a
  `tokenizer.json` is fine too) - default `bert-base-uncased/` next to the checkpoint. [DEC]/[ENC] are added here.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Sequence

import torch
from torch import nn

from branchgrpo.rewards._image import clip_preprocess, to_rgb
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward
from branchgrpo.core.state_dicts import count_blocks, mismatch_summary

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_FILE = os.path.join("ImageReward", "ImageReward.pt")  # under --reward_model_dir
MAX_PROMPT_TOKENS = 35
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
HEAD_LAYER_POSITIONS = (0, 2, 4, 6, 7)  # the Linear layers inside ImageReward's nn.Sequential MLP

PREFIXES = {"vision": "blip.visual_encoder.", "text": "blip.text_encoder.", "head": "mlp."}
UNUSED_KEYS = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias")
POSITION_IDS_KEY = "blip.text_encoder.embeddings.position_ids"

# BLIP ViT name (after "blip.visual_encoder.") <-> transformers BlipVisionModel name. The text encoder needs no
# table: transformers' BlipTextModel is a port of BLIP's med.py and kept every parameter name.
VISION_KEY_TEMPLATES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_VISION_RULES = [(_template_regex(a), b, _template_regex(b), a) for a, b in VISION_KEY_TEMPLATES]


def official_to_module_key(key: str) -> tuple[str, str] | None:
    """'blip.visual_encoder.blocks.3.attn.qkv.weight' -> ('vision', 'encoder.layers.3.self_attn.qkv.weight');
    None for a name outside the official layout."""
    for part, prefix in PREFIXES.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if part == "text":
            return part, rest
        if part == "head":
            match = re.fullmatch(r"layers\.(\d+)\.(weight|bias)", rest)
            if match and int(match[1]) in HEAD_LAYER_POSITIONS:
                return part, f"layers.{HEAD_LAYER_POSITIONS.index(int(match[1]))}.{match[2]}"
            return None
        for official_re, module_template, _, _ in _VISION_RULES:
            match = official_re.fullmatch(rest)
            if match:
                return part, module_template.format(**match.groupdict())
    return None


def module_to_official_key(part: str, key: str) -> str:
    """The inverse of `official_to_module_key` (used to report missing weights under their official names)."""
    if part == "text":
        return PREFIXES["text"] + key
    if part == "head":
        index, param = key.split(".")[1:]
        return f"mlp.layers.{HEAD_LAYER_POSITIONS[int(index)]}.{param}"
    for _, _, module_re, official_template in _VISION_RULES:
        match = module_re.fullmatch(key)
        if match:
            return PREFIXES["vision"] + official_template.format(**match.groupdict())
    return f"{PREFIXES[part]}<{key}>"


class RewardHead(nn.Module):
    """ImageReward's MLP without its (inactive at eval) dropouts: a chain of Linear layers, no activations."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, features_BD: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            features_BD = layer(features_BD)
        return features_BD


class ImageRewardModel(nn.Module):
    """vision -> text with cross-attention -> head on the first token -> (raw - mean) / std. Differentiable, so the
    same module can serve reward-gradient methods; the scorer below calls it under no_grad."""

    def __init__(self, vision: nn.Module, text: nn.Module, head: RewardHead):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head
        self.mean, self.std = IMAGEREWARD_MEAN, IMAGEREWARD_STD

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state       # [B, 1 + P, Dv]
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=image_mask, is_decoder=False)
        first_token = text.last_hidden_state[:, 0].float()                            # [B, Dt]
        raw = self.head(first_token).squeeze(-1)
        return (raw - self.mean) / self.std


def load_official_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"imagereward: checkpoint not found: '{path}' (expected THUDM/ImageReward's "
                                "ImageReward.pt; set the reward option checkpoint=...)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled code, git-lfs pointer...
        raise ValueError(f"imagereward: cannot read '{path}' as a torch checkpoint ({err}); expected "
                         "THUDM/ImageReward's ImageReward.pt") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _needed(tensors: dict, part: str, key: str, why: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"imagereward checkpoint: missing key {module_to_official_key(part, key)} (needed to {why})")
    return tensors[key]


def _vision_config(vision: dict, med_config: dict, num_heads: int | None):
    """ViT sizes read from the checkpoint's shapes (BLIP's med_config describes only the text side)."""
    from transformers import BlipVisionConfig

    pos = _needed(vision, "vision", "embeddings.position_embedding", "infer the ViT width and token count")
    patch = _needed(vision, "vision", "embeddings.patch_embedding.weight", "infer the ViT patch size").shape[-1]
    fc1 = _needed(vision, "vision", "encoder.layers.0.mlp.fc1.weight", "infer the ViT MLP width")
    width, grid = pos.shape[-1], math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ValueError(f"imagereward checkpoint: pos_embed has {pos.shape[1]} tokens, not 1 + a square grid")
    depth = 1 + max(int(key.split(".")[2]) for key in vision if key.startswith("encoder.layers."))
    # Head count is not visible in shapes; BLIP's ViTs use 64-dim heads (base 768/12, large 1024/16).
    heads = num_heads or med_config.get("vision_num_attention_heads") or width // 64
    return BlipVisionConfig(hidden_size=width, intermediate_size=fc1.shape[0], num_hidden_layers=depth,
                            num_attention_heads=heads, image_size=grid * patch, patch_size=patch, hidden_act="gelu",
                            layer_norm_eps=VIT_LAYER_NORM_EPS, attention_dropout=0.0)


def _text_config(med_config: dict, encoder_width: int):
    """BLIP's med_config (a BertConfig json) -> BlipTextConfig; the cross-attention width is the ViT width, as in
    BLIP_Pretrain (`encoder_config.encoder_width = vision_width`, overriding the json's value)."""
    from transformers import BlipTextConfig

    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")
    absent = [key for key in required if key not in med_config]
    if absent:
        raise ValueError(f"imagereward med_config: missing {absent}")
    if not med_config.get("add_cross_attention", True):
        raise ValueError("imagereward med_config: add_cross_attention is false; ImageReward's text encoder needs it")
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("imagereward med_config: only absolute position embeddings are supported")
    return BlipTextConfig(
        **{key: med_config[key] for key in required}, encoder_hidden_size=encoder_width,
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12), hidden_act=med_config.get("hidden_act", "gelu"),
        pad_token_id=med_config.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None, sep_token_id=None,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True)  # generation ids: unused


def _width(tensors: dict[str, torch.Tensor], key: str) -> str:
    return str(tensors[key].shape[-1]) if key in tensors else "?"


def build_imagereward_model(state: dict[str, torch.Tensor], med_config: dict, vision_num_heads: int | None = None,
                            source: str = "") -> ImageRewardModel:
    """Build the model from an official-layout state dict, strictly: every key used, every parameter filled.
    `source`: the file it came from (named in errors)."""
    from transformers import BlipTextModel, BlipVisionModel

    state = dict(state)
    for key in UNUSED_KEYS:
        state.pop(key, None)
    position_ids = state.pop(POSITION_IDS_KEY, None)
    if position_ids is not None and not torch.equal(position_ids.reshape(-1).long(),
                                                    torch.arange(position_ids.numel())):
        raise ValueError(f"imagereward checkpoint: {POSITION_IDS_KEY} is not 0..L-1")
    grouped: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PREFIXES}
    unexpected = []
    for key, value in state.items():
        target = official_to_module_key(key)
        if target is None:
            unexpected.append(key)
        else:
            grouped[target[0]][target[1]] = value

    vision_cfg = _vision_config(grouped["vision"], med_config, vision_num_heads)
    text_cfg = _text_config(med_config, vision_cfg.hidden_size)
    head_weights = [_needed(grouped["head"], "head", f"layers.{j}.weight", "infer the MLP sizes")
                    for j in range(len(HEAD_LAYER_POSITIONS))]
    head_dims = [head_weights[0].shape[1]] + [w.shape[0] for w in head_weights]
    with torch.device("meta"):  # no random init of ~450M parameters that are overwritten anyway
        parts = {"vision": BlipVisionModel(vision_cfg), "text": BlipTextModel(text_cfg, add_pooling_layer=False),
                 "head": RewardHead(head_dims)}

    missing, mismatched = [], []
    for part, module in parts.items():
        expected = module.state_dict()
        unexpected += [module_to_official_key(part, key) for key in grouped[part] if key not in expected]
        missing += [module_to_official_key(part, key) for key in expected if key not in grouped[part]]
        mismatched += [f"{module_to_official_key(part, key)} {tuple(grouped[part][key].shape)} vs expected "
                       f"{tuple(value.shape)}" for key, value in expected.items()
                       if key in grouped[part] and grouped[part][key].shape != value.shape]
    if unexpected or missing or mismatched:
        found_text = (f"text encoder {count_blocks(grouped['text'], 'encoder.layer.')} layers x width "
                      f"{_width(grouped['text'], 'embeddings.word_embeddings.weight')}")
        raise ValueError(f"imagereward checkpoint {source} does not match the ImageReward architecture built from "
                         f"its shapes and med_config (the file: vision {vision_cfg.num_hidden_layers} blocks x width "
                         f"{vision_cfg.hidden_size}, {found_text}; med_config: text encoder "
                         f"{text_cfg.num_hidden_layers} layers x width {text_cfg.hidden_size}); "
                         f"{mismatch_summary(missing, unexpected, mismatched)}; the `checkpoint` and `med_config` "
                         "options must name THUDM/ImageReward's ImageReward.pt and its med_config.json")
    for part, module in parts.items():
        module.load_state_dict({k: v.float() for k, v in grouped[part].items()}, strict=True, assign=True)
    text = parts["text"]  # its non-persistent position_ids buffer is still on the meta device
    text.embeddings.position_ids = torch.arange(text_cfg.max_position_embeddings).expand(1, -1)
    model = ImageRewardModel(parts["vision"], text, parts["head"]).eval()
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left unfilled: {left}"
    return model


def load_imagereward_tokenizer(folder: str, vocab_size: int):
    """bert-base-uncased's WordPiece tokenizer from a local folder, plus BLIP's [DEC] and [ENC] special tokens."""
    if not os.path.isdir(folder) or not any(os.path.isfile(os.path.join(folder, name))
                                            for name in ("vocab.txt", "tokenizer.json")):
        raise FileNotFoundError(f"imagereward: tokenizer folder '{folder}' must hold bert-base-uncased's vocab.txt "
                                "(+ tokenizer_config.json); set the reward option tokenizer=...")
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise ValueError(f"imagereward: tokenizer in '{folder}' has {len(tokenizer)} tokens with [DEC]/[ENC], but the "
                         f"text encoder has {vocab_size} (bert-base-uncased + 2 = 30524); wrong tokenizer folder?")
    return tokenizer


class ImageRewardScorer:
    """The reward: images `[B, C, H, W]` in [0, 1] + prompts -> normalised ImageReward scores, float32 `[B]` CPU."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, device: torch.device | str = "cpu", batch_size: int = 16,
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.model = model.to(self.device)
        self.model.vision.to(dtype)
        self.model.text.to(dtype)  # the head stays fp32, as ImageReward casts the features with .float()
        self.tokenizer = tokenizer

    def preprocess(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> OpenAI-CLIP-normalised [B, 3, S, S] pixels in the encoders' dtype."""
        images = to_rgb(images_BCHW.to(self.device, torch.float32))
        return clip_preprocess(images, self.model.image_size, dtype=self.dtype)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt")
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if media.ndim != 4:
            raise ValueError(f"imagereward scores images [B, C, H, W]; got shape {tuple(media.shape)}")
        if len(prompts) != media.shape[0]:
            raise ValueError(f"imagereward: {media.shape[0]} images but {len(prompts)} prompts")
        scores = [torch.zeros(0)]
        for start in range(0, media.shape[0], self.batch_size):
            end = start + self.batch_size
            input_ids, attention_mask = self.tokenize(prompts[start:end])
            scores.append(self.model(self.preprocess(media[start:end]), input_ids, attention_mask).float().cpu())
        return torch.cat(scores)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_reward("imagereward")
def build_imagereward(device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                      checkpoint: LocalPath | None = None, med_config: LocalPath | None = None, tokenizer: LocalPath | None = None,
                      **options) -> ImageRewardScorer:
    """`checkpoint` defaults to `model_dir`/ImageReward/ImageReward.pt, `med_config` and `tokenizer` to
    med_config.json and bert-base-uncased/ next to it. Options: `batch_size` (16), `dtype` (float32 | bfloat16 |
    float16, of the two encoders), `vision_num_heads` (default: med_config's `vision_num_attention_heads`, else ViT
    width / 64 = 16 for ImageReward)."""
    checkpoint = checkpoint or os.path.join(model_dir, IMAGEREWARD_FILE)
    allowed = {"batch_size", "dtype", "vision_num_heads"}
    if set(options) - allowed:
        raise ValueError(f"imagereward: unknown options {sorted(set(options) - allowed)}; allowed: {sorted(allowed)}")
    dtype = options.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"imagereward: dtype must be one of {sorted(_DTYPES)}, got '{dtype}'")
    folder = os.path.dirname(checkpoint)
    med_config = med_config or os.path.join(folder, "med_config.json")
    tokenizer = tokenizer or os.path.join(folder, "bert-base-uncased")
    if not os.path.isfile(med_config):
        raise FileNotFoundError(f"imagereward: med_config not found: '{med_config}' (THUDM/ImageReward's "
                                "med_config.json; set the reward option med_config=...)")
    with open(med_config) as f:
        med = json.load(f)
    model = build_imagereward_model(load_official_state_dict(checkpoint), med, options.get("vision_num_heads"),
                                    source=checkpoint)
    tok = load_imagereward_tokenizer(tokenizer, model.text.config.vocab_size)
    return ImageRewardScorer(model, tok, device=device, batch_size=int(options.get("batch_size", 16)),
                             dtype=_DTYPES[dtype])
