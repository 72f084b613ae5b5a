"""Host syncs of the hot loops, counted by branchgrpo.bench.syncs: the counter sees what makes a host wait for a
device, and the rollout's depth loop and the update's micro-batch loop make (almost) none of it."""

from types import SimpleNamespace

import torch

from branchgrpo.bench.syncs import SyncCounter


def test_the_counter_sees_reads_and_data_dependent_shapes():
    x = torch.randn(6)
    with SyncCounter() as counter:
        _ = x * 2 + 1  # device work only
        assert counter.total() == 0
        x.sum().item()
        bool(x[0] > 0)
        _ = x[x > 0]
        torch.nonzero(x)
        torch.unique(x)
        _ = x.repeat_interleave(torch.tensor([1] * 6))
        _ = x.repeat_interleave(torch.tensor([1] * 6), output_size=6)  # size given: no sync
    kinds = {k for (_, _, k) in counter.counts}
    assert counter.total() == 6 and kinds == {"read", "data-dependent shape"}, counter.counts


def test_rollout_and_update_loops_make_no_host_sync_per_depth_or_micro_batch():
    from branchgrpo.bench.backbones import load_backbone
    from branchgrpo.bench.throughput import host_syncs, no_autocast
    from branchgrpo.config.sections import ModelConfig

    backbone = load_backbone(ModelConfig(model="toy"), torch.device("cpu"), num_prompts=3)
    backbone.adapter.transformer.eval()
    args = SimpleNamespace(steps=8, split_points=[0, 2, 4], branch_factor=2, rollout_batch_size=64,
                           micro_batch_sizes=[2])
    result = host_syncs(backbone, args, torch.device("cpu"), no_autocast, 3)
    rollout, update = result["rollout"], result["update"]
    assert rollout["depths"] == 8 and update["micro_batches"] >= 10, result
    # the layouts (host bookkeeping) are counted, attributed to their functions, and left out of the loops' count
    assert update["own"] > update["in_loop"] and any("layout" in w for w in update["own_by_where"]), update
    assert rollout["in_loop"] == 0, rollout
    assert update["in_loop"] <= update["optimizer_steps"], update  # the gradient norm's finiteness, per step
