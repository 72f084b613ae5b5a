"""SD3Adapter against diffusers' StableDiffusion3Pipeline on a tiny random SD3.5-style checkpoint (CPU, offline).

Parity tolerance: final latents of the trainer's own rollout code (`run_rollout` on a one-chain ODE plan, eta = 0,
through the trainer's velocity closure) agree with the pipeline to <= 1e-5 absolute in fp32 at 2, 3 and 4 steps with
classifier-free guidance 4.5; the remaining difference is our [cond; neg] batch against the pipeline's [neg; cond]
and its float32 schedule. The pipeline shifts the unshifted grid linspace(1, 0, T + 1)[:-1] we hand it with the
checkpoint's static shift 3.0, which is our grid.
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
from branchgrpo.core import plans, sde
from branchgrpo.core.rollout import NoiseKeys, run_rollout
from branchgrpo.models import get_backbone
from branchgrpo.models.base import velocity_fn
from branchgrpo.models.sd3 import build_prompt_encoder, load_sd3

pytestmark = pytest.mark.slow  # builds diffusers models

HEIGHT, WIDTH = 64, 48  # non-square on purpose: axis mix-ups show as mismatches
PROMPTS = ["a red cat sitting on a wooden table", "an astronaut riding a horse in the desert at sunset"]
T5_LEN = 16
GUIDANCE = 4.5
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "sd3"
    make_tiny("sd3", str(folder))  # what `python -m branchgrpo.make_tiny sd3 DIR` runs
    return folder


@pytest.fixture(scope="module")
def pipe(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cond(pipe):
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS,
                                                                       max_sequence_length=T5_LEN)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled}


@pytest.fixture
def adapter(sd3_dir):
    """A fresh adapter per test (LoRA tests modify theirs)."""
    return load_sd3(str(sd3_dir), "cpu", height=HEIGHT, width=WIDTH, guidance_scale=GUIDANCE)


def _pipeline_run(pipe, x, cond, steps, guidance=GUIDANCE, output_type="latent"):
    """The pipeline from the same noise on the same grid (see the module docstring)."""
    unshifted = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
    out = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               negative_prompt_embeds=cond["negative_prompt_embeds"],
               negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"], latents=x.clone(),
               sigmas=unshifted, num_inference_steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
               output_type=output_type, max_sequence_length=T5_LEN).images
    return out, pipe.scheduler.sigmas.double()


def _rollout(adapter, cond, steps, seed=5):
    """The trainer's rollout code: a one-chain ODE plan per prompt, keyed initial noise, depth batching, through the
    trainer's velocity closure. Returns (initial noise, final latents) [2, ...]."""
    sigmas = sde.make_sigmas(steps, shift=adapter.native_shift)
    with torch.no_grad():
        graph = run_rollout(plans.group_plan(steps, 1, sde_steps=[]), velocity_fn(adapter, cond), sigmas,
                            sde.Kernel("dance", 0.3), NoiseKeys(seed, 0, (0, 1)), adapter.latent_shape, "cpu",
                            batch_size=8, keep_all_latents=True)
    roots = torch.nonzero(graph.parent < 0).flatten()
    assert graph.prompt[roots].tolist() == [0, 1] and graph.prompt[graph.leaves].tolist() == [0, 1]
    return graph.node_latents(roots), graph.node_latents(graph.leaves), sigmas


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_training_rollout_matches_sd3_pipeline_with_cfg(pipe, cond, adapter, steps):
    x, ours, sigmas = _rollout(adapter, cond, steps)
    ref, ref_sigmas = _pipeline_run(pipe, x, cond, steps)
    torch.testing.assert_close(ref_sigmas, sigmas.double(), atol=1e-6, rtol=0)
    assert ref.shape == ours.shape == (2, 16, HEIGHT // 8, WIDTH // 8)
    assert (ours - x).abs().max() > 0.1  # the sampler moved
    diff = (ours - ref).abs().max().item()
    print(f"sd3 parity: {steps} steps, guidance {GUIDANCE}: max abs latent difference {diff:.3e}")
    assert diff <= PARITY_ATOL


def test_guidance_off_needs_no_negative_and_matches_the_pipeline(pipe, cond, adapter):
    adapter.guidance_scale = 1.0
    own = {k: v for k, v in cond.items() if not k.startswith("negative")}
    x, ours, _ = _rollout(adapter, own, 3)
    ref, _ = _pipeline_run(pipe, x, cond, 3, guidance=1.0)
    assert (ours - ref).abs().max().item() <= PARITY_ATOL
    adapter.guidance_scale = GUIDANCE
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        adapter.velocity(x, torch.full((2,), 0.5), own)
    _, guided, _ = _rollout(adapter, cond, 3)
    assert (guided - ours).abs().max() > 1e-2  # guidance changes the result


def test_evaluation_skip_layer_guidance_matches_the_pipeline(sd3_dir, pipe, cond):
    """--skip_layer_guidance through the evaluation loader: 10 steps put step 1 in the pipeline's window (1% to 20%);
    the pipeline's sampling with skip_guidance_layers=[1] and ours agree, and differ from plain guidance."""
    from branchgrpo.config.sections import ModelConfig

    spec = get_backbone("sd3")
    model_cfg = ModelConfig.for_backbone("sd3", str(sd3_dir), h=HEIGHT, w=WIDTH, skip_layer_guidance="1")
    adapter = spec.load_for_eval(model_cfg, None, None, "cpu").adapter
    assert adapter.skip_layer_guidance.active(sde.make_sigmas(10, 3.0)[:-1].float()).nonzero().flatten().tolist() == [1]
    x, ours, _ = _rollout(adapter, cond, 10)
    unshifted = torch.linspace(1.0, 0.0, 11)[:-1].tolist()
    ref = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               negative_prompt_embeds=cond["negative_prompt_embeds"],
               negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"], latents=x.clone(),
               sigmas=unshifted, num_inference_steps=10, guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
               output_type="latent", max_sequence_length=T5_LEN, skip_guidance_layers=[1]).images
    plain, _ = _pipeline_run(pipe, x, cond, 10)
    assert (ours - ref).abs().max().item() <= PARITY_ATOL and (ref - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="--skip_layer_guidance: layer 5 does not exist; .* has layers 0-2"):
        spec.load_for_eval(ModelConfig.for_backbone("sd3", str(sd3_dir), h=HEIGHT, w=WIDTH, skip_layer_guidance="5"),
                           None, None, "cpu")


def test_per_sample_sigmas_equal_per_sample_calls(adapter, cond):
    x = torch.randn(3, *adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([1.0, 0.6, 0.13])
    rows = {k: v[torch.tensor([0, 1, 0])] for k, v in cond.items()}
    with torch.no_grad():
        together = adapter.velocity(x, sigmas, rows)
        alone = torch.cat([adapter.velocity(x[i:i + 1], sigmas[i:i + 1], {k: v[i:i + 1] for k, v in rows.items()})
                           for i in range(3)])
        bf16 = adapter.velocity(x, sigmas, {k: v.bfloat16() for k, v in rows.items()})
    assert together.dtype == bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_decode_matches_pipeline(pipe, cond, adapter):
    x, ours, _ = _rollout(adapter, cond, 2, seed=7)
    ref, _ = _pipeline_run(pipe, x, cond, 2, output_type="pt")
    images = adapter.decode(ours)
    assert images.shape == (2, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0
    assert (images - ref).abs().max().item() <= PARITY_ATOL


def test_native_shift_blocks_and_lora_targets(adapter):
    assert adapter.native_shift == 3.0  # the checkpoint's FlowMatchEuler shift
    assert [type(b).__name__ for b in adapter.blocks()] == ["JointTransformerBlock"] * 3
    assert set(adapter.default_lora_targets) == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                 "add_v_proj", "to_add_out"}
    assert adapter.blocks()[0].attn2 is not None and adapter.blocks()[1].attn2 is None  # dual attention in layer 0


# ----- prompt encoding ---------------------------------------------------------------------------------------------


def _encoder(sd3_dir, **settings):
    return build_prompt_encoder(str(sd3_dir), "cpu", SimpleNamespace(dtype="auto", **settings))


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_prompt_encoder_equals_encode_prompt(sd3_dir, pipe, negative):
    texts = PROMPTS + ["a prompt long enough to be cut " * 12]  # longer than CLIP's 77 tokens and T5's 16
    encode = _encoder(sd3_dir, t5_sequence_length=T5_LEN, negative_prompt=negative)
    ours, extras = encode(texts), encode.extras()
    with torch.no_grad():
        ref = pipe.encode_prompt(texts, texts, texts, negative_prompt=negative, max_sequence_length=T5_LEN)
    assert ours["prompt_embeds"].shape == (3, 77 + T5_LEN, 48) and ours["pooled_prompt_embeds"].shape == (3, 40)
    torch.testing.assert_close(ours["prompt_embeds"], ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], ref[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(extras["negative_prompt_embeds"], ref[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(extras["negative_pooled_prompt_embeds"], ref[3][0], atol=1e-6, rtol=1e-5)
    assert ours["prompt_embeds"][:, :77, 40:].abs().max() == 0  # CLIP's 16 + 24 channels, zero-padded to T5's 48


def test_default_t5_length_is_the_peers_and_bad_lengths_are_refused(sd3_dir):
    assert get_backbone("sd3").Config().resolved("t5_sequence_length") == 128
    assert _encoder(sd3_dir)(PROMPTS[:1])["prompt_embeds"].shape == (1, 77 + 128, 48)
    with pytest.raises(ValueError, match="--t5_sequence_length"):
        _encoder(sd3_dir, t5_sequence_length=513)


def test_preprocess_cli_writes_the_pipeline_embeddings(sd3_dir, pipe, tmp_path):
    from branchgrpo.cli import preprocess as cli
    from branchgrpo.data.embeddings import EmbeddingStore

    prompts, out = tmp_path / "p.txt", tmp_path / "emb"
    prompts.write_text("\n".join(PROMPTS + ["a blue bird"]) + "\n")
    cli.main(["--model", "sd3", "--model_path", str(sd3_dir), "--prompts", str(prompts), "--output_dir", str(out),
              "--t5_sequence_length", str(T5_LEN), "--shard_size", "2", "--batch_size", "2", "--device", "cpu"])
    store = EmbeddingStore(out)
    texts = [store.text(i) for i in range(len(store))]
    with torch.no_grad():
        ref = pipe.encode_prompt(texts, texts, texts, max_sequence_length=T5_LEN)
    stored = store.batch(range(len(store)))
    torch.testing.assert_close(stored["prompt_embeds"], ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stored["pooled_prompt_embeds"], ref[2], atol=1e-6, rtol=1e-5)
    assert set(store.extras) == {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    torch.testing.assert_close(store.extras["negative_prompt_embeds"], ref[1][0], atol=1e-6, rtol=1e-5)
    assert json.loads((out / "index.json").read_text())["model"] == "sd3"


# ----- export ------------------------------------------------------------------------------------------------------


def test_export_and_lora_load_in_diffusers(sd3_dir, adapter, cond, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    x, sigmas = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(9)), torch.full((2,), .7)
    with torch.no_grad():
        base = adapter.velocity(x, sigmas, cond)
    adapter.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
        tuned = adapter.velocity(x, sigmas, cond)
    assert (tuned - base).abs().max() > 1e-3
    path = adapter.export_lora(str(tmp_path / "lora"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=path.name)  # offline: name the file
    loaded = load_sd3(str(sd3_dir), "cpu", height=HEIGHT, width=WIDTH, guidance_scale=GUIDANCE)
    loaded.transformer = pipe.transformer
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigmas, cond), tuned, atol=1e-5, rtol=1e-5)  # same scaling
    adapter.export(str(tmp_path / "merged"))  # a full export of a LoRA'd model merges the adapter
    loaded.transformer = SD3Transformer2DModel.from_pretrained(str(tmp_path / "merged"), subfolder="transformer")
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigmas, cond), tuned, atol=1e-5, rtol=1e-5)


# ----- bad input ---------------------------------------------------------------------------------------------------


def test_bad_checkpoints_and_sizes_are_one_line_errors(sd3_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_sd3 does not exist.*model_index.json, transformer/"):
        load_sd3(str(tmp_path / "no_such_sd3"), "cpu")
    partial = tmp_path / "partial"
    shutil.copytree(sd3_dir, partial)
    shutil.rmtree(partial / "vae")
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="partial lacks vae"):
        load_sd3(str(partial), "cpu", height=HEIGHT, width=WIDTH)
    with pytest.raises(FileNotFoundError, match="partial lacks text_encoder_2"):
        _encoder(partial)
    other = tmp_path / "flux_like"
    shutil.copytree(sd3_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="model_index.json names FluxPipeline, not StableDiffusion3Pipeline"):
        load_sd3(str(other), "cpu", height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="--h: 72 is not a positive multiple of 16"):
        load_sd3(str(sd3_dir), "cpu", height=72, width=WIDTH)
    with pytest.raises(ValueError, match=r"--w: 144 px are 9 patches per side, more than the 8 positions of "
                                         r"pos_embed_max_size .* takes --w up to 128"):
        load_sd3(str(sd3_dir), "cpu", height=HEIGHT, width=144)


# ----- memory planner ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers,dual,params,table", [("sd3.5-medium", 24, 13, 2.243e9, 384 * 384 * 1536),
                                                          ("sd3.5-large", 38, 0, 8.057e9, 192 * 192 * 2432)])
def test_shipped_configs_build_the_released_transformers(name, layers, dual, params, table):
    """Medium: 2.243B trained parameters plus its 384 x 384 positional table (a persistent buffer of 0.226B, in the
    checkpoint but not trained) = the 2.47B the release names; Large: 8.06B (+ 0.09B) ~ 8.1B."""
    from branchgrpo.config import config_from_flags

    cfg = config_from_flags({"model": "sd3"}, validate="none")
    config, source = cfg.model.spec.planner_config(cfg.model, name)
    planned = cfg.model.spec.planner_model(cfg.model, config, torch.bfloat16)
    model = planned.transformer
    assert source == name and len(planned.blocks) == layers
    assert sum(b.attn2 is not None for b in planned.blocks) == dual
    assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.001e9
    assert sum(b.numel() for b in model.buffers()) == table
    assert planned.inputs(2)["hidden_states"].shape == (4, 16, 64, 64)  # 512 px, [cond; negative] rows


def test_trace_of_the_tiny_transformer_replays_like_a_full_trace():
    """SD3's last block returns no text states (None): the replayed trace accounts it like a traced one."""
    from branchgrpo.config import config_from_flags
    from branchgrpo.planner.trace import trace_activations
    from branchgrpo.testing.sd3_tiny import TRANSFORMER_CONFIG

    cfg = config_from_flags({"model": "sd3", "h": 64, "w": 64}, validate="none")
    planned = cfg.model.spec.planner_model(cfg.model, dict(TRANSFORMER_CONFIG), torch.bfloat16, text_tokens=20)
    fast, full = (trace_activations(planned.transformer, planned.blocks, planned.inputs(2), 2, replay=r)
                  for r in (True, False))
    assert fast == full and full.block_saved[0] > 0


def test_training_config_refuses_another_backbone_and_wrong_sizes_before_loading(sd3_dir, tmp_path):
    """Config validation reads only JSON files (model_index.json, the transformer's and VAE's configs)."""
    from branchgrpo.config import parse_train_config

    def parse(folder, *flags):
        return parse_train_config(["--model", "sd3", "--pretrained_model_name_or_path", str(folder),
                                   "--data_json_path", str(tmp_path), *flags])

    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (flux / "transformer" / "config.json").write_text(json.dumps({"in_channels": 64, "patch_size": 1}))
    with pytest.raises(ValueError, match="flux: model_index.json names FluxPipeline, not StableDiffusion3Pipeline"):
        parse(flux)
    with pytest.raises(ValueError, match="--h: 144 px are 9 patches per side"):
        parse(sd3_dir, "--h", "144")
    with pytest.raises(ValueError, match="--t5_sequence_length: 600 is not in"):
        parse(sd3_dir, "--t5_sequence_length", "600")
    with pytest.raises(ValueError, match="--skip_layer_guidance: 'x' is not an integer"):
        parse(sd3_dir, "--skip_layer_guidance", "7,x")
    with pytest.raises(ValueError, match="--w: 512 px are 32 patches per side"):  # the default 512: too big here
        parse(sd3_dir, "--h", "128")
    assert parse(sd3_dir, "--h", "128", "--w", "64").model.backbone.resolved("guidance_scale") == 4.5
