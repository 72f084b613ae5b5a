"""The toy's two networks: a word-level text encoder and a tiny flow-matching transformer for 8x8 digits.

The flow network is a miniature of FLUX's single-stream blocks: text tokens and 2x2 image patches attend jointly,
and the noise level plus the pooled text vector modulate every block (adaLN-zero, as in DiT). About 0.23M weights;
a forward+backward at batch 256 takes tens of milliseconds on 2 CPU cores.

Batch invariance. GRPO's first update needs ratio = exp(logp_new - logp_old) = 1 exactly, so on CPU in fp32 the
velocity of one sample must not depend on which other samples share its batch. Measured on these machines:
- `nn.Linear` gives different bits for matrices of 1, 2, 3, 5, 6, 7, 9, 10 or 11 rows than for the same rows inside
  a bigger matrix (MKL's small-M path); 4, 8 and >= 12 rows all agree. Token tensors `[B, T, D]` with T >= 12 are
  safe; per-sample vectors `[B, D]` go through `_rowwise`, which pads them to at least 16 rows.
- SiLU, sigmoid and tanh-GELU differ between their vectorised and scalar (loop tail) code paths, and which elements
  land in a tail depends on the batch size once several threads split the tensor. Exact GELU (erf), sin, cos,
  LayerNorm and SDPA agree; so the networks use only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from branchgrpo.toy.data import PAD_TOKEN, VOCAB, prompt_words, unknown_word_message

_MIN_ROWS = 16  # Linear layers on >= 12 rows give the same bits per row whatever the row count


def _rowwise(layer: nn.Module, x_BD: torch.Tensor) -> torch.Tensor:
    """`layer(x_BD)` with the rows padded to at least _MIN_ROWS, so a sample's bits do not depend on B."""
    num_rows = x_BD.shape[0]
    if num_rows >= _MIN_ROWS:
        return layer(x_BD)
    pad = x_BD.new_zeros(_MIN_ROWS - num_rows, *x_BD.shape[1:])
    return layer(torch.cat([x_BD, pad]))[:num_rows]


def _config_from_dict(cls, values: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------------------


class WordTokenizer:
    """Words of a vocabulary (the toy grammar's by default; index = token id, 0 = padding) -> ids `[n, L]`
    (0-padded) and a mask `[n, L]` (True on words)."""

    def __init__(self, max_length: int, vocab: tuple[str, ...] = VOCAB):
        self.max_length = max_length
        self.vocab = vocab
        self.word_to_id = {word: i for i, word in enumerate(vocab)}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids_NL = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = prompt_words(text)
            if not words:
                raise ValueError(f"toy prompt {text!r}: empty")
            if len(words) > self.max_length:
                raise ValueError(f"toy prompt {text!r}: {len(words)} words, the toy encodes at most {self.max_length}")
            for col, word in enumerate(words):
                if word not in self.word_to_id or word == PAD_TOKEN:
                    raise ValueError(unknown_word_message(text, word, self.vocab))
                ids_NL[row, col] = self.word_to_id[word]
        return ids_NL, ids_NL != 0


@dataclass
class TextEncoderConfig:
    vocab_size: int = len(VOCAB)
    max_length: int = 8  # L: every prompt is padded to this many tokens (the grammar needs at most 5)
    dim: int = 32  # D of prompt_embeds and pooled_prompt_embeds
    num_heads: int = 2
    num_layers: int = 1  # self-attention layers over the words


class _EncoderLayer(nn.Module):
    """Pre-LN self-attention over the words (padding masked out) + GELU MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff_in, self.ff_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x_NLD: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
        n, length, dim = x_NLD.shape
        q, k, v = self.qkv(self.norm1(x_NLD)).view(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_NL[:, None, None, :])
        x_NLD = x_NLD + self.out(attn.transpose(1, 2).reshape(n, length, dim))
        return x_NLD + self.ff_out(F.gelu(self.ff_in(self.norm2(x_NLD))))


class ToyTextEncoder(nn.Module):
    """Word embeddings + position embeddings + a small transformer. prompt_embeds are zero on padding."""

    def __init__(self, config: TextEncoderConfig, vocab: tuple[str, ...] = VOCAB):
        super().__init__()
        if len(vocab) != config.vocab_size:
            raise ValueError(f"toy text encoder: vocab_size {config.vocab_size} but a vocabulary of {len(vocab)} words")
        self.config = config
        self.tokenizer = WordTokenizer(config.max_length, vocab)
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Parameter(torch.randn(config.max_length, config.dim) * 0.02)
        self.layers = nn.ModuleList(_EncoderLayer(config.dim, config.num_heads) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.pool = nn.Linear(config.dim, config.dim)

    def forward(self, ids_NL: torch.Tensor, mask_NL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_NLD = self.token_embed(ids_NL) + self.pos_embed
        for layer in self.layers:
            x_NLD = layer(x_NLD, mask_NL)
        keep_NL1 = mask_NL.unsqueeze(-1).to(x_NLD.dtype)
        embeds_NLD = self.norm(x_NLD) * keep_NL1
        mean_ND = embeds_NLD.sum(dim=1) / keep_NL1.sum(dim=1)
        return embeds_NLD, _rowwise(self.pool, mean_ND)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The embedding dict the preprocess step writes: prompt_embeds `[n, L, D]`, pooled `[n, D]` (fp32)."""
        ids_NL, mask_NL = self.tokenizer(list(texts))
        device = self.pos_embed.device
        embeds_NLD, pooled_ND = self(ids_NL.to(device), mask_NL.to(device))
        return {"prompt_embeds": embeds_NLD.float(), "pooled_prompt_embeds": pooled_ND.float()}


# ----------------------------------------------------------------------------------------------------------------
# Flow transformer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FlowConfig:
    image_size: int = 8  # latents are [B, in_channels, image_size, image_size]
    in_channels: int = 1
    patch_size: int = 2  # 2x2 patches: 16 image tokens
    dim: int = 64  # token width
    num_blocks: int = 4  # repeated ToyBlocks (FSDP2 / activation-checkpointing units)
    num_heads: int = 4
    mlp_ratio: int = 2  # MLP hidden width = mlp_ratio * dim
    text_dim: int = 32  # D of the text encoder's embeddings (any number L of text tokens works)
    freq_dim: int = 64  # sinusoidal features of the noise level
    #: channels of a conditioning image concatenated to the latents before patching (as Wan I2V conditions on its
    #: first frame); 0: none (the text-to-image toy), > 0: `forward` requires `cond_latents_BCHW` (the edit toy)
    cond_channels: int = 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def sigma_features(sigmas_B: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Sinusoidal features `[B, freq_dim]` of 1000 * sigma (the timestep scale diffusion models are used to)."""
    half = freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigmas_B.device) / half)
    angles_BF = (sigmas_B.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles_BF), torch.sin(angles_BF)], dim=1)


class ToyBlock(nn.Module):
    """Image tokens attend to [text; image] tokens (self- and cross-attention in one softmax), then a GELU MLP;
    both modulated by the conditioning vector (shift, scale, gate; adaLN-zero: the gates start at 0, so a fresh
    block is the identity). Text tokens are keys and values only and are not updated, which saves a quarter of
    the compute against a joint stream and loses nothing measurable at this size."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.ff_in, self.ff_out = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def _heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        return x_BTD.view(b, t, self.num_heads, -1).transpose(1, 2)  # [B, heads, T, D / heads]

    def forward(self, x_BND: torch.Tensor, context_BLD: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        mod_B6D = _rowwise(self.modulation, F.gelu(cond_BD))
        shift1, scale1, gate1, shift2, scale2, gate2 = (m.unsqueeze(1) for m in mod_B6D.chunk(6, dim=1))
        h_BND = self.norm1(x_BND) * (1 + scale1) + shift1
        keys_BTD = torch.cat([context_BLD, h_BND], dim=1)
        attn = F.scaled_dot_product_attention(
            self._heads(self.to_q(h_BND)), self._heads(self.to_k(keys_BTD)), self._heads(self.to_v(keys_BTD))
        )
        x_BND = x_BND + gate1 * self.to_out(attn.transpose(1, 2).flatten(2))
        h_BND = self.norm2(x_BND) * (1 + scale2) + shift2
        return x_BND + gate2 * self.ff_out(F.gelu(self.ff_in(h_BND)))


class ToyFlowTransformer(nn.Module):
    """v(x, sigma | text) for latents `[B, 1, 8, 8]`; v = eps - x0. With `cond_channels`, v(x, sigma | text, image):
    the conditioning image's channels join the latents' in each patch (the output keeps `in_channels`)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        c, p, dim = config.in_channels, config.patch_size, config.dim
        self.patch_embed = nn.Linear((c + config.cond_channels) * p * p, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_patches, dim) * 0.02)
        self.context_embedder = nn.Linear(config.text_dim, dim)
        self.time_in, self.time_out = nn.Linear(config.freq_dim, dim), nn.Linear(dim, dim)
        self.text_in, self.text_out = nn.Linear(config.text_dim, dim), nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.num_blocks))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, c * p * p)
        for layer in (self.modulation_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _patchify(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_BCHW.shape
        p = self.config.patch_size
        x = x_BCHW.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpatchify(self, x_BNP: torch.Tensor) -> torch.Tensor:
        b = x_BNP.shape[0]
        c, p, size = self.config.in_channels, self.config.patch_size, self.config.image_size
        g = size // p
        x = x_BNP.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, size, size)

    def forward(
        self, latents_BCHW: torch.Tensor, sigmas_B: torch.Tensor, prompt_embeds_BLD: torch.Tensor,
        pooled_BD: torch.Tensor, cond_latents_BCHW: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.patch_embed.weight.dtype
        if (cond_latents_BCHW is not None) != (self.config.cond_channels > 0):
            raise ValueError(f"toy flow network: cond_channels is {self.config.cond_channels}, so cond_latents_BCHW "
                             f"must be {'given' if self.config.cond_channels else 'None'}")
        if cond_latents_BCHW is not None:
            latents_BCHW = torch.cat([latents_BCHW.to(dtype), cond_latents_BCHW.to(dtype)], dim=1)
        freqs_BF = sigma_features(sigmas_B, self.config.freq_dim).to(dtype)
        time_BD = _rowwise(self.time_out, F.gelu(_rowwise(self.time_in, freqs_BF)))
        text_BD = _rowwise(self.text_out, F.gelu(_rowwise(self.text_in, pooled_BD.to(dtype))))
        cond_BD = time_BD + text_BD
        image_BND = self.patch_embed(self._patchify(latents_BCHW.to(dtype))) + self.pos_embed
        context_BLD = self.context_embedder(prompt_embeds_BLD.to(dtype))
        x_BND = image_BND
        for block in self.blocks:
            x_BND = block(x_BND, context_BLD, cond_BD)
        shift, scale = (m.unsqueeze(1) for m in _rowwise(self.modulation_out, F.gelu(cond_BD)).chunk(2, dim=1))
        out_BND = self.proj_out(self.norm_out(x_BND) * (1 + scale) + shift)
        return self._unpatchify(out_BND)
