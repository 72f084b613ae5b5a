"""Wan2.1 image-to-video (`--model wan_i2v`) against diffusers' WanImageToVideoPipeline on a tiny random checkpoint
(CPU, offline), the JSONL prompt files it preprocesses, and the first-frame consistency reward.

Parity: a 3-step ODE rollout (eta = 0) through the trainer's own `run_rollout` and velocity closure, conditioned on
what our prompt encoder stores (UMT5 text, CLIP image tokens, first-frame latents), equals WanImageToVideoPipeline
given the same image, noise, sigmas and text embeddings - the pipeline building its own image conditioning - to
<= 1e-5 (measured 2.5e-6 to 5.4e-6 with CFG over 2-4 steps, latents about 4 in size). The pipeline takes one image
per call, so it runs once per prompt. The trainer's re-scoring at theta_old gives ratio exactly 1 on CPU (a
one-iteration training run).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from branchgrpo.core import sde
from branchgrpo.data.embeddings import EmbeddingStore, with_extras
from branchgrpo.data.preprocess import read_prompts, run_preprocess
from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.models import get_backbone
from branchgrpo.models.wan import DEFAULT_NEGATIVE_PROMPT, load_wan
from branchgrpo.models.wan_i2v import WanI2VAdapter, load_image
from branchgrpo.rewards.base import RewardSet, build_reward, decode_and_score

from trainer_utils import ode_chains

REPO = Path(__file__).resolve().parents[1]
ASSET_PROMPTS = REPO / "assets" / "i2v_prompts.jsonl"
FRAMES, HEIGHT, WIDTH = 9, 48, 80  # 3 latent frames of 6 x 10; 5:3, within 10% of the assets' 832 x 480
STEPS = 3
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_i2v") / "wan_i2v"
    make_tiny("wan_i2v", str(folder))  # what `python -m branchgrpo.make_tiny wan_i2v DIR` runs
    return folder


@pytest.fixture(scope="module")
def spec():
    return get_backbone("wan_i2v")


@pytest.fixture(scope="module")
def records():
    return read_prompts(ASSET_PROMPTS, "jsonl", image_size=(HEIGHT, WIDTH)).items[:2]


@pytest.fixture(scope="module")
def encoder(i2v_dir, spec):
    return spec.prompt_encoder(str(i2v_dir), "cpu", SimpleNamespace(dtype="auto", h=HEIGHT, w=WIDTH,
                                                                       num_frames=FRAMES))


@pytest.fixture(scope="module")
def cond(encoder, records):
    """Per-prompt conditioning as preprocessing stores it, with the negative prompt expanded per prompt."""
    with torch.no_grad():
        return with_extras(encoder(records), encoder.extras(), "cpu")


@pytest.fixture
def adapter(i2v_dir):
    """A fresh adapter per test (LoRA tests modify theirs)."""
    return load_wan(str(i2v_dir), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES, adapter_class=WanI2VAdapter)


@pytest.fixture(scope="module")
def pipe(i2v_dir):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(i2v_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rollout(adapter, cond, steps=STEPS):
    """The trainer's sampler at eta = 0 (one ODE chain per prompt): (initial noise, final latents)."""
    return ode_chains(adapter, cond, sde.make_sigmas(steps, shift=adapter.native_shift), 2)


def _pipeline(pipe, record, noise, cond, row, guidance, steps=STEPS):
    """WanImageToVideoPipeline on one image, with an Euler scheduler on our sigma grid (it is handed DanceGRPO's
    unshifted linspace(1, 0, T + 1) and applies the checkpoint's shift itself)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    set_timesteps = scheduler.set_timesteps
    unshifted = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
    scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(n, device=device, sigmas=unshifted)
    pipe.scheduler = scheduler
    return pipe(image=load_image(record.image), prompt_embeds=cond["prompt_embeds"][row : row + 1],
                negative_prompt_embeds=cond["negative_prompt_embeds"][row : row + 1], latents=noise.clone(),
                num_inference_steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                output_type="latent").frames


# ----- the backbone against the pipeline ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_rollout_matches_wan_i2v_pipeline(pipe, cond, records, adapter, guidance):
    adapter.guidance_scale = guidance
    noise, ours = _rollout(adapter, cond)
    assert ours.shape == (2, 16, 3, HEIGHT // 8, WIDTH // 8)
    for row, record in enumerate(records):
        ref = _pipeline(pipe, record, noise[row : row + 1], cond, row, guidance)
        assert (ours[row] - noise[row]).abs().max() > 0.1  # the sampler moved
        assert (ours[row : row + 1] - ref).abs().max().item() <= PARITY_ATOL
    # the image conditioning enters: the prompts' first frames swapped, the rollout changes
    swapped = {**cond, **{k: cond[k].flip(0) for k in ("image_embeds", "image_latents")}}
    assert (_rollout(adapter, swapped)[1] - ours).abs().max() > 1e-2


def test_conditioning_equals_the_pipelines(pipe, adapter, cond, records):
    """What preprocessing stores is what the pipeline builds: UMT5 text, CLIP tokens, the resized first frame, its
    VAE latents; and the adapter adds the pipeline's mask channels."""
    image = load_image(records[0].image)
    zeros = torch.zeros(1, *adapter.latent_shape)
    with torch.no_grad():
        text, negative = pipe.encode_prompt(records[0].text, negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                                            max_sequence_length=512)
        clip_tokens = pipe.encode_image(image, "cpu")
        pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH)
        _, condition = pipe.prepare_latents(pixels, 1, 16, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", latents=zeros)
    torch.testing.assert_close(cond["prompt_embeds"][:1], text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cond["negative_prompt_embeds"][:1], negative, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cond["image_embeds"][:1], clip_tokens, atol=1e-6, rtol=1e-5)
    assert cond["first_frame"].dtype == torch.uint8 and cond["first_frame"].shape == (2, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(cond["first_frame"][:1].float() / 255 * 2 - 1, pixels, atol=1e-6, rtol=0)
    inputs = adapter.model_input(zeros, {k: v[:1] for k, v in cond.items()})
    assert inputs.shape == (1, 36, *adapter.latent_shape[1:])
    torch.testing.assert_close(inputs[:, 16:20], condition[:, :4], atol=0, rtol=0)  # the mask
    torch.testing.assert_close(inputs[:, 20:], condition[:, 4:], atol=1e-5, rtol=1e-5)  # the first-frame latents


def test_cfg_is_one_batched_forward_with_the_image_on_both_rows(adapter, cond):
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.9, 0.4])
    model = adapter.transformer
    with torch.no_grad():
        guided = adapter.velocity(x, sigmas, cond)
        inputs = adapter.model_input(x, cond)
        assert inputs.shape[1] == 36 and torch.equal(inputs[:, :16], x)
        kwargs = dict(hidden_states=inputs, timestep=sigmas * 1000.0, encoder_hidden_states_image=cond["image_embeds"],
                      return_dict=False)
        v_cond = model(encoder_hidden_states=cond["prompt_embeds"], **kwargs)[0]
        v_unc = model(encoder_hidden_states=cond["negative_prompt_embeds"], **kwargs)[0]
    torch.testing.assert_close(guided, v_unc + 5.0 * (v_cond - v_unc), atol=1e-5, rtol=1e-5)


def test_bf16_conditioning_and_autocast_are_accepted(adapter, cond):
    """Mixed precision as on GPU: bf16 embeddings (a bf16 text encoder's), uint8 frames passed along, bf16 autocast."""
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    low = {k: (v if v.dtype == torch.uint8 else v.bfloat16()) for k, v in cond.items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v = adapter.velocity(x, torch.full((2,), 0.5), low)
    with torch.no_grad():
        ref = adapter.velocity(x, torch.full((2,), 0.5), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert (v - ref).abs().max() < 0.1 * ref.abs().max()


def test_adapter_refuses_conditioning_it_cannot_use(adapter, cond):
    x, sigmas = torch.zeros(2, *adapter.latent_shape), torch.tensor([0.5, 0.5])
    with torch.no_grad(), pytest.raises(ValueError, match="another video size.*H, W and FRAMES"):
        adapter.velocity(x, sigmas, {**cond, "image_latents": cond["image_latents"][:, :, :2]})
    with torch.no_grad(), pytest.raises(ValueError, match="exactly 512"):
        adapter.velocity(x, sigmas, {**cond, "prompt_embeds": cond["prompt_embeds"][:, :16],
                                     "negative_prompt_embeds": cond["negative_prompt_embeds"][:, :16]})
    with torch.no_grad(), pytest.raises(KeyError, match="image_latents"):
        adapter.velocity(x, sigmas, {k: v for k, v in cond.items() if k != "image_latents"})


def test_spec_answers_for_image_to_video(spec, adapter, cond):
    assert adapter.embedding_keys == ("prompt_embeds", "negative_prompt_embeds", "image_embeds", "image_latents")
    assert adapter.default_lora_targets == ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    assert [type(b).__name__ for b in adapter.blocks()] == ["WanTransformerBlock"] * 2
    assert (spec.media, spec.prompt_format, spec.default_prompts()) == ("video", "jsonl", ASSET_PROMPTS)
    assert "first_frame_consistency" in spec.eval_rewards and {"h", "w", "num_frames"} <= set(spec.encoder_flags)
    cfg = SimpleNamespace(h=None, w=None, num_frames=9)
    assert spec.encoder_sizes(cfg) == {"h": 480, "w": 832, "num_frames": 9} and spec.image_size(cfg) == (480, 832)
    assert get_backbone("wan").image_size(cfg) is None  # text-to-video reads no size
    # tokens: 3 x 3 x 5 latent patches + 512 text + 17 image tokens, twice with CFG
    assert spec.tokens_per_sample(adapter, cond) == 2 * (45 + 512 + 17)


def test_unsupported_checkpoints_are_refused(i2v_dir, tmp_path, spec):
    from diffusers import WanTransformer3DModel

    from branchgrpo.testing.wan_i2v_tiny import I2V_TRANSFORMER_CONFIG
    from branchgrpo.testing.wan_tiny import TRANSFORMER_CONFIG

    def load(folder):
        return load_wan(str(folder), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES, adapter_class=WanI2VAdapter)

    with pytest.raises(FileNotFoundError, match="Wan2.1-I2V folder holding .*image_encoder/"):
        load(tmp_path / "absent")
    t2v = tmp_path / "t2v"
    shutil.copytree(i2v_dir, t2v)
    WanTransformer3DModel(**TRANSFORMER_CONFIG).save_pretrained(str(t2v / "transformer"))
    with pytest.raises(ValueError, match="text-to-video Wan transformer.*--model wan"):
        load(t2v)
    with pytest.raises(ValueError, match="image-to-video Wan transformer.*--model wan_i2v"):
        load_wan(str(i2v_dir), "cpu", height=HEIGHT, width=WIDTH, num_frames=FRAMES)  # the T2V backbone refuses it
    flf = tmp_path / "flf2v"
    shutil.copytree(i2v_dir, flf)
    WanTransformer3DModel(**I2V_TRANSFORMER_CONFIG, pos_embed_seq_len=34).save_pretrained(str(flf / "transformer"))
    with pytest.raises(ValueError, match="first-last-frame"):
        load(flf)
    wan22 = tmp_path / "wan22"
    shutil.copytree(i2v_dir, wan22)
    index = json.loads((wan22 / "model_index.json").read_text())
    (wan22 / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.9}))
    with pytest.raises(ValueError, match="Wan2.2"):
        load(wan22)
    with pytest.raises(ValueError, match="--max_sequence_length.*512"):
        spec.prompt_encoder(str(i2v_dir), "cpu", SimpleNamespace(max_sequence_length=16, h=HEIGHT, w=WIDTH,
                                                                    num_frames=FRAMES))
    with pytest.raises(ValueError, match="--num_frames"):
        spec.prompt_encoder(str(i2v_dir), "cpu", SimpleNamespace(h=HEIGHT, w=WIDTH, num_frames=8))


# Wan2.1-I2V-14B-480P-Diffusers' transformer config (the 720P one is the same; its scheduler's flow_shift differs)
I2V_14B = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": 5120, "attention_head_dim": 128,
           "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": 1280,
           "in_channels": 36, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16, "patch_size": [1, 2, 2],
           "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}


@pytest.mark.parametrize("height,width,shift", [(480, 832, 3.0), (720, 1280, 5.0)])
def test_the_14b_480p_and_720p_configs_pass_the_checks(tmp_path, spec, height, width, shift):
    """The size and support checks that run before any weight is read accept the real 14B configs at their sizes
    (81 frames), and the shift is read from the scheduler (the trainer warns when --shift differs)."""
    from branchgrpo.config.sections import ModelConfig
    from branchgrpo.models.wan import read_flow_shift

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(I2V_14B))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"z_dim": 16, "temperal_downsample": [False, True, True]}))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": shift}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline",
                                                           "image_encoder": ["transformers", "CLIPVisionModel"],
                                                           "transformer_2": [None, None], "boundary_ratio": None}))
    model_cfg = ModelConfig.for_backbone("wan_i2v", str(tmp_path), h=height, w=width, num_frames=81)
    spec.check_files(model_cfg)
    assert read_flow_shift(tmp_path) == shift
    with pytest.raises(ValueError, match="image-to-video Wan transformer"):
        get_backbone("wan").check_files(ModelConfig(model="wan", pretrained_model_name_or_path=str(tmp_path)))


@pytest.mark.slow
def test_lora_and_full_exports_load_in_the_i2v_pipeline(i2v_dir, adapter, pipe, cond, records, tmp_path):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    noise, base = _rollout(adapter, cond)
    adapter.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    _, tuned = _rollout(adapter, cond)
    assert (tuned - base).abs().max() > 1e-2
    path = adapter.export_lora(str(tmp_path / "lora"))
    from safetensors.torch import load_file

    assert any(".attn2.add_k_proj.lora_A" in k for k in load_file(str(path)))  # read as an I2V LoRA, as is
    lora_pipe = WanImageToVideoPipeline.from_pretrained(str(i2v_dir), local_files_only=True)
    lora_pipe.set_progress_bar_config(disable=True)
    lora_pipe.load_lora_weights(str(tmp_path / "lora"))
    ref = _pipeline(lora_pipe, records[0], noise[:1], cond, 0, adapter.guidance_scale)
    assert (ref - tuned[:1]).abs().max().item() <= PARITY_ATOL  # same LoRA scaling (rank 4, alpha 8) restored
    assert (ref - base[:1]).abs().max() > 1e-2  # the loaded LoRA changes the pipeline's output
    adapter.export(str(tmp_path / "merged"))  # a full export of a LoRA'd model merges the adapter
    pipe.transformer = WanTransformer3DModel.from_pretrained(str(tmp_path / "merged"), subfolder="transformer")
    try:
        merged = _pipeline(pipe, records[0], noise[:1], cond, 0, adapter.guidance_scale)
    finally:
        pipe.transformer = WanTransformer3DModel.from_pretrained(str(i2v_dir), subfolder="transformer")
    assert (merged - tuned[:1]).abs().max().item() <= PARITY_ATOL


# ----- JSONL prompt files and preprocessing ------------------------------------------------------------------------


def _image(path: Path, size=(WIDTH, HEIGHT), color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _bad_file(folder: Path) -> Path:
    _image(folder / "frames" / "ok.png")
    _image(folder / "frames" / "square.png", size=(64, 64))
    (folder / "frames" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = ['{"prompt": "a red square slides left", "image": "frames/ok.png"}',  # 1: good (relative path)
             "",  # 2: empty, ignored
             '{"prompt": "no image here"}',  # 3
             "not json at all",  # 4
             '{"prompt": "gone", "image": "frames/missing.png"}',  # 5
             '{"prompt": "garbage", "image": "frames/broken.png"}',  # 6
             '{"prompt": "too square", "image": "frames/square.png"}',  # 7
             json.dumps({"prompt": "absolute path", "image": str(folder / "frames" / "ok.png")})]  # 8: good
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_bad_lines_are_refused_or_skipped_by_line_number(tmp_path, caplog):
    path = _bad_file(tmp_path)
    with pytest.raises(ValueError) as err:
        read_prompts(path, "jsonl", image_size=(HEIGHT, WIDTH))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "5 bad line(s)" in message and "--bad_lines skip" in message
    for number, why in ((3, "expected {"), (4, "not valid JSON"), (5, "image [^;]*missing.png does not exist"),
                        (6, "image [^;]*broken.png cannot be read"),
                        (7, "image [^;]*64 x 64, an aspect ratio 40% off")):
        assert re.search(f"line {number}: {why}", message), (number, message)
    with caplog.at_level(logging.WARNING):
        prompts = read_prompts(path, "jsonl", "skip", image_size=(HEIGHT, WIDTH))
    assert prompts.texts == ["a red square slides left", "absolute path"]
    assert [r.line for r in prompts.items] == [1, 8] and prompts.items[0].image == tmp_path / "frames" / "ok.png"
    assert prompts.skipped == {"empty": 1, "bad_line": 2, "missing_image": 1, "unreadable_image": 1, "wrong_size": 1}
    assert "line 7 skipped" in caplog.text and "aspect ratio" in caplog.text
    # without a video size the square image is fine; the text format is unchanged (one prompt per line)
    assert len(read_prompts(path, "jsonl", "skip").items) == 3
    assert read_prompts(path, "text").texts[0].startswith('{"prompt"')


def test_assets_are_usable_first_frames():
    prompts = read_prompts(ASSET_PROMPTS, "jsonl", image_size=(480, 832))
    assert len(prompts.items) == 6
    for record in prompts.items:
        with Image.open(record.image) as image:
            assert image.size == (832, 480) and image.mode == "RGB"


@pytest.mark.slow
def test_preprocess_cli_stores_the_conditioning_and_resumes_only_with_the_same_sizes(i2v_dir, cond, tmp_path,
                                                                                    capsys):
    from branchgrpo.cli import preprocess as cli

    out = tmp_path / "emb"
    args = ["--model", "wan_i2v", "--model_path", str(i2v_dir), "--prompts", str(ASSET_PROMPTS), "--output_dir",
            str(out), "--h", str(HEIGHT), "--w", str(WIDTH), "--num_frames", str(FRAMES), "--shard_size", "4",
            "--device", "cpu"]
    assert cli.main(args) == 0
    store = EmbeddingStore(out)
    assert store.model == "wan_i2v" and len(store) == 6
    assert store.text(0) == read_prompts(ASSET_PROMPTS, "jsonl").texts[0]
    assert store.keys["image_latents"] == ((16, 3, HEIGHT // 8, WIDTH // 8), "F32")
    assert store.keys["first_frame"] == ((3, HEIGHT, WIDTH), "U8") and set(store.extras) == {"negative_prompt_embeds"}
    stored = store.batch([0, 1])
    for key in ("prompt_embeds", "image_embeds", "image_latents", "first_frame"):
        torch.testing.assert_close(stored[key], cond[key], atol=1e-6, rtol=1e-5)
    assert cli.main(args) == 0  # resumable: every shard exists, nothing is encoded again
    assert cli.main([*args[:-2], "--num_frames", "13", "--device", "cpu"]) == 2  # other sizes: refused
    assert "another prompt list, shard size or encoder settings" in capsys.readouterr().err


# ----- reward conditioning and first-frame consistency -------------------------------------------------------------


def _videos(first_frames: torch.Tensor, drift: float) -> torch.Tensor:
    """Videos [B, 3, 5, H, W] that start at the images and drift away by `drift` per frame."""
    images = first_frames.float() / 255
    return torch.stack([(images + drift * t).clamp(0, 1) for t in range(5)], dim=2)


def test_first_frame_consistency_scores_faithfulness_to_the_conditioning_image():
    frames = (torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    reward = build_reward("first_frame_consistency", model_dir="/nonexistent")  # the pixel score needs no file
    assert reward.conditioning == ("first_frame",)
    still, drifting = _videos(frames, 0.0), _videos(frames, 0.1)
    assert torch.allclose(reward(still, ["a", "b"], {"first_frame": frames}), torch.ones(2))
    score = reward(drifting, ["a", "b"], {"first_frame": frames})
    assert score.dtype == torch.float32 and bool((score < 0.95).all())
    swapped = reward(still, ["a", "b"], {"first_frame": frames.flip(0)})  # another image: lower
    assert bool((swapped < 0.9).all())
    with pytest.raises(ValueError, match="conditioning image"):
        reward(still, ["a", "b"])
    assert build_reward("first_frame_consistency", num_frames=2).num_frames == 2


@pytest.mark.slow
def test_first_frame_consistency_with_clip_features(tmp_path):
    """Any local open_clip checkpoint (here the tiny HPS one): cosine of each frame's embedding with the image's."""
    from branchgrpo.testing.clip_tiny import TINY_HPS_ARCH

    make_tiny("hps", str(tmp_path))
    reward = build_reward("first_frame_consistency", clip_checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"),
                          clip_arch=TINY_HPS_ARCH, model_config_dir=str(tmp_path / "open_clip_configs"), num_frames=3)
    frames = (torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    still = _videos(frames, 0.0)
    same = reward(still, ["a", "b"], {"first_frame": frames})
    assert same.shape == (2,) and torch.allclose(same, torch.ones(2), atol=1e-5)
    other = reward(still, ["a", "b"], {"first_frame": frames.flip(0)})
    assert bool((other < same - 1e-4).all())
    # a conditioning image of another size is compared at the video's size
    bigger = torch.nn.functional.interpolate(frames.float(), size=(64, 96), mode="nearest").to(torch.uint8)
    assert torch.allclose(reward(still, ["a", "b"], {"first_frame": bigger}), same, atol=1e-2)


def test_reward_sets_pass_conditioning_only_to_the_rewards_that_read_it():
    frames = (torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    per_prompt = {"first_frame": frames, "prompt_embeds": torch.zeros(3, 4, 2)}
    rewards = RewardSet({"first_frame_consistency": build_reward("first_frame_consistency"),
                         "temporal_consistency": build_reward("temporal_consistency")}, {"first_frame_consistency": 1.0,
                                                                                         "temporal_consistency": 0.5})
    assert rewards.condition_keys == ("first_frame",)
    index = torch.tensor([2, 0, 0, 1])  # four samples of three prompts
    conditions = rewards.conditions(per_prompt, index)
    assert list(conditions) == ["first_frame"] and torch.equal(conditions["first_frame"], frames[index])
    videos = _videos(frames[index], 0.05)
    scores, _ = decode_and_score(lambda z, rows: z, videos, list("wxyz"), rewards, 3, conditions)  # chunks of 3 + 1
    alone = rewards.score(videos, list("wxyz"), conditions)
    assert all(torch.equal(scores[k], alone[k]) for k in scores)
    assert RewardSet({"t": build_reward("temporal_consistency")}, {"t": 1.0}).conditions(per_prompt, index) == {}
    with pytest.raises(ValueError, match="'first_frame_consistency' needs the per-prompt 'first_frame'"):
        rewards.score(videos, list("wxyz"), {})  # e.g. a text-to-video dataset


@pytest.mark.slow
def test_one_training_iteration_has_ratio_one_at_theta_old_and_scores_first_frames(i2v_dir, encoder, tmp_path):
    """The trainer on stored I2V embeddings, one process on CPU: re-scoring at theta_old gives ratio exactly 1, the
    first-frame reward gets each leaf's own image, and the held-out evaluation scores it too."""
    from trainer_utils import train

    index = run_preprocess(ASSET_PROMPTS, tmp_path / "emb", "wan_i2v", encoder, shard_size=8, prompt_format="jsonl")
    out = tmp_path / "run"
    summary = train(["--model", "wan_i2v", "--pretrained_model_name_or_path", str(i2v_dir), "--data_json_path",
                     str(index), "--output_dir", str(out), "--h", str(HEIGHT), "--w", str(WIDTH), "--num_frames",
                     str(FRAMES), "--reward", "first_frame_consistency=1.0", "--device", "cpu", "--sampling_steps", "4",
                     "--tree_split_points", "0,1", "--train_batch_size", "2", "--max_train_steps", "1",
                     "--num_eval_prompts", "1", "--eval_samples_per_prompt", "1", "--report_to", "none",
                     "--checkpointing_steps", "0", "--learning_rate", "1e-3"])
    entry = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert entry["first_ratio_min"] == 1.0 == entry["first_ratio_max"]
    assert 0.0 < entry["reward_mean"] < 1.0 and summary["eval_reward_before"] is not None
