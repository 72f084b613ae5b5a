"""The memory planner: real configs' parameter counts, the plan's JSON and errors, and its activation model against
peaks measured on CPU for the tiny FLUX and Wan (allocator records, branchgrpo.bench.measure)."""

from __future__ import annotations

import json
import pytest
import torch

from branchgrpo.planner import memory
from branchgrpo.bench.measure import allocation_peak_bytes
from branchgrpo.cli import plan
from branchgrpo.planner.gpu_memory import memory_model
from branchgrpo.planner.trace import lora_parameters, trace_activations
from branchgrpo.config import config_from_flags
from branchgrpo.runtime.parallel import apply_activation_checkpointing


def _plan_json(capsys, *flags) -> dict:
    assert plan.main([*flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_shipped_flux_dev_config_has_its_parameter_count():
    cfg = config_from_flags({"model": "flux"}, validate="none")
    config, source = cfg.model.spec.planner_config(cfg.model)
    planned = cfg.model.spec.planner_model(cfg.model, config, torch.bfloat16)
    assert source == "flux1-dev" and len(planned.blocks) == 19 + 38
    assert abs(sum(p.numel() for p in planned.transformer.parameters()) - 11.9e9) < 0.02e9


def test_flux_dev_plan_on_8_gpus(capsys):
    full = _plan_json(capsys, "--model", "flux", "--h", "720", "--w", "720", "--gpus", "8", "--gpu_memory_gb", "80",
                      "--gradient_checkpointing", "--train_micro_batch_size", "4", "--reduce_dtype", "bf16")
    assert full["transformer_config"] == "flux1-dev"
    assert abs(full["transformer_parameters"] - 11.9e9) < 0.05e9  # FLUX.1-dev's transformer: ~11.9B
    parts = full["breakdown_gb"]
    assert set(parts) >= {"parameters", "gradients", "optimizer", "ema", "activations", "rollout", "rewards", "margin"}
    assert abs(sum(parts.values()) - full["memory_per_gpu_gb"]) < 1e-6
    # fp32 master weights + AdamW sharded over 8: 12 bytes x 11.9B / 8 = 16.6 GiB before gathers and buffers
    assert 16.0 < parts["parameters"] + parts["optimizer"] < 19.0
    # one optimizer step over all micro-batches: FSDP2 holds the unsharded bf16 gradient between them
    assert parts["unsharded_grad_accumulation"] == pytest.approx(2 * 11.9014e9 / memory.GB, rel=1e-3)
    assert full["fits"] and full["max_train_micro_batch_size"] >= 4


def test_wan_counts_and_lora():
    m_small, facts_small = memory_model(config_from_flags({"model": "wan"}, validate="none"), {"nodes": 219}, 8,
                                        None, "wan2.1-t2v-1.3b")
    assert 1.35e9 < facts_small["transformer_parameters"] < 1.5e9
    cfg = config_from_flags({"model": "wan_i2v"}, validate="none")
    config, source = cfg.model.spec.planner_config(cfg.model)
    planned = cfg.model.spec.planner_model(cfg.model, config, torch.bfloat16)  # built only: no trace
    assert source == "wan2.1-i2v-14b" and len(planned.blocks) == 40
    assert 16.0e9 < sum(p.numel() for p in planned.transformer.parameters()) < 17.0e9
    assert 0 < lora_parameters(planned.transformer, planned.lora_targets, 32) < 0.2e9
    # without checkpointing a micro-batch needs far more than with it
    m_small.checkpointed_blocks = 30
    assert memory.activation_bytes(m_small, 1) * 5 < sum(m_small.block_saved)


def test_replayed_blocks_account_like_traced_ones():
    """The trace runs the first block of each kind and replays the rest: the same bytes as running every block."""
    cfg = config_from_flags({"model": "toy"}, validate="none")
    config, _ = cfg.model.spec.planner_config(cfg.model)
    planned = cfg.model.spec.planner_model(cfg.model, config, torch.bfloat16)
    fast, full = (trace_activations(planned.transformer, planned.blocks, planned.inputs(3), 3, replay=r)
                  for r in (True, False))
    assert fast == full and len(set(full.block_saved[1:])) == 1 and full.block_saved[0] > 0


def test_toy_plan_json_and_budget(capsys):
    out = _plan_json(capsys, "--gpus", "1", "--gpu_memory_gb", "2", "--train_micro_batch_size", "4")
    assert out["transformer_parameters"] == 259332 and out["leaves"] == 16
    # the toy's parts are megabytes: the fixed margin (1.5 GiB) dominates; 2 GiB fits, 1 GiB does not
    assert out["fits"] and out["max_train_micro_batch_size"] > 1000
    small = _plan_json(capsys, "--gpus", "1", "--gpu_memory_gb", "1")
    assert not small["fits"] and small["max_train_micro_batch_size"] == 0


@pytest.mark.parametrize("flags,message", [(["--gpu_memory_gb", "-3"], "--gpu_memory_gb -3"),
                                           (["--gpus", "0"], "--gpus 0"),
                                           (["--gpus", "2", "--transformer_config", "nope"],
                                            "--transformer_config nope")])
def test_bad_memory_flags(flags, message, capsys):
    assert plan.main(["--model", "toy", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _tiny(model: str, tmp_path, checkpointing: bool):
    from branchgrpo.testing.flux_tiny import TRANSFORMER_CONFIG as FLUX
    from branchgrpo.testing.wan_tiny import TRANSFORMER_CONFIG as WAN

    config, sizes = {"flux": (FLUX, {"h": 256, "w": 256}), "wan": (WAN, {"h": 64, "w": 64, "num_frames": 9})}[model]
    path = tmp_path / f"{model}.json"
    path.write_text(json.dumps(config))
    flags = {"model": model, **sizes, "mixed_precision": "fp32", "gradient_checkpointing": checkpointing}
    return config_from_flags(flags, validate="none"), str(path), config


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_activation_model_matches_measured_peak(model, tmp_path):
    """Predicted (activations of the micro-batch + fp32 gradients) vs the allocator's peak over one forward +
    backward of the same tiny transformer on CPU, with and without checkpointing, within 25%."""
    batch = 4
    for checkpointing in (False, True):
        cfg, path, config = _tiny(model, tmp_path, checkpointing)
        m, _ = memory_model(cfg, {"nodes": 1}, 1, 0.0, path, text_tokens=16)
        predicted = memory.activation_bytes(m, batch) + 4 * m.num_trainable
        torch.manual_seed(0)
        real = cfg.model.spec.planner_model(cfg.model, config, torch.float32, "cpu", text_tokens=16)
        if checkpointing:
            apply_activation_checkpointing(real.transformer, real.blocks)
        inputs = real.inputs(batch)

        def step():
            out = real.transformer(**inputs)
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()

        measured = allocation_peak_bytes(step)
        print(f"{model} checkpointing={checkpointing}: predicted {predicted} measured {measured}")
        assert abs(predicted / measured - 1) < 0.25, (model, checkpointing, predicted, measured)
