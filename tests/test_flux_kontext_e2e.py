"""FLUX.1-Kontext end to end through the launchers on a tiny checkpoint: make_tiny flux_kontext -> the edit preprocess
launcher (2 processes, the shipped edit JSONL) -> the Kontext BranchGRPO launcher (2 processes, FSDP2, LoRA) with
source consistency as the reward -> the LoRA loads through FluxKontextPipeline.load_lora_weights and changes the
pipeline's edit, which equals our adapter's rollout with the trained LoRA."""

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

    root = tmp_path_factory.mktemp("flux_kontext_e2e")
    make_tiny("flux_kontext", str(root / "kontext"))
    out = run(["bash", "scripts/preprocess/preprocess_flux_kontext_rl_embeddings.sh", "--shard_size", "3",
               "--max_sequence_length", "16", "--device", "cpu"],
              env=dict(NPROC="2", MODEL_PATH=str(root / "kontext"), OUTPUT_DIR=str(root / "emb"), H="32", W="32",
                       MASTER_PORT=str(free_port())))  # PROMPTS: the default, assets/edit_prompts.jsonl
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1: shard 2/2 written" in out.stderr  # the second process encoded its share
    index = json.loads((root / "emb" / "index.json").read_text())
    assert index["model"] == "flux_kontext" and index["num_prompts"] == 6
    assert index["keys"]["image_latents"] == {"shape": [4, 64], "dtype": "F32"}
    assert index["keys"]["source_image"] == {"shape": [3, 32, 32], "dtype": "U8"}
    return root


def test_lora_tree_training_exports_an_adapter_the_kontext_pipeline_loads(tiny, tmp_path):
    from diffusers import FluxKontextPipeline

    from branchgrpo.config.sections import ModelConfig
    from branchgrpo.data.embeddings import EmbeddingStore
    from branchgrpo.models import get_backbone
    from branchgrpo.models.base import velocity_fn

    out = tmp_path / "lora"
    env = dict(NPROC="2", MODEL_PATH=str(tiny / "kontext"), DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tmp_path / "no_rewards"), OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()),
               REWARD="source_consistency=1.0", USE_LORA="1", LORA_RANK="4", LORA_ALPHA="8")
    args = [*SIZE, "--sampling_steps", "4", "--tree_split_points", "0,1", "--max_train_steps", "2", "--device", "cpu",
            "--mixed_precision", "fp32", "--learning_rate", "1e-2", "--num_eval_prompts", "2",
            "--eval_samples_per_prompt", "1", "--train_batch_size", "1", "--checkpointing_steps", "2",
            "--report_to", "none", "--no-use_ema"]
    proc = run(["bash", "scripts/finetune/finetune_kontext_branchgrpo_8gpus.sh", *args], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), parallel=fsdp" in proc.stderr
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(0 < e["reward_mean"] <= 1 for e in entries)  # source consistency
    # theta_old re-scoring: 1 to within an fp32 ulp (the rollout's batches of 8 and the micro-batches of 4 round their
    # matmuls differently on CPU; with equal batch shapes it is exactly 1, tests/test_flux_kontext.py)
    assert all(abs(e["first_ratio_min"] - 1) <= 2e-7 and abs(e["first_ratio_max"] - 1) <= 2e-7 for e in entries)
    folder = out / "checkpoints" / "checkpoint-2" / "model"
    assert (folder / "pytorch_lora_weights.safetensors").exists()

    # the pipeline with the exported LoRA edits as our adapter with the same LoRA fused does
    spec = get_backbone("flux_kontext")
    model_cfg = ModelConfig.for_backbone("flux_kontext", str(tiny / "kontext"), h=32, w=32, source_size="generation")
    store = EmbeddingStore(tiny / "emb" / "index.json")
    cond = store.batch([0])
    tuned = spec.load_for_eval(model_cfg, folder, "diffusers_lora", "cpu").adapter
    base = spec.load(model_cfg, "cpu")
    x = torch.randn(1, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8])
    with torch.no_grad():
        v_tuned = velocity_fn(tuned, cond)(x, sigma, torch.tensor([0]))
        v_base = velocity_fn(base, cond)(x, sigma, torch.tensor([0]))
    assert (v_tuned - v_base).abs().max() > 1e-4  # the training moved the LoRA
    pipe = FluxKontextPipeline.from_pretrained(str(tiny / "kontext"))
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    base.transformer = pipe.transformer  # the pipeline's LoRA'd transformer in our adapter
    with torch.no_grad():
        v_pipe = velocity_fn(base, cond)(x, sigma, torch.tensor([0]))
    torch.testing.assert_close(v_pipe, v_tuned, atol=1e-5, rtol=1e-5)
