"""Timing and memory helpers of the benchmarks: warm-up, interleaved repeats, medians, peak memory per phase.

Repeats of the variants being compared are interleaved (A B A B ...) rather than run back to back (A A B B), so a
change in machine load - these CPUs are shared - hits both variants alike instead of biasing the ratio.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved_medians(variants: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                        warmup: int) -> dict[str, dict]:
    """{name: {"median_s", "times_s"}} over `repeats` interleaved runs after `warmup` unrecorded rounds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device)[0])
    return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


class PeakMemory:
    """Peak memory of a phase: CUDA max allocated, or on CPU the peak resident set size (VmHWM), reset at the start
    of the phase by writing 5 to /proc/self/clear_refs (Linux). Where that reset is not allowed, the process-lifetime
    peak (ru_maxrss) is reported and `kind` says so."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_peak():
            self.kind = "cpu_max_rss_since_start"
        self.peak_mb = None
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = _rss_peak_mb() if self.kind == "cpu_peak_rss" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _rss_peak_mb() is not None
    except OSError:
        return False


def _rss_peak_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    try:
        info["load_average_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def allocation_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started, from the allocator's own records:
    torch.profiler with profile_memory logs every allocation and free of the CPU (and CUDA) allocator with its size;
    the running sum of those sizes in time order peaks where `fn` held the most. Works on CPU, where torch keeps no
    peak counter (tensors allocated before `fn` and freed inside count negative: keep them alive across the call)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(sizes):
        running += size
        peak = max(peak, running)
    return peak


# matrix multiplies and attention: operators a compiler hands to the same library kernels (BLAS / cuBLAS, the fused
# attention kernels) in their default modes, prefixes of the profiler's operator names
GEMM_AND_ATTENTION = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                      "aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention",
                      "aten::_cudnn_attention")


UNIT_RANGE = "branchgrpo::unit"


@contextlib.contextmanager
def ranged(units: list[torch.nn.Module]):
    """Each unit's forward inside a profiler range named UNIT_RANGE (an instance attribute over the class's forward,
    removed on exit)."""
    from torch.profiler import record_function

    def wrap(forward):
        def forward_in_range(*args, **kwargs):
            with record_function(UNIT_RANGE):
                return forward(*args, **kwargs)
        return forward_in_range

    own = [unit.__dict__.get("forward") for unit in units]  # a forward set on the instance, put back after
    for unit in units:
        unit.forward = wrap(unit.forward)
    try:
        yield
    finally:
        for unit, forward in zip(units, own):
            if forward is None:
                del unit.forward
            else:
                unit.forward = forward


def _in_units(events) -> tuple[float, float]:
    """CPU seconds inside the unit ranges (outermost ones), and the self time of GEMM + attention inside them."""
    inside = gemm = 0.0
    for e in events:
        chain, parent = [], e.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if e.name == UNIT_RANGE and UNIT_RANGE not in chain:
            inside += e.cpu_time_total
        elif e.name.startswith(GEMM_AND_ATTENTION) and UNIT_RANGE in chain:
            gemm += e.self_cpu_time_total
    return inside / 1e6, gemm / 1e6


def gemm_attention_share(fn: Callable[[], object], device: torch.device,
                         units: list[torch.nn.Module] | None = None) -> tuple[dict, object]:
    """(share, fn's output): the share of one run of `fn`'s wall time spent in matrix multiplies and attention (the
    self time of those operators; their kernels' time on a GPU), profiled once. Compiling fuses and removes the rest -
    elementwise work, normalisation, copies, dispatch - and in its default modes hands these to the same library
    kernels, so while they stay the same 1 / share bounds the speed-up compiling can bring: the speed-up if all else
    became free ("bound"; None when there is no such operator). The profiler lengthens the wall, so the share comes
    out low and the bound high; inductor may still pick other kernels (bf16 linears on CPU), so it is an estimate.

    With `units` (the modules that get compiled; a forward-only `fn` on CPU), also what compiling just those can
    bring: "units_share" of the wall inside them, "units_gemm_share" of it in GEMM + attention, and "units_bound" =
    1 / (1 - what else runs inside them) - the speed-up if that became free and the rest stayed as it is."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with ranged(units or []), \
            profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall_s, out = timed(fn, device)
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy_s = sum(getattr(e, field) for e in prof.key_averages() if e.key.startswith(GEMM_AND_ATTENTION)) / 1e6
    share = busy_s / wall_s
    result = {"share": share, "bound": 1.0 / share if share > 0 else None, "profiled_wall_s": wall_s}
    if units and not cuda:
        inside_s, gemm_s = _in_units(prof.events())
        result.update(units_share=inside_s / wall_s, units_gemm_share=gemm_s / max(inside_s, 1e-12),
                      units_bound=wall_s / (wall_s - (inside_s - gemm_s)))
    return result, out
