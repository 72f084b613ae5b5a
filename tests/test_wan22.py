"""Wan2.2 A14B (two experts) against diffusers' WanPipeline with `transformer_2` and `boundary_ratio`, on a tiny
random checkpoint (CPU, offline).

Parity: the trainer's rollout code (`run_rollout` on one ODE chain) from the same noise agrees with the pipeline to
<= 1e-5 absolute in fp32 at 2, 3 and 4 steps, with each expert's own guidance scale (4.0 / 3.0). The steps are
chosen to span the boundary (t = 875 of T2V-A14B): at shift 5 each of 2, 3 and 4 steps has sigmas on both sides,
and the test counts each expert's calls. The scheduler is handed our unshifted grid, as in tests/test_wan.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.core import sde
from branchgrpo.models import get_backbone
from branchgrpo.models.wan import DEFAULT_NEGATIVE_PROMPT, load_wan
from branchgrpo.models.wan22 import load_wan22

from trainer_utils import ode_chains

REPO = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 9, 32, 48
PROMPTS = ["a red cat sitting on a wooden table", "an astronaut riding a horse in the desert at sunset"]
MAX_SEQ = 16
SHIFT = 5.0  # puts sigmas on both sides of the boundary at 2, 3 and 4 steps
HIGH_SCALE, LOW_SCALE = 4.0, 3.0
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22") / "wan22"
    make_tiny("wan22", str(folder))
    return folder


@pytest.fixture(scope="module")
def pipe(wan22_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(wan22_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cond(pipe):
    with torch.no_grad():
        prompt_embeds, negative = pipe.encode_prompt(PROMPTS, negative_prompt=[DEFAULT_NEGATIVE_PROMPT] * 2,
                                                     max_sequence_length=MAX_SEQ)
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}


def _load(folder, **kwargs):
    return load_wan22(str(folder), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=HIGH_SCALE,
                      guidance_scale_2=LOW_SCALE, **kwargs)


@pytest.fixture
def adapter(wan22_dir):
    return _load(wan22_dir)


def _noise(adapter, batch=2, seed=0):
    return torch.randn(batch, *adapter.latent_shape, generator=torch.Generator().manual_seed(seed))


def _pipeline_run(pipe, x, cond, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    set_timesteps = scheduler.set_timesteps
    unshifted = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
    scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(n, device=device, sigmas=unshifted)
    pipe.scheduler = scheduler
    return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                latents=x.clone(), num_inference_steps=steps, guidance_scale=HIGH_SCALE, guidance_scale_2=LOW_SCALE,
                height=HEIGHT, width=WIDTH, num_frames=FRAMES, output_type="latent", max_sequence_length=MAX_SEQ).frames


def _rollout(adapter, cond, steps):
    """The trainer's rollout code on one ODE chain per prompt: (initial noise, final latents)."""
    return ode_chains(adapter, cond, sde.make_sigmas(steps, shift=SHIFT), 2, seed=5, batch_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 3, 4])
def test_rollout_matches_two_expert_pipeline_across_the_boundary(pipe, cond, adapter, steps):
    calls = {"high": 0, "low": 0}
    for name in calls:
        getattr(adapter.transformer, name).register_forward_hook(
            lambda module, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
    x, ours = _rollout(adapter, cond, steps)
    high_steps = int((sde.make_sigmas(steps, shift=SHIFT)[:-1] * 1000 >= 875).sum())
    assert calls == {"high": high_steps, "low": steps - high_steps} and 0 < high_steps < steps  # both experts ran
    ref = _pipeline_run(pipe, x, cond, steps)
    assert (ours - x).abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


def test_each_row_takes_its_experts_prediction_and_scale(adapter, cond):
    """A batch mixing both sides of the boundary: each row is the guided prediction of the expert owning its
    timestep (t >= 875: high, 4.0; below: low, 3.0), as one call per row gives it."""
    x, sigmas = _noise(adapter, batch=3, seed=1), torch.tensor([0.95, 0.875, 0.5])
    rows = {k: v[torch.tensor([0, 1, 0])] for k, v in cond.items()}
    with torch.no_grad():
        mixed = adapter.velocity(x, sigmas, rows)
        by_hand = []
        for i, (expert, scale) in enumerate([("high", HIGH_SCALE), ("high", HIGH_SCALE), ("low", LOW_SCALE)]):
            model = getattr(adapter.transformer, expert)
            args = dict(hidden_states=x[i:i + 1], timestep=sigmas[i:i + 1] * 1000.0, return_dict=False)
            v_cond = model(encoder_hidden_states=rows["prompt_embeds"][i:i + 1], **args)[0]
            v_neg = model(encoder_hidden_states=rows["negative_prompt_embeds"][i:i + 1], **args)[0]
            by_hand.append(v_neg + scale * (v_cond - v_neg))
    torch.testing.assert_close(mixed, torch.cat(by_hand), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        adapter.guidance_scale_2 = 1.0  # the low-noise expert unguided: its row changes, the others do not
        low_unguided = adapter.velocity(x, sigmas, rows)
    torch.testing.assert_close(low_unguided[:2], mixed[:2], atol=1e-6, rtol=1e-6)
    assert (low_unguided[2] - mixed[2]).abs().max() > 1e-3


def test_train_experts_freezes_the_other_expert(wan22_dir):
    only_low = _load(wan22_dir, train_experts="low")
    assert not any(p.requires_grad for p in only_low.transformer.high.parameters())
    assert all(p.requires_grad for p in only_low.transformer.low.parameters())
    only_low.add_lora(rank=2)
    trained = {n for n, p in only_low.transformer.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("low.") and ".lora_" in n for n in trained)
    assert any(n.startswith("high.") and ".lora_" in n for n, _ in only_low.transformer.named_parameters())
    assert len(only_low.blocks()) == 4 and only_low.blocks()[0] is only_low.transformer.high.blocks[0]


@pytest.mark.slow
def test_exports_load_in_the_two_expert_pipeline(wan22_dir, adapter, cond, tmp_path):
    """Full export: transformer/ + transformer_2/ (WanPipeline takes them); LoRA export: one file per expert, loaded
    with `load_lora_weights` (the low-noise one with `load_into_transformer_2`); both reproduce our sampler."""
    from diffusers import WanPipeline, WanTransformer3DModel

    x = _noise(adapter, seed=5)
    adapter.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    _, base = _rollout(_load(wan22_dir), cond, 3)
    x, tuned = _rollout(adapter, cond, 3)
    assert (tuned - base).abs().max() > 1e-2
    lora_file = adapter.export_lora(str(tmp_path / "lora"), adapter.transformer.state_dict())
    adapter.export(str(tmp_path / "full"))

    pipe = WanPipeline.from_pretrained(str(wan22_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=lora_file.name)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights_transformer_2.safetensors",
                           load_into_transformer_2=True)
    assert (_pipeline_run(pipe, x, cond, 3) - tuned).abs().max().item() <= PARITY_ATOL
    experts = {sub: WanTransformer3DModel.from_pretrained(str(tmp_path / "full"), subfolder=sub)
               for sub in ("transformer", "transformer_2")}
    merged = WanPipeline.from_pretrained(str(wan22_dir), local_files_only=True, **experts)
    merged.set_progress_bar_config(disable=True)
    assert (_pipeline_run(merged, x, cond, 3) - tuned).abs().max().item() <= PARITY_ATOL


def test_checkpoints_of_the_other_kind_are_refused(wan22_dir, tmp_path):
    with pytest.raises(ValueError, match="two-expert .*--model wan22"):
        load_wan(str(wan22_dir), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    wan21 = tmp_path / "wan21"
    make_tiny("wan", str(wan21))
    with pytest.raises(FileNotFoundError, match="wan21 lacks transformer_2"):
        _load(wan21)
    shutil.copytree(wan21 / "transformer", wan21 / "transformer_2")
    with pytest.raises(ValueError, match="text-to-video Wan transformer \\(Wan2.1\\).*--model wan "):
        _load(wan21)
    odd = tmp_path / "odd"
    shutil.copytree(wan22_dir, odd)
    config = json.loads((odd / "transformer_2" / "config.json").read_text())
    (odd / "transformer_2" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ValueError, match="transformer/config.json and transformer_2/config.json differ"):
        _load(odd)
    index = json.loads((odd / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ValueError, match="TI2V-5B"):
        _load(odd)
    with pytest.raises(ValueError, match="--train_experts"):
        get_backbone("wan22").Config(train_experts="middle").validate()


def test_prompt_encoder_is_wans(wan22_dir, pipe, tmp_path):
    """Wan2.2 encodes prompts as Wan2.1 (UMT5, 512 tokens, zeroed padding): the preprocessing CLI equals the
    pipeline's `encode_prompt`, negative prompt included."""
    from branchgrpo.cli import preprocess as cli
    from branchgrpo.data.embeddings import EmbeddingStore

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cli.main(["--model", "wan22", "--model_path", str(wan22_dir), "--prompts", str(prompts), "--output_dir",
              str(tmp_path / "emb"), "--max_sequence_length", str(MAX_SEQ), "--device", "cpu"])
    store = EmbeddingStore(tmp_path / "emb")
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt([store.text(i) for i in range(len(store))],
                                              negative_prompt=[DEFAULT_NEGATIVE_PROMPT] * len(store),
                                              max_sequence_length=MAX_SEQ)
    torch.testing.assert_close(store.batch(range(len(store)))["prompt_embeds"], embeds, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(store.extras["negative_prompt_embeds"], negative[0], atol=1e-6, rtol=1e-5)


def test_planner_counts_both_experts():
    """The shipped config (Wan2.2-T2V-A14B's transformer/config.json, the same as Wan2.1-14B's): two experts of
    14.29B, within 2% of the release's 14.3B per expert, both held; one runs per forward."""
    from branchgrpo.config.sections import ModelConfig

    spec = get_backbone("wan22")
    model_cfg = ModelConfig.for_backbone("wan22", None)
    config, _ = spec.planner_config(model_cfg)
    planned = spec.planner_model(model_cfg, config, torch.bfloat16)
    per_expert = [sum(p.numel() for p in getattr(planned.transformer, e).parameters()) for e in ("high", "low")]
    assert per_expert[0] == per_expert[1] and abs(per_expert[0] / 14.3e9 - 1) < 0.02
    assert len(planned.blocks) == 80 and planned.inputs(1)["expert"] == "high"


# ----- image-to-video: Wan2.2 I2V-A14B (boundary 0.9, 36 input channels, no CLIP image tokens) ---------------------

I2V_FRAMES, I2V_HEIGHT, I2V_WIDTH = 9, 48, 80  # 5:3, within 10% of the asset frames' aspect ratio
I2V_HIGH, I2V_LOW = 3.5, 2.0  # distinct, so that a row guided with the other expert's scale shows


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22_i2v") / "wan22_i2v"
    make_tiny("wan22_i2v", str(folder))
    return folder


@pytest.fixture(scope="module")
def i2v_records():
    from branchgrpo.data.preprocess import read_prompts

    return read_prompts(REPO / "assets" / "i2v_prompts.jsonl", "jsonl", image_size=(I2V_HEIGHT, I2V_WIDTH)).items[:2]


@pytest.fixture(scope="module")
def i2v_cond(i2v_dir, i2v_records):
    """Per-prompt conditioning as the preprocessing stores it: text, first frame, first-frame latents - no CLIP."""
    from branchgrpo.data.embeddings import with_extras

    encode = get_backbone("wan22_i2v").prompt_encoder(str(i2v_dir), "cpu", SimpleNamespace(
        dtype="auto", h=I2V_HEIGHT, w=I2V_WIDTH, num_frames=I2V_FRAMES, max_sequence_length=MAX_SEQ))
    with torch.no_grad():
        return with_extras(encode(i2v_records), encode.extras(), "cpu")


def _load_i2v(folder):
    from branchgrpo.models.wan22 import Wan22I2VAdapter

    return load_wan22(str(folder), "cpu", height=I2V_HEIGHT, width=I2V_WIDTH, num_frames=I2V_FRAMES,
                      guidance_scale=I2V_HIGH, guidance_scale_2=I2V_LOW, adapter_class=Wan22I2VAdapter)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 3, 4])
def test_i2v_rollout_matches_two_expert_i2v_pipeline_across_the_boundary(i2v_dir, i2v_cond, i2v_records, steps):
    """Our rollout against WanImageToVideoPipeline (it encodes the image itself): at shift 5 each of 2, 3 and 4
    steps has sigmas on both sides of t = 900."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    from branchgrpo.models.wan_i2v import load_image

    assert "image_embeds" not in i2v_cond and i2v_cond["image_latents"].shape[1] == 16
    adapter = _load_i2v(i2v_dir)
    assert adapter.boundary_timestep == 900.0
    sigmas = sde.make_sigmas(steps, shift=SHIFT)
    assert 0 < int((sigmas[:-1] * 1000 >= 900).sum()) < steps
    x, ours = _rollout(adapter, i2v_cond, steps)
    pipe = WanImageToVideoPipeline.from_pretrained(str(i2v_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for row, record in enumerate(i2v_records):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        set_timesteps = scheduler.set_timesteps
        unshifted = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
        scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(n, device=device, sigmas=unshifted)
        pipe.scheduler = scheduler
        ref = pipe(image=load_image(record.image), prompt_embeds=i2v_cond["prompt_embeds"][row:row + 1],
                   negative_prompt_embeds=i2v_cond["negative_prompt_embeds"][row:row + 1],
                   latents=x[row:row + 1].clone(), num_inference_steps=steps, guidance_scale=I2V_HIGH,
                   guidance_scale_2=I2V_LOW, height=I2V_HEIGHT, width=I2V_WIDTH, num_frames=I2V_FRAMES,
                   output_type="latent").frames
        assert (ours[row] - x[row]).abs().max() > 0.1
        assert (ours[row:row + 1] - ref).abs().max().item() <= PARITY_ATOL


def test_i2v_checkpoints_go_to_their_backbone(i2v_dir, wan22_dir):
    from branchgrpo.models.wan_i2v import WanI2VAdapter

    with pytest.raises(ValueError, match="Wan2.2 I2V-A14B.*--model wan22_i2v"):
        load_wan22(str(i2v_dir), "cpu", height=I2V_HEIGHT, width=I2V_WIDTH, num_frames=I2V_FRAMES)
    with pytest.raises(ValueError, match="Wan2.2 T2V-A14B.*--model wan22 "):
        _load_i2v(wan22_dir)
    with pytest.raises(FileNotFoundError, match="lacks image_encoder"):  # Wan2.1-I2V's loader and encoder
        get_backbone("wan_i2v").prompt_encoder(str(i2v_dir), "cpu", SimpleNamespace(h=I2V_HEIGHT, w=I2V_WIDTH,
                                                                                    num_frames=I2V_FRAMES))
    with pytest.raises(ValueError, match="--model wan22_i2v"):
        load_wan(str(i2v_dir), "cpu", height=I2V_HEIGHT, width=I2V_WIDTH, num_frames=I2V_FRAMES,
                 adapter_class=WanI2VAdapter)


def test_i2v_planner_counts_both_experts():
    from branchgrpo.config.sections import ModelConfig

    spec = get_backbone("wan22_i2v")
    model_cfg = ModelConfig.for_backbone("wan22_i2v", None)
    planned = spec.planner_model(model_cfg, spec.planner_config(model_cfg)[0], torch.bfloat16)
    per_expert = sum(p.numel() for p in planned.transformer.low.parameters())
    assert planned.transformer.high.config.in_channels == 36 and abs(per_expert / 14.3e9 - 1) < 0.02
    assert model_cfg.backbone.resolved("guidance_scale") == 3.5 == model_cfg.backbone.resolved("guidance_scale_2")
