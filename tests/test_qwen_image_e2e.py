"""Qwen-Image end to end through the user-facing launchers on tiny checkpoints: make_tiny -> preprocess launcher (2
processes, a custom negative prompt) -> BranchGRPO finetune launcher (2 processes, FSDP2, LoRA, true CFG on the
dynamic schedule, a tree) -> the LoRA loads through QwenImagePipeline.load_lora_weights and changes its output. (The
full-weight export is trained and loaded in tests/test_qwen_image.py, one process: a second 2-process run would cost
the suite about 20 s more; the FSDP2 gather of full weights is the FLUX e2e test's.)"""

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
NEGATIVE = "blurry, low quality"


def run(cmd, env=None, timeout=300):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("qwen_e2e")
    make_tiny("qwen_image", str(root / "qwen_image"))
    make_tiny("hps", str(root / "hps"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((REPO / "assets" / "prompts.txt").read_text().splitlines()[:4]) + "\n")
    out = run(["bash", "scripts/preprocess/preprocess_qwen_image_rl_embeddings.sh", "--shard_size", "2",
               "--device", "cpu"],
              env=dict(NPROC="2", MODEL_PATH=str(root / "qwen_image"), PROMPTS=str(prompts), NEGATIVE_PROMPT=NEGATIVE,
                       MAX_SEQUENCE_LENGTH="48", OUTPUT_DIR=str(root / "emb"), MASTER_PORT=str(free_port())))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1: shard" in out.stderr  # the second process did encode its share
    return root


def test_preprocessed_store_equals_the_encoder(tiny):
    from types import SimpleNamespace

    from branchgrpo.data.embeddings import EmbeddingStore
    from branchgrpo.models.qwen_image import build_prompt_encoder

    store = EmbeddingStore(tiny / "emb")
    assert store.keys["prompt_embeds"] == ((48, 32), "F32") and store.keys["prompt_embeds_mask"] == ((48,), "I64")
    encode = build_prompt_encoder(str(tiny / "qwen_image"), "cpu",
                                  SimpleNamespace(max_sequence_length=48, negative_prompt=NEGATIVE))
    texts = [store.text(i) for i in range(len(store))]
    ref, stored = encode(texts), store.batch(range(len(store)))
    for key in ref:
        torch.testing.assert_close(stored[key], ref[key], atol=1e-6, rtol=1e-5)
    for key, value in encode.extras().items():
        torch.testing.assert_close(store.extras[key], value, atol=1e-6, rtol=1e-5)


def finetune(tiny, out, **env):
    options = {"hps": {"arch": "ViT-H-14-tiny", "model_config_dir": str(tiny / "hps" / "open_clip_configs")}}
    env = dict(NPROC="2", MODEL_PATH=str(tiny / "qwen_image"), DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tiny / "hps"), OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()), H="64", W="48",
               **env)
    args = ["--sampling_steps", "4", "--tree_split_points", "0,1", "--max_train_steps", "2", "--device", "cpu",
            "--mixed_precision", "fp32", "--num_eval_prompts", "1", "--eval_samples_per_prompt", "1",
            "--reward_options", json.dumps(options), "--report_to", "none", "--checkpointing_steps", "2",
            "--validation_steps", "0", "--save_rollout_samples", "0", "--lora_rank", "4", "--lora_alpha", "8"]
    return run(["bash", "scripts/finetune/finetune_qwen_image_branchgrpo_8gpus.sh", *args], env=env)


def _velocity(transformer, seed=0):
    from types import SimpleNamespace

    from branchgrpo.models.qwen_image import QwenImageAdapter

    vae = SimpleNamespace(config=SimpleNamespace(temperal_downsample=[False, True, True], z_dim=16,
                                                 latents_mean=[0.0] * 16, latents_std=[1.0] * 16))
    vae.eval = lambda: vae
    vae.requires_grad_ = lambda flag: vae
    adapter = QwenImageAdapter(transformer, vae, 64, 48, guidance_scale=1.0)
    gen = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(2, 8, 32, generator=gen), "prompt_embeds_mask": torch.ones(2, 8)}
    with torch.no_grad():
        return adapter.velocity(torch.randn(2, *adapter.latent_shape, generator=gen), torch.tensor([0.9, 0.4]), cond)


def _entries(out):
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in entries)
    return entries


def test_lora_finetune_with_fsdp2_loads_in_the_pipeline(tiny, tmp_path):
    from diffusers import QwenImagePipeline

    out = tmp_path / "lora"
    proc = finetune(tiny, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), parallel=fsdp" in proc.stderr  # FSDP2 really wrapped the model
    entries = _entries(out)
    # theta_old, sharded: within float32 rounding (exactly 1 in the one-process test of tests/test_qwen_image.py)
    assert abs(entries[0]["first_ratio_min"] - 1) < 1e-6 and abs(entries[0]["first_ratio_max"] - 1) < 1e-6
    print("iteration seconds (LoRA, 2 processes):", [round(e["iter_time_s"], 2) for e in entries])
    folder = out / "checkpoints" / "checkpoint-2" / "model"
    pipe = QwenImagePipeline.from_pretrained(str(tiny / "qwen_image"))
    before = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    assert not torch.allclose(_velocity(pipe.transformer), before)
