"""Qwen-Image (`--model qwen_image`) against diffusers' QwenImagePipeline on a tiny random checkpoint (CPU, offline).

Parity: ODE rollouts (eta = 0) of 2, 3 and 4 steps through the trainer's own `run_rollout` and velocity closure, on
the checkpoint's dynamic schedule (exponential shift from the image tokens, stretched to shift_terminal 0.02),
conditioned on what our prompt encoder stores (each prompt padded to --max_sequence_length with its mask), equal
QwenImagePipeline given the prompt and negative-prompt STRINGS (it encodes them itself, padding to the longest of
its batch) and the same noise to <= 1e-5 (measured 1.55e-6 to 1.67e-6 with true CFG 4.0, at most 9.5e-7 without; latents
about 2 in size). The trainer's re-scoring at theta_old gives ratio exactly 1 (a one-iteration training run).
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
from branchgrpo.data.embeddings import with_extras
from branchgrpo.models import get_backbone
from branchgrpo.models.qwen_image import (
    PROMPT_TEMPLATE,
    TEMPLATE_TOKENS,
    QwenImageAdapter,
    build_prompt_encoder,
    load_qwen_image,
)

from trainer_utils import ode_chains

HEIGHT, WIDTH = 64, 48  # non-square on purpose: packing or rotary-grid order errors show up as mismatches
PROMPTS = ["a red cat sitting on a wooden table",
           "an astronaut riding a horse in the desert at sunset under many bright stars"]  # different lengths
NEGATIVE = "blurry, low quality"
MAX_SEQ = 32
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_image") / "qwen_image"
    make_tiny("qwen_image", str(folder))  # what `python -m branchgrpo.make_tiny qwen_image DIR` runs
    return folder


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(qwen_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def encoder(qwen_dir):
    return build_prompt_encoder(str(qwen_dir), "cpu", SimpleNamespace(max_sequence_length=MAX_SEQ, dtype="auto",
                                                                      negative_prompt=NEGATIVE))


@pytest.fixture(scope="module")
def cond(encoder):
    """Per-prompt conditioning as preprocessing stores it, with the negative prompt expanded per prompt."""
    with torch.no_grad():
        return with_extras(encoder(PROMPTS), encoder.extras(), "cpu")


@pytest.fixture
def adapter(qwen_dir):
    """A fresh adapter per test (LoRA tests modify theirs)."""
    return load_qwen_image(str(qwen_dir), "cpu", height=HEIGHT, width=WIDTH)


def _rollout(adapter, cond, steps):
    """The trainer's sampler at eta = 0 on the dynamic schedule (one ODE chain per prompt): (noise, final latents)."""
    sigmas = sde.make_sigmas(steps, mu=adapter.mu(), shift_terminal=adapter.shift_terminal)
    return (*ode_chains(adapter, cond, sigmas, 2), sigmas)


def _pipeline(pipe, noise, steps, guidance, output_type="latent"):
    """QwenImagePipeline from the same noise, encoding the prompts itself, on its own schedule."""
    out = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), true_cfg_scale=guidance,
               latents=noise.clone(), num_inference_steps=steps, height=HEIGHT, width=WIDTH, output_type=output_type,
               max_sequence_length=MAX_SEQ)
    return out.images, pipe.scheduler.sigmas


# ----- the backbone against the pipeline ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("steps,guidance", [(2, 4.0), (3, 4.0), (4, 4.0), (3, 1.0)])
def test_rollout_matches_qwen_image_pipeline(pipe, cond, adapter, steps, guidance):
    adapter.guidance_scale = guidance
    noise, ours, sigmas = _rollout(adapter, cond, steps)
    ref, ref_sigmas = _pipeline(pipe, noise, steps, guidance)
    torch.testing.assert_close(ref_sigmas.double(), sigmas, atol=1e-6, rtol=0)
    assert sigmas[-2].item() == pytest.approx(0.02)  # stretched to the scheduler's shift_terminal
    assert ours.shape == ref.shape == (2, (HEIGHT // 16) * (WIDTH // 16), 64)
    assert (ours - noise).abs().max() > 0.1  # the sampler moved
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


def test_dynamic_schedule_equals_the_scheduler_for_other_sizes(adapter):
    """mu from the image tokens with Qwen-Image's base/max values (0.5 at 256 tokens, 0.9 at 8192), then the
    stretch to 0.02, for the real 1024x1024 token count and a few step counts."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from branchgrpo.models.flux import scheduler_mu

    config = adapter.scheduler_config
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    for tokens, steps in ((4096, 20), (4096, 50), (1024, 7), (adapter.latent_shape[0], 2)):
        mu = scheduler_mu(config, tokens)
        assert mu == pytest.approx(calculate_shift(tokens, 256, 8192, 0.5, 0.9))
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu)
        ours = sde.make_sigmas(steps, mu=mu, shift_terminal=adapter.shift_terminal)
        torch.testing.assert_close(scheduler.sigmas.double(), ours, atol=1e-6, rtol=0)
    # one step: diffusers divides by zero (1 - sigma_0 = 0, NaN sigmas); ours keeps the single sigma 1
    assert sde.make_sigmas(1, mu=0.5, shift_terminal=0.02).tolist() == [1.0, 0.0]


def test_prompt_encoder_matches_encode_prompt(qwen_dir, pipe, cond):
    """Each prompt's embedding and mask equal the pipeline's (which pads to the longest of its batch); the rest is
    zero padding with mask 0. In the fixture the template's 34 dropped tokens are exactly its system turn."""
    tokens = pipe.tokenizer(PROMPT_TEMPLATE.format("x")).input_ids
    assert pipe.tokenizer.decode(tokens[:TEMPLATE_TOKENS]).endswith("<|im_start|>user\n")
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
        neg, _ = pipe.encode_prompt([NEGATIVE], max_sequence_length=MAX_SEQ)
    lengths = ref_mask.sum(1)
    assert lengths[0] < lengths[1]  # the batch really pads
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32) and cond["prompt_embeds_mask"].shape == (2, MAX_SEQ)
    assert torch.equal(cond["prompt_embeds_mask"].sum(1), lengths)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(cond["prompt_embeds"][row, :length], ref[row, :length], atol=1e-6, rtol=1e-5)
        assert cond["prompt_embeds"][row, length:].abs().max() == 0
    length = neg.shape[1]
    torch.testing.assert_close(cond["negative_prompt_embeds"][0, :length], neg[0], atol=1e-6, rtol=1e-5)
    assert int(cond["negative_prompt_embeds_mask"][0].sum()) == length
    bf16 = build_prompt_encoder(str(qwen_dir), "cpu",
                                SimpleNamespace(max_sequence_length=MAX_SEQ, dtype="bf16"))
    assert bf16(PROMPTS)["prompt_embeds"].dtype == torch.bfloat16  # what preprocessing stores on GPUs
    for bad, flag in ((dict(max_sequence_length=1025, dtype="auto"), "--max_sequence_length"),
                      (dict(max_sequence_length=MAX_SEQ, dtype="fp16"), "--dtype")):
        with pytest.raises(ValueError, match=flag):
            build_prompt_encoder(str(qwen_dir), "cpu", SimpleNamespace(**bad))


def test_padding_never_changes_a_prediction(adapter, cond):
    """Rows of prompts of different lengths in one forward, each stored padded to MAX_SEQ: equal to each prompt
    alone, with CFG ([cond; negative] rows of three lengths) and without it, cut to the prompt's own tokens (what
    the pipeline passes for a single prompt)."""
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.9, 0.35])
    for guidance in (4.0, 1.0):
        adapter.guidance_scale = guidance
        with torch.no_grad():
            together = adapter.velocity(x, sigmas, cond)
            for row in range(2):
                alone = {k: v[row : row + 1] for k, v in cond.items()}
                if guidance == 1.0:
                    length = int(cond["prompt_embeds_mask"][row].sum())
                    alone = {k: alone[k][:, :length] for k in ("prompt_embeds", "prompt_embeds_mask")}
                single = adapter.velocity(x[row : row + 1], sigmas[row : row + 1], alone)
                torch.testing.assert_close(together[row : row + 1], single, atol=1e-5, rtol=1e-5)
    assert together.dtype == torch.float32
    swapped = {**cond, "prompt_embeds_mask": cond["prompt_embeds_mask"].flip(0),
               "prompt_embeds": cond["prompt_embeds"].flip(0)}
    with torch.no_grad():
        assert (adapter.velocity(x, sigmas, swapped) - together).abs().max() > 1e-3  # the text really enters


def test_guidance_needs_the_negative_embedding(adapter, cond):
    from branchgrpo.models.base import check_embedding_keys

    x = torch.randn(1, *adapter.latent_shape)
    plain = {k: cond[k][:1] for k in ("prompt_embeds", "prompt_embeds_mask")}
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        adapter.velocity(x, torch.tensor([0.5]), plain)
    with pytest.raises(ValueError, match="emb/index.json: prompt embeddings lack .*negative_prompt_embeds"):
        check_embedding_keys(adapter, list(plain), "emb/index.json")  # what the trainer checks before a rollout
    adapter.guidance_scale = 1.0
    check_embedding_keys(adapter, list(plain), "emb/index.json")
    with torch.no_grad():
        assert torch.isfinite(adapter.velocity(x, torch.tensor([0.5]), plain)).all()


def test_decode_matches_pipeline(pipe, cond, adapter):
    noise, ours, _ = _rollout(adapter, cond, 2)
    ref, _ = _pipeline(pipe, noise, 2, 4.0, output_type="pt")
    images = adapter.decode(ours)
    assert images.shape == (2, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.01
    assert (images - ref).abs().max().item() <= PARITY_ATOL


def test_blocks_lora_targets_and_export_round_trip(adapter, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    assert [type(b).__name__ for b in adapter.blocks()] == ["QwenImageTransformerBlock"] * 2
    assert set(adapter.default_lora_targets) == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                 "add_v_proj", "to_add_out"}
    with torch.no_grad():  # make the weights differ from the checkpoint's
        for p in adapter.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    adapter.export(str(tmp_path / "out"))
    loaded = QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer",
                                                         local_files_only=True)
    ours = adapter.transformer.state_dict()
    assert set(loaded.state_dict()) == set(ours)
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())


@pytest.mark.slow
def test_lora_export_loads_in_qwen_image_pipeline(qwen_dir, adapter, cond, tmp_path):
    from diffusers import QwenImagePipeline

    x, sigmas = torch.randn(2, *adapter.latent_shape), torch.full((2,), 0.7)
    with torch.no_grad():
        base_v = adapter.velocity(x, sigmas, cond)
    adapter.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
        lora_v = adapter.velocity(x, sigmas, cond)
    assert (lora_v - base_v).abs().max() > 1e-3
    path = adapter.export_lora(str(tmp_path / "lora"))
    pipe = QwenImagePipeline.from_pretrained(str(qwen_dir), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=path.name)
    loaded = QwenImageAdapter(pipe.transformer, pipe.vae, HEIGHT, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigmas, cond), lora_v, atol=1e-5, rtol=1e-5)


# ----- bad input ---------------------------------------------------------------------------------------------------


def _copy(qwen_dir, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(qwen_dir, folder)
    return folder


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_wrong_or_incomplete_folders_are_refused_before_loading(qwen_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_qwen does not exist.*model_index.json, transformer/"):
        load_qwen_image(str(tmp_path / "no_such_qwen"), "cpu")
    partial = _copy(qwen_dir, tmp_path, "partial")
    shutil.rmtree(partial / "vae")
    shutil.rmtree(partial / "text_encoder")
    with pytest.raises(FileNotFoundError, match="partial lacks vae"):
        load_qwen_image(str(partial), "cpu", height=HEIGHT, width=WIDTH)
    with pytest.raises(FileNotFoundError, match="partial lacks text_encoder"):
        build_prompt_encoder(str(partial), "cpu", SimpleNamespace(max_sequence_length=MAX_SEQ))
    flux = _copy(qwen_dir, tmp_path, "flux_like")  # another backbone's folder
    _edit_json(flux / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(ValueError, match="model_index.json: a FluxPipeline checkpoint; --model qwen_image"):
        load_qwen_image(str(flux), "cpu", height=HEIGHT, width=WIDTH)
    other = _copy(qwen_dir, tmp_path, "other_transformer")
    _edit_json(other / "transformer" / "config.json", _class_name="FluxTransformer2DModel")
    with pytest.raises(ValueError, match="a FluxTransformer2DModel; --model qwen_image expects"):
        load_qwen_image(str(other), "cpu", height=HEIGHT, width=WIDTH)
    edit = _copy(qwen_dir, tmp_path, "edit_2511")
    _edit_json(edit / "transformer" / "config.json", zero_cond_t=True)
    with pytest.raises(ValueError, match="sets zero_cond_t: a later Qwen-Image variant"):
        load_qwen_image(str(edit), "cpu", height=HEIGHT, width=WIDTH)


@pytest.mark.parametrize("height,width,flag", [(70, 48, "--h"), (64, 40, "--w")])
def test_sizes_the_model_cannot_take(qwen_dir, height, width, flag, tmp_path):
    from branchgrpo.config import parse_train_config

    with pytest.raises(ValueError, match=f"{flag}: .* not a .*multiple of 16"):
        load_qwen_image(str(qwen_dir), "cpu", height=height, width=width)
    (tmp_path / "index.json").write_text("{}")  # never read: the size check comes first
    with pytest.raises(ValueError, match=flag):  # the config check, before any model is loaded
        parse_train_config(["--model", "qwen_image", "--pretrained_model_name_or_path", str(qwen_dir),
                            "--data_json_path", str(tmp_path / "index.json"), "--h", str(height), "--w", str(width)])


# ----- training ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_training_iteration_has_ratio_one_at_theta_old_and_exports(qwen_dir, encoder, tmp_path):
    """The trainer on stored embeddings (a tree: splits at depths 0 and 1), one process on CPU, with true CFG and the
    dynamic schedule: re-scoring at theta_old gives ratio exactly 1; the export loads in diffusers."""
    from diffusers import QwenImageTransformer2DModel
    from trainer_utils import train

    from branchgrpo.data.preprocess import run_preprocess

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    index = run_preprocess(prompts, tmp_path / "emb", "qwen_image", encoder, shard_size=2)
    make_tiny("hps", str(tmp_path / "hps"))
    out = tmp_path / "run"
    options = {"hps": {"arch": "ViT-H-14-tiny", "model_config_dir": str(tmp_path / "hps" / "open_clip_configs")}}
    summary = train(["--model", "qwen_image", "--pretrained_model_name_or_path", str(qwen_dir), "--data_json_path",
                     str(index), "--output_dir", str(out), "--h", str(HEIGHT), "--w", str(WIDTH), "--reward",
                     "hps=1.0", "--reward_model_dir", str(tmp_path / "hps"), "--reward_options", json.dumps(options),
                     "--device", "cpu", "--sampling_steps", "4", "--time_shift", "dynamic", "--tree_split_points",
                     "0,1", "--train_batch_size", "2", "--max_train_steps", "1", "--num_eval_prompts", "1",
                     "--eval_samples_per_prompt", "1", "--report_to", "none", "--checkpointing_steps", "1",
                     "--learning_rate", "1e-3"])
    entry = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert entry["first_ratio_min"] == 1.0 == entry["first_ratio_max"]
    assert summary["eval_reward_before"] is not None
    trained = QwenImageTransformer2DModel.from_pretrained(str(out / "checkpoints" / "checkpoint-1" / "model"),
                                                          subfolder="transformer")
    base = QwenImageTransformer2DModel.from_pretrained(str(qwen_dir), subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))


def test_spec_answers_for_qwen_image(qwen_dir):
    spec = get_backbone("qwen_image")
    assert spec.dynamic_shift and spec.media == "image"
    assert spec.encoder_sizes(SimpleNamespace()) == {} and spec.image_size(SimpleNamespace()) is None


def test_planner_builds_the_release_on_the_meta_device():
    """The shipped config is the release's transformer/config.json (with its `pooled_projection_dim`, which the class
    does not take): 60 blocks, 20.4B parameters (within 2%), and the inputs of a true-CFG forward."""
    from branchgrpo.config import config_from_flags
    from branchgrpo.planner.trace import lora_parameters

    cfg = config_from_flags({"model": "qwen_image", "h": 512, "w": 512}, validate="none")
    config, source = cfg.model.spec.planner_config(cfg.model)
    assert source == "qwen-image" and "pooled_projection_dim" in config
    planned = cfg.model.spec.planner_model(cfg.model, config, torch.bfloat16)
    assert len(planned.blocks) == 60
    assert abs(sum(p.numel() for p in planned.transformer.parameters()) - 20.4e9) < 0.02 * 20.4e9
    assert 0 < lora_parameters(planned.transformer, planned.lora_targets, 64) < 0.01 * 20.4e9
    inputs = planned.inputs(3)
    assert inputs["hidden_states"].shape == (6, 1024, 64) and len(inputs["img_shapes"]) == 6  # [cond; negative]
