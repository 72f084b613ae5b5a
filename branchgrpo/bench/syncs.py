"""Host syncs of the hot loops, counted: the operations that make the host wait for the device.

`SyncCounter` (a TorchDispatchMode) counts, by kind and by where they come from: reading a value back (`.item()`, `bool()`, `float()`:
aten._local_scalar_dense), results whose shape depends on the data (nonzero, boolean-mask indexing, unique,
masked_select, repeat_interleave without an output size) and copies between two devices. The count is
conservative on the CPU, where host and device are one: a value read from a host-only tensor counts too, while a
host-to-device copy cannot be seen (the rollout and the update move their index tensors in one copy before their
loops, branchgrpo.core.transfer) and neither can `.tolist()`. Calls inside the backbone can be counted apart
(`count_backbone_apart`), so the rollout's and the update's own syncs show. Each count is attributed to the
innermost branchgrpo function on the stack; `HOST_SIDE` names the functions that lay out host bookkeeping before a
loop (on a GPU their tensors never leave the host), and counts inside torch.optim are the optimizers' host-side
step counters - what is left is what the loops themselves make the host wait for.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {"aten.nonzero", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
                   "aten.masked_select", "aten.repeat_interleave"}


HOST_SIDE = frozenset({"expand_plans", "_prepare", "_layout", "_noise_layout", "_plan", "layout", "prepare", "windows",
                       "plan_micro_batches"})


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()  # (scope, where, kind) -> count
        self.scope = "own"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _kind(func, args, kwargs)
        if kind:
            self.counts[(self.scope, _where(), kind)] += 1
        return func(*args, **kwargs)

    def total(self, scope: str = "own", in_loop: bool = False) -> int:
        return sum(n for (s, w, _), n in self.counts.items()
                   if s == scope and not (in_loop and (w == "torch.optim" or w.rsplit(".", 1)[-1] in HOST_SIDE)))

    def by_where(self, scope: str = "own") -> dict[str, int]:
        out = Counter()
        for (s, w, k), n in self.counts.items():
            if s == scope:
                out[f"{w} ({k})"] += n
        return dict(sorted(out.items()))

    @contextlib.contextmanager
    def in_scope(self, scope: str):
        previous, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = previous


def _where() -> str:
    """The innermost branchgrpo function on the stack (module.function), or torch.optim inside an optimizer."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/optim/" in name:
            return "torch.optim"
        if "/branchgrpo/" in name and not name.endswith("syncs.py") and not frame.f_code.co_name.startswith("<"):
            module = name.rsplit("/branchgrpo/", 1)[1].removesuffix(".py").replace("/", ".")
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"


def _kind(func, args, kwargs) -> str | None:
    name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    qualified = f"aten.{name}"
    if qualified == "aten._local_scalar_dense":
        return "read"
    if qualified in _DATA_DEPENDENT:
        if qualified == "aten.repeat_interleave" and kwargs.get("output_size") is not None:
            return None
        return "data-dependent shape"
    if qualified in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ()):
            return "data-dependent shape"
    if qualified in ("aten._to_copy", "aten.copy_"):
        src = args[1] if qualified == "aten.copy_" else args[0]
        dst = args[0] if qualified == "aten.copy_" else kwargs.get("device")
        dst_device = dst.device if isinstance(dst, torch.Tensor) else dst
        if dst_device is not None and torch.device(dst_device).type != src.device.type:
            return "device copy"
    return None


@contextlib.contextmanager
def count_backbone_apart(counter: SyncCounter, adapter):
    """Within it, syncs inside `adapter.velocity` count under the scope "backbone"."""
    velocity, own = adapter.velocity, "velocity" in vars(adapter)

    def counted(*args, **kwargs):
        with counter.in_scope("backbone"):
            return velocity(*args, **kwargs)

    adapter.velocity = counted
    try:
        yield
    finally:
        if own:
            adapter.velocity = velocity
        else:
            del adapter.velocity  # the instance attribute; the class's method shows again


def rollout_and_update_syncs(adapter, graph_fn, update_fn, num_depths: int, num_micro: int, num_steps: int) -> dict:
    """Host syncs of one rollout (`graph_fn`) and one update (`update_fn`): all of their own, those of their loops
    (per depth / micro-batch / optimizer step), and those inside the backbone."""
    out = {}
    for name, fn, units in (("rollout", graph_fn, {("depth", "depths"): num_depths}),
                            ("update", update_fn, {("micro_batch", "micro_batches"): num_micro,
                                                   ("optimizer_step", "optimizer_steps"): num_steps})):
        counter = SyncCounter()
        with count_backbone_apart(counter, adapter), counter:
            fn()
        in_loop = counter.total("own", in_loop=True)
        out[name] = {"own": counter.total("own"), "in_loop": in_loop, "own_by_where": counter.by_where("own"),
                     "backbone": counter.total("backbone"), "backbone_by_where": counter.by_where("backbone"),
                     **{plural: n for (_, plural), n in units.items()},
                     **{f"in_loop_per_{unit}": in_loop / max(n, 1) for (unit, _), n in units.items()}}
    return out
