"""Exponential moving average of the trained weights, fp32, kept on the CPU (default) or on the device.

With FSDP2 every rank keeps the EMA of its own shards, so the EMA costs no communication; it is gathered only to
export or evaluate it. `swapped_in` temporarily puts the EMA weights into the model.

`device="cpu"` (`--ema_device cpu`): no GPU memory, but every update copies the trained shards to the host (a
device-to-host transfer and a sync per update). `device="device"`: the EMA lives beside the shards on their device
(4 bytes per trained parameter / number of GPUs), updated there without a transfer - for big nodes where the host
copy is the bottleneck. Either way the state dict holds CPU tensors, so checkpoints have one layout and a run may
resume with the other setting.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _resharded(model: nn.Module) -> nn.Module:
    """`model` with every FSDP2 unit on its shards, which are what the copies here hold. FSDP2 keeps the root unit's
    parameters gathered after a forward without backward (an evaluation; DiffusionNFT's rollout with theta_old), and
    while they are, `named_parameters` gives the gathered tensors: a copy into them would not reach the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


class EMA:
    def __init__(self, model: nn.Module, decay: float, device: str = "cpu"):
        self.decay = decay
        self.on_device = device == "device"
        self.shadow = {n: _local(p.detach()).to(self._where(p), torch.float32, copy=True)
                       for n, p in model.named_parameters() if p.requires_grad}

    def _where(self, param: torch.Tensor) -> torch.device | str:
        return _local(param.detach()).device if self.on_device else "cpu"

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """shadow <- d shadow + (1 - d) param, d = `decay` (a schedule's value: DiffusionNFT's old policy) or the
        fixed --ema_decay."""
        d = self.decay if decay is None else decay
        for name, param in _resharded(model).named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(_local(param.detach()).to(self._where(param), torch.float32), 1.0 - d)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        params = {n: p for n, p in _resharded(model).named_parameters() if n in self.shadow}
        backup = {n: _local(p.detach()).clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    _local(p.data).copy_(self.shadow[n])
            yield
        finally:
            _resharded(model)  # the forwards inside may have gathered the root unit again
            with torch.no_grad():
                for n, p in params.items():
                    _local(p.data).copy_(backup[n])

    def state_dict(self) -> dict:
        if self.on_device:
            return {"decay": self.decay, "shadow": {n: t.to("cpu", copy=True) for n, t in self.shadow.items()}}
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("resume: the checkpoint's EMA tracks other parameters (LoRA vs full, or another model)")
        for name, value in state["shadow"].items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"resume: EMA tensor {name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(self.shadow[name].shape)} (same number of processes needed)")
            self.shadow[name].copy_(value)
