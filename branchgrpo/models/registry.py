"""Backbone name -> adapter, from the training config (the only place that knows every backbone)."""

from __future__ import annotations

import torch

from branchgrpo.models.base import FlowAdapter


def load_adapter(cfg, device: torch.device) -> FlowAdapter:
    dtype = torch.bfloat16 if cfg.master_weight_type == "bf16" else torch.float32
    if cfg.model == "toy":
        from branchgrpo.models.toy import load_toy

        adapter = load_toy(cfg.pretrained_model_name_or_path, device)
        adapter.transformer.to(dtype)
        return adapter
    if cfg.model == "flux":
        from branchgrpo.models.flux import load_flux

        return load_flux(cfg.pretrained_model_name_or_path, device, dtype=dtype, height=cfg.h or 720,
                         width=cfg.w or 720, guidance_scale=3.5 if cfg.guidance_scale is None else cfg.guidance_scale)
    if cfg.model == "wan":
        from branchgrpo.models.wan import load_wan

        return load_wan(cfg.pretrained_model_name_or_path, device, dtype=dtype, height=cfg.h or 480,
                        width=cfg.w or 832, num_frames=cfg.num_frames or 33,
                        guidance_scale=5.0 if cfg.guidance_scale is None else cfg.guidance_scale)
    raise ValueError(f"--model: unknown backbone '{cfg.model}'")


def schedule_mu(cfg, adapter: FlowAdapter) -> float | None:
    """The dynamic-shift mu for --time_shift dynamic (the adapter knows its resolution), else None."""
    if cfg.time_shift != "dynamic":
        return None
    if not hasattr(adapter, "mu"):
        raise ValueError(f"--time_shift dynamic: the {adapter.name} backbone has no resolution-dependent shift")
    return adapter.mu() if callable(adapter.mu) else adapter.mu
