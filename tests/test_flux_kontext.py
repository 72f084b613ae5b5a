"""FLUX.1-Kontext (`--model flux_kontext`) against diffusers' FluxKontextPipeline on a tiny random checkpoint (CPU,
offline), and the edit JSONL files it preprocesses.

Parity: ODE rollouts (eta = 0) of 2, 3 and 4 steps through the trainer's own `run_rollout` and velocity closure,
conditioned on what our prompt encoder stores (T5 + CLIP of the instruction, the source image's packed latents),
equal FluxKontextPipeline given the same source image, noise, sigmas and text embeddings - the pipeline encoding
the source itself - to <= 1e-5, with the resolution-dependent shift (`mu` of the generated tokens) and embedded
guidance 2.5. The pipeline takes one source image per call, so it runs once per prompt.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.config.sections import ModelConfig
from branchgrpo.core import sde
from branchgrpo.data.preprocess import read_prompts
from branchgrpo.models import get_backbone
from branchgrpo.models.flux_kontext import FluxKontextAdapter, source_resolution

from trainer_utils import ode_chains

REPO = Path(__file__).resolve().parents[1]
ASSET_PROMPTS = REPO / "assets" / "edit_prompts.jsonl"
SIZE = 32  # 2 x 2 packed tokens of the tiny VAE's 4 x 4 latent
MAX_SEQ = 16
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_kontext") / "flux_kontext"
    make_tiny("flux_kontext", str(folder))  # what `python -m branchgrpo.make_tiny flux_kontext DIR` runs
    return folder


@pytest.fixture(scope="module")
def spec():
    return get_backbone("flux_kontext")


@pytest.fixture(scope="module")
def records():
    return read_prompts(ASSET_PROMPTS, "jsonl", image_size=(SIZE, SIZE)).items[:2]


def _settings(source_size="generation"):
    return SimpleNamespace(dtype="auto", max_sequence_length=MAX_SEQ, h=SIZE, w=SIZE, source_size=source_size)


@pytest.fixture(scope="module")
def cond(kontext_dir, spec, records):
    with torch.no_grad():
        return spec.prompt_encoder(str(kontext_dir), "cpu", _settings())(records)


def _model_cfg(folder, source_size="generation"):
    return ModelConfig.for_backbone("flux_kontext", str(folder), h=SIZE, w=SIZE, source_size=source_size)


@pytest.fixture
def adapter(kontext_dir, spec):
    """A fresh adapter per test (LoRA tests modify theirs)."""
    return spec.load(_model_cfg(kontext_dir), "cpu")


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(kontext_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rollout(adapter, cond, steps):
    """The trainer's sampler at eta = 0 (one ODE chain per prompt), with the pipeline's shift: (noise, final)."""
    return ode_chains(adapter, cond, sde.make_sigmas(steps, mu=adapter.mu()), len(cond["image_latents"]))


def _pipeline(pipe, image, noise, cond, row, steps, auto_resize=False):
    """FluxKontextPipeline on one source image (it shifts the unshifted grid linspace(1, 0, T + 1)[:-1] itself);
    `max_area` keeps the tiny generation size."""
    out = pipe(image=image, prompt_embeds=cond["prompt_embeds"][row : row + 1],
               pooled_prompt_embeds=cond["pooled_prompt_embeds"][row : row + 1], latents=noise.clone(),
               sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), num_inference_steps=steps, height=SIZE,
               width=SIZE, max_area=SIZE * SIZE, guidance_scale=2.5, output_type="latent",
               max_sequence_length=MAX_SEQ, _auto_resize=auto_resize)
    return out.images


def _sources(records, size):
    """The records' source images as the pipeline is handed them: at the source size (no auto-resize), or as is."""
    from diffusers.utils import load_image

    images = [load_image(str(r.image)) for r in records]
    return images if size is None else [image.resize((size, size), Image.LANCZOS) for image in images]


# ----- the backbone against the pipeline ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 3, 4])
def test_rollout_matches_flux_kontext_pipeline(pipe, cond, records, adapter, steps):
    noise, ours = _rollout(adapter, cond, steps)
    assert ours.shape == (2, 4, 64) and adapter.guidance_scale == 2.5
    for row, image in enumerate(_sources(records, SIZE)):
        ref = _pipeline(pipe, image, noise[row : row + 1], cond, row, steps)
        assert (ours[row] - noise[row]).abs().max() > 0.1  # the sampler moved
        assert (ours[row : row + 1] - ref).abs().max().item() <= PARITY_ATOL
    # the source enters: the prompts' sources swapped, the rollout changes
    swapped = {**cond, "image_latents": cond["image_latents"].flip(0)}
    assert (_rollout(adapter, swapped, steps)[1] - ours).abs().max() > 1e-2


@pytest.mark.slow
def test_preferred_source_size_matches_the_pipelines_auto_resize(pipe, kontext_dir, spec, records):
    """The default source size: a square run's sources go in at 1024 x 1024 (4096 source tokens), as the pipeline
    resizes a square source image itself."""
    with torch.no_grad():
        cond = spec.prompt_encoder(str(kontext_dir), "cpu", _settings("preferred"))(records[:1])
    assert cond["image_latents"].shape == (1, 64 * 64, 64) and cond["source_image"].shape == (1, 3, 1024, 1024)
    adapter = spec.load(_model_cfg(kontext_dir, "preferred"), "cpu")
    noise, ours = _rollout(adapter, cond, 2)
    ref = _pipeline(pipe, _sources(records[:1], None)[0], noise, cond, 0, 2, auto_resize=True)
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


def test_conditioning_equals_the_pipelines(pipe, cond, records):
    """What preprocessing stores is what the pipeline builds: the instruction's T5 + CLIP embeddings, the resized
    source's pixels and its packed latents with ids (1, row, col)."""
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(prompt=[r.text for r in records], prompt_2=None,
                                             max_sequence_length=MAX_SEQ)
        pixels = pipe.image_processor.preprocess(_sources(records, SIZE), SIZE, SIZE)
        _, source, _, ids = pipe.prepare_latents(pixels, 2, 16, SIZE, SIZE, torch.float32, "cpu")
    torch.testing.assert_close(cond["prompt_embeds"], text, atol=0, rtol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, atol=0, rtol=0)
    assert cond["source_image"].dtype == torch.uint8 and cond["source_image"].shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(cond["source_image"].float() / 255 * 2 - 1, pixels, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond["image_latents"], source, atol=1e-6, rtol=1e-5)
    assert ids[:, 0].eq(1).all() and ids[:, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_velocity_is_the_transformer_on_both_token_sets_cut_to_the_generated(adapter, cond):
    from branchgrpo.models.flux import token_ids

    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v = adapter.velocity(x, sigmas, cond)
        full = adapter.transformer(hidden_states=torch.cat([x, cond["image_latents"]], dim=1), timestep=sigmas,
                                   guidance=torch.full((2,), 2.5), pooled_projections=cond["pooled_prompt_embeds"],
                                   encoder_hidden_states=cond["prompt_embeds"], txt_ids=torch.zeros(MAX_SEQ, 3),
                                   img_ids=torch.cat([token_ids(2, 2, "cpu"), token_ids(2, 2, "cpu", first=1.0)]),
                                   return_dict=False)[0]
    assert full.shape == (2, 8, 64) and v.shape == (2, 4, 64)
    torch.testing.assert_close(v, full[:, :4], atol=0, rtol=0)


def test_adapter_refuses_conditioning_it_cannot_use(adapter, cond):
    x, sigmas = torch.zeros(2, *adapter.latent_shape), torch.tensor([0.5, 0.5])
    with torch.no_grad(), pytest.raises(ValueError, match="another source size.*H, W and SOURCE_SIZE"):
        adapter.velocity(x, sigmas, {**cond, "image_latents": cond["image_latents"][:, :2]})
    with torch.no_grad(), pytest.raises(KeyError, match="image_latents"):
        adapter.velocity(x, sigmas, {k: v for k, v in cond.items() if k != "image_latents"})


def test_spec_answers_for_editing(spec, adapter, cond):
    assert adapter.embedding_keys == ("prompt_embeds", "pooled_prompt_embeds", "image_latents")
    assert (spec.media, spec.prompt_format, spec.default_prompts()) == ("image", "jsonl", ASSET_PROMPTS)
    defaults = SimpleNamespace(h=None, w=None, source_size=None)
    assert spec.encoder_sizes(defaults) == {"h": 1024, "w": 1024, "source_size": "preferred"}
    assert spec.image_size(defaults) == (1024, 1024) and spec.Config().resolved("guidance_scale") == 2.5
    assert spec.image_size(SimpleNamespace(h=512, w=768, source_size="generation")) == (512, 768)
    assert spec.tokens_per_sample(adapter, cond) == 4 + 4 + MAX_SEQ  # generated + source + text
    assert adapter.mu() == pytest.approx(sde.flux_mu(4))  # the generated tokens only


@pytest.mark.parametrize("height,width,expected", [(1024, 1024, (1024, 1024)), (512, 512, (1024, 1024)),
                                                   (720, 1280, (752, 1392)), (1280, 720, (1392, 752))])
def test_preferred_source_size_is_the_pipelines_choice_for_the_runs_aspect_ratio(height, width, expected):
    assert source_resolution(height, width, "preferred") == expected
    assert source_resolution(height, width, "generation") == (height, width)


def test_other_checkpoints_are_refused(kontext_dir, tmp_path, spec):
    flux = tmp_path / "flux"
    shutil.copytree(kontext_dir, flux)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="names 'FluxPipeline', not FluxKontextPipeline.*--model flux"):
        spec.load(_model_cfg(flux), "cpu")
    with pytest.raises(ValueError, match="names 'FluxPipeline'"):
        spec.check_files(_model_cfg(flux))
    with pytest.raises(ValueError, match="names 'FluxPipeline'"):
        spec.prompt_encoder(str(flux), "cpu", _settings())
    shutil.rmtree(flux / "vae")
    with pytest.raises(FileNotFoundError, match="lacks vae"):
        spec.prompt_encoder(str(flux), "cpu", _settings())
    with pytest.raises(ValueError, match="--h: 40 is not a multiple of 16"):
        spec.check_files(ModelConfig.for_backbone("flux_kontext", str(kontext_dir), h=40, w=SIZE))


def test_edit_jsonl_lines_are_checked_against_the_source_size(tmp_path):
    """Generic JSONL checks on edit lines: "images" lists (at most as many as the backbone takes, as many on every
    line), empty instructions, sources whose aspect ratio the model would distort - refused or skipped by line
    number."""
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "square.png")
    Image.new("RGB", (96, 48), (200, 40, 40)).save(tmp_path / "wide.png")
    lines = ['{"prompt": "make it blue", "image": "square.png"}', '{"prompt": "  ", "image": "square.png"}',
             '{"prompt": "make it wide", "image": "wide.png"}',
             '{"prompt": "two sources", "images": ["square.png", "square.png"]}',
             '{"prompt": "both keys", "image": "square.png", "images": ["square.png"]}',
             '{"prompt": "one in a list", "images": ["square.png"]}']
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        read_prompts(tmp_path / "edits.jsonl", "jsonl", image_size=(1024, 1024))
    message = str(err.value)
    assert "4 bad line(s)" in message and "line 2: expected" in message and "line 5: expected" in message
    assert "line 3: image" in message and "100% off the 1024 x 1024" in message
    assert "line 4: 2 images, but this backbone takes at most 1" in message
    prompts = read_prompts(tmp_path / "edits.jsonl", "jsonl", "skip", image_size=(1024, 1024))
    assert prompts.texts == ["make it blue", "one in a list"] and prompts.skipped["wrong_size"] == 1
    several = read_prompts(tmp_path / "edits.jsonl", "jsonl", "skip", max_images=3)
    # line 4 gives two images where line 1 gives one: the stored conditioning has one shape per run
    assert [r.line for r in several.items] == [1, 3, 6] and several.skipped["bad_line"] == 3
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "two sources", "images": ["square.png", "wide.png"]}\n'
                                          '{"prompt": "one source", "image": "square.png"}\n')
    with pytest.raises(ValueError, match=r"line 2: 1 image\(s\), but line 1 gives 2: every line of a file must"):
        read_prompts(tmp_path / "pairs.jsonl", "jsonl", max_images=3)
    pairs = read_prompts(tmp_path / "pairs.jsonl", "jsonl", "skip", max_images=3)
    assert [r.images for r in pairs.items] == [(tmp_path / "square.png", tmp_path / "wide.png")]


def test_the_edit_mask_is_stored_at_the_source_size(kontext_dir, spec, cond, tmp_path):
    Image.new("RGB", (64, 64), (30, 120, 200)).save(tmp_path / "source.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half may change
    mask.save(tmp_path / "mask.png")
    (tmp_path / "edits.jsonl").write_text('{"prompt": "make the left half red", "image": "source.png", '
                                          '"mask": "mask.png"}\n{"prompt": "no mask", "image": "source.png"}\n'
                                          '{"prompt": "gone", "image": "source.png", "mask": "missing.png"}\n')
    prompts = read_prompts(tmp_path / "edits.jsonl", "jsonl", "skip", image_size=(SIZE, SIZE))
    assert prompts.items[0].mask == tmp_path / "mask.png" and prompts.skipped["missing_image"] == 1
    with torch.no_grad():
        stored = spec.prompt_encoder(str(kontext_dir), "cpu", _settings())(prompts.items)["edit_mask"]
    assert stored.dtype == torch.uint8 and stored.shape == (2, 1, SIZE, SIZE)
    assert stored[0, 0, :, : SIZE // 2].eq(1).all() and stored[0, 0, :, SIZE // 2 :].eq(0).all()
    assert stored[1].eq(0).all() and cond["edit_mask"].eq(0).all()  # no mask given: no region


@pytest.mark.slow
def test_one_training_iteration_has_ratio_one_at_theta_old(kontext_dir, spec, tmp_path):
    """The trainer on stored edit embeddings, one process on CPU: re-scoring at theta_old gives ratio exactly 1 and
    the source-consistency reward gets each leaf's own source."""
    from branchgrpo.data.preprocess import run_preprocess
    from trainer_utils import train

    encoder = spec.prompt_encoder(str(kontext_dir), "cpu", _settings())
    index = run_preprocess(ASSET_PROMPTS, tmp_path / "emb", "flux_kontext", encoder, shard_size=8,
                           prompt_format="jsonl", image_size=(SIZE, SIZE))
    out = tmp_path / "run"
    train(["--model", "flux_kontext", "--pretrained_model_name_or_path", str(kontext_dir), "--data_json_path",
           str(index), "--output_dir", str(out), "--h", str(SIZE), "--w", str(SIZE), "--source_size", "generation",
           "--reward", "source_consistency=1.0", "--device", "cpu", "--sampling_steps", "4", "--tree_split_points",
           "0,1", "--train_batch_size", "2", "--max_train_steps", "1", "--num_eval_prompts", "1", "--report_to",
           "none", "--checkpointing_steps", "0", "--learning_rate", "1e-3", "--rollout_batch_size", "4",
           "--train_micro_batch_size", "4"])
    entry = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert entry["first_ratio_min"] == 1.0 == entry["first_ratio_max"]
    assert 0.0 < entry["reward_mean"] < 1.0


@pytest.mark.slow
def test_eval_cli_on_an_edit_jsonl_writes_source_and_result_grids(kontext_dir, tmp_path):
    from branchgrpo.cli.eval import main as eval_main

    out = tmp_path / "eval"
    assert eval_main(["--model", "flux_kontext", "--pretrained_model_name_or_path", str(kontext_dir), "--h", "32",
                      "--w", "32", "--source_size", "generation", "--max_sequence_length", str(MAX_SEQ),
                      "--num_prompts", "2", "--samples_per_prompt", "2", "--steps", "2", "--time_shift", "dynamic",
                      "--rewards", "source_consistency", "--bootstrap", "50", "--output_dir", str(out),
                      "--device", "cpu", "--num_threads", "1"]) == 0
    result = json.loads((out / "results.json").read_text())
    consistency = result["metrics"]["source_consistency"]
    assert consistency["n"] == 4 and 0 < consistency["mean"] < 1 and consistency["ci95_normal"][0] < consistency["mean"]
    with Image.open(out / "grid.png") as grid:  # rows: source | 2 results, 32 px tiles at scale 2, 12 px labels
        assert grid.size == (3 * 64, 2 * (64 + 12))
        source = torch.from_numpy(np.asarray(grid.convert("RGB"))[12:76:2, 0:64:2].copy())
    with torch.no_grad():
        stored = get_backbone("flux_kontext").prompt_encoder(str(kontext_dir), "cpu", _settings())(
            read_prompts(ASSET_PROMPTS, "jsonl").items[:1])["source_image"][0]
    assert torch.equal(source.permute(2, 0, 1), stored)  # the first tile of the first row is the first source


def test_full_export_loads_as_the_kontext_transformer(adapter, cond, tmp_path):
    from diffusers import FluxTransformer2DModel

    with torch.no_grad():  # make the weights differ from the checkpoint's
        for p in adapter.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    adapter.export(str(tmp_path / "out"))
    loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer")
    x, sigmas = torch.randn(2, *adapter.latent_shape), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        ours = adapter.velocity(x, sigmas, cond)
        adapter.transformer = loaded
        torch.testing.assert_close(adapter.velocity(x, sigmas, cond), ours, atol=0, rtol=0)
