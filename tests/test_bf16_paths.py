"""The GPU path's dtypes on CPU: tiny FLUX and Wan rollouts and updates under bf16 autocast, with fp32 master weights
(one GPU) and with bf16 parameters (what FSDP2's mixed precision all-gathers), so casting bugs surface without a GPU.
Records the first-ratio deviation max |ratio - 1| of the first micro-batch (same weights as the rollout, so 1 up to
bf16 rounding and layout) without and with --recompute_old_log_prob (`-s` prints them)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from branchgrpo.core import plans
from branchgrpo.bench.gpu_check import SPLITS, update_once
from branchgrpo.bench.throughput import make_rollout
from branchgrpo.runtime.parallel import apply_activation_checkpointing

STEPS = 11
MICRO = 32  # parents per training forward: 2 micro-batches for the tree's 43 parents


def _flux(dtype):
    from branchgrpo.models.flux import FluxAdapter, random_flux_cond, random_flux_transformer, vae_stand_in

    adapter = FluxAdapter(random_flux_transformer("tiny", "cpu", dtype), vae_stand_in(), 64, 64)
    return adapter, random_flux_cond(adapter, 1, 16, "cpu", torch.bfloat16, 0)


def _wan(dtype):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from branchgrpo.models.diffusers_backbone import build_transformer
    from branchgrpo.models.wan import WanAdapter
    from branchgrpo.testing.wan_tiny import TRANSFORMER_CONFIG, VAE_CONFIG

    torch.manual_seed(0)
    transformer = build_transformer(WanTransformer3DModel, TRANSFORMER_CONFIG, "cpu", dtype)
    adapter = WanAdapter(transformer, AutoencoderKLWan(**VAE_CONFIG), 9, 32, 32, guidance_scale=5.0)  # CFG on
    gen = torch.Generator().manual_seed(0)
    cond = {k: torch.randn(1, 16, 32, generator=gen).bfloat16() for k in ("prompt_embeds", "negative_prompt_embeds")}
    return adapter, cond


@pytest.mark.parametrize("model", ["flux", "wan"])
@pytest.mark.parametrize("weights", ["fp32_master", "bf16_params"])
def test_bf16_rollout_and_update(model, weights):
    dtype = torch.float32 if weights == "fp32_master" else torch.bfloat16
    adapter, cond = {"flux": _flux, "wan": _wan}[model](dtype)
    adapter.transformer.requires_grad_(True)
    device = torch.device("cpu")
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    rollout = make_rollout(type("B", (), {"adapter": adapter, "cond": cond}), plans.tree_plan(STEPS, SPLITS, 2), 1,
                           STEPS, 32, device, autocast)
    with torch.no_grad():
        graph = rollout()
    assert torch.isfinite(graph.latents).all() and torch.isfinite(graph.log_prob[graph.stochastic]).all()
    apply_activation_checkpointing(adapter.transformer, adapter.blocks())
    plain = update_once(adapter, cond, graph, MICRO, device, autocast, recompute=False)
    recomputed = update_once(adapter, cond, graph, MICRO, device, autocast, recompute=True)
    message = (f"{model} {weights}: first-ratio deviation {plain['first_ratio_deviation']:.3g}, with "
               f"--recompute_old_log_prob {recomputed['first_ratio_deviation']:.3g}")
    assert 0 <= plain["first_ratio_deviation"] < 0.05
    assert recomputed["first_ratio_deviation"] <= plain["first_ratio_deviation"] + 1e-6
    if weights == "fp32_master":
        # the measure sees bf16 rounding when there is some: the same fp32 weights re-scoring without autocast
        fp32 = update_once(adapter, cond, graph, MICRO, device, contextlib.nullcontext, recompute=False)
        message += f"; fp32 training forward vs the bf16 rollout: {fp32['first_ratio_deviation']:.3g}"
        assert fp32["first_ratio_deviation"] > 0
    print(message)
    # a real step: every parameter stays in its dtype, the loss and gradient norm are finite, the weights move
    before = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters()}
    stepped = update_once(adapter, cond, graph, MICRO, device, autocast, recompute=False, lr=1e-2)
    assert 0 < stepped["grad_norm"] < float("inf") and abs(stepped["loss"]) < float("inf")
    after = dict(adapter.transformer.named_parameters())
    assert all(after[n].dtype == dtype for n in before)
    moved = sum(not torch.equal(before[n], after[n].detach()) for n in before)
    assert moved > len(before) // 2, (moved, len(before))
