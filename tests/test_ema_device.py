"""--ema_device: an EMA kept beside the weights updates exactly like the host EMA, and their checkpoints share one
layout (CPU tensors), so each resumes from the other's state."""

from __future__ import annotations

import torch
from torch import nn

from branchgrpo.runtime.ema import EMA


def test_device_ema_equals_host_ema_and_resumes_across_settings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # untrained parameters are not tracked
    host, device = EMA(model, 0.9), EMA(model, 0.9, "device")
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        host.update(model)
        device.update(model)
    a, b = host.state_dict(), device.state_dict()
    assert a["shadow"].keys() == b["shadow"].keys() and "0.bias" not in a["shadow"]
    assert all(torch.equal(a["shadow"][k], b["shadow"][k]) and b["shadow"][k].device.type == "cpu" for k in a["shadow"])
    # the device EMA's state dict is a copy: changing it does not change the EMA
    next(iter(b["shadow"].values())).add_(1.0)
    assert torch.equal(device.shadow["0.weight"], host.shadow["0.weight"])
    fresh_host, fresh_device = EMA(model, 0.9), EMA(model, 0.9, "device")
    fresh_host.load_state_dict(device.state_dict())
    fresh_device.load_state_dict(host.state_dict())
    for k in a["shadow"]:
        assert torch.equal(fresh_host.shadow[k], host.shadow[k]) and torch.equal(fresh_device.shadow[k], host.shadow[k])
    with fresh_device.swapped_in(model):
        assert torch.equal(model[1].weight, host.shadow["1.weight"])
