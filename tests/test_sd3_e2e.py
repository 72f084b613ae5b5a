"""SD3.5 end to end through the user-facing launchers on tiny checkpoints: make_tiny -> preprocess launcher (2
processes) -> finetune launchers (2 processes, FSDP2: a full fine-tune with BranchGRPO's tree, a LoRA with DanceGRPO)
-> the exported weights load in diffusers and change its output; re-scoring at theta_old gives ratio exactly 1."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_utils import free_port

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

REPO = Path(__file__).resolve().parents[1]
T5_LEN = 8


def run(cmd, env=None, timeout=300):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("sd3_e2e")
    make_tiny("sd3", str(root / "sd3"))
    make_tiny("hps", str(root / "hps"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((REPO / "assets" / "prompts.txt").read_text().splitlines()[:4]) + "\n")
    out = run(["bash", "scripts/preprocess/preprocess_sd3_rl_embeddings.sh", "--shard_size", "2", "--device", "cpu"],
              env=dict(NPROC="2", MODEL_PATH=str(root / "sd3"), PROMPTS=str(prompts), OUTPUT_DIR=str(root / "emb"),
                       T5_SEQUENCE_LENGTH=str(T5_LEN), MASTER_PORT=str(free_port())))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1: shard" in out.stderr  # the second process encoded its share
    index = json.loads((root / "emb" / "index.json").read_text())
    assert index["num_prompts"] == 4 and index["model"] == "sd3"
    return root


def finetune(tiny, out, script, extra=(), **env):
    configs = str(tiny / "hps" / "open_clip_configs")
    env = dict(NPROC="2", MODEL_PATH=str(tiny / "sd3"), DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tiny / "hps"), OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()), **env)
    args = ["--h", "32", "--w", "32", "--max_train_steps", "2", "--device", "cpu", "--mixed_precision", "fp32",
            "--max_grad_norm", "1.0", "--num_eval_prompts", "1", "--eval_samples_per_prompt", "1",
            "--train_batch_size", "2", "--report_to", "none", "--checkpointing_steps", "2", "--validation_steps", "0",
            "--reward_options", json.dumps({"hps": {"arch": "ViT-H-14-tiny", "model_config_dir": configs}}),
            "--no-use_ema", *extra]
    start = time.time()
    proc = run(["bash", f"scripts/finetune/{script}", *args], env=env)
    print(f"{script} {' '.join(extra)}: {time.time() - start:.1f} s for 2 iterations (2 processes, incl. start-up)")
    return proc


def _output(transformer, seed=0):
    """The transformer's prediction for fixed random inputs of its widths."""
    gen = torch.Generator().manual_seed(seed)
    config = transformer.config
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, 16, 4, 4, generator=gen), timestep=torch.tensor([900., 400.]),
                           encoder_hidden_states=torch.randn(2, 77 + T5_LEN, config.joint_attention_dim, generator=gen),
                           pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=gen),
                           return_dict=False)[0]


def _metrics(out):
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in entries)
    # re-scoring at theta_old; exact on CPU when every forward holds >= 2 samples (4 rows with CFG): oneDNN's patch
    # convolution at batch 1 and MKL's GEMM at 2 rows round differently from larger batches (last bit)
    assert all(e["first_ratio_min"] == 1.0 == e["first_ratio_max"] for e in entries)
    return entries


def test_branchgrpo_lora_tree_under_fsdp2_exports_an_adapter_the_pipeline_loads(tiny, tmp_path):
    """The tree, FSDP2 and LoRA in one 2-process run through the launcher (the full-weights export is loaded by
    diffusers in tests/test_sd3.py; one run here keeps the suite's time)."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "lora"
    proc = finetune(tiny, out, "finetune_sd3_branchgrpo_8gpus.sh",
                    ["--sampling_steps", "4", "--tree_split_points", "0,1", "--lora_rank", "4", "--lora_alpha", "8",
                     "--learning_rate", "1e-2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), parallel=fsdp" in proc.stderr  # FSDP2 really wrapped the model
    entries = _metrics(out)
    print(f"sd3 branchgrpo LoRA FSDP2 iteration times: {[round(e['iter_time_s'], 2) for e in entries]}")
    folder = out / "checkpoints" / "checkpoint-2" / "model"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny / "sd3"))
    before = _output(pipe.transformer)
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")  # offline: name the file
    assert not torch.allclose(_output(pipe.transformer), before)


def test_launchers_refuse_missing_inputs(tiny, tmp_path):
    env = dict(NPROC="2", MODEL_PATH=str(tmp_path / "no_sd3"), DATA_JSON=str(tmp_path / "no.json"),
               HPS_CKPT_DIR=str(tmp_path / "no_hps"), OUTPUT_DIR=str(tmp_path / "o"))
    proc = run(["bash", "scripts/finetune/finetune_sd3_branchgrpo_8gpus.sh"], env=env)
    assert proc.returncode == 2 and all(what in proc.stderr for what in ("MODEL_PATH", "DATA_JSON", "HPS_CKPT_DIR"))
    proc = run(["bash", "scripts/preprocess/preprocess_sd3_rl_embeddings.sh"],
               env=dict(MODEL_PATH=str(tiny / "hps"), PROMPTS=str(tmp_path / "none.txt")))
    assert proc.returncode == 2 and "text_encoder_3" in proc.stderr and "PROMPTS" in proc.stderr
