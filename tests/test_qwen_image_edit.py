"""Qwen-Image-Edit (`--model qwen_image_edit`) against diffusers' QwenImageEditPipeline on a tiny random checkpoint
(CPU, offline).

Parity: ODE rollouts (eta = 0) of 2, 3 and 4 steps through the trainer's own `run_rollout` and velocity closure, on
the checkpoint's dynamic schedule, conditioned on what our prompt encoder stores (instruction and source through
Qwen2.5-VL with the edit template, the negative prompt with the same source, the source's packed latents), equal
QwenImageEditPipeline given the same source image, instruction and negative-prompt STRINGS (it encodes them and the
source itself) and the same noise, with true CFG 4.0, to <= 1e-5. The pipeline resizes every source to about
1024 x 1024 pixels, so the sources go in at that size (4096 source tokens after the 4 generated ones); it takes one
source image per call, so it runs once per prompt.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.config.sections import ModelConfig
from branchgrpo.core import plans, sde
from branchgrpo.core.rollout import NoiseKeys, run_rollout
from branchgrpo.data.preprocess import read_prompts
from branchgrpo.models import get_backbone
from branchgrpo.models.base import velocity_fn
from branchgrpo.models.qwen_image_edit import source_resolution

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
ASSET_PROMPTS = REPO / "assets" / "edit_prompts.jsonl"
SIZE = 32  # 2 x 2 generated tokens of the tiny VAE's 4 x 4 latent
NEGATIVE = "blurry, low quality"
MAX_SEQ = 64
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_image_edit") / "qwen_image_edit"
    make_tiny("qwen_image_edit", str(folder))  # what `python -m branchgrpo.make_tiny qwen_image_edit DIR` runs
    return folder


@pytest.fixture(scope="module")
def spec():
    return get_backbone("qwen_image_edit")


@pytest.fixture(scope="module")
def records():
    return read_prompts(ASSET_PROMPTS, "jsonl", image_size=(1024, 1024)).items[:2]


def _settings(**overrides):
    return SimpleNamespace(**{**dict(dtype="auto", max_sequence_length=MAX_SEQ, h=SIZE, w=SIZE,
                                     source_size="preferred", negative_prompt=NEGATIVE), **overrides})


@pytest.fixture(scope="module")
def cond(edit_dir, spec, records):
    with torch.no_grad():
        return spec.prompt_encoder(str(edit_dir), "cpu", _settings())(records)


def _model_cfg(folder, **flags):
    return ModelConfig.for_backbone("qwen_image_edit", str(folder), h=SIZE, w=SIZE, **flags)


@pytest.fixture
def adapter(edit_dir, spec):
    """A fresh adapter per test (LoRA tests modify theirs)."""
    return spec.load(_model_cfg(edit_dir), "cpu")


@pytest.fixture(scope="module")
def pipe(edit_dir):
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline.from_pretrained(str(edit_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rollout(adapter, cond, steps):
    """The trainer's sampler at eta = 0 on the dynamic schedule (one ODE chain per prompt): (noise, final, sigmas)."""
    sigmas = sde.make_sigmas(steps, mu=adapter.mu(), shift_terminal=adapter.shift_terminal)
    graph = run_rollout(plans.group_plan(steps, 1, sde_steps=[]), velocity_fn(adapter, cond), sigmas,
                        sde.Kernel("dance", 0.3), NoiseKeys(0, 0, tuple(range(len(cond["image_latents"])))),
                        adapter.latent_shape, "cpu", keep_all_latents=True)
    return graph.node_latents(torch.nonzero(graph.parent < 0).flatten()), graph.node_latents(graph.leaves), sigmas


def _source(record):
    from diffusers.utils import load_image

    return load_image(str(record.image))


def _pipeline(pipe, record, noise, steps, guidance=4.0):
    """QwenImageEditPipeline on one source image, encoding instruction, negative prompt and source itself."""
    out = pipe(image=_source(record), prompt=record.text, negative_prompt=NEGATIVE, true_cfg_scale=guidance,
               latents=noise.clone(), num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent")
    return out.images, pipe.scheduler.sigmas


# ----- the backbone against the pipeline ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 3, 4])
def test_rollout_matches_qwen_image_edit_pipeline(pipe, cond, records, adapter, steps):
    noise, ours, sigmas = _rollout(adapter, cond, steps)
    assert ours.shape == (2, 4, 64) and adapter.guidance_scale == 4.0 and adapter.source_grid == (1, 64, 64)
    for row, record in enumerate(records):
        ref, ref_sigmas = _pipeline(pipe, record, noise[row : row + 1], steps)
        torch.testing.assert_close(ref_sigmas.double(), sigmas, atol=1e-6, rtol=0)
        assert (ours[row] - noise[row]).abs().max() > 0.1  # the sampler moved
        print(f"steps {steps} row {row}: max abs diff {(ours[row : row + 1] - ref).abs().max().item():.3g}")
        assert (ours[row : row + 1] - ref).abs().max().item() <= PARITY_ATOL
    # the source enters: the prompts' source latents swapped, the rollout changes
    swapped = {**cond, "image_latents": cond["image_latents"].flip(0)}
    assert (_rollout(adapter, swapped, steps)[1] - ours).abs().max() > 100 * PARITY_ATOL
