"""FLUX end to end through the user-facing launchers on tiny checkpoints: make_tiny -> preprocess launcher (2
processes) -> finetune launcher (2 processes, FSDP2; again with LoRA) -> the exported weights load in diffusers and
change its output. Plus the launchers' and trainer's errors for missing or wrong inputs."""

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


def run(cmd, env=None, timeout=300):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("flux_e2e")
    make_tiny("flux", str(root / "flux"))
    make_tiny("hps", str(root / "hps"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((REPO / "assets" / "prompts.txt").read_text().splitlines()[:6]) + "\n")
    out = run(["bash", "scripts/preprocess/preprocess_flux_rl_embeddings.sh", "--max_sequence_length", "16",
               "--shard_size", "2", "--device", "cpu"],
              env=dict(NPROC="2", MODEL_PATH=str(root / "flux"), PROMPTS=str(prompts),
                       OUTPUT_DIR=str(root / "emb"), MASTER_PORT=str(free_port())))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((root / "emb" / "index.json").read_text())["num_prompts"] == 6
    return root


def finetune(tiny, out, extra=(), reward="hps=1.0", script="finetune_flux_branchgrpo_8gpus.sh", **launcher_env):
    configs = str(tiny / "hps" / "open_clip_configs")
    reward_options = {"hps": {"arch": "ViT-H-14-tiny", "model_config_dir": configs},
                      # CLIP score from an open_clip file: the tiny HPS checkpoint stands in for a CLIP one
                      "clip": {"model_path": str(tiny / "hps" / "HPS_v2.1_compressed.pt"), "arch": "ViT-H-14-tiny",
                               "model_config_dir": configs}}
    reward_options = {k: v for k, v in reward_options.items() if k in reward}
    env = dict(NPROC="2", MODEL_PATH=str(tiny / "flux"), DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tiny / "hps"), OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()), REWARD=reward,
               **launcher_env)
    args = ["--h", "64", "--w", "64", "--sampling_steps", "6", "--tree_split_points", "0,2", "--max_train_steps", "2",
            "--device", "cpu", "--mixed_precision", "fp32", "--learning_rate", "1e-3", "--max_grad_norm", "1.0",
            "--num_eval_prompts", "2", "--eval_samples_per_prompt", "1", "--train_batch_size", "1",
            "--reward_options", json.dumps(reward_options), "--report_to", "none", "--checkpointing_steps", "2",
            *extra]
    return run(["bash", f"scripts/finetune/{script}", *args], env=env)


def _transformer_output(transformer, seed=0):
    from branchgrpo.models.flux import FluxAdapter

    gen = torch.Generator().manual_seed(seed)
    vae = type("V", (), {"config": type("C", (), {"block_out_channels": [8, 8], "scaling_factor": 1.0,
                                                  "latent_channels": 16, "shift_factor": 0.0})(),
                         "eval": lambda self: self,
                         "requires_grad_": lambda self, flag: self})()
    adapter = FluxAdapter(transformer, vae=vae, height=64, width=64)
    x = torch.randn(2, *adapter.latent_shape, generator=gen)
    cond = {"prompt_embeds": torch.randn(2, 16, transformer.config.joint_attention_dim, generator=gen),
            "pooled_prompt_embeds": torch.randn(2, transformer.config.pooled_projection_dim, generator=gen)}
    with torch.no_grad():
        return adapter.velocity(x, torch.tensor([0.9, 0.4]), cond)


def test_full_finetune_with_fsdp2_exports_diffusers_weights(tiny, tmp_path):
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "full"
    proc = finetune(tiny, out, reward="hps=1.0,clip=0.5")  # two rewards, weighted raw sum (--reward_combine sum)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), parallel=fsdp" in proc.stderr  # FSDP2 really wrapped the model
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in entries)
    assert all({"reward_hps", "reward_clip"} <= set(e) for e in entries)
    trained = FluxTransformer2DModel.from_pretrained(str(out / "checkpoints" / "checkpoint-2" / "model"),
                                                     subfolder="transformer")
    base = FluxTransformer2DModel.from_pretrained(str(tiny / "flux"), subfolder="transformer")
    assert not torch.allclose(_transformer_output(trained), _transformer_output(base))
    assert (out / "checkpoints" / "checkpoint-2" / "ema" / "transformer").is_dir()  # the launcher keeps an EMA


def test_lora_finetune_exports_an_adapter_diffusers_loads(tiny, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "lora"
    proc = finetune(tiny, out, ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
                                "--reward_combine", "advantage"], reward="hps=1.0,clip=0.5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "parallel=fsdp" in proc.stderr
    folder = out / "checkpoints" / "checkpoint-2" / "model"
    assert (folder / "pytorch_lora_weights.safetensors").exists()
    pipe = FluxPipeline.from_pretrained(str(tiny / "flux"))
    before = _transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")  # offline, diffusers < 0.39
    assert not torch.allclose(_transformer_output(pipe.transformer), before)


@pytest.mark.parametrize("script,env,extra", [
    # full weights under FSDP2; --global_std all-reduces the rewards' sums over the 2 ranks
    ("finetune_flux_flow_grpo_8gpus.sh", {"USE_LORA": "0"}, ["--learning_rate", "1e-3", "--max_grad_norm", "1.0"]),
    # LoRA, the cps kernel, and GRPO-Guard's ratio normalisation on the one-split tree
    ("finetune_flux_flow_grpo_fast_8gpus.sh", {}, ["--learning_rate", "1e-2", "--lora_rank", "4", "--lora_alpha", "8",
                                                   "--ratio_norm", "--sde_window_range", "0,3"]),
])
def test_flow_grpo_launchers_train_two_processes(tiny, tmp_path, script, env, extra):
    out = tmp_path / script.split(".")[0]
    proc = finetune(tiny, out, ["--num_generations", "2", *extra], script=script, **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), parallel=fsdp" in proc.stderr
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(math.isfinite(e["loss"]) and e["grad_norm"] > 0 for e in entries)
    assert all(e["first_ratio_min"] == pytest.approx(1.0, abs=1e-5) for e in entries)
    folder = out / "checkpoints" / "checkpoint-2" / "model"
    lora = bool(extra.count("--lora_rank"))
    assert (folder / "pytorch_lora_weights.safetensors").exists() == lora
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists() != lora


def test_diffusion_nft_trains_lora_under_fsdp2_with_a_sharded_old_policy(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "nft"
    proc = finetune(tiny, out, ["--num_generations", "2", "--nft_timestep_fraction", "0.5", "--lora_rank", "4",
                                "--lora_alpha", "8", "--learning_rate", "1e-2"],
                    script="finetune_flux_diffusion_nft_8gpus.sh")  # LoRA by default
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), parallel=fsdp" in proc.stderr
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) and e["grad_norm"] > 0 for e in entries)
    folder = out / "checkpoints" / "checkpoint-2"
    lora = load_file(str(folder / "model" / "pytorch_lora_weights.safetensors"))
    shards = [torch.load(folder / "state" / f"rank{r}.pt", weights_only=True)["old_policy"]["shadow"] for r in (0, 1)]
    # theta_old is a copy of this rank's shards of the LoRA tensors only: the ranks' shards add up to the adapter
    assert shards[0].keys() == shards[1].keys() and all(".lora_" in k for k in shards[0])
    assert sum(t.numel() for shard in shards for t in shard.values()) == sum(t.numel() for t in lora.values())


def test_launcher_reports_missing_inputs(tmp_path):
    env = dict(NPROC="2", MODEL_PATH=str(tmp_path / "no_flux"), DATA_JSON=str(tmp_path / "no.json"),
               HPS_CKPT_DIR=str(tmp_path / "no_hps"), OUTPUT_DIR=str(tmp_path / "o"))
    proc = run(["bash", "scripts/finetune/finetune_flux_branchgrpo_8gpus.sh"], env=env)
    assert proc.returncode == 2
    for what in ("MODEL_PATH", "DATA_JSON", "HPS_CKPT_DIR"):
        assert what in proc.stderr
    proc = run(["bash", "scripts/preprocess/preprocess_flux_rl_embeddings.sh"],
               env=dict(MODEL_PATH=str(tmp_path / "no_flux"), PROMPTS=str(tmp_path / "none.txt")))
    assert proc.returncode == 2 and "MODEL_PATH" in proc.stderr and "PROMPTS" in proc.stderr


def test_trainer_refuses_a_wrong_image_size_before_loading(tiny, tmp_path):
    proc = finetune(tiny, tmp_path / "size", ["--h", "70"])
    assert proc.returncode != 0 and "--h" in proc.stderr and "multiple" in proc.stderr
