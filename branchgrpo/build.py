"""Building the training objects from a config: LoRA, parallelism, precision, optimizer, LR schedule, reference
policy. Kept apart from the loop so that trainer.py reads like the paper."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from branchgrpo import parallel
from branchgrpo.distributed import DistInfo
from branchgrpo.models.base import FlowAdapter
from branchgrpo.models.lora import lora_disabled

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: nn.Module  # what the optimizer and backward see (DDP-wrapped, FSDP2-sharded or plain)
    bare: nn.Module  # the module the rollout calls (no DDP wrapper: no collectives during sampling)
    mode: str  # none | ddp | fsdp
    autocast: Callable[[], contextlib.AbstractContextManager]
    reference: Callable[[], contextlib.AbstractContextManager] | None  # adapter.velocity = reference policy inside


def resolve_precision(cfg, device: torch.device) -> torch.dtype | None:
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def using_module(adapter: FlowAdapter, module: nn.Module):
    """Temporarily point the adapter at another module (the bare one for rollouts, a frozen copy for KL)."""
    previous = adapter.transformer
    adapter.transformer = module
    try:
        yield
    finally:
        adapter.transformer = previous


def prepare_model(adapter: FlowAdapter, cfg, info: DistInfo) -> Prepared:
    """LoRA -> frozen reference copy (KL, full fine-tune) -> activation checkpointing -> FSDP2 | DDP."""
    if cfg.use_lora:
        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] or None
        adapter.add_lora(cfg.lora_rank, cfg.lora_alpha, targets)
    module = adapter.transformer
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("nothing to train: every parameter of the backbone is frozen")

    reference = None
    frozen_copy = None
    if cfg.kl_coef > 0:
        if cfg.use_lora:
            reference = lambda: lora_disabled(module)  # noqa: E731 - the base model is the adapters switched off
        else:
            frozen_copy = copy.deepcopy(module).requires_grad_(False).eval()

    mode = cfg.parallel
    if mode == "auto":
        mode = "none" if info.world_size == 1 else adapter.default_parallel
    if mode != "none" and info.world_size == 1:
        log.info("--parallel %s with a single process: running without a wrapper", mode)
        mode = "none"
    blocks = adapter.blocks()
    if cfg.gradient_checkpointing:
        if not blocks:
            raise ValueError(f"--gradient_checkpointing: the {adapter.name} backbone declares no blocks")
        n = parallel.apply_activation_checkpointing(module, blocks, cfg.selective_checkpointing)
        log.info("activation checkpointing on %d of %d blocks", n, len(blocks))
    precision = resolve_precision(cfg, info.device)
    model = module
    if mode == "fsdp":
        units = parallel.checkpointed_blocks(module, blocks)
        parallel.apply_fsdp(module, units, param_dtype=precision, cpu_offload=cfg.use_cpu_offload)
        if frozen_copy is not None:
            parallel.apply_fsdp(frozen_copy, [u for u in frozen_copy.modules() if type(u) in {type(b) for b in blocks}],
                                param_dtype=precision)
    elif mode == "ddp":
        model = parallel.apply_ddp(module, info.device)
        adapter.transformer = model
    if frozen_copy is not None:
        reference = lambda: using_module(adapter, frozen_copy)  # noqa: E731

    if precision is not None:
        autocast = lambda: torch.autocast(info.device.type, dtype=precision)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    return Prepared(model=model, bare=module, mode=mode, autocast=autocast, reference=reference)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def lr_lambda(cfg, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step s: linear warmup, then the chosen decay over the rest."""
    warmup = cfg.lr_warmup_steps
    kind = cfg.lr_scheduler

    def factor(step: int) -> float:
        if kind != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "cosine_with_restarts":
            return 0.5 * (1.0 + math.cos(math.pi * ((cfg.lr_num_cycles * progress) % 1.0)))
        return (1.0 - progress) ** cfg.lr_power  # polynomial

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
