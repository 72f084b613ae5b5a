"""Tiny random CLIP-family reward checkpoints in the real file layouts, built offline (for tests and smoke runs).

Each writer lays out `out_dir` the way `hps_ckpt/` is laid out for the real checkpoints, so that
`python -m branchgrpo.make_tiny KIND hps_ckpt` gives a folder the reward's defaults would find (except that the tiny
open_clip architecture has its own name and config folder: pass `arch` and `model_config_dir`).

- hps:       HPS_v2.1_compressed.pt ({'state_dict': ...}) + open_clip_configs/ViT-H-14-tiny.json
- clip:      clip-vit-large-patch14/ (transformers CLIPModel + tokenizer + preprocessor_config.json)
- pickscore: PickScore_v1/ (CLIPModel) + CLIP-ViT-H-14-laion2B-s32B-b79K/ (tokenizer + preprocessor_config.json)

The text towers keep the real 49,408-token CLIP vocabulary, rebuilt from the BPE file that ships inside open_clip, so
the real tokenizers run unchanged; everything else is a few dozen channels wide.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

TINY_HPS_ARCH = "ViT-H-14-tiny"
TINY_IMAGE_SIZE = 32
# A scaled-down ViT-H-14 open_clip config (same keys as open_clip's ViT-H-14.json).
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2 / CLIP): printable bytes map to
    themselves, the rest to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clip_bpe_tokenizer(model_max_length: int = 77):
    """The OpenAI CLIP tokenizer (49,408 tokens) as a transformers CLIPTokenizer, rebuilt offline from open_clip's
    bundled `bpe_simple_vocab_16e6.txt.gz`: 512 byte tokens (plain and end-of-word), 48,894 merges, 2 specials."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_clip_text_config(hidden_size: int = 32, **overrides) -> dict:
    """A 2-layer CLIP text tower over the real vocabulary (token ids as in the real tokenizer)."""
    cfg = dict(vocab_size=49408, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407, hidden_act="gelu")
    cfg.update(overrides)
    return cfg


def make_tiny_hps(out_dir: str, seed: int = 0) -> Path:
    """Write `HPS_v2.1_compressed.pt` ({'state_dict': ...}) of a tiny open_clip model, and its model config json
    (`open_clip_configs/ViT-H-14-tiny.json`, registered with `open_clip.add_model_config`)."""
    import open_clip

    out = Path(out_dir)
    config_dir = out / "open_clip_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{TINY_HPS_ARCH}.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(str(config_dir))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_HPS_ARCH, pretrained=None)
    path = out / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def tiny_hps_options(out_dir: str) -> dict:
    """The hps reward's options for the checkpoint `make_tiny_hps(out_dir)` wrote: its architecture is the tiny one,
    registered from the config written beside it."""
    return {"arch": TINY_HPS_ARCH, "model_config_dir": str(Path(out_dir) / "open_clip_configs")}


def _write_hf_clip(model_dir: Path | None, processor_dir: Path, seed: int) -> None:
    """A tiny transformers CLIPModel in `model_dir` (None: skip) and its tokenizer + image processor config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if model_dir is not None:
        torch.manual_seed(seed)
        config = CLIPConfig(
            text_config=tiny_clip_text_config(),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                               image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_act="gelu"),
            projection_dim=16,
        )
        CLIPModel(config).save_pretrained(str(model_dir))
    clip_bpe_tokenizer().save_pretrained(str(processor_dir))
    CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(str(processor_dir))


def make_tiny_clip(out_dir: str, seed: int = 0) -> Path:
    """`out_dir/clip-vit-large-patch14/`: model, tokenizer and preprocessor config in one folder, as on the hub."""
    folder = Path(out_dir) / "clip-vit-large-patch14"
    _write_hf_clip(folder, folder, seed)
    return folder


def make_tiny_pickscore(out_dir: str, seed: int = 0) -> Path:
    """`out_dir/PickScore_v1/` (the model) and `out_dir/CLIP-ViT-H-14-laion2B-s32B-b79K/` (its processor), the two
    folders the PickScore reward reads, as in the official setup."""
    out = Path(out_dir)
    _write_hf_clip(out / "PickScore_v1", out / "PickScore_v1", seed)
    _write_hf_clip(None, out / "CLIP-ViT-H-14-laion2B-s32B-b79K", seed)
    return out
