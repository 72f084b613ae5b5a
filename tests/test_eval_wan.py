"""The evaluation CLI on a tiny Wan2.1 (CPU, offline): video rewards found under --reward_model_dir are scored
(`frame_reward` on a tiny HPS, the checkpoint-free `temporal_consistency`), `videoalign` is skipped with its reason,
the video outputs are written (grid of first/middle/last frames, one PNG and one MP4 per sample); a training
checkpoint's weights (LoRA and full export) load through the spec's `load_for_eval` and give the trained model's
velocity, and score differently from the base through the CLI and scripts/eval/eval_wan.sh; flags that do not apply
to the chosen backbone are refused before anything is loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from branchgrpo.cli.eval import main as eval_main
from branchgrpo.config.sections import ModelConfig
from branchgrpo.eval.checkpoints import load_eval_model
from branchgrpo.cli.make_tiny import make_tiny
from branchgrpo.models import get_backbone

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

REPO = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 9, 32, 48
SIZE = ["--h", str(HEIGHT), "--w", str(WIDTH), "--num_frames", str(FRAMES)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_wan")
    make_tiny("wan", str(root / "wan"))
    make_tiny("hps", str(root / "rewards"))  # HPS_v2.1_compressed.pt: what frame_reward's default image reward reads
    (root / "prompts.txt").write_text("a red kite flies over a green hill\n")
    return root


def evaluate(tiny, out, *flags) -> dict:
    options = {"frame_reward": {"arch": "ViT-H-14-tiny", "model_config_dir": str(tiny / "rewards" / "open_clip_configs")}}
    # frame_reward's options when it is evaluated (--rewards default); options of a reward not evaluated are refused
    options_flags = [] if "--rewards" in flags else ["--reward_options", json.dumps(options)]
    assert eval_main(["--model", "wan", "--pretrained_model_name_or_path", str(tiny / "wan"), "--prompts",
                      str(tiny / "prompts.txt"), "--num_prompts", "1", "--samples_per_prompt", "2", "--steps", "2",
                      *SIZE, "--max_sequence_length", "16", "--reward_model_dir", str(tiny / "rewards"),
                      *options_flags, "--output_dir", str(out), *flags]) == 0
    return json.loads((out / "results.json").read_text())


def test_wan_eval_scores_videos_and_writes_video_outputs(tiny, tmp_path, capsys):
    result = evaluate(tiny, tmp_path / "out", "--save_images", str(tmp_path / "media"))
    assert "skipping reward 'videoalign'" in capsys.readouterr().out
    assert list(result["metrics"]) == ["frame_reward", "temporal_consistency",  # --rewards default: the spec's
                                       # then the video metrics that need no weights (docs/evaluation.md)
                                       "frame_consistency_pixels", "motion_smoothness_pixels",
                                       "dynamic_degree_pixels", "flow_magnitude_pixels"]
    assert result["skipped_video_metrics"].keys() == {"subject_consistency", "background_consistency",
                                                      "aesthetic_quality", "imaging_quality"}
    results_md = (tmp_path / "out" / "results.md").read_text()
    assert "| dynamic_degree_pixels | 2 |" in results_md and "pyramidal Lucas-Kanade fallback" in results_md
    assert result["skipped_rewards"].keys() == {"videoalign"} and "VideoReward" in result["skipped_rewards"]["videoalign"]
    assert (result["num_frames"], result["h"], result["w"], result["guidance_scale"]) == (FRAMES, HEIGHT, WIDTH, 5.0)
    assert result["weights"] == "base" and result["forward_passes"] == 2 * 2
    for name in ("results.md", "results.csv", "scores.csv", "grid.png"):
        assert (tmp_path / "out" / name).is_file(), name
    for metric in result["metrics"].values():
        assert metric["n"] == 2 and metric["mean"] is not None
    # one prompt: a row of 2 samples x (first, middle, last frame), under a 12-pixel label
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 * 3 * WIDTH, HEIGHT + 12)
    for sample in result["samples"]:  # the middle frame as PNG (what the diversity CLI reads) and the clip
        png, video = Path(sample["image"]), Path(sample["video"])
        assert png.parent == video.parent == tmp_path / "media" and png.stem == video.stem
        assert Image.open(png).size == (WIDTH, HEIGHT) and video.suffix in (".mp4", ".gif") and video.stat().st_size


def _velocity(adapter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *adapter.latent_shape, generator=gen)
    text = torch.randn(2, 16, adapter.transformer.config.text_dim, generator=gen)
    with torch.no_grad():
        return adapter.velocity(x, torch.tensor([0.9, 0.4]), {"prompt_embeds": text, "negative_prompt_embeds": text[0]})


def test_wan_checkpoint_weights_load_for_eval(tiny, tmp_path):
    spec = get_backbone("wan")
    model_cfg = ModelConfig.for_backbone("wan", str(tiny / "wan"), h=HEIGHT, w=WIDTH, num_frames=FRAMES)
    base = _velocity(spec.load(model_cfg, "cpu"))
    trained = spec.load(model_cfg, "cpu")
    trained.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in trained.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    expected = _velocity(trained)
    assert (expected - base).abs().max() > 1e-2
    trained.export_lora(str(tmp_path / "lora"))  # what a LoRA run's checkpoint-N/model holds
    trained.export(str(tmp_path / "full"))  # and a full run's (here with the LoRA merged)
    for folder, description in (("lora", "LoRA from"), ("full", "full weights from")):
        loaded = load_eval_model(spec, model_cfg, str(tmp_path / folder), False, torch.device("cpu"))
        assert loaded.description.startswith(description) and loaded.prompt_source == str(tiny / "wan")
        assert not any(p.requires_grad for p in loaded.adapter.transformer.parameters())
        torch.testing.assert_close(_velocity(loaded.adapter), expected, atol=1e-5, rtol=1e-5)
    # the base through the launcher, the full export through the CLI: same noise and prompts, other scores
    env = dict(os.environ, PYTHON=sys.executable, MODEL_PATH=str(tiny / "wan"), PROMPTS=str(tiny / "prompts.txt"),
               HPS_CKPT_DIR=str(tiny / "rewards"), H=str(HEIGHT), W=str(WIDTH), FRAMES=str(FRAMES), STEPS="2",
               SAMPLES="2", NUM_PROMPTS="1", REWARDS="temporal_consistency", OUTPUT_DIR=str(tmp_path / "base"))
    proc = subprocess.run(["bash", "scripts/eval/eval_wan.sh", "--max_sequence_length", "16"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads((tmp_path / "base" / "results.json").read_text())
    after = evaluate(tiny, tmp_path / "after", "--rewards", "temporal_consistency", "--checkpoint", str(tmp_path / "full"))
    assert (before["weights"], before["num_samples"]) == ("base", 2) and after["weights"].startswith("full weights")
    scores = [[s["scores"]["temporal_consistency"] for s in r["samples"]] for r in (before, after)]
    assert scores[0] != scores[1]


def test_wan_launcher_checks_its_inputs(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, MODEL_PATH=str(tmp_path / "no_wan"),
               PROMPTS=str(tmp_path / "none.txt"), CHECKPOINT=str(tmp_path / "no_ckpt"))
    proc = subprocess.run(["bash", "scripts/eval/eval_wan.sh"], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    for what in ("MODEL_PATH", "PROMPTS", "CHECKPOINT"):
        assert what in proc.stderr


def test_checkpoint_of_another_backbone_is_refused(tiny, tmp_path, capsys):
    from branchgrpo.models.toy import load_toy

    load_toy().export(str(tmp_path / "toy"))
    assert eval_main(["--model", "wan", "--pretrained_model_name_or_path", str(tiny / "wan"), *SIZE, "--checkpoint",
                      str(tmp_path / "toy"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "toy_full checkpoint cannot be loaded into --model wan" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--model", "flux", "--num_frames", "9"], "--num_frames"),
    (["--model", "toy", "--h", "64"], "--h"),
    (["--model", "toy", "--max_sequence_length", "16"], "--max_sequence_length"),
    (["--model", "flux", "--negative_prompt", ""], "--negative_prompt"),
    (["--model", "wan", "--time_shift", "dynamic"], "--time_shift"),
])
def test_flags_that_do_not_apply_are_refused_before_loading(tmp_path, capsys, flags, named):
    # no model folder exists: the refusal must come first
    assert eval_main([*flags, "--pretrained_model_name_or_path", str(tmp_path / "absent"), "--output_dir",
                      str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named}") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
