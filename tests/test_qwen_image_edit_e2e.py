"""Qwen-Image-Edit-2509 with two sources per edit end to end through the edit launchers (EDIT_MODEL=
qwen_image_edit_plus) on a tiny checkpoint: make_tiny qwen_image_edit_plus -> the edit preprocess launcher (2
processes, the shipped edit JSONL's edits each with a second source, sources at the generation size) -> the
Qwen-Image-Edit BranchGRPO launcher (2 processes, FSDP2, LoRA, true CFG on the dynamic schedule, a tree) with source
consistency to the first source as the reward -> the LoRA loads through QwenImageEditPlusPipeline.load_lora_weights
and predicts as our adapter with the trained LoRA fused does. Qwen-Image-Edit (one source) shares the launchers and
the adapter; its own training iteration is tests/test_qwen_image_edit.py's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_utils import free_port

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--h", "32", "--w", "32"]


def run(cmd, env, timeout=400):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("qwen_image_edit_e2e")
    make_tiny("qwen_image_edit_plus", str(root / "edit"))
    assets = REPO / "assets"
    lines = [json.loads(line) for line in (assets / "edit_prompts.jsonl").read_text().splitlines()]
    (root / "pairs.jsonl").write_text("".join(  # the edit's source first (the rewards compare to it), then another
        json.dumps({"prompt": e["prompt"], "images": [str(assets / e["image"]), str(assets / "edit/green_tree.png")]})
        + "\n" for e in lines))
    out = run(["bash", "scripts/preprocess/preprocess_qwen_image_edit_rl_embeddings.sh", "--shard_size", "3",
               "--device", "cpu"],
              env=dict(NPROC="2", EDIT_MODEL="qwen_image_edit_plus", MODEL_PATH=str(root / "edit"),
                       PROMPTS=str(root / "pairs.jsonl"), OUTPUT_DIR=str(root / "emb"), H="32", W="32",
                       MAX_SEQUENCE_LENGTH="64", MASTER_PORT=str(free_port())))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1: shard 2/2 written" in out.stderr  # the second process encoded its share
    index = json.loads((root / "emb" / "index.json").read_text())
    assert index["model"] == "qwen_image_edit_plus" and index["num_prompts"] == 6
    assert index["keys"]["image_latents"] == {"shape": [2 * 4, 64], "dtype": "F32"}  # two 32 x 32 sources
    # Qwen2.5-VL sees a 384 x 384 copy of each source: 2 x 196 vision tokens + 64 (instruction and "Picture i: ")
    assert index["keys"]["negative_prompt_embeds"] == {"shape": [2 * 196 + 64, 32], "dtype": "F32"}
    return root


def test_lora_tree_training_on_two_sources_exports_an_adapter_the_edit_pipeline_loads(tiny, tmp_path):
    from diffusers import QwenImageEditPlusPipeline

    from branchgrpo.config.sections import ModelConfig
    from branchgrpo.data.embeddings import EmbeddingStore
    from branchgrpo.models import get_backbone
    from branchgrpo.models.base import velocity_fn

    out = tmp_path / "lora"
    env = dict(NPROC="2", EDIT_MODEL="qwen_image_edit_plus", MODEL_PATH=str(tiny / "edit"),
               DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tmp_path / "no_rewards"), OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()),
               REWARD="source_consistency=1.0", LORA_RANK="4", LORA_ALPHA="8")  # USE_LORA: the launcher's 1
    args = [*SIZE, "--sampling_steps", "4", "--tree_split_points", "0,1", "--max_train_steps", "2", "--device", "cpu",
            "--mixed_precision", "fp32", "--learning_rate", "1e-2", "--num_eval_prompts", "2",
            "--eval_samples_per_prompt", "1", "--checkpointing_steps", "2", "--validation_steps", "0",
            "--save_rollout_samples", "0", "--report_to", "none", "--no-use_ema"]
    proc = run(["bash", "scripts/finetune/finetune_qwen_image_edit_branchgrpo_8gpus.sh", *args], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), parallel=fsdp" in proc.stderr
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(0 < e["reward_mean"] <= 1 for e in entries)  # source consistency
    # theta_old, sharded: within float32 rounding (exactly 1 in the one-process test of tests/test_qwen_image_edit.py)
    assert all(abs(e["first_ratio_min"] - 1) < 1e-6 and abs(e["first_ratio_max"] - 1) < 1e-6 for e in entries)
    print("iteration seconds (LoRA, 2 processes):", [round(e["iter_time_s"], 2) for e in entries])
    folder = out / "checkpoints" / "checkpoint-2" / "model"

    # the pipeline with the exported LoRA predicts as our adapter with the same LoRA fused does
    spec = get_backbone("qwen_image_edit_plus")
    model_cfg = ModelConfig.for_backbone("qwen_image_edit_plus", str(tiny / "edit"), h=32, w=32,
                                         source_size="generation")
    cond = EmbeddingStore(tiny / "emb" / "index.json").batch([0])
    tuned = spec.load_for_eval(model_cfg, folder, "diffusers_lora", "cpu").adapter
    base = spec.load(model_cfg, "cpu")
    x = torch.randn(1, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8])
    with torch.no_grad():
        v_tuned = velocity_fn(tuned, cond)(x, sigma, torch.tensor([0]))
        v_base = velocity_fn(base, cond)(x, sigma, torch.tensor([0]))
    assert (v_tuned - v_base).abs().max() > 1e-4  # the training moved the LoRA
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny / "edit"))
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    base.transformer = pipe.transformer  # the pipeline's LoRA'd transformer in our adapter
    with torch.no_grad():
        v_pipe = velocity_fn(base, cond)(x, sigma, torch.tensor([0]))
    torch.testing.assert_close(v_pipe, v_tuned, atol=1e-5, rtol=1e-5)
