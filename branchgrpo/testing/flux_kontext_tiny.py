"""A tiny random FLUX.1-Kontext-style pipeline in diffusers layout, built offline (tests, CPU smoke runs).

FLUX.1-Kontext-dev has FLUX.1-dev's parts and shapes (the same FluxTransformer2DModel configuration, VAE, CLIP and
T5 encoders; only the transformer's weights and the pipeline differ), so the tiny FLUX pipeline's parts
(branchgrpo/testing/flux_tiny.py) are saved as a `FluxKontextPipeline`: its model_index.json names that pipeline,
as the real checkpoint's does.
"""

from __future__ import annotations

from pathlib import Path

from branchgrpo.testing.flux_tiny import build_tiny_flux_pipeline


def build_tiny_flux_kontext_pipeline(seed: int = 0):
    """The tiny FluxKontextPipeline in memory (random weights drawn from `seed`)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**build_tiny_flux_pipeline(seed).components)


def make_tiny_flux_kontext(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `out_dir` in diffusers layout (safetensors); returns the folder."""
    out = Path(out_dir)
    build_tiny_flux_kontext_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out
