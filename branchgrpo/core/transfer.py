"""Host-to-device transfers in bulk: the hot loops (rollout depths, training micro-batches) index the device with
tensors laid out on the host beforehand, and moving them one by one would cost a synchronising copy each."""

from __future__ import annotations

import torch


def to_device_once(tables: list[dict], device: torch.device) -> None:
    """Replace every tensor of `tables` (dicts of host tensors) by a view of one host-to-device copy per dtype,
    made from pinned memory without blocking the host. On the CPU the tensors stay as they are."""
    if device.type == "cpu":
        return
    groups: dict[torch.dtype, list] = {}
    for table in tables:
        for name, t in table.items():
            groups.setdefault(t.dtype, []).append((table, name, t))
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for _, _, t in group])
        flat = flat.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else flat.to(device)
        for (table, name, t), piece in zip(group, flat.split([t.numel() for _, _, t in group])):
            table[name] = piece.view(t.shape)
