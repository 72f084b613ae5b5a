"""Process-group setup for 1..N processes launched by torchrun (or plain python: a world of one).

gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo for CPU ones. Parallel wrappers (DDP, FSDP2) and activation
checkpointing live in `branchgrpo.runtime.parallel`.

Collectives give up after `--collective_timeout_s` (the process group's timeout); the wrappers below record which
collective a rank waits in, and `mark` records the main thread's progress, in `PROGRESS`: the stall watchdog
(branchgrpo.runtime.watchdog) reads it to say where a rank waits.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


class _Progress:
    """What the main thread last did (plain attributes: the watchdog thread only reads them)."""

    def __init__(self):
        self.what, self.iteration, self.count = "start-up", None, 0
        self.since = time.monotonic()
        self.collective: str | None = None  # the collective this rank is in now (None: not in one)
        self.last_collective: str | None = None


PROGRESS = _Progress()


def mark(what: str, iteration: int | None = None) -> None:
    """The main thread made progress (cheap: a few attribute writes)."""
    PROGRESS.what, PROGRESS.count, PROGRESS.since = what, PROGRESS.count + 1, time.monotonic()
    if iteration is not None:
        PROGRESS.iteration = iteration


@contextmanager
def in_collective(name: str):
    """Record the collective (and the function that called the wrapper) while this rank waits in it."""
    code = sys._getframe(3).f_code  # in_collective <- contextlib <- the wrapper in distributed.py <- its caller
    caller = getattr(code, "co_qualname", code.co_name)
    label = f"{name} (from {caller})"
    PROGRESS.collective = PROGRESS.last_collective = label
    try:
        yield
    finally:
        PROGRESS.collective = None
        mark(f"after {label}")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CUDA_DEVICE = re.compile(r"cuda(?::([0-9]+))?")


def check_device_name(name: str, flag: str = "--device") -> None:
    """A --device value is auto, cpu, cuda or cuda:<index>, spelled so; anything else (gpu, gpu0, cuda:x, '') is a
    ValueError naming the flag - it must never mean "the CPU" by default."""
    if name not in ("auto", "cpu") and not _CUDA_DEVICE.fullmatch(str(name)):
        raise ValueError(f"{flag}: {name!r} is not a device; use auto (CUDA if visible, else the CPU), cpu, cuda or "
                         "cuda:<index>")


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1, flag: str = "--device") -> torch.device:
    """The device a --device value names, checked strictly (`check_device_name`): auto is CUDA when a GPU is visible,
    else the CPU; cuda is this process's GPU (its local rank's); cuda:N is GPU N (one process only: under torchrun
    each rank takes its local rank's). A GPU that is not visible is a ValueError naming the flag."""
    check_device_name(name, flag)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "cpu" or (name == "auto" and not visible):
        return torch.device("cpu")
    if not visible:
        raise ValueError(f"{flag} {name}: no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); use --device cpu or auto")
    explicit = _CUDA_DEVICE.fullmatch(name).group(1) if name != "auto" else None
    if explicit is not None and world_size > 1:
        raise ValueError(f"{flag} {name}: with {world_size} processes each takes its local rank's GPU; pass --device "
                         "cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    index = local_rank if explicit is None else int(explicit)
    if index >= visible:
        raise ValueError(f"{flag} {name}: GPU {index} is not visible ({visible} CUDA device(s): 0..{visible - 1})")
    return torch.device("cuda", index)


def init_distributed(device: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Initialise from torchrun's variables when present. `device`: a --device value (`resolve_device`);
    `timeout_s`: how long a collective waits for the other ranks before it raises (--collective_timeout_s)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, world_size)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        # On GPUs "cpu:gloo,cuda:nccl": NCCL reduces only CUDA tensors, and the trainer's small collectives (the
        # SIGTERM flag, micro-batch counts, rewards and eval sums) are CPU tensors; torch routes each collective to
        # the backend of its tensor's device, so FSDP's CUDA traffic still goes over NCCL.
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        with in_collective("barrier"):
            dist.barrier()


def shutdown(clean: bool = True) -> None:
    """A barrier before destroying the group: without it gloo runs sometimes abort at exit (notes/ecosystem.md).
    After an error (`clean=False`) no barrier: the other ranks may be waiting in another collective, and this rank
    must exit so that torchrun stops them too."""
    if is_distributed():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        with in_collective("all_reduce_sum"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        with in_collective("all_reduce_max"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0 (rank order)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    with in_collective("all_gather"):
        dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
