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

The pure arithmetic that turns these bytes into a per-GPU budget is in branchgrpo/planner/memory.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

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


def _tensor_bytes(values, seen: set | None = None) -> int:
    """Bytes of the storages of `values` not in `seen` (which is updated)."""
    seen, total = set() if seen is None else seen, 0
    for v in values:
        if isinstance(v, torch.Tensor):
            key = v.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
    return total


def _signature(module: nn.Module, leaves: list) -> tuple:
    """What decides a block's saved tensors: its class, its structure and its inputs' shapes and dtypes."""
    return (type(module), tuple(n for n, _ in module.named_parameters()),
            tuple((tuple(v.shape), v.dtype, v.requires_grad) if isinstance(v, torch.Tensor) else repr(v)
                  for v in leaves))


class _BlockReplay:
    """Traces the first block of each signature for real and replays the others: a repeated block (FLUX.1-dev has
    19 + 38 of two kinds, Wan 30-40 of one) saves the same tensors for the same inputs, so its record is reused and
    its forward replaced by outputs of the right shapes (requiring grad, so later blocks save as they would). Saved
    storages that are the block's inputs or outputs are mapped to this call's, so sharing across blocks (the
    time embedding and rotary tables every block saves) is still counted once."""

    def __init__(self, blocks: list[nn.Module], state):
        self.blocks, self.state, self.cache, self.originals = blocks, state, {}, {}
        self.fresh = 0

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            self.originals[i] = block.forward
            block.forward = self._wrap(i, block, block.forward)
        return self

    def __exit__(self, *exc):
        for i, block in enumerate(self.blocks):
            block.forward = self.originals[i]

    def _wrap(self, i, block, forward):
        from torch.utils._pytree import tree_flatten, tree_unflatten

        def run(*args, **kwargs):
            leaves, _ = tree_flatten((args, kwargs))
            tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
            in_keys = [t.untyped_storage()._cdata for t in tensors]
            # what a checkpointed block keeps: its inputs; those shared by all blocks (time embedding, rotary
            # tables, text states) are one storage, counted at the first block that takes them
            self.state.inputs_bytes[i] = _tensor_bytes(tensors, self.state.seen_inputs)
            key = _signature(block, leaves)
            saved = self.state.saved[i]
            if key in self.cache:
                out_spec, out_meta, record = self.cache[key]
                outs = [None if meta is None else torch.empty(meta[0], dtype=meta[1], device="meta").requires_grad_(
                    meta[2]) for meta in out_meta]
                out_keys = _storage_keys(outs)
                self.state.keep.extend(tensors + [t for t in outs if t is not None])
                for (kind, where), nbytes in record:
                    if kind == "input":
                        saved[in_keys[where]] = nbytes
                    elif kind == "output":
                        saved[out_keys[where]] = nbytes
                    else:
                        self.fresh -= 1
                        saved[self.fresh] = nbytes  # negative keys: never a real storage's
                return tree_unflatten(outs, out_spec)
            self.state.active.append(i)
            try:
                output = forward(*args, **kwargs)
            finally:
                self.state.active.pop()
            outs, out_spec = tree_flatten(output)
            out_keys = _storage_keys(outs)
            record = []
            for k, nbytes in saved.items():
                kind = ("input", in_keys.index(k)) if k in in_keys else (
                    ("output", out_keys.index(k)) if k in out_keys else ("internal", 0))
                record.append((kind, nbytes))
            # a block may return None beside tensors (SD3's last block has no text output)
            self.cache[key] = (out_spec, [None if t is None else (tuple(t.shape), t.dtype, t.requires_grad)
                                          for t in outs], record)
            return output

        return run


def _storage_keys(outputs: list) -> list:
    """The storage of each tensor among a block's flattened outputs (None for the non-tensors)."""
    return [t.untyped_storage()._cdata if isinstance(t, torch.Tensor) else None for t in outputs]


def trace_activations(model: nn.Module, blocks: list[nn.Module], inputs: dict, batch: int,
                      replay: bool = True) -> ActivationTrace:
    """Run `model(**inputs)` (meta tensors, trainable parameters) once and account its saved tensors per block
    (`replay`: repeated blocks replay the first one's record, `_BlockReplay`; False traces every block)."""
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    # every saved tensor stays alive until the end, as in training (its backward has not run): a freed storage's
    # address could otherwise come back as another storage's key (a replayed block's stand-in outputs cut the graph
    # that would keep earlier ones alive, so the replay keeps its inputs and outputs here too)
    keep = []
    state = SimpleNamespace(saved=[dict() for _ in blocks], inputs_bytes=[0] * len(blocks), active=[], keep=keep,
                            seen_inputs=set())
    other: dict[int, int] = {}

    def pack(t: torch.Tensor):
        keep.append(t)
        key = t.untyped_storage()._cdata
        if key not in param_storages:
            (state.saved[state.active[-1]] if state.active else other)[key] = t.untyped_storage().nbytes()
        return t

    with _flash_like_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if replay:
            with _BlockReplay(blocks, state):
                model(**inputs)
        else:
            with _BlockReplay(blocks, state) as r:
                r.cache = _NeverCached()
                model(**inputs)
    # a storage saved by two blocks (a block's output saved by the next one) is counted in the first only
    counted: set[int] = set()
    block_saved = []
    for per_block in state.saved:
        block_saved.append(sum(b for k, b in per_block.items() if k not in counted))
        counted |= set(per_block)
    return ActivationTrace(batch=batch, block_saved=block_saved, block_inputs=state.inputs_bytes,
                           other_saved=sum(b for k, b in other.items() if k not in counted),
                           block_params=[sum(p.numel() for p in b.parameters()) for b in blocks])


class _NeverCached(dict):
    def __contains__(self, key):
        return False


def lora_parameters(model: nn.Module, targets, rank: int) -> int:
    """Parameters LoRA of `rank` adds on the Linear layers whose names end with one of `targets`, in the parts of
    `model` that train (a frozen part, e.g. an expert left out of training, keeps its LoRA frozen)."""
    total = 0
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.weight.requires_grad
                and any(name == t or name.endswith("." + t) for t in targets)):
            total += rank * (module.in_features + module.out_features)
    return total
