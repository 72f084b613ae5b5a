"""--ema_device: an EMA kept beside the weights updates exactly like the host EMA, and their checkpoints share one
layout (CPU tensors), so each resumes from the other's state; under FSDP2 a swapped-in copy reaches the shards even
after a forward that left the root unit gathered."""

from __future__ import annotations

import pytest
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


def _swap_after_a_forward(rank: int, port: int, results) -> None:
    """One rank of FSDP2 over 2 processes (gloo): theta_old kept, theta moved by a step, a forward without backward
    (which leaves the root unit's parameters gathered), then theta_old swapped in (DiffusionNFT's rollout)."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))  # the second layer belongs to the root unit
        fully_shard(model[0])
        fully_shard(model)
        x = torch.randn(3, 4)
        old = EMA(model, 0.0, "device")
        with torch.no_grad():
            at_old = model(x)
        model(x).square().sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        with torch.no_grad():
            moved = model(x)
            with old.swapped_in(model):
                swapped = model(x)
            after = model(x)
        results.put((rank, torch.equal(swapped, at_old), torch.equal(after, moved), not torch.equal(moved, at_old)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_an_old_policy_swaps_into_fsdp2_shards_after_a_forward_without_backward():
    import torch.multiprocessing as mp

    from trainer_utils import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_swap_after_a_forward, args=(rank, port, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == [(0, True, True, True), (1, True, True, True)]
