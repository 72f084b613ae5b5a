"""Wan2.2 TI2V-5B (per-token timesteps, the 48-channel Wan2.2 VAE) against diffusers' WanPipeline and
WanImageToVideoPipeline with `expand_timesteps`, on a tiny random checkpoint (CPU, offline).

Parity: the trainer's rollout code (`run_rollout` on one ODE chain) from the same noise agrees with the pipeline to
<= 1e-5 absolute in fp32 at 2, 3 and 4 steps with classifier-free guidance 5.0, text-to-video and image-to-video
(there: our latents are the generated frames; the pipeline's first frame is the condition, compared too). The
scheduler is handed our unshifted grid, as in tests/test_wan.py.
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
from branchgrpo.core import sde
from branchgrpo.data.preprocess import PromptRecord
from branchgrpo.models import get_backbone
from branchgrpo.models.base import decode_media
from branchgrpo.models.wan import DEFAULT_NEGATIVE_PROMPT, WanAdapter, load_wan
from branchgrpo.models.wan22_ti2v import Wan22TI2VAdapter, Wan22TI2VImageAdapter

from trainer_utils import ode_chains

pytestmark = pytest.mark.slow  # every test builds or loads the tiny pipeline

FRAMES, HEIGHT, WIDTH = 9, 32, 64  # 3 latent frames of 2 x 4 (1 x 2 tokens each)
PROMPTS = ["a red cat sitting on a wooden table", "an astronaut riding a horse in the desert at sunset"]
MAX_SEQ = 16
SHIFT = 5.0
GUIDANCE = 5.0
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti2v") / "ti2v"
    make_tiny("wan22_ti2v", str(folder))
    return folder


@pytest.fixture(scope="module")
def pipes(ti2v_dir):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    t2v = WanPipeline.from_pretrained(str(ti2v_dir), local_files_only=True)
    i2v = WanImageToVideoPipeline.from_pretrained(str(ti2v_dir), local_files_only=True, image_encoder=None,
                                                  image_processor=None)
    for pipe in (t2v, i2v):
        pipe.set_progress_bar_config(disable=True)
    assert t2v.config.expand_timesteps and i2v.config.expand_timesteps
    return t2v, i2v


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("frames")
    paths = []
    for i, seed in enumerate((1, 2)):
        pixels = (torch.rand(HEIGHT * 2, WIDTH * 2, 3, generator=torch.Generator().manual_seed(seed)) * 255)
        path = folder / f"frame{i}.png"
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)
        paths.append(path)
    return paths


def _encoder(ti2v_dir, model, **sizes):
    settings = SimpleNamespace(max_sequence_length=MAX_SEQ, dtype="fp32", negative_prompt=None,
                               **{"h": HEIGHT, "w": WIDTH, **sizes})
    return get_backbone(model).prompt_encoder(str(ti2v_dir), "cpu", settings)


@pytest.fixture(scope="module")
def cond(ti2v_dir, images):
    """Our preprocessing's per-prompt tensors (image-to-video's: text + first frame + its latents) and the negative
    prompt's embedding, one row per prompt."""
    encode = _encoder(ti2v_dir, "wan22_ti2v_i2v")
    records = [PromptRecord(text, (path,), (path.name,), i + 1) for i, (text, path) in enumerate(zip(PROMPTS, images))]
    out = encode(records)
    out["negative_prompt_embeds"] = encode.extras()["negative_prompt_embeds"][None].expand(2, -1, -1)
    return out


def _load(folder, adapter_class=Wan22TI2VAdapter, **kwargs):
    return load_wan(str(folder), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=GUIDANCE,
                    adapter_class=adapter_class, **kwargs)


def _rollout(adapter, cond, steps):
    """The trainer's rollout code on one ODE chain per prompt: (initial noise, final latents)."""
    return ode_chains(adapter, cond, sde.make_sigmas(steps, shift=SHIFT), 2, seed=5, batch_size=8)


def _our_grid(pipe, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    set_timesteps = scheduler.set_timesteps
    unshifted = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
    scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(n, device=device, sigmas=unshifted)
    pipe.scheduler = scheduler


def _sizes(steps):
    return dict(num_inference_steps=steps, guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                output_type="latent", max_sequence_length=MAX_SEQ)


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_text_to_video_rollout_matches_the_pipeline(ti2v_dir, pipes, cond, steps):
    adapter = _load(ti2v_dir)
    x, ours = _rollout(adapter, cond, steps)
    t2v, _ = pipes
    _our_grid(t2v, steps)
    ref = t2v(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
              latents=x.clone(), **_sizes(steps)).frames
    assert (ours - x).abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_image_to_video_rollout_matches_the_pipeline(ti2v_dir, pipes, cond, images, steps):
    """Our latents are the generated frames; the pipeline's hold the condition in front of them (its final
    overwrite), which is our stored `image_latents`. Its first-frame noise is never used: any value gives the same."""
    from PIL import Image

    adapter = _load(ti2v_dir, Wan22TI2VImageAdapter)
    x, ours = _rollout(adapter, cond, steps)
    _, i2v = pipes
    _our_grid(i2v, steps)
    first = torch.full((2, x.shape[1], 1, *x.shape[3:]), 7.0)  # overwritten by the condition before any use
    ref = torch.cat([i2v(image=Image.open(path).convert("RGB"), prompt_embeds=cond["prompt_embeds"][i:i + 1],
                         negative_prompt_embeds=cond["negative_prompt_embeds"][i:i + 1],
                         latents=torch.cat([first[i:i + 1], x[i:i + 1]], dim=2), **_sizes(steps)).frames
                     for i, path in enumerate(images)])
    assert (ours - x).abs().max() > 0.1
    assert (ref[:, :, :1] - cond["image_latents"]).abs().max().item() <= 1e-6  # the condition we store
    assert (ours - ref[:, :, 1:]).abs().max().item() <= PARITY_ATOL


def test_per_token_timesteps_and_the_given_frame(ti2v_dir, cond):
    """The transformer sees one timestep per token - t on generated frames, 0 on the given one - and the given
    frame's latents in front; the velocity covers only the generated frames, whose values it depends on."""
    adapter = _load(ti2v_dir, Wan22TI2VImageAdapter)
    assert adapter.latent_shape == (48, 2, 2, 4)
    seen = []
    adapter.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = adapter.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert v.shape == x.shape
    inputs = seen[0]
    timestep = inputs["timestep"]  # [cond; negative] rows of 3 frames x 2 tokens
    assert timestep.shape == (4, 6)
    assert torch.equal(timestep[:, :2], torch.zeros(4, 2))
    assert torch.allclose(timestep[:, 2:], torch.tensor([900.0, 400.0, 900.0, 400.0])[:, None].expand(4, 4))
    assert torch.equal(inputs["hidden_states"][:2, :, :1], cond["image_latents"])
    assert torch.equal(inputs["hidden_states"][:2, :, 1:], x)
    with torch.no_grad():
        video = decode_media(adapter, x, {"image_latents": cond["image_latents"]})
    assert video.shape == (2, 3, FRAMES, HEIGHT, WIDTH)
    with torch.no_grad():  # the VAE is causal in time: the first frame is the given frame's decode alone
        given_alone = WanAdapter.decode(adapter, cond["image_latents"])
    torch.testing.assert_close(video[:, :, :1], given_alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="given first frame"):
        adapter.decode(x)


def test_prompt_and_condition_encoding_equal_the_pipelines(ti2v_dir, pipes, cond, images):
    from PIL import Image

    t2v, i2v = pipes
    with torch.no_grad():
        prompt_embeds, negative = t2v.encode_prompt(PROMPTS, negative_prompt=[DEFAULT_NEGATIVE_PROMPT] * 2,
                                                    max_sequence_length=MAX_SEQ)
        assert torch.equal(cond["prompt_embeds"], prompt_embeds)
        assert torch.equal(cond["negative_prompt_embeds"], negative)
        for i, path in enumerate(images):
            pixels = i2v.video_processor.preprocess(Image.open(path).convert("RGB"), height=HEIGHT, width=WIDTH)
            _, condition, mask = i2v.prepare_latents(pixels.float(), 1, 48, HEIGHT, WIDTH, FRAMES, torch.float32,
                                                     "cpu", None, torch.zeros(1, 48, 3, 2, 4))
            assert (condition - cond["image_latents"][i:i + 1]).abs().max().item() <= 1e-6
            assert torch.equal(mask[0, 0, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert cond["first_frame"].shape == (2, 3, HEIGHT, WIDTH) and cond["first_frame"].dtype == torch.uint8


def test_full_export_loads_in_diffusers(ti2v_dir, tmp_path):
    """`export` writes transformer/ that WanTransformer3DModel.from_pretrained loads as the trained module."""
    from diffusers import WanTransformer3DModel

    adapter = _load(ti2v_dir)
    with torch.no_grad():
        adapter.transformer.proj_out.weight.add_(0.01)  # stands in for training
    adapter.export(str(tmp_path / "model"))
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path / "model"), subfolder="transformer")
    base = WanTransformer3DModel.from_pretrained(str(ti2v_dir), subfolder="transformer")
    x = torch.randn(1, 48, 2, 2, 4, generator=torch.Generator().manual_seed(4))
    inputs = dict(hidden_states=x, timestep=torch.full((1, 4), 500.0), encoder_hidden_states=torch.randn(1, 8, 32),
                  return_dict=False)
    with torch.no_grad():
        ours, theirs, before = (m(**inputs)[0] for m in (adapter.transformer, loaded, base))
    assert torch.equal(ours, theirs) and not torch.allclose(theirs, before)


def test_other_backbones_folders_and_bad_sizes_are_refused_in_one_line(ti2v_dir, tmp_path):
    wan21 = tmp_path / "wan21"
    make_tiny("wan", str(wan21))
    with pytest.raises(ValueError, match="wan21: not a Wan2.2 TI2V-5B checkpoint .*expand_timesteps"):
        _load(wan21)
    with pytest.raises(ValueError, match="ti2v: a Wan2.2 TI2V-5B checkpoint .*use --model wan22_ti2v"):
        load_wan(str(ti2v_dir), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)  # --model wan
    no_vae = tmp_path / "no_vae"
    shutil.copytree(ti2v_dir, no_vae, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match="no_vae lacks vae"):
        _load(no_vae)
    with pytest.raises(ValueError, match="--h: 48 is not a multiple of 32"):
        load_wan(str(ti2v_dir), "cpu", height=48, width=WIDTH, num_frames=FRAMES, adapter_class=Wan22TI2VAdapter)
    with pytest.raises(ValueError, match="--w: 80 is not a positive multiple of 32"):
        get_backbone("wan22_ti2v").Config(w=80).validate()
    with pytest.raises(ValueError, match="--num_frames: 1 frames are 1 latent frame"):
        load_wan(str(ti2v_dir), "cpu", height=HEIGHT, width=WIDTH, num_frames=1, adapter_class=Wan22TI2VImageAdapter)
    swapped = tmp_path / "swapped"
    shutil.copytree(ti2v_dir, swapped)
    vae = json.loads((swapped / "vae" / "config.json").read_text())
    (swapped / "vae" / "config.json").write_text(json.dumps({**vae, "z_dim": 16}))
    with pytest.raises(ValueError, match="takes 48 channels but the VAE's 16 latent channels make 16"):
        _load(swapped)


def test_condition_of_another_size_is_refused(ti2v_dir, cond):
    adapter = load_wan(str(ti2v_dir), "cpu", height=HEIGHT, width=WIDTH * 2, num_frames=FRAMES,
                       adapter_class=Wan22TI2VImageAdapter)
    x = torch.zeros(2, *adapter.latent_shape)
    with pytest.raises(ValueError, match="image_latents of shape .* another video size .*--w 128"):
        adapter.velocity(x, torch.ones(2), cond)


def test_planner_counts_the_shipped_config():
    """models/configs/wan2.2-ti2v-5b.json (the release's transformer: 30 blocks of width 3072, FFN 14336, 48
    channels) built on the meta device: 5.0B parameters, as the release says."""
    from branchgrpo.config.sections import ModelConfig

    spec = get_backbone("wan22_ti2v")
    config, _ = spec.planner_config(ModelConfig(model="wan22_ti2v"))
    model_cfg = SimpleNamespace(backbone=spec.Config())
    planned = spec.planner_model(model_cfg, config, torch.bfloat16)
    count = sum(p.numel() for p in planned.transformer.parameters())
    assert count == 4_999_787_712 and abs(count / 5.0e9 - 1) < 0.02
    assert len(planned.blocks) == 30 and planned.latent_numel == 48 * 31 * 44 * 80  # 121 x 704 x 1280
