"""A run's writes and the file system: putting a written folder on disk (`fsync_tree`), and, when a write fails, the
disk error (full, quota, read-only, failing) found behind the writer's own exception, with the sizes the one-line
message gives."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
# how writers that wrap the OSError say it (safetensors: "I/O error: No space left on device (os error 28)")
_DISK_TEXTS = {errno.ENOSPC: ("No space left on device", "os error 28"), errno.EDQUOT: ("Disk quota exceeded",),
               errno.EROFS: ("Read-only file system", "os error 30")}


def disk_errno(err: BaseException) -> int | None:
    """The errno of a disk failure behind `err` (its causes, contexts and DCP's per-rank failures), or None."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            return current.errno
        text = str(current)
        for code, markers in _DISK_TEXTS.items():
            if any(marker in text for marker in markers):
                return code
        pending += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            pending += [f[0] if isinstance(f, tuple) else f for f in current.failures.values()]
    return None


def tensor_bytes(tree) -> int:
    """Bytes of the tensors in a (nested) state dict, this rank's shard of each sharded one."""
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    return 0


def size_text(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, and the folder itself, on disk (before the completeness marker is written)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
