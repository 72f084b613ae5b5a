"""Wan2.2 TI2V-5B end to end through the launchers on a tiny checkpoint: make_tiny wan22_ti2v -> the preprocess
launcher (image-to-video, on the shipped JSONL of rendered first frames)
-> image-to-video BranchGRPO with 2 processes (FSDP2, LoRA, a tree) and the first-frame reward, whose decoded videos
start with the given frame -> the LoRA loads through WanImageToVideoPipeline.load_lora_weights and changes the
transformer; the evaluation CLI reproduces the trainer's held-out evaluation. (The full export's loading in
WanTransformer3DModel.from_pretrained is tested in-process in tests/test_wan22_ti2v.py: a training run here costs
more than it adds.)"""

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
H, W, FRAMES = "96", "160", "9"  # 5:3 as the assets' 832 x 480; sides multiples of 32; 3 latent frames
SIZE = ["--h", H, "--w", W, "--num_frames", FRAMES, "--sampling_steps", "4", "--max_sequence_length", "16"]


def run(cmd, env, timeout=400):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("ti2v_e2e")
    make_tiny("wan22_ti2v", str(root / "ti2v"))
    proc = run(["bash", "scripts/preprocess/preprocess_wan22_ti2v_rl_embeddings.sh", "--device", "cpu"],
               env=dict(NPROC="1", MODEL_PATH=str(root / "ti2v"), OUTPUT_DIR=str(root / "emb_i2v"), H=H, W=W,
                        MAX_SEQUENCE_LENGTH="16", IMAGE_TO_VIDEO="1", MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]  # PROMPTS: the default, assets/i2v_prompts.jsonl
    index = json.loads((root / "emb_i2v" / "index.json").read_text())
    assert index["model"] == "wan22_ti2v_i2v" and index["num_prompts"] == 6
    assert {"prompt_embeds", "image_latents", "first_frame"} <= set(index["keys"])
    assert index["keys"]["image_latents"]["shape"] == [48, 1, 6, 10]  # the frame encoded alone
    return root


def _output(transformer):
    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=gen)
    text = torch.randn(1, 16, cfg.text_dim, generator=gen)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.full((1, 8), 500.0), encoder_hidden_states=text,
                           return_dict=False)[0]


def test_image_to_video_tree_with_two_processes_fsdp2_and_lora(tiny, tmp_path):
    from diffusers import WanImageToVideoPipeline

    from branchgrpo.cli.eval import main as eval_main

    out = tmp_path / "i2v"
    env = dict(NPROC="2", IMAGE_TO_VIDEO="1", USE_LORA="1", MODEL_PATH=str(tiny / "ti2v"),
               DATA_JSON=str(tiny / "emb_i2v" / "index.json"), HPS_CKPT_DIR=str(tiny / "no_rewards"),
               OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()), REWARD="first_frame_consistency=1.0")
    args = [*SIZE[:8], "--tree_split_points", "0,1", "--max_train_steps", "1", "--device", "cpu", "--mixed_precision",
            "fp32", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--num_eval_prompts", "2",
            "--checkpointing_steps", "1", "--report_to", "none", "--save_rollout_samples", "0"]
    proc = run(["bash", "scripts/finetune/finetune_wan22_ti2v_branchgrpo_8gpus.sh", *args], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "parallel=fsdp" in proc.stderr
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["first_ratio_min"] == 1.0 == entries[0]["first_ratio_max"]
    assert 0.0 < entries[0]["reward_mean"] <= 1.0  # each leaf's decoded first frame vs its image
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = out / "checkpoints" / "checkpoint-1"
    pipe = WanImageToVideoPipeline.from_pretrained(str(tiny / "ti2v"), image_encoder=None, image_processor=None)
    before = _output(pipe.transformer)
    pipe.load_lora_weights(str(checkpoint / "model"), weight_name="pytorch_lora_weights.safetensors")
    assert not torch.allclose(_output(pipe.transformer), before)
    assert eval_main(["--model", "wan22_ti2v_i2v", "--pretrained_model_name_or_path", str(tiny / "ti2v"),
                      "--checkpoint", str(checkpoint), "--num_prompts", "2", "--samples_per_prompt", "1",
                      "--steps", "4", *SIZE[:6], "--shift", "5", "--max_sequence_length", "16", "--rewards",
                      "first_frame_consistency", "--reward_batch_size", "1",
                      "--output_dir", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["weights"].startswith("LoRA from")
    assert math.isclose(result["metrics"]["first_frame_consistency"]["mean"], summary["eval_reward_after"],
                        rel_tol=1e-4)
