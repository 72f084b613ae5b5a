"""Wan2.1 end to end through the launchers on tiny checkpoints: make_tiny -> preprocess launcher (2 processes) ->
finetune launcher (2 processes, FSDP2) with every video reward, and with LoRA -> the weights load in diffusers and
change its output, and the evaluation CLI reproduces the trainer's held-out evaluation of them; rollout videos are
written next to the metrics."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_utils import free_port

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

REPO = Path(__file__).resolve().parents[1]


def run(cmd, env, timeout=400):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("wan_e2e")
    make_tiny("wan", str(root / "wan"))
    make_tiny("hps", str(root / "rewards"))
    make_tiny("videoalign", str(root / "rewards"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((REPO / "assets" / "video_prompts.txt").read_text().splitlines()[:4]) + "\n")
    out = run(["bash", "scripts/preprocess/preprocess_wan_rl_embeddings.sh", "--max_sequence_length", "16",
               "--shard_size", "2", "--device", "cpu"],
              env=dict(NPROC="2", MODEL_PATH=str(root / "wan"), PROMPTS=str(prompts), OUTPUT_DIR=str(root / "emb"),
                       MASTER_PORT=str(free_port())))
    assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((root / "emb" / "index.json").read_text())
    assert index["num_prompts"] == 4 and (root / "emb" / "extras.safetensors").exists()
    return root


def finetune(tiny, out, reward, extra=(), nproc="2"):
    hps = {"checkpoint": str(tiny / "rewards" / "HPS_v2.1_compressed.pt"), "arch": "ViT-H-14-tiny",
           "model_config_dir": str(tiny / "rewards" / "open_clip_configs")}
    options = {"frame_reward": {"image_reward": "hps", **hps}, "videoalign": {"checkpoint": str(tiny / "rewards" / "VideoReward")}}
    options = {k: v for k, v in options.items() if k in reward}  # options of a reward the run does not use are refused
    env = dict(NPROC=nproc, MODEL_PATH=str(tiny / "wan"), DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tiny / "rewards"), OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()), REWARD=reward)
    args = ["--h", "32", "--w", "48", "--num_frames", "9", "--sampling_steps", "6", "--tree_split_points", "0,2",
            "--max_train_steps", "2", "--device", "cpu", "--mixed_precision", "fp32", "--learning_rate", "1e-3",
            "--num_eval_prompts", "2", "--save_rollout_samples", "1", "--checkpointing_steps", "2",
            "--reward_options", json.dumps(options), "--report_to", "none", "--reward_combine", "advantage", *extra]
    return run(["bash", "scripts/finetune/finetune_wan_branchgrpo_8gpus.sh", *args], env)


def _output(transformer):
    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 3, 4, 6, generator=gen)
    text = torch.randn(1, 16, cfg.text_dim, generator=gen)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                           return_dict=False)[0]


def test_full_finetune_with_every_video_reward(tiny, tmp_path):
    from diffusers import WanTransformer3DModel

    out = tmp_path / "full"
    proc = finetune(tiny, out, "videoalign=1.0,frame_reward=0.5,temporal_consistency=0.2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2
    for e in entries:
        assert all(torch.isfinite(torch.tensor(e[f"reward_{n}"])) for n in ("videoalign", "frame_reward",
                                                                           "temporal_consistency"))
        assert e["first_ratio_min"] == 1.0 == e["first_ratio_max"]
    assert list((out / "samples").glob("rollout_step*.mp4")) or list((out / "samples").glob("rollout_step*.gif"))
    trained = WanTransformer3DModel.from_pretrained(str(out / "checkpoints" / "checkpoint-2" / "model"),
                                                    subfolder="transformer")
    base = WanTransformer3DModel.from_pretrained(str(tiny / "wan"), subfolder="transformer")
    assert not torch.allclose(_output(trained), _output(base))


def test_lora_finetune_loads_in_wan_pipeline(tiny, tmp_path):
    from diffusers import WanPipeline

    out = tmp_path / "lora"
    proc = finetune(tiny, out, "videoalign=1.0", ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8",
                                                  "--learning_rate", "1e-2"], nproc="1")  # one rank: the full run covers two
    assert proc.returncode == 0, proc.stderr[-4000:]
    pipe = WanPipeline.from_pretrained(str(tiny / "wan"))
    before = _output(pipe.transformer)
    pipe.load_lora_weights(str(out / "checkpoints" / "checkpoint-2" / "model"),
                           weight_name="pytorch_lora_weights.safetensors")  # offline: diffusers < 0.39 needs the name
    assert not torch.allclose(_output(pipe.transformer), before)
    # the evaluation CLI on the last checkpoint, with the trainer's eval prompts (the first 2), seeds, steps and
    # sizes, reproduces the trainer's own held-out evaluation of the same weights
    from branchgrpo.cli.eval import main as eval_main

    assert eval_main(["--model", "wan", "--pretrained_model_name_or_path", str(tiny / "wan"), "--checkpoint",
                      str(out / "checkpoints" / "checkpoint-2"), "--prompts", str(tiny / "prompts.txt"),
                      "--num_prompts", "2", "--samples_per_prompt", "1", "--steps", "6", "--h", "32", "--w", "48",
                      "--num_frames", "9", "--max_sequence_length", "16", "--rewards", "videoalign",
                      "--reward_model_dir", str(tiny / "rewards"), "--reward_batch_size", "1",
                      "--output_dir", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert result["weights"].startswith("LoRA from")
    assert math.isclose(result["metrics"]["videoalign"]["mean"], summary["eval_reward_after"], rel_tol=1e-4)


def test_wan_launcher_reports_missing_inputs(tmp_path):
    proc = run(["bash", "scripts/finetune/finetune_wan_branchgrpo_8gpus.sh"],
               dict(MODEL_PATH=str(tmp_path / "none"), DATA_JSON=str(tmp_path / "none.json"),
                    HPS_CKPT_DIR=str(tmp_path / "no")))
    assert proc.returncode == 2
    assert all(k in proc.stderr for k in ("MODEL_PATH", "DATA_JSON", "VideoReward"))
