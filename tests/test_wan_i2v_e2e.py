"""Wan2.1 image-to-video end to end through the launchers on tiny checkpoints: make_tiny wan_i2v -> the I2V preprocess
launcher (2 processes, the shipped JSONL of rendered first frames) -> the I2V finetune launcher (2 processes, FSDP2,
EMA) with first-frame consistency as the reward, then with LoRA -> the weights (and the EMA's) load in diffusers
(WanTransformer3DModel, WanImageToVideoPipeline.load_lora_weights) and change its output, and the evaluation CLI
reproduces the trainer's held-out evaluation of them."""

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
SIZE = ["--h", "48", "--w", "80", "--num_frames", "9"]  # 5:3, within the preprocessing's 10% of the assets' 832 x 480


def run(cmd, env, timeout=400):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("wan_i2v_e2e")
    make_tiny("wan_i2v", str(root / "wan_i2v"))
    script = "scripts/preprocess/preprocess_wan_i2v_rl_embeddings.sh"
    out = run(["bash", script, "--shard_size", "3", "--device", "cpu"],
              env=dict(NPROC="2", MODEL_PATH=str(root / "wan_i2v"), OUTPUT_DIR=str(root / "emb"), H="48", W="80",
                       FRAMES="9", MASTER_PORT=str(free_port())))  # PROMPTS: the default, assets/i2v_prompts.jsonl
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1: shard 2/2 written" in out.stderr  # the second process encoded its share
    index = json.loads((root / "emb" / "index.json").read_text())
    assert index["model"] == "wan_i2v" and index["num_prompts"] == 6
    assert {"image_embeds", "image_latents", "first_frame"} <= set(index["keys"])
    return root


def finetune(tiny, out, extra=(), nproc="2"):
    env = dict(NPROC=nproc, MODEL_PATH=str(tiny / "wan_i2v"), DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tiny / "no_rewards"), OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()),
               REWARD="first_frame_consistency=1.0,temporal_consistency=0.2")
    args = [*SIZE, "--sampling_steps", "4", "--tree_split_points", "0,1", "--max_train_steps", "2", "--device", "cpu",
            "--mixed_precision", "fp32", "--learning_rate", "1e-3", "--num_eval_prompts", "2",
            "--save_rollout_samples", "1", "--checkpointing_steps", "2", "--report_to", "none", *extra]
    return run(["bash", "scripts/finetune/finetune_wan_i2v_branchgrpo_8gpus.sh", *args], env)


def _output(transformer):
    """The transformer on fixed inputs: 36 channels, text and CLIP image tokens."""
    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 3, 6, 10, generator=gen)
    text = torch.randn(1, 512, cfg.text_dim, generator=gen)
    image = torch.randn(1, 17, cfg.image_dim, generator=gen)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                           encoder_hidden_states_image=image, return_dict=False)[0]


def test_full_finetune_with_fsdp2_ema_and_the_first_frame_reward(tiny, tmp_path):
    from diffusers import WanTransformer3DModel

    out = tmp_path / "full"
    proc = finetune(tiny, out, ["--use_ema", "--ema_decay", "0.5"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "parallel=fsdp" in proc.stderr
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2
    for e in entries:
        assert e["first_ratio_min"] == 1.0 == e["first_ratio_max"]  # re-scoring at theta_old, FSDP2 on CPU
        assert 0.0 < e["reward_first_frame_consistency"] < 1.0
    assert list((out / "samples").glob("rollout_step*.mp4")) or list((out / "samples").glob("rollout_step*.gif"))
    trained = WanTransformer3DModel.from_pretrained(str(out / "checkpoints" / "checkpoint-2" / "model"),
                                                    subfolder="transformer")
    base = WanTransformer3DModel.from_pretrained(str(tiny / "wan_i2v"), subfolder="transformer")
    assert trained.config.image_dim == base.config.image_dim and trained.config.in_channels == 36
    assert not torch.allclose(_output(trained), _output(base))
    ema = WanTransformer3DModel.from_pretrained(str(out / "checkpoints" / "checkpoint-2" / "ema"),
                                                subfolder="transformer")
    assert not torch.allclose(_output(ema), _output(trained)) and not torch.allclose(_output(ema), _output(base))


def test_lora_finetune_loads_in_the_i2v_pipeline_and_evaluates_alike(tiny, tmp_path):
    from diffusers import WanImageToVideoPipeline

    out = tmp_path / "lora"
    proc = finetune(tiny, out, ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"],
                    nproc="1")  # one rank: the full run covers two (FSDP2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pipe = WanImageToVideoPipeline.from_pretrained(str(tiny / "wan_i2v"))
    before = _output(pipe.transformer)
    pipe.load_lora_weights(str(out / "checkpoints" / "checkpoint-2" / "model"))
    assert not torch.allclose(_output(pipe.transformer), before)
    # the evaluation CLI on the last checkpoint, with the trainer's eval prompts (the first 2 of the JSONL), seeds,
    # steps and sizes, reproduces the trainer's held-out evaluation of the same weights
    from branchgrpo.cli.eval import main as eval_main

    assert eval_main(["--model", "wan_i2v", "--pretrained_model_name_or_path", str(tiny / "wan_i2v"), "--checkpoint",
                      str(out / "checkpoints" / "checkpoint-2"), "--num_prompts", "2", "--samples_per_prompt", "1",
                      "--steps", "4", *SIZE, "--reward_model_dir", str(tiny / "no_rewards"), "--reward_batch_size",
                      "1", "--output_dir", str(tmp_path / "eval")]) == 0  # prompts: assets/i2v_prompts.jsonl
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    final = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert result["weights"].startswith("LoRA from")
    assert set(result["skipped_rewards"]) == {"frame_reward", "videoalign"}
    for name in ("first_frame_consistency", "temporal_consistency"):  # --rewards default: the spec's
        assert math.isclose(result["metrics"][name]["mean"], final[f"eval_{name}"], rel_tol=1e-4), name


def test_i2v_launchers_report_missing_inputs(tmp_path):
    proc = run(["bash", "scripts/finetune/finetune_wan_i2v_dancegrpo_8gpus.sh"],
               dict(MODEL_PATH=str(tmp_path / "none"), DATA_JSON=str(tmp_path / "none.json"),
                    HPS_CKPT_DIR=str(tmp_path / "no")))
    assert proc.returncode == 2
    assert all(k in proc.stderr for k in ("MODEL_PATH", "Wan2.1-I2V", "preprocess_wan_i2v_rl_embeddings.sh",
                                          "VideoReward"))
    proc = run(["bash", "scripts/preprocess/preprocess_wan_i2v_rl_embeddings.sh"],
               dict(MODEL_PATH=str(tmp_path / "none"), PROMPTS=str(tmp_path / "none.jsonl")))
    assert proc.returncode == 2 and "none.jsonl not found" in proc.stderr and "none not found" in proc.stderr
