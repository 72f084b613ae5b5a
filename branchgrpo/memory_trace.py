"""What one training forward keeps for its backward, counted on the meta device (no weights, no compute).

`trace_activations` runs a transformer's forward once on meta tensors of the real shapes, with
`torch.autograd.graph.saved_tensors_hooks` recording every tensor autograd saves for the backward (storages counted
once, parameters left out: they are counted as parameters), attributed to the block (FSDP / checkpointing unit) that
was running. That is exactly the activation memory a forward leaves alive until its backward, for any backbone,
without a hand-written per-architecture formula. Two corrections make the meta run behave like a GPU or CPU one:

- attention: on meta, `scaled_dot_product_attention` takes the math path, which saves the [B, H, L, L] probability
  matrix; the fused kernels the GPU (flash / memory-efficient) and the CPU (flash for CPU) run save only q, k, v, the
  output and a float32 log-sum-exp per query row. During the trace SDPA is a stand-in function that saves exactly
  those.
- dtype: autocast does not run on meta, so the trace runs with the parameters in the compute dtype (as FSDP2's
  mixed precision all-gathers them); the tensors it saves are then in that dtype, as under bf16 autocast.

The pure arithmetic that turns these bytes into a per-GPU budget is in branchgrpo/memory.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ActivationTrace:
    """Bytes saved for the backward by one forward of `batch` samples."""

    batch: int
    block_saved: list[int]  # per block, in call order: what the block saves (checkpointing drops it)
    block_inputs: list[int]  # per block: its tensor inputs (what a checkpointed block keeps instead)
    other_saved: int  # saved outside the blocks (embeddings, final norm and projection)
    block_params: list[int] = field(default_factory=list)  # parameters per block (FSDP2 all-gather unit)


class _FlashLikeAttention(torch.autograd.Function):
    """SDPA stand-in for the trace: the output's shape, and the tensors a fused attention kernel saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the trace runs forwards only
        raise NotImplementedError


def _sdpa_stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashLikeAttention.apply(query, key, value)


@contextlib.contextmanager
def _flash_like_sdpa():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa_stand_in
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _tensor_bytes(values) -> int:
    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor):
            key = v.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
    return total


def trace_activations(model: nn.Module, blocks: list[nn.Module], inputs: dict, batch: int) -> ActivationTrace:
    """Run `model(**inputs)` (meta tensors, trainable parameters) once and account its saved tensors per block."""
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    index = {id(b): i for i, b in enumerate(blocks)}
    saved = [dict() for _ in blocks]
    other: dict[int, int] = {}
    inputs_bytes = [0] * len(blocks)
    active: list[int] = []

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in param_storages:
            (saved[active[-1]] if active else other)[key] = t.untyped_storage().nbytes()
        return t

    def enter(module, args, kwargs):
        i = index[id(module)]
        active.append(i)
        inputs_bytes[i] = _tensor_bytes(list(args) + list(kwargs.values()))

    def leave(module, args, kwargs, output):
        active.pop()

    handles = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(leave, with_kwargs=True) for b in blocks]
    try:
        with _flash_like_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    # a storage saved by two blocks (a block's output saved by the next one) is counted in the first only
    counted: set[int] = set()
    block_saved = []
    for per_block in saved:
        block_saved.append(sum(b for k, b in per_block.items() if k not in counted))
        counted |= set(per_block)
    return ActivationTrace(batch=batch, block_saved=block_saved, block_inputs=inputs_bytes,
                           other_saved=sum(b for k, b in other.items() if k not in counted),
                           block_params=[sum(p.numel() for p in b.parameters()) for b in blocks])


def lora_parameters(model: nn.Module, targets, rank: int) -> int:
    """Parameters LoRA of `rank` adds on the Linear layers whose names end with one of `targets`."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total
