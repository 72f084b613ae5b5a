"""The evaluation CLI (`python -m branchgrpo.cli.eval`) on the toy and on a tiny FLUX: it writes its tables, its
numbers reproduce the trainer's own held-out evaluation of the same weights (same prompts, seeds, sampler), a
trained checkpoint (full, LoRA, EMA) scores differently from the base model, and rewards without a checkpoint are
skipped with a message while the others still run."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from branchgrpo.cli.eval import main as eval_main
from trainer_utils import REPO, fast_args, make_toy_embeddings, train

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

# the trainer's evaluation in fast_args terms: 6 steps, the first 3 held-out prompts x 2 seeds, eval seed 1234
EVAL = ["--steps", "6", "--num_prompts", "3", "--samples_per_prompt", "2", "--seed", "1234"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_toy")
    emb = make_toy_embeddings(root / "emb")
    common = dict(checkpointing_steps=2, num_eval_prompts=3, eval_samples_per_prompt=2, learning_rate=3e-3)
    full = train(fast_args(emb, root / "full", use_ema=True, ema_decay=0.5, **common))
    lora = train(fast_args(emb, root / "lora", use_lora=True, lora_rank=4, **{**common, "learning_rate": 1e-2}))
    return root, {"full": full, "lora": lora}


def evaluate(out: Path, *flags) -> dict:
    assert eval_main(["--model", "toy", "--output_dir", str(out), "--num_threads", "1", *EVAL, *flags]) == 0
    return json.loads((out / "results.json").read_text())


def per_sample(result: dict, reward: str) -> list[float]:
    return [s["scores"][reward] for s in result["samples"]]


def test_toy_eval_writes_tables_and_reproduces_the_trainers_evaluation(toy_runs, tmp_path, capsys):
    root, summaries = toy_runs
    base = evaluate(tmp_path / "base", "--rewards", "toy,toy_digit,hps", "--reward_model_dir", str(tmp_path / "none"),
                    "--save_images", str(tmp_path / "png"))
    printed = capsys.readouterr().out
    assert "skipping reward 'hps'" in printed and "HPS_v2.1_compressed.pt" in printed
    assert base["skipped_rewards"].keys() == {"hps"} and list(base["metrics"]) == ["toy", "toy_digit"]
    for name in ("results.md", "results.csv", "results.json", "scores.csv", "grid.png"):
        assert (tmp_path / "base" / name).is_file(), name
    assert len(base["samples"]) == 3 * 2 and len(list((tmp_path / "png").glob("*.png"))) == 6
    toy = base["metrics"]["toy"]
    assert toy["n"] == 6 and toy["std"] > 0
    assert toy["ci95_normal"][0] < toy["mean"] < toy["ci95_normal"][1]
    assert toy["ci95_bootstrap"][0] <= toy["mean"] <= toy["ci95_bootstrap"][1]
    assert math.isclose(toy["mean"], sum(per_sample(base, "toy")) / 6, rel_tol=1e-12)
    table = (tmp_path / "base" / "results.md").read_text()
    assert "| toy | 6 |" in table and "95% CI, normal approx." in table and "bootstrap over prompts" in table
    rows = list(csv.DictReader(open(tmp_path / "base" / "results.csv")))
    assert [r["metric"] for r in rows] == ["toy", "toy_digit"] and float(rows[0]["ci95_normal_low"]) < toy["mean"]
    # same prompts, seeds and sampler as the trainer's evaluation: the numbers are the trainer's own
    assert math.isclose(toy["mean"], summaries["full"]["eval_reward_before"], rel_tol=1e-9)


@pytest.mark.parametrize("run, ema", [("full", False), ("full", True), ("lora", False)])
def test_toy_checkpoints_score_differently_from_the_base(toy_runs, tmp_path, run, ema):
    root, summaries = toy_runs
    base = evaluate(tmp_path / "base", "--rewards", "toy")
    flags = ["--rewards", "toy", "--checkpoint", str(root / run / "checkpoints" / "checkpoint-2")]
    trained = evaluate(tmp_path / "trained", *flags, *(["--use_ema"] if ema else []))
    assert trained["weights"].startswith("LoRA" if run == "lora" else "full weights")
    assert per_sample(trained, "toy") != per_sample(base, "toy")
    if run == "lora" or ema:  # what the trainer evaluated at the end: the weights (LoRA run) or their EMA (full run)
        # a LoRA is merged into the weights for evaluation: W x + s B (A x) -> (W + s B A) x moves the last bits
        tolerance = 1e-5 if run == "lora" else 1e-9
        assert math.isclose(trained["metrics"]["toy"]["mean"], summaries[run]["eval_reward_after"], rel_tol=tolerance)


def test_eval_refuses_bad_inputs(tmp_path, capsys):
    assert eval_main(["--model", "flux", "--output_dir", str(tmp_path)]) == 2
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err
    assert eval_main(["--model", "toy", "--checkpoint", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert eval_main(["--model", "toy", "--samples_per_prompt", "0", "--output_dir", str(tmp_path)]) == 2


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from types import SimpleNamespace

    from branchgrpo.data.preprocess import run_preprocess
    from branchgrpo.cli.make_tiny import make_tiny
    from branchgrpo.models.flux import build_prompt_encoder

    root = tmp_path_factory.mktemp("eval_flux")
    make_tiny("flux", str(root / "flux"))
    make_tiny("hps", str(root / "hps"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join((REPO / "assets" / "prompts.txt").read_text().splitlines()[:4]) + "\n")
    encode = build_prompt_encoder(root / "flux", "cpu", SimpleNamespace(max_sequence_length=16, dtype="fp32"))
    index = run_preprocess(prompts, root / "emb", "flux", encode, shard_size=8)
    configs = str(root / "hps" / "open_clip_configs")
    options = json.dumps({"hps": {"arch": "ViT-H-14-tiny", "model_config_dir": configs}})
    summary = train(fast_args((index, index), root / "lora", model="flux", pretrained_model_name_or_path=root / "flux",
                              h=64, w=64, reward="hps", reward_model_dir=root / "hps", reward_options=options,
                              use_lora=True, lora_rank=4, lora_alpha=8, learning_rate=1e-2, checkpointing_steps=2,
                              train_batch_size=1, num_eval_prompts=2, eval_samples_per_prompt=2,
                              mixed_precision="fp32"))
    return root, prompts, options, summary


def test_tiny_flux_lora_checkpoint_through_the_launcher(tiny_flux, tmp_path, capsys):
    root, prompts, options, summary = tiny_flux
    common = ["--max_sequence_length", "16", "--reward_options", options, "--num_threads", "1"]
    assert eval_main(["--model", "flux", "--pretrained_model_name_or_path", str(root / "flux"), "--prompts",
                      str(prompts), "--h", "64", "--w", "64", "--rewards", "all", "--reward_model_dir",
                      str(root / "hps"), "--output_dir", str(tmp_path / "base"), *EVAL[:2], "--num_prompts", "2",
                      "--samples_per_prompt", "2", *common]) == 0
    assert "skipping reward 'pickscore'" in capsys.readouterr().out  # absent checkpoints skipped, hps still runs
    env = dict(os.environ, PYTHON=sys.executable, MODEL_PATH=str(root / "flux"), PROMPTS=str(prompts),
               HPS_CKPT_DIR=str(root / "hps"), H="64", W="64", STEPS="6", SAMPLES="2", NUM_PROMPTS="2",
               CHECKPOINT=str(root / "lora" / "checkpoints" / "checkpoint-2"), OUTPUT_DIR=str(tmp_path / "lora"))
    proc = subprocess.run(["bash", "scripts/eval/eval_flux.sh", *common], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, lora = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("base", "lora"))
    assert lora["weights"].startswith("LoRA from") and list(lora["metrics"]) == ["hps"] == list(base["metrics"])
    assert len(lora["samples"]) == 2 * 2 and (tmp_path / "lora" / "grid.png").is_file()
    assert per_sample(lora, "hps") != per_sample(base, "hps")
    assert math.isclose(base["metrics"]["hps"]["mean"], summary["eval_reward_before"], rel_tol=1e-5)
    assert math.isclose(lora["metrics"]["hps"]["mean"], summary["eval_reward_after"], rel_tol=1e-5)


def test_flux_launcher_checks_its_inputs(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, MODEL_PATH=str(tmp_path / "no_flux"),
               PROMPTS=str(tmp_path / "none.txt"), CHECKPOINT=str(tmp_path / "no_ckpt"))
    proc = subprocess.run(["bash", "scripts/eval/eval_flux.sh"], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    for what in ("MODEL_PATH", "PROMPTS", "CHECKPOINT"):
        assert what in proc.stderr
