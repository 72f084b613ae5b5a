"""A tiny random ImageReward checkpoint in the OFFICIAL layout, for tests and smoke runs of the real loading code.

    python -m branchgrpo.make_tiny imagereward DIR

writes, like the THUDM/ImageReward model repo plus a tokenizer folder:
    DIR/ImageReward.pt             plain state dict with the official key names (as BLIP_Pretrain / ImageReward name
                                   them: blip.visual_encoder.blocks.0.attn.qkv.weight, blip.text_encoder.encoder.layer.0
                                   .crossattention.self.key.weight, mlp.layers.7.bias, blip.vision_proj.weight, ...)
    DIR/med_config.json            BLIP's BertConfig json, tiny sizes (+ "vision_num_attention_heads", since a 48-wide
                                   ViT cannot use BLIP's 64-dim heads)
    DIR/bert-base-uncased/         a small WordPiece vocab.txt + tokenizer_config.json (uncased, BERT's special tokens)

The key names are generated here from BLIP's module structure, independently of the renaming table in
`branchgrpo.rewards.imagereward`, so loading this file exercises that table.
"""

from __future__ import annotations

import json
import os
import string

import torch

TINY = {
    "vision_width": 48, "vision_depth": 2, "vision_heads": 4, "vision_mlp": 96, "patch": 8, "image_size": 32,
    "text_width": 32, "text_layers": 2, "text_heads": 4, "text_intermediate": 64, "max_positions": 40,
    "head_dims": (24, 16, 8, 4, 1), "proj_dim": 16,
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "green", "car", "on", "with", "and", "in",
         "painting", "ocean", "birds", "sky", ",", ".", "##s", "##ing"]


def tiny_vocab() -> list[str]:
    """BERT-style WordPiece vocabulary: special tokens, some words, and every letter/digit alone and as ##piece,
    so any lowercase ASCII word tokenises without [UNK]."""
    chars = string.ascii_lowercase + string.digits
    vocab = SPECIAL_TOKENS + WORDS
    pieces = list(chars) + [f"##{c}" for c in chars]
    return vocab + [piece for piece in pieces if piece not in vocab]


def official_shapes(cfg: dict, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of ImageReward.pt, named as BLIP's VisionTransformer, med.py BertModel (no pooler), BLIP_Pretrain's
    projections and ImageReward's nn.Sequential MLP name them."""
    vw, tw, p = cfg["vision_width"], cfg["text_width"], cfg["patch"]
    shapes: dict[str, tuple[int, ...]] = {}
    ve = "blip.visual_encoder."
    shapes[ve + "cls_token"] = (1, 1, vw)
    shapes[ve + "pos_embed"] = (1, 1 + (cfg["image_size"] // p) ** 2, vw)
    shapes[ve + "patch_embed.proj.weight"], shapes[ve + "patch_embed.proj.bias"] = (vw, 3, p, p), (vw,)
    for i in range(cfg["vision_depth"]):
        b = f"{ve}blocks.{i}."
        for name, out_in in (("attn.qkv", (3 * vw, vw)), ("attn.proj", (vw, vw)),
                             ("mlp.fc1", (cfg["vision_mlp"], vw)), ("mlp.fc2", (vw, cfg["vision_mlp"]))):
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = out_in, out_in[:1]
        for name in ("norm1", "norm2"):
            shapes[b + name + ".weight"] = shapes[b + name + ".bias"] = (vw,)
    shapes[ve + "norm.weight"] = shapes[ve + "norm.bias"] = (vw,)

    te = "blip.text_encoder."
    shapes[te + "embeddings.position_ids"] = (1, cfg["max_positions"])
    shapes[te + "embeddings.word_embeddings.weight"] = (vocab_size, tw)
    shapes[te + "embeddings.position_embeddings.weight"] = (cfg["max_positions"], tw)
    shapes[te + "embeddings.LayerNorm.weight"] = shapes[te + "embeddings.LayerNorm.bias"] = (tw,)
    for i in range(cfg["text_layers"]):
        b = f"{te}encoder.layer.{i}."
        linears = {"attention.self.query": (tw, tw), "attention.self.key": (tw, tw), "attention.self.value": (tw, tw),
                   "attention.output.dense": (tw, tw), "crossattention.self.query": (tw, tw),
                   "crossattention.self.key": (tw, vw), "crossattention.self.value": (tw, vw),
                   "crossattention.output.dense": (tw, tw), "intermediate.dense": (cfg["text_intermediate"], tw),
                   "output.dense": (tw, cfg["text_intermediate"])}
        for name, out_in in linears.items():
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = out_in, out_in[:1]
        for name in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            shapes[b + name + ".weight"] = shapes[b + name + ".bias"] = (tw,)

    shapes["blip.vision_proj.weight"], shapes["blip.vision_proj.bias"] = (cfg["proj_dim"], vw), (cfg["proj_dim"],)
    shapes["blip.text_proj.weight"], shapes["blip.text_proj.bias"] = (cfg["proj_dim"], tw), (cfg["proj_dim"],)
    dims = (tw,) + tuple(cfg["head_dims"])
    for position, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        shapes[f"mlp.layers.{position}.weight"], shapes[f"mlp.layers.{position}.bias"] = (d_out, d_in), (d_out,)
    return shapes


def random_official_state_dict(cfg: dict, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values scaled so activations stay O(1) through the tiny network (fan-in scaling for matrices,
    LayerNorm gains near 1), which makes the score sensitive to every weight."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(cfg, vocab_size).items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[1]).expand(1, -1).clone()
        elif "norm" in name.lower() and name.endswith(".weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2 and "embed" not in name and "token" not in name:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[name] = torch.randn(shape, generator=gen) / fan_in**0.5
        else:
            state[name] = 0.5 * torch.randn(shape, generator=gen)
    return state


def med_config_dict(cfg: dict, vocab_size: int) -> dict:
    """The same fields as ImageReward's med_config.json, tiny sizes."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": cfg["text_width"], "initializer_range": 0.02,
        "intermediate_size": cfg["text_intermediate"], "layer_norm_eps": 1e-12,
        "max_position_embeddings": cfg["max_positions"], "model_type": "bert",
        "num_attention_heads": cfg["text_heads"], "num_hidden_layers": cfg["text_layers"], "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True,
        "vision_num_attention_heads": cfg["vision_heads"],
    }


def make_tiny_imagereward(out_dir: str, seed: int = 0) -> str:
    """Write the tiny checkpoint, med_config and tokenizer into `out_dir`; returns the checkpoint path."""
    os.makedirs(os.path.join(out_dir, "bert-base-uncased"), exist_ok=True)
    vocab = tiny_vocab()
    vocab_size = len(vocab) + 2  # + BLIP's [DEC] and [ENC], added by the tokenizer loader
    with open(os.path.join(out_dir, "bert-base-uncased", "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(out_dir, "bert-base-uncased", "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}, f)
    with open(os.path.join(out_dir, "med_config.json"), "w") as f:
        json.dump(med_config_dict(TINY, vocab_size), f, indent=2)
    path = os.path.join(out_dir, "ImageReward.pt")
    torch.save(random_official_state_dict(TINY, vocab_size, seed), path)
    return path
