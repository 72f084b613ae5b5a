"""FluxAdapter against diffusers' FluxPipeline on a tiny random FLUX.1-style checkpoint (CPU, offline).

Parity tolerance: final latents of a 6-step Euler ODE sampler (eta = 0, no branching) agree with FluxPipeline to
<= 1e-5 absolute in fp32 (measured about 7e-7; the latents are O(4)), for the static SD3 shift and FLUX's dynamic
shift; the remaining difference is FluxPipeline's float32 numpy schedule and its t*1000/1000 round trip.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from branchgrpo.core import sde
from branchgrpo.models.flux import (
    FluxAdapter,
    build_prompt_encoder,
    check_image_size,
    load_flux,
    pack_latents,
    unpack_latents,
)
from branchgrpo.testing.flux_tiny import make_tiny_flux

HEIGHT, WIDTH = 64, 48  # non-square on purpose: packing order errors show up as mismatches
PROMPTS = ["a red cat sitting on a wooden table", "an astronaut riding a horse in the desert at sunset"]
MAX_SEQ = 16
STEPS = 6
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return make_tiny_flux(str(tmp_path_factory.mktemp("flux") / "flux"), seed=0)


@pytest.fixture(scope="module")
def pipe(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cond(pipe):
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=PROMPTS, max_sequence_length=MAX_SEQ)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


@pytest.fixture
def adapter(flux_dir):
    """A fresh adapter per test (LoRA tests modify theirs)."""
    return load_flux(str(flux_dir), "cpu", height=HEIGHT, width=WIDTH)


def _noise(adapter, batch=2, seed=0):
    return torch.randn(batch, *adapter.latent_shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ode_sample(adapter, x, sigmas, cond):
    """Our sampler with eta = 0: a loop of adapter.velocity + sde.ode_step."""
    for i in range(len(sigmas) - 1):
        sigma_B = torch.full((x.shape[0],), float(sigmas[i]))
        x = sde.ode_step(x, adapter.velocity(x, sigma_B, cond), sigma_B, float(sigmas[i + 1]))
    return x


def _pipeline_run(pipe, x, cond, shift_mode, output_type="latent"):
    """FluxPipeline from the same noise; FluxPipeline shifts the unshifted grid linspace(1, 0, T+1)[:-1] itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(pipe.scheduler.config)  # FLUX.1-dev's; the module-scoped pipe is reused, so set the mode explicitly
    config.update(use_dynamic_shifting=shift_mode == "dynamic", shift=3.0)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    base = torch.linspace(1.0, 0.0, STEPS + 1)[:-1].tolist()
    out = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               latents=x.clone(), sigmas=base, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH,
               guidance_scale=3.5, output_type=output_type, max_sequence_length=MAX_SEQ).images
    return out, pipe.scheduler.sigmas


def _our_sigmas(adapter, shift_mode):
    return sde.make_sigmas(STEPS, shift=3.0) if shift_mode == "static" else sde.make_sigmas(STEPS, mu=adapter.mu())


@pytest.mark.parametrize("shift_mode", ["static", "dynamic"])
@pytest.mark.slow
def test_ode_sampler_matches_flux_pipeline(pipe, cond, adapter, shift_mode):
    x = _noise(adapter)
    sigmas = _our_sigmas(adapter, shift_mode)
    ref, ref_sigmas = _pipeline_run(pipe, x, cond, shift_mode)
    torch.testing.assert_close(ref_sigmas.double(), sigmas, atol=1e-6, rtol=0)
    ours = ode_sample(adapter, x, sigmas, cond)
    assert ref.shape == ours.shape == (2, (HEIGHT // 16) * (WIDTH // 16), 64)
    assert (ours - x).abs().max() > 0.1  # the sampler moved
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


def test_training_rollout_code_matches_flux_pipeline(pipe, cond, adapter):
    """The same parity through the code the trainer and the evaluation CLI run: `run_rollout` on a one-chain ODE plan
    (float32 sigmas, keyed initial noise, depth batching, the deterministic last step), not a test-side loop."""
    from branchgrpo.core import plans
    from branchgrpo.models.base import gather_cond
    from branchgrpo.core.rollout import NoiseKeys, run_rollout

    sigmas = sde.make_sigmas(STEPS, shift=3.0)

    def velocity(x, sigma, prompt):
        return adapter.velocity(x, sigma, gather_cond(cond, prompt))

    with torch.no_grad():
        graph = run_rollout(plans.group_plan(STEPS, 1, sde_steps=[]), velocity, sigmas, sde.Kernel("dance", 0.3),
                            NoiseKeys(5, 0, (0, 1)), adapter.latent_shape, "cpu", batch_size=8, keep_all_latents=True)
    roots = torch.nonzero(graph.parent < 0).flatten()
    assert graph.prompt[roots].tolist() == [0, 1] and graph.prompt[graph.leaves].tolist() == [0, 1]
    ref, _ = _pipeline_run(pipe, graph.node_latents(roots), cond, "static")
    ours = graph.node_latents(graph.leaves)
    assert (ours - graph.node_latents(roots)).abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


def test_mu_is_flux_pipeline_shift(adapter):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert adapter.mu() == pytest.approx(calculate_shift(adapter.latent_shape[0]))


def test_pack_unpack_match_pipeline(pipe):
    z = torch.randn(2, 16, HEIGHT // 8, WIDTH // 8)
    packed = pack_latents(z)
    assert torch.equal(packed, pipe._pack_latents(z, 2, 16, HEIGHT // 8, WIDTH // 8))
    assert torch.equal(unpack_latents(packed, HEIGHT // 8, WIDTH // 8), z)
    assert torch.equal(pipe._unpack_latents(packed, HEIGHT, WIDTH, 8), z)


def test_per_sample_sigmas_equal_per_sample_calls(adapter, cond):
    x = _noise(adapter, batch=3, seed=1)
    sigmas = torch.tensor([1.0, 0.6, 0.13])
    batch_cond = {k: v[torch.tensor([0, 1, 0])] for k, v in cond.items()}
    with torch.no_grad():
        together = adapter.velocity(x, sigmas, batch_cond)
        alone = torch.cat([adapter.velocity(x[i : i + 1], sigmas[i : i + 1], {k: v[i : i + 1] for k, v in
                                                                                batch_cond.items()}) for i in range(3)])
        same_sigma = adapter.velocity(x, torch.full((3,), 0.6), batch_cond)
    assert together.dtype == torch.float32
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (together[0] - same_sigma[0]).abs().max() > 1e-3  # sigma really enters per sample


def test_bf16_embeddings_are_accepted(adapter, cond):
    x = _noise(adapter)
    bf16 = {k: v.to(torch.bfloat16) for k, v in cond.items()}
    with torch.no_grad():
        v = adapter.velocity(x, torch.full((2,), 0.5), bf16)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_decode_matches_pipeline(pipe, cond, adapter):
    x = _noise(adapter, seed=2)
    ref, _ = _pipeline_run(pipe, x, cond, "dynamic", output_type="pt")
    images = adapter.decode(ode_sample(adapter, x, _our_sigmas(adapter, "dynamic"), cond))
    assert images.shape == (2, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert (images - ref).abs().max().item() <= PARITY_ATOL


@pytest.mark.parametrize("height,width,flag", [(50, 48, "--h"), (64, 0, "--w"), (-16, 48, "--h"), (64, 40, "--w")])
def test_image_size_validation(flux_dir, height, width, flag):
    with pytest.raises(ValueError, match=flag):
        check_image_size(height, width)
    with pytest.raises(ValueError, match=flag):
        load_flux(str(flux_dir), "cpu", height=height, width=width)


def test_blocks_and_lora_targets(adapter):
    blocks = adapter.blocks()
    assert [type(b).__name__ for b in blocks] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert set(adapter.default_lora_targets) == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                 "add_v_proj", "to_add_out"}


def test_export_round_trip(adapter, cond, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    with torch.no_grad():  # make the weights differ from the checkpoint's
        for p in adapter.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    adapter.export(str(tmp_path / "out"))
    loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer",
                                                    local_files_only=True)
    ours = adapter.transformer.state_dict()
    assert set(loaded.state_dict()) == set(ours)
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    # A gathered state dict from a DDP-wrapped model ("module." keys), saved in bf16.
    adapter.export(str(tmp_path / "ddp"), state_dict={"module." + k: v for k, v in ours.items()}, dtype=torch.bfloat16)
    saved = load_file(str(tmp_path / "ddp" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == ours.keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, ours[k].bfloat16()) for k, v in saved.items())


def _randomise_lora(adapter):
    adapter.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))


@pytest.mark.slow
def test_lora_export_loads_in_flux_pipeline(flux_dir, adapter, cond, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    x, sigmas = _noise(adapter, seed=3), torch.full((2,), 0.7)
    with torch.no_grad():
        base_v = adapter.velocity(x, sigmas, cond)
    _randomise_lora(adapter)
    trainable = adapter.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    assert len(trainable) == sum(1 for n, _ in adapter.transformer.named_parameters() if "lora_" in n)
    with torch.no_grad():
        lora_v = adapter.velocity(x, sigmas, cond)
    assert (lora_v - base_v).abs().max() > 1e-3
    path = adapter.export_lora(str(tmp_path / "lora"))
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    # The same file from a full (gathered) state dict of the LoRA'd transformer.
    from_full = adapter.export_lora(str(tmp_path / "lora_full"), adapter.transformer.state_dict())
    a, b = load_file(str(path)), load_file(str(from_full))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in a)

    pipe = FluxPipeline.from_pretrained(str(flux_dir), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=path.name)  # offline: diffusers < 0.39 needs the name
    loaded = FluxAdapter(pipe.transformer, pipe.vae, HEIGHT, WIDTH)
    with torch.no_grad():
        loaded_v = loaded.velocity(x, sigmas, cond)
    torch.testing.assert_close(loaded_v, lora_v, atol=1e-5, rtol=1e-5)  # same scaling (rank 4, alpha 8) restored

    # Full-weight export of a LoRA'd model merges the adapter into plain weights.
    merged = load_flux(str(flux_dir), "cpu", height=HEIGHT, width=WIDTH)
    adapter.export(str(tmp_path / "merged"))
    merged.transformer = type(merged.transformer).from_pretrained(str(tmp_path / "merged"), subfolder="transformer")
    with torch.no_grad():
        torch.testing.assert_close(merged.velocity(x, sigmas, cond), lora_v, atol=1e-5, rtol=1e-5)


def test_missing_folder_errors(flux_dir, tmp_path):
    import argparse
    import shutil

    missing = tmp_path / "no_such_flux"
    with pytest.raises(FileNotFoundError, match="no_such_flux.*model_index.json, transformer/, vae/"):
        load_flux(str(missing), "cpu", height=HEIGHT, width=WIDTH)
    partial = tmp_path / "partial"
    shutil.copytree(flux_dir, partial)
    shutil.rmtree(partial / "vae")
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"partial lacks vae"):
        load_flux(str(partial), "cpu", height=HEIGHT, width=WIDTH)
    args = argparse.Namespace(max_sequence_length=MAX_SEQ, dtype="auto")
    with pytest.raises(FileNotFoundError, match=r"partial lacks text_encoder_2"):
        build_prompt_encoder(str(partial), "cpu", args)


@pytest.mark.slow
def test_prompt_encoder_matches_encode_prompt(flux_dir, cond):
    import argparse

    encode = build_prompt_encoder(str(flux_dir), "cpu", argparse.Namespace(max_sequence_length=MAX_SEQ, dtype="auto"))
    out = encode(PROMPTS)
    assert out["prompt_embeds"].shape == (2, MAX_SEQ, 32) and out["pooled_prompt_embeds"].shape == (2, 32)
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(out[key], cond[key], atol=1e-6, rtol=1e-5)
    bf16 = build_prompt_encoder(str(flux_dir), "cpu", argparse.Namespace(max_sequence_length=MAX_SEQ, dtype="bf16"))
    out16 = bf16(PROMPTS)
    assert all(v.dtype == torch.bfloat16 for v in out16.values())  # what preprocessing stores on GPUs
    torch.testing.assert_close(out16["pooled_prompt_embeds"].float(), cond["pooled_prompt_embeds"], atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="--dtype"):
        build_prompt_encoder(str(flux_dir), "cpu", argparse.Namespace(max_sequence_length=MAX_SEQ, dtype="fp16"))
    with pytest.raises(ValueError, match="--max_sequence_length"):
        build_prompt_encoder(str(flux_dir), "cpu", argparse.Namespace(max_sequence_length=600, dtype="auto"))


def test_mismatched_vae_and_transformer_are_refused(adapter):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, norm_num_groups=4)
    with pytest.raises(ValueError, match="takes 64 packed channels, but the VAE has 4 latent channels"):
        FluxAdapter(adapter.transformer, vae, HEIGHT, WIDTH)
