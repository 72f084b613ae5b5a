"""The memory planner's arithmetic: per-GPU bytes of a training run from counts, dtypes and traced activations.

Pure functions of numbers (no torch): the parameter counts and the activation bytes per sample come from the
backbone's transformer built on the meta device (branchgrpo/planner/trace.py, `PlannerSupport.planner_model`), the
rollout's node count from the algorithm's plan. What each part assumes:

- parameters: every weight in the master dtype (`--master_weight_type`), sharded over the GPUs under FSDP2; FSDP2
  all-gathers one block at a time in the compute dtype and prefetches the next (2 blocks), plus the parameters
  outside the blocks (the root unit). Unsharded with autocast, the forward caches a compute-dtype copy of every
  trained weight (autocast's weight cache).
- gradients: the trained parameters in the master dtype (sharded under FSDP2), plus the unsharded gradients of the
  block being reduce-scattered (2 blocks, in `--reduce_dtype`); DDP adds its buckets (one more copy).
- gradient accumulation without sync: with more than one micro-batch per optimizer step (the trainer's default,
  `--gradient_accumulation_steps 0`, is one step per iteration over all its micro-batches), FSDP2 skips the
  reduce-scatter on all but the last micro-batch (`set_requires_gradient_sync(False)`) and keeps each parameter's
  UNSHARDED gradient until then, in `--reduce_dtype`: a full gradient of the trained parameters on every GPU, not
  1/N of it. Costly for a full fine-tune (FLUX.1-dev in fp32: 44 GiB per GPU), negligible for LoRA;
  `--reduce_dtype bf16` halves it, and one optimizer step per micro-batch (`--gradient_accumulation_steps 1`)
  avoids it at the price of more optimizer steps.
- optimizer: AdamW's two moments per trained parameter, in the master dtype.
- EMA: fp32 per trained parameter; on the device only with `--ema_device device` (else host memory, reported apart).
- reference: the frozen copy the KL term needs for a full fine-tune (LoRA's reference is the adapters switched off).
- activations: what one training micro-batch saves for its backward (traced per block); a checkpointed block keeps
  only its inputs, and its backward recomputes it, so the largest checkpointed block's activations come back once.
- rollout: the latents of every node of the rank's rollout graphs, fp32, alive through the update.
- rewards: the reward models resident on each GPU (a figure passed in).
- margin: `margin_fraction` of the rest plus a fixed amount for the CUDA context, kernels and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024 ** 3  # the planner reports GiB, as nvidia-smi and torch.cuda do


@dataclass
class MemoryModel:
    num_params: int  # transformer parameters, all
    num_trainable: int  # those trained (all, or LoRA's)
    block_params: list[int]  # parameters per block (FSDP2 unit)
    world_size: int
    sharded: bool  # FSDP2 (else replicated: DDP or one process)
    master_bytes: int  # bytes per parameter of the master weights (4 fp32, 2 bf16)
    compute_bytes: int  # bytes of the compute dtype (2 under bf16 autocast, 4 in fp32)
    reduce_bytes: int  # bytes of the gradient reduce-scatter dtype
    ema: str  # none | cpu | device
    reference_copy: bool  # a frozen copy for the KL term (full fine-tune with --kl_coef > 0)
    block_saved: list[int]  # activation bytes per sample saved by each block (no checkpointing)
    block_inputs: list[int]  # bytes per sample of each block's inputs (what a checkpointed block keeps)
    other_saved: int  # activation bytes per sample saved outside the blocks
    checkpointed_blocks: int  # the first this many blocks are checkpointed (0: off)
    rollout_latents: int  # latent elements stored per rank (nodes x elements per latent)
    reward_bytes: float
    parents_per_rank: int = 1  # distinct parents trained per rank and iteration (the update's forwards)
    accumulation_steps: int = 0  # micro-batches per optimizer step (0: all of the iteration's)
    margin_fraction: float = 0.10
    margin_fixed_bytes: float = 1.5 * GB


def activation_bytes(m: MemoryModel, micro_batch: int) -> float:
    """Saved activations of one training micro-batch of `micro_batch` samples (parents)."""
    k = m.checkpointed_blocks
    kept = m.other_saved + sum(m.block_inputs[:k]) + sum(m.block_saved[k:])
    recompute = max(m.block_saved[:k], default=0)
    return micro_batch * (kept + recompute)


def breakdown(m: MemoryModel, micro_batch: int) -> dict[str, float]:
    """Bytes per GPU by part (the keys of `--json`'s breakdown_gb)."""
    shard = m.world_size if m.sharded else 1
    gathered = 0.0
    if m.sharded and m.world_size > 1:
        root = m.num_params - sum(m.block_params)
        gathered = (2 * max(m.block_params, default=0) + root) * m.compute_bytes
    elif m.compute_bytes != m.master_bytes:
        gathered = m.num_trainable * m.compute_bytes  # autocast's cache of cast weights
    trainable_fraction = m.num_trainable / max(1, m.num_params)
    if m.sharded and m.world_size > 1:
        grad_buffers = 2 * max(m.block_params, default=0) * trainable_fraction * m.reduce_bytes
    else:
        grad_buffers = m.num_trainable * m.master_bytes if m.world_size > 1 else 0.0  # DDP buckets
    return {
        "parameters": m.num_params * m.master_bytes / shard + gathered,
        "gradients": m.num_trainable * m.master_bytes / shard + grad_buffers,
        "unsharded_grad_accumulation": _no_sync_bytes(m, micro_batch),
        "optimizer": 2 * m.num_trainable * m.master_bytes / shard,
        "ema": 4 * m.num_trainable / shard if m.ema == "device" else 0.0,
        "reference": m.num_params * m.master_bytes / shard if m.reference_copy else 0.0,
        "activations": activation_bytes(m, micro_batch),
        "rollout": 4 * m.rollout_latents,
        "rewards": m.reward_bytes,
    }


def _no_sync_bytes(m: MemoryModel, micro_batch: int) -> float:
    if not (m.sharded and m.world_size > 1):
        return 0.0
    window = m.accumulation_steps or -(-m.parents_per_rank // micro_batch)  # ceil: micro-batches per iteration
    return m.num_trainable * m.reduce_bytes if window > 1 else 0.0


def total_bytes(m: MemoryModel, micro_batch: int) -> tuple[float, dict[str, float]]:
    parts = breakdown(m, micro_batch)
    margin = m.margin_fraction * sum(parts.values()) + m.margin_fixed_bytes
    parts["margin"] = margin
    return sum(parts.values()), parts


def max_micro_batch(m: MemoryModel, budget_bytes: float, limit: int = 4096) -> int:
    """The largest micro-batch (parents per training forward) whose total fits `budget_bytes`; 0 if none."""
    lo, hi = 0, limit
    while lo < hi:  # the total grows with the micro-batch: bisect for the last that fits
        mid = (lo + hi + 1) // 2
        if total_bytes(m, mid)[0] <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def host_ema_bytes(m: MemoryModel) -> float:
    """Host memory per process of a CPU EMA (fp32 per trained parameter of its shard)."""
    return 4 * m.num_trainable / (m.world_size if m.sharded else 1) if m.ema == "cpu" else 0.0
