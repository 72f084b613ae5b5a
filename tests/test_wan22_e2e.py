"""Wan2.2 A14B (two experts) end to end through the launchers on tiny checkpoints: make_tiny -> preprocess launcher
-> BranchGRPO launcher with 2 processes (FSDP2 over both experts' blocks, LoRA per expert, EMA) whose tree spans
both experts -> the LoRA files load into WanPipeline's two experts and change both; the evaluation CLI reproduces the
trainer's held-out evaluation; a full fine-tune of one expert (--train_experts low) exports transformer/ and
transformer_2/, the frozen expert unchanged. Wan2.2 I2V-A14B (`wan22_i2v`) the same way with 2 processes and LoRA on
both experts, loading in WanImageToVideoPipeline, and resumed from its checkpoint-1 to the same checkpoint-2 bitwise."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_utils import exported_weights, free_port, metrics, without_timings

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

REPO = Path(__file__).resolve().parents[1]
# at shift 5, 6 steps: sigmas 1, .96, .91, .83, .71, .5 - the high-noise expert (t >= 875) owns 3 depths, the
# low-noise one 3; splits at 0 and 2 branch inside the high-noise range, edges of both experts are trained
SIZE = ["--h", "32", "--w", "48", "--num_frames", "9", "--sampling_steps", "6", "--shift", "5"]


def run(cmd, env, timeout=400):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("wan22_e2e")
    make_tiny("wan22", str(root / "wan22"))
    make_tiny("videoalign", str(root / "rewards"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((REPO / "assets" / "video_prompts.txt").read_text().splitlines()[:2]) + "\n")
    out = run(["bash", "scripts/preprocess/preprocess_wan22_rl_embeddings.sh", "--max_sequence_length", "16",
               "--device", "cpu"], env=dict(NPROC="1", MODEL_PATH=str(root / "wan22"), PROMPTS=str(prompts),
                                            OUTPUT_DIR=str(root / "emb"), MASTER_PORT=str(free_port())))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((root / "emb" / "index.json").read_text())["model"] == "wan22"
    return root


def finetune(tiny, out, extra, nproc, **launcher_env):
    env = dict(launcher_env, NPROC=nproc, MODEL_PATH=str(tiny / "wan22"), DATA_JSON=str(tiny / "emb" / "index.json"),
               HPS_CKPT_DIR=str(tiny / "rewards"), REWARD="videoalign=1.0")
    args = [*SIZE, "--tree_split_points", "0,2", "--max_train_steps", "2", "--device", "cpu", "--mixed_precision",
            "fp32", "--num_eval_prompts", "2", "--checkpointing_steps", "2", "--report_to", "none",
            "--reward_options", json.dumps({"videoalign": {"checkpoint": str(tiny / "rewards" / "VideoReward")}}),
            *extra]
    launch("scripts/finetune/finetune_wan22_branchgrpo_8gpus.sh", out, env, args)
    return out / "checkpoints" / "checkpoint-2"


def launch(script, out, env, args) -> list[dict]:
    """A finetune launcher's run of 2 iterations into `out`; its metrics."""
    proc = run(["bash", script, *args], dict(env, OUTPUT_DIR=str(out), MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the first micro-batch re-scores its edges at theta_old: ratio 1 up to the Wan transformer's batch-size
    # dependence (a row computed alone differs from the same row in a batch by ~1e-6 on CPU, Wan2.1 alike), which
    # a micro-batch mixing both experts' rows meets more often than a one-expert micro-batch
    assert len(entries) == 2 and entries[0]["first_ratio_min"] == 1.0 == entries[0]["first_ratio_max"]
    assert all(abs(e[k] - 1.0) <= 1e-6 for e in entries for k in ("first_ratio_min", "first_ratio_max"))
    return entries


def _output(transformer):
    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 3, 4, 6, generator=gen)
    text = torch.randn(1, 16, cfg.text_dim, generator=gen)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                           return_dict=False)[0]


def test_lora_on_both_experts_with_two_processes_loads_in_the_pipeline(tiny, tmp_path):
    from diffusers import WanPipeline

    from branchgrpo.cli.eval import main as eval_main

    checkpoint = finetune(tiny, tmp_path / "lora", ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate",
                                                    "1e-2", "--use_ema"], nproc="2")  # USE_LORA=1: the default
    pipe = WanPipeline.from_pretrained(str(tiny / "wan22"))
    before = {name: _output(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    pipe.load_lora_weights(str(checkpoint / "model"), weight_name="pytorch_lora_weights.safetensors")
    pipe.load_lora_weights(str(checkpoint / "model"), weight_name="pytorch_lora_weights_transformer_2.safetensors",
                           load_into_transformer_2=True)
    for name, output in before.items():
        assert not torch.allclose(_output(getattr(pipe, name)), output), name  # both experts trained
    assert (checkpoint / "ema" / "pytorch_lora_weights_transformer_2.safetensors").is_file()
    assert eval_main(["--model", "wan22", "--pretrained_model_name_or_path", str(tiny / "wan22"), "--checkpoint",
                      str(checkpoint), "--prompts", str(tiny / "prompts.txt"), "--num_prompts", "2",
                      "--samples_per_prompt", "1", "--steps", "6", *SIZE[:6], "--shift", "5",
                      "--max_sequence_length", "16", "--rewards", "videoalign", "--reward_model_dir",
                      str(tiny / "rewards"), "--reward_batch_size", "1", "--use_ema",  # the trainer evaluates its EMA
                      "--output_dir", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert result["weights"].startswith("LoRA from")
    assert math.isclose(result["metrics"]["videoalign"]["mean"], summary["eval_reward_after"], rel_tol=1e-4)


def test_full_finetune_of_one_expert_exports_both(tiny, tmp_path):
    from diffusers import WanTransformer3DModel

    checkpoint = finetune(tiny, tmp_path / "full", ["--learning_rate", "1e-3"], nproc="1", USE_LORA="0",
                          TRAIN_EXPERTS="low") / "model"
    for folder, changed in (("transformer", False), ("transformer_2", True)):
        trained = WanTransformer3DModel.from_pretrained(str(checkpoint), subfolder=folder)
        base = WanTransformer3DModel.from_pretrained(str(tiny / "wan22"), subfolder=folder)
        assert torch.equal(_output(trained), _output(base)) != changed, folder


# ----- Wan2.2 I2V-A14B ---------------------------------------------------------------------------------------------

I2V_SIZE = ["--h", "48", "--w", "80", "--num_frames", "9", "--sampling_steps", "6", "--shift", "5"]  # 5:3 frames
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """The tiny I2V-A14B checkpoint and the first 2 shipped first-frame prompts, encoded in this process (the
    preprocess launcher is Wan2.1 I2V's, run by tests/test_wan_i2v_e2e.py)."""
    from types import SimpleNamespace

    from branchgrpo.cli.make_tiny import make_tiny
    from branchgrpo.data.preprocess import read_prompts, run_preprocess
    from branchgrpo.models import get_backbone

    root = tmp_path_factory.mktemp("wan22_i2v_e2e")
    make_tiny("wan22_i2v", str(root / "wan22_i2v"))
    prompts = read_prompts(REPO / "assets" / "i2v_prompts.jsonl", "jsonl", image_size=(48, 80))
    prompts.items, prompts.texts = prompts.items[:2], prompts.texts[:2]
    encode = get_backbone("wan22_i2v").prompt_encoder(str(root / "wan22_i2v"), "cpu", SimpleNamespace(
        dtype="auto", h=48, w=80, num_frames=9, max_sequence_length=16))
    with torch.no_grad():
        index = run_preprocess(prompts, root / "emb", "wan22_i2v", encode, prompt_format="jsonl")
    assert json.loads(index.read_text())["num_prompts"] == 2
    return root


def test_i2v_lora_on_both_experts_with_two_processes_loads_in_the_pipeline(i2v, tmp_path):
    """A 2-process run through the I2V-A14B launcher (FSDP2, LoRA on both experts, a tree spanning both experts:
    I2V-A14B's boundary 0.9 at shift 5 gives each expert 3 depths): both experts' LoRA files load into
    WanImageToVideoPipeline and change both experts."""
    from diffusers import WanImageToVideoPipeline

    env = dict(NPROC="2", MODEL_PATH=str(i2v / "wan22_i2v"), DATA_JSON=str(i2v / "emb" / "index.json"),
               HPS_CKPT_DIR=str(i2v / "no_rewards"), REWARD="first_frame_consistency=1.0")
    args = [*I2V_SIZE, "--tree_split_points", "0,2", "--max_train_steps", "2", "--device", "cpu",
            "--mixed_precision", "fp32", "--num_eval_prompts", "1", "--eval_samples_per_prompt", "1",
            "--checkpointing_steps", "2", "--report_to", "none", "--lora_rank", "4", "--lora_alpha", "8",
            "--learning_rate", "1e-2", "--save_rollout_samples", "0"]  # USE_LORA=1, TRAIN_EXPERTS=both: defaults
    out = tmp_path / "lora"
    entries = launch("scripts/finetune/finetune_wan22_i2v_branchgrpo_8gpus.sh", out, env, args)
    assert all(0 < e["reward_mean"] < 1 for e in entries)  # first-frame consistency
    print("iteration seconds (LoRA, 2 processes):", [round(e["iter_time_s"], 2) for e in entries])
    pipe = WanImageToVideoPipeline.from_pretrained(str(i2v / "wan22_i2v"))
    before = {name: _output(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    for name, expert in zip(LORA_FILES, ("transformer", "transformer_2")):
        pipe.load_lora_weights(str(out / "checkpoints" / "checkpoint-2" / "model"), weight_name=name,
                               load_into_transformer_2=expert == "transformer_2")
    for name, output in before.items():
        assert not torch.allclose(_output(getattr(pipe, name)), output), name  # both experts trained


def test_a_resumed_wan22_run_matches_the_unbroken_one_bitwise(i2v, tmp_path):
    """Wan2.2's two-expert state across a resume, in one process as tests/test_resume.py does it (FSDP2's sharded
    state across a resume: tests/test_distributed.py): an unbroken run of 2 iterations with LoRA on both experts,
    EMA, a cosine LR schedule and a checkpoint after each iteration; then a copy of its folder cut after iteration 1
    (checkpoint-2 gone, as a stop after checkpoint-1 leaves it) resumed: both experts' LoRA weights, their EMA, the
    metrics and the evaluations equal the unbroken run's bitwise."""
    from trainer_utils import train

    args = ["--model", "wan22_i2v", "--pretrained_model_name_or_path", str(i2v / "wan22_i2v"), "--data_json_path",
            str(i2v / "emb" / "index.json"), *I2V_SIZE, "--guidance_scale", "3.5", "--guidance_scale_2", "2.0",
            "--tree_split_points", "0,2", "--train_batch_size", "2", "--max_train_steps", "2", "--device", "cpu",
            "--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--lr_scheduler",
            "cosine", "--use_ema", "--ema_decay", "0.5", "--reward", "first_frame_consistency=1.0",
            "--num_eval_prompts", "1", "--eval_samples_per_prompt", "1", "--validation_steps", "1",
            "--checkpointing_steps", "1", "--report_to", "none"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train([*args, "--output_dir", str(straight)])
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-2")
    (resumed / "checkpoints" / "latest").write_text("checkpoint-1\n")
    train([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    for which in ("model", "ema"):
        a, b = exported_weights(straight, 2, which), exported_weights(resumed, 2, which)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), which
        assert {key.split("/")[0] for key in a} == {Path(name).stem for name in LORA_FILES}  # both experts
    assert without_timings(metrics(resumed)) == without_timings(metrics(straight))
    assert [e["step"] for e in metrics(resumed)] == [0, 1]
    assert (resumed / "eval.jsonl").read_text() == (straight / "eval.jsonl").read_text()
    lrs = [e["lr"] for e in metrics(resumed)]
    assert lrs[1] < lrs[0]  # the schedule moved across the resume
