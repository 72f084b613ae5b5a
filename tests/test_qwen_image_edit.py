"""Qwen-Image-Edit (`--model qwen_image_edit`) against diffusers' QwenImageEditPipeline on a tiny random checkpoint
(CPU, offline).

Parity: ODE rollouts (eta = 0) of 2, 3 and 4 steps through the trainer's own `run_rollout` and velocity closure, on
the checkpoint's dynamic schedule, conditioned on what our prompt encoder stores (instruction and source through
Qwen2.5-VL with the edit template, the negative prompt with the same source, the source's packed latents), equal
QwenImageEditPipeline given the same source image, instruction and negative-prompt STRINGS (it encodes them and the
source itself) and the same noise, with true CFG 4.0, to <= 1e-5. The pipeline resizes every source to about
1024 x 1024 pixels, so the sources go in at that size (4096 source tokens after the 4 generated ones); one prompt
(each forward of [cond; negative] x 4100 tokens costs about a second on a CPU core).
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
from branchgrpo.core import sde
from branchgrpo.data.preprocess import read_prompts
from branchgrpo.models import get_backbone
from branchgrpo.models.qwen_image_edit import EDIT_TEMPLATE, TEMPLATE_TOKENS, source_resolution

from trainer_utils import ode_chains

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
    return read_prompts(ASSET_PROMPTS, "jsonl", image_size=(1024, 1024)).items[:1]  # a 1024 x 1024 source costs


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
    return (*ode_chains(adapter, cond, sigmas, len(cond["image_latents"])), sigmas)


def load_source(path):
    from diffusers.utils import load_image

    return load_image(str(path))


def _source(record):
    return load_source(record.image)


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
    assert ours.shape == (1, 4, 64) and adapter.guidance_scale == 4.0 and adapter.source_grid == (1, 64, 64)
    ref, ref_sigmas = _pipeline(pipe, records[0], noise, steps)
    torch.testing.assert_close(ref_sigmas.double(), sigmas, atol=1e-6, rtol=0)
    assert (ours - noise).abs().max() > 0.1  # the sampler moved
    print(f"steps {steps}: max abs diff {(ours - ref).abs().max().item():.3g}")
    assert (ours - ref).abs().max().item() <= PARITY_ATOL
    if steps == 2:  # the source enters: other source latents, another result
        other = {**cond, "image_latents": torch.randn_like(cond["image_latents"])}
        assert (_rollout(adapter, other, steps)[1] - ours).abs().max() > 100 * PARITY_ATOL


@pytest.mark.slow
def test_conditioning_equals_the_pipelines(pipe, cond, records):
    """Instruction and negative prompt, each with the source, equal the pipeline's `encode_prompt` on the resized
    source (the rest zero padding, mask 0); the source latents equal its `prepare_latents`. In the fixture the
    template's 64 dropped tokens end exactly before the source's vision tokens, as in the real tokenizer."""
    tokens = pipe.tokenizer(EDIT_TEMPLATE.format("x")).input_ids
    assert pipe.tokenizer.decode(tokens[:TEMPLATE_TOKENS]).endswith("<|im_start|>user\n")
    height, width = source_resolution(SIZE, SIZE, "preferred")
    assert (height, width) == (1024, 1024)
    for row, record in enumerate(records):
        image = pipe.image_processor.resize(_source(record), height, width)
        with torch.no_grad():
            for key, text in (("prompt_embeds", record.text), ("negative_prompt_embeds", NEGATIVE)):
                ref, ref_mask = pipe.encode_prompt(text, image=image, device="cpu")
                length = ref.shape[1]
                assert ref_mask is None or bool(ref_mask.all())  # one prompt: no padding
                assert int(cond[f"{key}_mask"][row].sum()) == length
                torch.testing.assert_close(cond[key][row, :length], ref[0], atol=1e-6, rtol=1e-5)
                assert cond[key][row, length:].abs().max() == 0
            pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
            _, latents = pipe.prepare_latents(pixels, 1, 16, SIZE, SIZE, torch.float32, "cpu", None)
        torch.testing.assert_close(cond["image_latents"][row : row + 1], latents, atol=1e-6, rtol=1e-5)
    assert cond["source_image"].shape == (1, 3, 1024, 1024) and cond["edit_mask"].shape == (1, 1, 1024, 1024)


def test_velocity_refuses_conditioning_it_cannot_use(adapter, cond):
    x, sigmas = torch.randn(1, *adapter.latent_shape), torch.tensor([0.5])
    with pytest.raises(KeyError, match="image_latents"):
        adapter.velocity(x, sigmas, {k: v for k, v in cond.items() if k != "image_latents"})
    with pytest.raises(ValueError, match="another source size"):
        adapter.velocity(x, sigmas, {**cond, "image_latents": cond["image_latents"][:, :16]})
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        adapter.velocity(x, sigmas, {k: v for k, v in cond.items() if not k.startswith("negative")})


@pytest.mark.parametrize("height,width,expected", [(1024, 1024, (1024, 1024)), (512, 768, (832, 1248)),
                                                   (32, 32, (1024, 1024))])
def test_preferred_source_size_is_the_pipelines_choice_for_the_runs_aspect_ratio(height, width, expected):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    assert source_resolution(height, width, "preferred") == expected
    assert calculate_dimensions(1024 * 1024, width / height)[:2] == expected[::-1]
    assert source_resolution(height, width, "generation") == (height, width)


# ----- training ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_training_iteration_has_ratio_one_at_theta_old_and_exports(edit_dir, spec, tmp_path):
    """The trainer on stored edit embeddings (sources at the generation size: 4 source tokens, 4 vision tokens), one
    process on CPU, true CFG: re-scoring at theta_old gives ratio exactly 1, the source-consistency reward gets each
    leaf's own source, and the full export loads in diffusers."""
    from diffusers import QwenImageTransformer2DModel
    from trainer_utils import train

    from branchgrpo.data.preprocess import run_preprocess

    encoder = spec.prompt_encoder(str(edit_dir), "cpu", _settings(source_size="generation"))
    index = run_preprocess(ASSET_PROMPTS, tmp_path / "emb", "qwen_image_edit", encoder, shard_size=8,
                           prompt_format="jsonl", image_size=(SIZE, SIZE))
    out = tmp_path / "run"
    train(["--model", "qwen_image_edit", "--pretrained_model_name_or_path", str(edit_dir), "--data_json_path",
           str(index), "--output_dir", str(out), "--h", str(SIZE), "--w", str(SIZE), "--source_size", "generation",
           "--reward", "source_consistency=1.0", "--device", "cpu", "--sampling_steps", "4", "--time_shift",
           "dynamic", "--tree_split_points", "0,1", "--train_batch_size", "2", "--max_train_steps", "1",
           "--num_eval_prompts", "1", "--report_to", "none", "--checkpointing_steps", "1", "--learning_rate", "1e-3",
           "--rollout_batch_size", "4", "--train_micro_batch_size", "4"])
    entry = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert entry["first_ratio_min"] == 1.0 == entry["first_ratio_max"]
    assert 0.0 < entry["reward_mean"] < 1.0
    trained = QwenImageTransformer2DModel.from_pretrained(str(out / "checkpoints" / "checkpoint-1" / "model"),
                                                          subfolder="transformer")
    base = QwenImageTransformer2DModel.from_pretrained(str(edit_dir), subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))


@pytest.mark.slow
def test_eval_cli_on_an_edit_jsonl_writes_source_and_result_grids(edit_dir, tmp_path):
    from PIL import Image

    from branchgrpo.cli.eval import main as eval_main

    out = tmp_path / "eval"
    assert eval_main(["--model", "qwen_image_edit", "--pretrained_model_name_or_path", str(edit_dir), "--h", "32",
                      "--w", "32", "--source_size", "generation", "--max_sequence_length", str(MAX_SEQ),
                      "--num_prompts", "2", "--samples_per_prompt", "2", "--steps", "2", "--time_shift", "dynamic",
                      "--rewards", "source_consistency", "--bootstrap", "50", "--output_dir", str(out),
                      "--device", "cpu", "--num_threads", "1"]) == 0
    consistency = json.loads((out / "results.json").read_text())["metrics"]["source_consistency"]
    assert consistency["n"] == 4 and 0 < consistency["mean"] < 1
    with Image.open(out / "grid.png") as grid:  # rows: source | 2 results, 32 px tiles at scale 2, 12 px labels
        assert grid.size == (3 * 64, 2 * (64 + 12))


# ----- bad input ---------------------------------------------------------------------------------------------------


def _copy(folder, tmp_path, name, pipeline=None):
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    if pipeline is not None:
        index = copy / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": pipeline}))
    return copy


def test_the_other_qwen_release_is_refused_before_loading(edit_dir, spec, tmp_path):
    """A Qwen-Image (text-to-image) folder given to the edit unit and an edit folder given to Qwen-Image: one line
    naming the folder's model_index.json and the pipeline expected."""
    plain = _copy(edit_dir, tmp_path, "qwen_image", "QwenImagePipeline")
    with pytest.raises(ValueError, match="qwen_image/model_index.json: a QwenImagePipeline checkpoint; --model "
                                         "qwen_image_edit takes a QwenImageEditPipeline folder"):
        spec.load(_model_cfg(plain), "cpu")
    with pytest.raises(ValueError, match="a QwenImagePipeline checkpoint"):
        spec.prompt_encoder(str(plain), "cpu", _settings())
    with pytest.raises(ValueError, match="a QwenImageEditPipeline checkpoint; --model qwen_image takes"):
        get_backbone("qwen_image").load(ModelConfig.for_backbone("qwen_image", str(edit_dir), h=SIZE, w=SIZE), "cpu")
    partial = _copy(edit_dir, tmp_path, "partial")
    shutil.rmtree(partial / "processor")
    with pytest.raises(FileNotFoundError, match="partial lacks processor"):
        spec.prompt_encoder(str(partial), "cpu", _settings())


@pytest.mark.parametrize("model,shipped,vision", [("qwen_image_edit", "qwen-image-edit", 37 ** 2),
                                                   ("qwen_image_edit_plus", "qwen-image-edit-2509", 14 ** 2)])
def test_planner_builds_the_release_on_the_meta_device(model, shipped, vision):
    """The shipped configs (the edit releases' transformer is Qwen-Image's shape): 60 blocks, 20.4B parameters
    (within 2%); a true-CFG forward carries the generated and the source tokens with both grids, and the source's
    vision tokens in the text (of a 1024 x 1024 copy: 37 x 37; Edit-2509's 384 x 384 copy: 14 x 14)."""
    from branchgrpo.config import config_from_flags

    cfg = config_from_flags({"model": model, "h": 512, "w": 512}, validate="none")
    config, source = cfg.model.spec.planner_config(cfg.model)
    assert source == shipped
    planned = cfg.model.spec.planner_model(cfg.model, config, torch.bfloat16)
    assert len(planned.blocks) == 60
    assert abs(sum(p.numel() for p in planned.transformer.parameters()) - 20.4e9) < 0.02 * 20.4e9
    inputs = planned.inputs(3)
    assert inputs["hidden_states"].shape == (6, 1024 + 4096, 64) and len(inputs["img_shapes"]) == 6
    assert inputs["img_shapes"][0] == [(1, 32, 32), (1, 64, 64)]
    assert inputs["encoder_hidden_states"].shape[1] == 512 + vision


def test_edit_2509_planner_counts_num_sources():
    """`--num_sources 3`: three sources' tokens in every forward (one grid each) and three vision copies in the text,
    so the memory per GPU grows with the count; out-of-range counts are refused naming the flag."""
    from branchgrpo.config import config_from_flags
    from branchgrpo.planner.gpu_memory import memory_model
    from branchgrpo.planner.memory import total_bytes

    totals = []
    for count in (1, 3):
        cfg = config_from_flags({"model": "qwen_image_edit_plus", "h": 512, "w": 512, "num_sources": count,
                                 "source_size": "generation"}, validate="none")
        config, _ = cfg.model.spec.planner_config(cfg.model)
        inputs = cfg.model.spec.planner_model(cfg.model, config, torch.bfloat16).inputs(1)
        assert inputs["hidden_states"].shape == (2, 1024 + count * 1024, 64)
        assert inputs["img_shapes"][0] == [(1, 32, 32)] + [(1, 32, 32)] * count
        assert inputs["encoder_hidden_states"].shape[1] == 512 + count * 14 ** 2
        model, _ = memory_model(cfg, {"nodes": 20, "train_forward_passes": 20}, 8, None, None)
        totals.append(total_bytes(model, 2)[0])
    assert totals[1] > totals[0]
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"--num_sources: need 1 to 3 source images per edit, got {bad}"):
            config_from_flags({"model": "qwen_image_edit_plus", "num_sources": bad}, validate="none").model.backbone\
                .validate()


# ----- Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline), two sources per edit --------------------------------------


@pytest.fixture(scope="module")
def plus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_image_edit_plus") / "qwen_image_edit_plus"
    make_tiny("qwen_image_edit_plus", str(folder))
    return folder


@pytest.fixture(scope="module")
def plus_pipe(plus_dir):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(str(plus_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _two_source_records(folder):
    edit = REPO / "assets" / "edit"
    (folder / "pairs.jsonl").write_text(json.dumps({"prompt": "Put the ball from picture 1 in front of the house",
                                                    "images": [str(edit / "red_ball.png"),
                                                               str(edit / "blue_house.png")]}) + "\n")
    return read_prompts(folder / "pairs.jsonl", "jsonl", image_size=(1024, 1024), max_images=3).items


@pytest.mark.slow
def test_edit_2509_rollouts_and_conditioning_match_the_plus_pipeline_with_two_sources(plus_dir, plus_pipe,
                                                                                       tmp_path):
    """Edit-2509 with two sources per edit: the encoding ("Picture 1: <vision> Picture 2: <vision>" before the
    instruction, Qwen2.5-VL on a 384 x 384 copy of each, the VAE on the 1024 x 1024 ones, their latents one after
    another) equals the pipeline's `encode_prompt`, and the rollouts of 2, 3 and 4 steps equal the pipeline's
    (encoding the instruction, negative prompt and both sources itself; 4 + 2 x 4096 tokens per forward). That the
    second source changes the prediction: test_edit_2509_velocity_takes_up_to_three_sources."""
    spec = get_backbone("qwen_image_edit_plus")
    records = _two_source_records(tmp_path)
    with torch.no_grad():
        cond = spec.prompt_encoder(str(plus_dir), "cpu", _settings())(records)
    sources = [load_source(path) for path in records[0].images]
    seen = [plus_pipe.image_processor.resize(image, 384, 384) for image in sources]
    with torch.no_grad():
        ref, _ = plus_pipe.encode_prompt(records[0].text, image=seen, device="cpu")
    length = ref.shape[1]
    assert int(cond["prompt_embeds_mask"][0].sum()) == length and length < 500  # 2 x 196 vision tokens, not 2 x 1369
    torch.testing.assert_close(cond["prompt_embeds"][0, :length], ref[0], atol=1e-6, rtol=1e-5)
    assert cond["image_latents"].shape == (1, 2 * 4096, 64) and cond["source_image"].shape == (1, 3, 1024, 1024)
    adapter = spec.load(ModelConfig.for_backbone("qwen_image_edit_plus", str(plus_dir), h=SIZE, w=SIZE), "cpu")
    assert adapter.pipeline_class_name == "QwenImageEditPlusPipeline"
    for steps in (2, 3, 4):
        noise, ours, _ = _rollout(adapter, cond, steps)
        out = plus_pipe(image=sources, prompt=records[0].text, negative_prompt=NEGATIVE, true_cfg_scale=4.0,
                        latents=noise.clone(), num_inference_steps=steps, height=SIZE, width=SIZE,
                        output_type="latent")
        print(f"Edit-2509, two sources, steps {steps}: max abs diff {(ours - out.images).abs().max().item():.3g}")
        assert (ours - noise).abs().max() > 0.1
        assert (ours - out.images).abs().max().item() <= PARITY_ATOL


def test_edit_2509_velocity_takes_up_to_three_sources(adapter):
    """The tiny transformer on random conditioning of the stored shapes (sources at the generation size: 4 tokens
    each): 1 to 3 sources run, a 4th or a partial one is refused naming the limit or the source size; the one-source
    release refuses a second source."""
    plus, one = (get_backbone(name).adapter_class(adapter.transformer, adapter.vae, SIZE, SIZE)
                 for name in ("qwen_image_edit_plus", "qwen_image_edit"))
    text = {"prompt_embeds": torch.randn(1, 6, 32), "prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long)}
    cond = {**text, **{f"negative_{k}": v for k, v in text.items()}}
    x, sigma = torch.randn(1, *plus.latent_shape), torch.tensor([0.5])
    outputs = []
    for count in (1, 2, 3):
        sources = {**cond, "image_latents": torch.randn(1, 4 * count, 64, generator=torch.Generator().manual_seed(0))}
        outputs.append(plus.velocity(x, sigma, sources))
        assert get_backbone("qwen_image_edit_plus").tokens_per_sample(plus, sources) == 2 * (4 + 6 + 4 * count)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4  # a second source changes the prediction
    with pytest.raises(ValueError, match="hold 4 source images, but --model qwen_image_edit_plus takes at most 3"):
        plus.velocity(x, sigma, {**cond, "image_latents": torch.randn(1, 16, 64)})
    with pytest.raises(ValueError, match="another source size"):
        plus.velocity(x, sigma, {**cond, "image_latents": torch.randn(1, 6, 64)})
    with pytest.raises(ValueError, match="--model qwen_image_edit takes at most 1"):
        one.velocity(x, sigma, {**cond, "image_latents": torch.randn(1, 8, 64)})
    two = get_backbone("qwen_image_edit_plus").adapter_class(adapter.transformer, adapter.vae, SIZE, SIZE,
                                                            num_sources=2)
    with pytest.raises(ValueError, match="hold 1 source image\\(s\\) per edit, but --num_sources is 2"):
        two.velocity(x, sigma, {**cond, "image_latents": torch.randn(1, 4, 64)})


def test_edit_2509_and_edit_folders_are_told_apart(edit_dir, tmp_path):
    plus = get_backbone("qwen_image_edit_plus")
    with pytest.raises(ValueError, match="a QwenImageEditPipeline checkpoint; --model qwen_image_edit_plus takes a "
                                         "QwenImageEditPlusPipeline folder"):
        plus.load(ModelConfig.for_backbone("qwen_image_edit_plus", str(edit_dir), h=SIZE, w=SIZE), "cpu")
    other = _copy(edit_dir, tmp_path, "plus", "QwenImageEditPlusPipeline")
    with pytest.raises(ValueError, match="a QwenImageEditPlusPipeline checkpoint; --model qwen_image_edit takes"):
        get_backbone("qwen_image_edit").prompt_encoder(str(other), "cpu", _settings())
