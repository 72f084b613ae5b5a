"""The optimizer and its learning-rate schedule, from the optimisation section of the config."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim_cfg.learning_rate, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
                             eps=optim_cfg.adam_epsilon, weight_decay=optim_cfg.weight_decay)


def lr_lambda(optim_cfg, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step s: linear warmup, then the chosen decay over the rest."""
    warmup = optim_cfg.lr_warmup_steps
    kind = optim_cfg.lr_scheduler

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
            return 0.5 * (1.0 + math.cos(math.pi * ((optim_cfg.lr_num_cycles * progress) % 1.0)))
        return (1.0 - progress) ** optim_cfg.lr_power  # polynomial

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int):
    """The LR schedule over the run's `total_steps` optimizer steps; a warm-up that does not end before the run does
    is warned about (the LR would never reach --learning_rate)."""
    warmup = optim_cfg.lr_warmup_steps
    if optim_cfg.lr_scheduler != "constant" and warmup >= total_steps:
        log.warning("--lr_warmup_steps %d is not shorter than the run's %d optimizer steps: the learning rate never "
                    "reaches --learning_rate %g (at most %.3g of it); shorten the warm-up", warmup, total_steps,
                    optim_cfg.learning_rate, total_steps / (warmup + 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_cfg, total_steps))
