"""WanAdapter against diffusers' WanPipeline on a tiny random Wan2.1-style checkpoint (CPU, offline).

Parity tolerance: final latents of a 4-step Euler ODE sampler (eta = 0, no branching) agree with WanPipeline to
<= 1e-5 absolute in fp32 (measured about 3e-6 with CFG, latents are O(5)), on our static-shift grid and on the
pipeline's own FlowMatchEuler grid. The remaining difference is our one batched CFG forward (2B rows) against the
pipeline's two forwards, and the pipeline's float32 schedule. WanPipeline's `__call__` takes no `sigmas`, and its
scheduler builds its grid as linspace(t_max, t_min, T) before shifting, which is not DanceGRPO's linspace(1, 0, T + 1);
to compare on our grid, the scheduler's `set_timesteps` is handed our unshifted grid (it then applies the shift).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from branchgrpo.core import sde
from branchgrpo.models.wan import (
    DEFAULT_NEGATIVE_PROMPT,
    build_prompt_encoder,
    check_video_size,
    load_wan,
)
from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.models import get_backbone

REPO = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 9, 32, 48  # 3 latent frames of 4 x 6; non-square so that axis mix-ups show
PROMPTS = ["a red cat sitting on a wooden table", "an astronaut riding a horse in the desert at sunset"]
MAX_SEQ = 16
STEPS = 4
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "wan"
    make_tiny("wan", str(folder))  # what `python -m branchgrpo.make_tiny wan DIR` runs
    return folder


@pytest.fixture(scope="module")
def pipe(wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(wan_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cond(pipe):
    with torch.no_grad():
        prompt_embeds, negative = pipe.encode_prompt(PROMPTS, negative_prompt=[DEFAULT_NEGATIVE_PROMPT] * 2,
                                                     max_sequence_length=MAX_SEQ)
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}


@pytest.fixture
def adapter(wan_dir):
    """A fresh adapter per test (LoRA tests modify theirs)."""
    return load_wan(str(wan_dir), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)


def _noise(adapter, batch=2, seed=0):
    return torch.randn(batch, *adapter.latent_shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ode_sample(adapter, x, sigmas, cond):
    """Our sampler with eta = 0: a loop of adapter.velocity + sde.ode_step."""
    for i in range(len(sigmas) - 1):
        sigma_B = torch.full((x.shape[0],), float(sigmas[i]))
        x = sde.ode_step(x, adapter.velocity(x, sigma_B, cond), sigma_B, float(sigmas[i + 1]))
    return x


def _pipeline_run(pipe, x, cond, guidance, grid, shift, output_type="latent"):
    """WanPipeline from the same noise with an Euler scheduler of the checkpoint's shift. grid "ours": the scheduler
    shifts DanceGRPO's linspace(1, 0, T + 1)[:-1]; "pipeline": its own default grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    if grid == "ours":
        set_timesteps = scheduler.set_timesteps
        unshifted = torch.linspace(1.0, 0.0, STEPS + 1)[:-1].tolist()
        scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(n, device=device, sigmas=unshifted)
    pipe.scheduler = scheduler
    out = pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
               latents=x.clone(), num_inference_steps=STEPS, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
               num_frames=FRAMES, output_type=output_type, max_sequence_length=MAX_SEQ).frames
    return out, scheduler.sigmas.double()


@pytest.mark.parametrize("guidance,grid", [(5.0, "ours"), (1.0, "ours"), (5.0, "pipeline")])
@pytest.mark.slow
def test_ode_sampler_matches_wan_pipeline(pipe, cond, adapter, guidance, grid):
    adapter.guidance_scale = guidance
    x = _noise(adapter)
    ref, ref_sigmas = _pipeline_run(pipe, x, cond, guidance, grid, adapter.native_shift)
    sigmas = sde.make_sigmas(STEPS, shift=adapter.native_shift)
    if grid == "ours":
        torch.testing.assert_close(ref_sigmas, sigmas, atol=1e-6, rtol=0)
    else:  # the pipeline's grid differs from ours; run our sampler on it
        assert (ref_sigmas - sigmas).abs().max() > 1e-3
        sigmas = ref_sigmas
    ours = ode_sample(adapter, x, sigmas, cond)
    assert ref.shape == ours.shape == (2, 16, 3, HEIGHT // 8, WIDTH // 8)
    assert (ours - x).abs().max() > 0.1  # the sampler moved
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


def test_shift_is_read_from_the_checkpoint_scheduler(adapter):
    assert adapter.native_shift == 3.0  # UniPCMultistepScheduler(flow_shift=3.0), as Wan2.1-T2V-1.3B-Diffusers ships


def test_cfg_is_one_batched_forward_equal_to_two_forwards(adapter, cond):
    x, sigmas = _noise(adapter, seed=1), torch.tensor([0.9, 0.4])
    model = adapter.transformer
    with torch.no_grad():
        guided = adapter.velocity(x, sigmas, cond)
        t = sigmas * 1000.0
        v_cond = model(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]
        v_unc = model(hidden_states=x, timestep=t, encoder_hidden_states=cond["negative_prompt_embeds"],
                      return_dict=False)[0]
        adapter.guidance_scale = 1.0
        unguided = adapter.velocity(x, sigmas, {"prompt_embeds": cond["prompt_embeds"]})  # no negative needed
    torch.testing.assert_close(guided, v_unc + 5.0 * (v_cond - v_unc), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unguided, v_cond, atol=1e-6, rtol=1e-6)
    assert (guided - unguided).abs().max() > 1e-2  # CFG on and off differ


def test_negative_embedding_forms_and_errors(adapter, cond):
    x, sigmas = _noise(adapter, seed=2), torch.tensor([0.7, 0.7])
    shared = {"prompt_embeds": cond["prompt_embeds"], "negative_prompt_embeds": cond["negative_prompt_embeds"][0]}
    with torch.no_grad():  # the store's extras hold one [L, D] embedding: accepted and expanded
        torch.testing.assert_close(adapter.velocity(x, sigmas, shared), adapter.velocity(x, sigmas, cond))
        with pytest.raises(KeyError, match="negative_prompt_embeds"):
            adapter.velocity(x, sigmas, {"prompt_embeds": cond["prompt_embeds"]})
        with pytest.raises(ValueError, match="--max_sequence_length"):
            adapter.velocity(x, sigmas, {**cond, "negative_prompt_embeds": cond["negative_prompt_embeds"][:, :8]})


def test_per_sample_sigmas_equal_per_sample_calls(adapter, cond):
    x = _noise(adapter, batch=3, seed=3)
    sigmas = torch.tensor([1.0, 0.6, 0.13])
    batch_cond = {k: v[torch.tensor([0, 1, 0])] for k, v in cond.items()}
    with torch.no_grad():
        together = adapter.velocity(x, sigmas, batch_cond)
        alone = torch.cat([adapter.velocity(x[i:i + 1], sigmas[i:i + 1], {k: v[i:i + 1] for k, v in batch_cond.items()})
                           for i in range(3)])
        same_sigma = adapter.velocity(x, torch.full((3,), 0.6), batch_cond)
    assert together.dtype == torch.float32
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (together[0] - same_sigma[0]).abs().max() > 1e-3  # sigma really enters per sample


def test_bf16_embeddings_are_accepted(adapter, cond):
    with torch.no_grad():
        v = adapter.velocity(_noise(adapter), torch.full((2,), 0.5), {k: v.bfloat16() for k, v in cond.items()})
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_decode_matches_pipeline(pipe, cond, adapter):
    x = _noise(adapter, seed=4)
    ref, _ = _pipeline_run(pipe, x, cond, 5.0, "ours", adapter.native_shift, output_type="pt")  # [B, F, C, H, W]
    video = adapter.decode(ode_sample(adapter, x, sde.make_sigmas(STEPS, shift=adapter.native_shift), cond))
    assert video.shape == (2, 3, FRAMES, HEIGHT, WIDTH) and video.dtype == torch.float32
    assert video.min() >= 0.0 and video.max() <= 1.0 and video.std() > 0
    assert (video - ref.permute(0, 2, 1, 3, 4)).abs().max().item() <= PARITY_ATOL


@pytest.mark.parametrize("frames,height,width,flag", [(8, 32, 48, "--num_frames"), (0, 32, 48, "--num_frames"),
                                                     (9, 40, 48, "--h"), (9, 32, 0, "--w"), (9, -16, 48, "--h")])
def test_video_size_validation(wan_dir, frames, height, width, flag):
    with pytest.raises(ValueError, match=flag):
        check_video_size(frames, height, width)
    with pytest.raises(ValueError, match=flag):
        load_wan(str(wan_dir), "cpu", height=height, width=width, num_frames=frames)


def test_blocks_and_lora_targets(adapter):
    assert [type(b).__name__ for b in adapter.blocks()] == ["WanTransformerBlock"] * 2
    assert adapter.default_lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert get_backbone("wan").media == "video" and adapter.embedding_keys == ("prompt_embeds", "negative_prompt_embeds")


def test_export_round_trip(adapter, tmp_path):
    from diffusers import WanTransformer3DModel

    with torch.no_grad():  # make the weights differ from the checkpoint's
        for p in adapter.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    adapter.export(str(tmp_path / "out"))
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer",
                                                   local_files_only=True)
    ours = adapter.transformer.state_dict()
    assert set(loaded.state_dict()) == set(ours)
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())


@pytest.mark.slow
def test_lora_export_loads_in_wan_pipeline_and_changes_its_output(wan_dir, adapter, cond, tmp_path):
    from diffusers import WanPipeline

    x, sigmas = _noise(adapter, seed=5), sde.make_sigmas(STEPS, shift=adapter.native_shift)
    base = ode_sample(adapter, x, sigmas, cond)
    adapter.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    trainable = adapter.trainable_parameters()
    assert trainable and len(trainable) == sum(1 for n, _ in adapter.transformer.named_parameters() if "lora_" in n)
    tuned = ode_sample(adapter, x, sigmas, cond)
    assert (tuned - base).abs().max() > 1e-2
    path = adapter.export_lora(str(tmp_path / "lora"))
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    from safetensors.torch import load_file  # the trainer passes a gathered full state dict: same file

    from_state = adapter.export_lora(str(tmp_path / "lora_from_state"), adapter.transformer.state_dict())
    written, again = load_file(str(path)), load_file(str(from_state))
    assert written.keys() == again.keys() and all(torch.equal(written[k], again[k]) for k in written)

    pipe = WanPipeline.from_pretrained(str(wan_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=path.name)  # offline: diffusers < 0.39 needs the name
    ref, _ = _pipeline_run(pipe, x, cond, adapter.guidance_scale, "ours", adapter.native_shift)
    assert (ref - tuned).abs().max().item() <= PARITY_ATOL  # same LoRA scaling (rank 4, alpha 8) restored
    assert (ref - base).abs().max() > 1e-2  # the loaded LoRA changes the pipeline's output

    merged = load_wan(str(wan_dir), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    adapter.export(str(tmp_path / "merged"))  # full export of a LoRA'd model merges the adapter
    merged.transformer = type(merged.transformer).from_pretrained(str(tmp_path / "merged"), subfolder="transformer")
    assert (ode_sample(merged, x, sigmas, cond) - tuned).abs().max().item() <= PARITY_ATOL


def test_missing_folder_and_unsupported_checkpoints(wan_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    from branchgrpo.testing.wan_tiny import TRANSFORMER_CONFIG

    with pytest.raises(FileNotFoundError, match="no_such_wan.*model_index.json, transformer/, vae/"):
        load_wan(str(tmp_path / "no_such_wan"), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    partial = tmp_path / "partial"
    shutil.copytree(wan_dir, partial)
    shutil.rmtree(partial / "vae")
    shutil.rmtree(partial / "text_encoder")
    with pytest.raises(FileNotFoundError, match="partial lacks vae"):
        load_wan(str(partial), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    with pytest.raises(FileNotFoundError, match="partial lacks text_encoder"):
        build_prompt_encoder(str(partial), "cpu", argparse.Namespace(max_sequence_length=MAX_SEQ, dtype="auto"))
    i2v = tmp_path / "i2v"
    shutil.copytree(wan_dir, i2v)  # an image-to-video transformer: CLIP image tokens and 36 input channels
    WanTransformer3DModel(**{**TRANSFORMER_CONFIG, "in_channels": 36, "image_dim": 8, "added_kv_proj_dim": 24}
                          ).save_pretrained(str(i2v / "transformer"))
    with pytest.raises(ValueError, match="image-to-video"):
        load_wan(str(i2v), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)


# ----- prompt preprocessing ----------------------------------------------------------------------------------------


def _prompt_file(path: Path) -> Path:
    path.write_text("\n".join(PROMPTS + ["a &amp; b:   spaced   out  "]) + "\n")  # escaped HTML, runs of spaces
    return path


def _reference(pipe, texts, negative):
    with torch.no_grad():
        embeds, neg = pipe.encode_prompt(texts, negative_prompt=[negative] * len(texts), max_sequence_length=MAX_SEQ)
    return embeds, neg[0]


def test_preprocess_cli_equals_encode_prompt_and_writes_negative_extras(wan_dir, pipe, tmp_path):
    from branchgrpo.cli import preprocess as cli
    from branchgrpo.data.embeddings import EmbeddingStore

    prompts, out = _prompt_file(tmp_path / "p.txt"), tmp_path / "emb"
    cli.main(["--model", "wan", "--model_path", str(wan_dir), "--prompts", str(prompts), "--output_dir", str(out),
              "--max_sequence_length", str(MAX_SEQ), "--shard_size", "2", "--batch_size", "2", "--device", "cpu"])
    store = EmbeddingStore(out)
    texts = [store.text(i) for i in range(len(store))]
    embeds, negative = _reference(pipe, texts, DEFAULT_NEGATIVE_PROMPT)
    torch.testing.assert_close(store.batch(range(len(store)))["prompt_embeds"], embeds, atol=1e-6, rtol=1e-5)
    assert store.keys["prompt_embeds"] == ((MAX_SEQ, 32), "F32")
    assert set(store.extras) == {"negative_prompt_embeds"}
    torch.testing.assert_close(store.extras["negative_prompt_embeds"], negative, atol=1e-6, rtol=1e-5)
    embeds_empty, _ = _reference(pipe, texts[:1], "")
    assert (embeds_empty[0] - embeds[0]).abs().max() == 0  # prompts do not depend on the negative prompt
    with pytest.raises(ValueError, match="--max_sequence_length"):
        build_prompt_encoder(str(wan_dir), "cpu", argparse.Namespace(max_sequence_length=513, dtype="auto"))


@pytest.mark.slow
def test_launcher_with_two_processes_and_custom_negative_prompt(wan_dir, pipe, tmp_path):
    """The bash launcher: torchrun, NPROC=2 on gloo (CPU); NEGATIVE_PROMPT reaches the extras."""
    out = tmp_path / "emb"
    env = dict(os.environ, NPROC="2", MODEL_PATH=str(wan_dir), PROMPTS=str(_prompt_file(tmp_path / "p.txt")),
               OUTPUT_DIR=str(out), NEGATIVE_PROMPT="blurry, static", MAX_SEQUENCE_LENGTH=str(MAX_SEQ),
               MASTER_PORT=str(29500 + (os.getpid() + 7) % 1000), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = REPO / "scripts" / "preprocess" / "preprocess_wan_rl_embeddings.sh"
    result = subprocess.run(["bash", str(script), "--shard_size", "2", "--device", "cpu"], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "rank 1: shard" in result.stderr  # the second process did encode its share
    index = json.loads((out / "index.json").read_text())
    assert index["model"] == "wan" and len(index["shards"]) == 2
    from branchgrpo.data.embeddings import EmbeddingStore

    store = EmbeddingStore(out)
    texts = [store.text(i) for i in range(len(store))]
    embeds, negative = _reference(pipe, texts, "blurry, static")
    torch.testing.assert_close(store.batch(range(len(store)))["prompt_embeds"], embeds, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(store.extras["negative_prompt_embeds"], negative, atol=1e-6, rtol=1e-5)


def test_launcher_reports_missing_inputs(tmp_path):
    env = dict(os.environ, MODEL_PATH=str(tmp_path / "nothing"), PROMPTS=str(tmp_path / "none.txt"))
    script = REPO / "scripts" / "preprocess" / "preprocess_wan_rl_embeddings.sh"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "none.txt not found" in result.stderr and "nothing not found" in result.stderr

