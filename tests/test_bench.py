"""The throughput benchmark at tiny sizes: one run measures the forward-cost curve, depth-batched vs one-node-at-a-
time rollouts (depth batching must win clearly even on a loaded CI machine; the 3x target is checked in the real
run, docs/benchmarks.md), tree vs sequential rollouts with exact forward counts, and training edges per second with
and without activation checkpointing; plus the MFU formula and the FLUX.1-dev shape of the random-weight model."""

import json

import pytest
import torch

from branchgrpo.bench.__main__ import main as bench_main
from branchgrpo.bench.measure import gemm_attention_share
from branchgrpo.bench.throughput import mfu

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "toy.json"
    assert bench_main(["--model", "toy", "--num_threads", "1", "--repeats", "3", "--warmup", "1",
                       "--train_repeats", "1", "--forward_batches", "1,16", "--tree_prompts", "1",
                       "--micro_batch_sizes", "8,32", "--peak_tflops", "1.0", "--output", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_depth_batching_beats_one_node_at_a_time(toy_bench):
    _, r = toy_bench
    d = r["depth_batching"]
    batched, single = d["rows"]
    assert (batched["mode"], single["mode"]) == ("depth_batched", "one_node_at_a_time")
    assert batched["forward_passes"] == single["forward_passes"] == 203  # T 20, splits 0,3,6,9, K 2
    assert (batched["velocity_calls"], single["velocity_calls"]) == (20, 203)
    assert d["speedup"] >= 1.5, d
    assert 0 < batched["backbone_share"] <= 1 and batched["peak_memory_mb"] > 0


def test_tree_vs_sequential_counts_and_check(toy_bench):
    _, r = toy_bench
    (t,) = r["tree_vs_sequential"]
    assert (t["tree_forward_passes"], t["sequential_forward_passes"]) == (203, 320)
    assert t["proportional_share_s"] == pytest.approx(203 / 320 * t["sequential_s"])
    assert t["within_tolerance"] == (t["tree_s"] <= 1.15 * t["proportional_share_s"])


def test_training_rows_and_outputs(toy_bench):
    out, r = toy_bench
    rows = r["training"]
    assert [(x["micro_batch_parents"], x["activation_checkpointing"]) for x in rows] == \
        [(8, False), (32, False), (8, True), (32, True)]
    assert all(x["edges"] == 202 and x["training_forwards"] == 187 for x in rows)  # siblings share a forward
    assert [x["micro_batches"] for x in rows] == [24, 6, 24, 6]  # ceil(187 / 8), ceil(187 / 32)
    assert all(x["edges_per_s"] > 0 for x in rows)
    assert r["forward_cost"][0]["batch"] == 1 and "fit_fixed_ms" in r["forward_cost"][0]
    assert r["mfu"]["rollout_depth_batched"] > 0 and r["mfu"]["training_micro32_ckpt1"] > 0
    md = out.with_suffix(".md").read_text()
    assert "Depth batching" in md and "within 15%" in md and "edges / s" in md


def test_gemm_attention_share_separates_matrix_and_attention_work_from_the_rest():
    cpu = torch.device("cpu")
    a, q = torch.randn(256, 256), torch.randn(4, 4, 256, 64)

    def matrix():
        return [a @ a for _ in range(10)] + [torch.nn.functional.scaled_dot_product_attention(q, q, q)]

    def elementwise():
        return [a.exp().sin() for _ in range(20)]

    (gemm, out), (rest, _) = gemm_attention_share(matrix, cpu), gemm_attention_share(elementwise, cpu)
    both, _ = gemm_attention_share(lambda: (matrix(), elementwise()), cpu)
    assert len(out) == 11  # fn's output comes back
    assert gemm["share"] > 0.5 and gemm["bound"] < 2, gemm
    assert rest["share"] == 0 and rest["bound"] is None, rest
    assert rest["share"] < both["share"] < gemm["share"] and both["bound"] > gemm["bound"], (gemm, both)


def test_gemm_attention_share_inside_units_bounds_compiling_just_them():
    cpu, a = torch.device("cpu"), torch.randn(512, 256)
    units = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU()) for _ in range(2))

    def step():
        x = a.exp().sin().cos()  # outside the units: compiling them leaves it as it is
        for unit in units:
            x = unit(x)
        return x

    with torch.no_grad():
        share, out = gemm_attention_share(step, cpu, units=list(units))
    assert out.shape == (512, 256) and all("forward" not in u.__dict__ for u in units)  # the ranges are gone
    assert 0 < share["units_share"] < 1 and 0 < share["units_gemm_share"] < 1, share
    # the time outside the units cannot be saved by compiling them: their bound is below the all-free one
    assert 1 < share["units_bound"] < share["bound"], share


def test_mfu_formula():
    # 2 N tokens FLOPs per forward: 1e9 params x 100 tokens x 10 forwards/s = 2e12 FLOP/s = 2 x a 1 TFLOP/s peak
    assert mfu(10**9, 100, 10.0, 1.0) == pytest.approx(2.0)
    assert mfu(10**9, 100, 10.0, 1.0, flops_factor=6) == pytest.approx(6.0)
    assert mfu(10**9, 100, 10.0, None) is None


def test_random_flux_shapes():
    from branchgrpo.models.flux import random_flux_transformer

    full = random_flux_transformer("full", torch.device("meta"), torch.bfloat16)  # no memory: shapes only
    assert sum(p.numel() for p in full.parameters()) == 11_901_408_320  # FLUX.1-dev's transformer
    assert len(full.transformer_blocks) == 19 and len(full.single_transformer_blocks) == 38
    tiny = random_flux_transformer("tiny", torch.device("cpu"), torch.float32)
    assert next(tiny.parameters()).dtype == torch.float32 and len(tiny.transformer_blocks) == 1
