"""The memory half of `python -m branchgrpo.plan`: per-GPU memory of a configuration, before renting GPUs.

`plan_memory` builds the backbone's transformer from a shipped config on the meta device (its spec's
`planner_model`, models/support.py `PlannerSupport`), traces what one training forward saves (branchgrpo/planner/trace.py), and hands the counts to the
arithmetic of branchgrpo/planner/memory.py. GPU runs are assumed: bf16 autocast unless `--mixed_precision fp32`.
"""

from __future__ import annotations

import torch

from branchgrpo.models.support import PlannerSupport, require_support
from branchgrpo.planner import memory
from branchgrpo.planner.trace import lora_parameters, trace_activations

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2}


def check_memory_flags(extras) -> tuple[int, float]:
    gpus = 1 if extras.gpus is None else extras.gpus
    budget = 80.0 if extras.gpu_memory_gb is None else extras.gpu_memory_gb
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: need at least 1")
    if not budget > 0:
        raise ValueError(f"--gpu_memory_gb {extras.gpu_memory_gb:g}: need a positive number of GiB")
    if extras.reward_memory_gb is not None and extras.reward_memory_gb < 0:
        raise ValueError(f"--reward_memory_gb {extras.reward_memory_gb}: need >= 0")
    return gpus, budget


def memory_model(cfg, counts: dict, gpus: int, reward_gb: float | None, config_name: str | None,
                 device: str = "meta", text_tokens: int | None = None) -> tuple[memory.MemoryModel, dict]:
    """The MemoryModel of a TrainConfig on `gpus` GPUs, and facts for the report (parameter counts, config)."""
    spec, par = require_support(cfg.model.spec, PlannerSupport, "the memory planner"), cfg.parallel
    config, source = spec.planner_config(cfg.model, config_name)
    compute = par.compute_dtype(torch.device("cuda")) or torch.float32
    kwargs = {} if text_tokens is None else {"text_tokens": text_tokens}
    planned = spec.planner_model(cfg.model, config, compute, device, **kwargs)
    model = planned.transformer
    num_params = sum(p.numel() for p in model.parameters())
    trace = trace_activations(model, planned.blocks, planned.inputs(1), 1)
    lora = cfg.model.use_lora
    # what trains: every parameter, or LoRA's, except in the parts the backbone built frozen
    trainable = (lora_parameters(model, cfg.model.lora_targets or planned.lora_targets, cfg.model.lora_rank)
                 if lora else sum(p.numel() for p in model.parameters() if p.requires_grad))
    mode = par.parallel
    if mode == "auto":
        mode = "none" if gpus == 1 else spec.default_parallel
    sharded = mode == "fsdp" and gpus > 1
    num_ckpt = round(par.selective_checkpointing * len(planned.blocks)) if par.gradient_checkpointing else 0
    if reward_gb is None:
        reward_gb = 4.0 if spec.is_large else 0.0
    m = memory.MemoryModel(
        num_params=num_params + (trainable if lora else 0), num_trainable=trainable, block_params=trace.block_params,
        world_size=gpus, sharded=sharded, master_bytes=DTYPE_BYTES[par.master_dtype],
        compute_bytes=DTYPE_BYTES[compute],
        reduce_bytes=DTYPE_BYTES[par.gradient_reduce_dtype], ema=cfg.optim.ema_device if cfg.optim.use_ema else "none",
        reference_copy=cfg.loss.kl_coef > 0 and not lora, block_saved=trace.block_saved,
        block_inputs=trace.block_inputs, other_saved=trace.other_saved, checkpointed_blocks=num_ckpt,
        rollout_latents=counts["nodes"] * cfg.data.train_batch_size * planned.latent_numel,
        reward_bytes=reward_gb * memory.GB, accumulation_steps=cfg.optim.gradient_accumulation_steps,
        parents_per_rank=counts.get("train_forward_passes", 1) * cfg.data.train_batch_size)
    facts = {"transformer_config": source, "transformer_parameters": num_params, "trainable_parameters": trainable,
             "parallel": mode, "blocks": len(planned.blocks), "checkpointed_blocks": num_ckpt,
             "sample": planned.description, "compute_dtype": str(compute).replace("torch.", "")}
    return m, facts


def plan_memory(cfg, counts: dict, extras) -> dict:
    gpus, budget_gb = check_memory_flags(extras)
    m, facts = memory_model(cfg, counts, gpus, extras.reward_memory_gb, extras.transformer_config)
    micro = cfg.optim.train_micro_batch_size
    total, parts = memory.total_bytes(m, micro)
    fits = total <= budget_gb * memory.GB
    return {**facts, "gpus": gpus, "gpu_memory_gb": budget_gb, "train_micro_batch_size": micro,
            "memory_per_gpu_gb": total / memory.GB, "breakdown_gb": {k: v / memory.GB for k, v in parts.items()},
            "host_ema_gb_per_process": memory.host_ema_bytes(m) / memory.GB,
            "activation_gb_per_sample": memory.activation_bytes(m, 1) / memory.GB,
            "fits": fits, "max_train_micro_batch_size": memory.max_micro_batch(m, budget_gb * memory.GB)}


def format_memory(r: dict) -> str:
    head = (f"memory per GPU, {r['gpus']} x {r['gpu_memory_gb']:g} GiB, {r['parallel']}, {r['compute_dtype']} compute "
            f"({r['transformer_config']}: {r['transformer_parameters'] / 1e9:.3f}B parameters, "
            f"{r['trainable_parameters'] / 1e6:.1f}M trained; {r['checkpointed_blocks']} of {r['blocks']} blocks "
            f"checkpointed; a sample is {r['sample']}):")
    rows = [(k, f"{v:8.2f} GiB") for k, v in r["breakdown_gb"].items()]
    rows.append(("total", f"{r['memory_per_gpu_gb']:8.2f} GiB  at --train_micro_batch_size "
                          f"{r['train_micro_batch_size']}: {'fits' if r['fits'] else 'does NOT fit'}"))
    rows.append(("largest micro-batch that fits", str(r["max_train_micro_batch_size"])))
    if r["host_ema_gb_per_process"]:
        rows.append(("host memory per process (EMA)", f"{r['host_ema_gb_per_process']:.2f} GiB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])
