"""The malformed inputs of scripts/audit/audit_inputs.py: one `Case` each, grouped by entry point.

Paths in `argv` and `env` are templates: {w} the case's scratch folder (the command runs in {w}/cwd, beside a file of
the user's), {out} the output folder inside it, {emb} toy embeddings (train/ and eval/), {run} a finished toy run
with its checkpoints, {repo} the checkout. A `setup(work, ctx)` puts the case's files in place (and returns a tmpfs
mount point to unmount afterwards, or None).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Case:
    id: str
    argv: list[str]  # python -m ARGV..., or (kind "launcher") a script under the checkout and its arguments
    names: tuple[str, ...] = ()  # what the error line must name (expect "error"), or the launched command hold
    expect: str = "error"  # error | warn (exit code free, a warning naming `warns`) | launch
    code: int = 2  # expected exit code of a refusal
    env: dict = field(default_factory=dict)
    setup: Callable | None = None
    keep: tuple[str, ...] = ()  # files under {out} that must survive unchanged (results)
    warns: tuple[str, ...] = ()  # strings a warning line must hold
    kind: str = "python"
    needs_mount: bool = False


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def files(**contents):
    """A setup writing {relative path: text} into the case's folder ('{out}/x' goes into the output folder)."""
    def setup(work: Path, ctx: dict):
        for name, text in contents.items():
            write(work / name.replace("__", "/"), text)
    return setup


def copied_run(edit: Callable[[Path], None]):
    """A setup copying the finished toy run to {out}, then `edit(out)`."""
    def setup(work: Path, ctx: dict):
        shutil.copytree(ctx["run"], work / "out")
        edit(work / "out")
    return setup


def copied_embeddings(edit: Callable[[dict, Path], None]):
    """A setup copying the toy embeddings to {w}/emb, then `edit(index, folder)`; the index is rewritten after."""
    def setup(work: Path, ctx: dict):
        shutil.copytree(ctx["emb"], work / "emb")
        folder = work / "emb" / "train"
        index = json.loads((folder / "index.json").read_text())
        edit(index, folder)
        (folder / "index.json").write_text(json.dumps(index))
    return setup


def images(work: Path, ctx: dict) -> None:
    """Two 8x8 PNGs in {w}/a (a sample set for the diversity CLI)."""
    from PIL import Image

    (work / "a").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(work / "a" / f"{i}.png")


def mounted(options: str, then: Callable[[Path], None] | None = None):
    def setup(work: Path, ctx: dict):
        point = work / "mnt"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        if then:
            then(point)
        return str(point)
    return setup


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _cut_export(out: Path, drop_marker: bool) -> None:
    ckpt = out / "checkpoints" / "checkpoint-1"
    weights = ckpt / "model" / "transformer.safetensors"
    _truncate(weights, weights.stat().st_size // 2)
    marker = ckpt / "complete.json"
    if drop_marker:
        marker.unlink()
    else:  # the marker agrees with the cut file: only the file's own header can tell
        listing = json.loads(marker.read_text())
        listing["files"]["model/transformer.safetensors"] = weights.stat().st_size
        marker.write_text(json.dumps(listing))


def _results_without_checkpoints(out: Path) -> None:
    shutil.rmtree(out / "checkpoints")


def _shard_dtype(index: dict, folder: Path) -> None:
    for spec in index["keys"].values():
        spec["dtype"] = "F16" if spec["dtype"] != "F16" else "F32"


def _no_text(index: dict, folder: Path) -> None:
    del index["prompts"][3]["text"]


def train_cases(flags) -> list[Case]:
    T = ["branchgrpo.cli.train", *flags("{emb}", "{out}")]
    out_files = {"out__metrics.jsonl": '{"step": 0}\n', "out__config.json": '{"algo": "branchgrpo", "output_dir": "x"}',
                 "out__thesis.tex": "mine"}
    cases = [
        Case("train-negative-lr", T + ["--learning_rate", "-1e-3"], ("--learning_rate",)),
        Case("train-lr-not-number", T + ["--learning_rate", "abc"], ("--learning_rate",)),
        Case("train-steps-float", T + ["--max_train_steps", "1.5"], ("--max_train_steps",)),
        Case("train-missing-value", T + ["--sampling_steps"], ("--sampling_steps",)),
        Case("train-unknown-flag", T + ["--learnig_rate", "1e-3"], ("--learnig_rate",)),
        Case("train-bad-choice", T + ["--lr_scheduler", "cosin"], ("--lr_scheduler",)),
        Case("train-device-gpu", T + ["--device", "gpu"], ("--device", "gpu")),
        Case("train-device-gpu0", T + ["--device", "gpu0"], ("--device", "gpu0")),
        Case("train-device-cuda-none", T + ["--device", "cuda"], ("--device", "cuda")),
        Case("train-device-cuda-x", T + ["--device", "cuda:x"], ("--device",)),
        Case("train-device-empty", T + ["--device", ""], ("--device",)),
        Case("train-output-empty", T + ["--output_dir", ""], ("--output_dir",)),
        Case("train-output-blank", T + ["--output_dir", "  "], ("--output_dir",)),
        Case("train-output-empty-overwrite", T + ["--output_dir", "", "--overwrite_output_dir"], ("--output_dir",),
             setup=files(**{"cwd__metrics.jsonl": "{}\n"})),
        Case("train-output-is-file", T + ["--output_dir", "{w}/afile"], ("--output_dir", "afile"),
             setup=files(afile="x")),
        Case("train-output-under-file", T + ["--output_dir", "{w}/afile/sub"], ("--output_dir",), setup=files(afile="x")),
        Case("train-overwrite-foreign-file", T + ["--overwrite_output_dir"], ("--output_dir", "thesis.tex"),
             setup=files(**out_files), keep=("thesis.tex", "metrics.jsonl")),
        Case("train-requeue-finished-run", T + ["--resume_from_checkpoint", "latest", "--checkpointing_steps", "1"],
             ("--resume_from_checkpoint", "--overwrite_output_dir", "{out}"),
             setup=copied_run(_results_without_checkpoints),
             keep=("metrics.jsonl", "eval.jsonl", "summary.json", "config.json")),
        Case("train-truncated-export-legacy", T + ["--resume_from_checkpoint", "latest", "--checkpointing_steps", "1",
                                                  "--max_train_steps", "2"],
             ("transformer.safetensors",), setup=copied_run(lambda out: _cut_export(out, True))),
        Case("train-truncated-export-listed", T + ["--resume_from_checkpoint", "latest", "--checkpointing_steps", "1",
                                                  "--max_train_steps", "2"],
             ("transformer.safetensors",), setup=copied_run(lambda out: _cut_export(out, False))),
        Case("train-resume-missing", T + ["--resume_from_checkpoint", "{w}/nope"], ("--resume_from_checkpoint", "nope")),
        Case("train-resume-and-overwrite", T + ["--resume_from_checkpoint", "latest", "--overwrite_output_dir"],
             ("--overwrite_output_dir", "--resume_from_checkpoint")),
        Case("train-config-dir", T + ["--config", "{w}"], ("--config", "folder")),
        Case("train-config-missing", T + ["--config", "{w}/nope.yaml"], ("--config", "nope.yaml")),
        Case("train-config-empty", T + ["--config", "{w}/empty.yaml"], ("--config", "empty.yaml"),
             setup=files(**{"empty.yaml": "# nothing here\n"})),
        Case("train-config-duplicate-key", T + ["--config", "{w}/dup.yaml"], ("dup.yaml", "learning_rate"),
             setup=files(**{"dup.yaml": "learning_rate: 1.0e-3\nseed: 1\nlearning_rate: 1.0e-4\n"})),
        Case("train-config-bad-yaml", T + ["--config", "{w}/bad.yaml"], ("--config", "bad.yaml"),
             setup=files(**{"bad.yaml": "seed: [1, 2\n"})),
        Case("train-config-unknown-key", T + ["--config", "{w}/c.yaml"], ("c.yaml", "learnig_rate"),
             setup=files(**{"c.yaml": "learnig_rate: 1.0e-3\n"})),
        Case("train-config-wrong-type", T + ["--config", "{w}/c.yaml"], ("--branch_factor",),
             setup=files(**{"c.yaml": "branch_factor: many\n"})),
        Case("train-config-list", T + ["--config", "{w}/c.yaml"], ("--config", "c.yaml"),
             setup=files(**{"c.yaml": "- seed\n- 1\n"})),
        Case("train-config-binary", T + ["--config", "{w}/c.yaml"], ("--config", "c.yaml"),
             setup=files(**{"c.yaml": b"\xff\xfe\x00\x01"})),
        Case("train-reward-options-type", T + ["--reward_options", '{"toy": {"path": 3}}'],
             ("--reward_options", "path")),
        Case("train-reward-options-unknown-reward", T + ["--reward_options", '{"toyy": {"path": "x"}}'],
             ("--reward_options", "toyy")),
        Case("train-reward-options-unknown-key", T + ["--reward_options", '{"toy": {"paht": "x"}}'],
             ("--reward_options", "paht")),
        Case("train-reward-options-missing-path", T + ["--reward_options", '{"toy": {"path": "{w}/nope"}}'],
             ("--reward_options", "path", "nope")),
        Case("train-reward-options-not-json", T + ["--reward_options", "{toy: 1}"], ("--reward_options",)),
        Case("train-reward-options-list", T + ["--reward_options", "[1, 2]"], ("--reward_options",)),
        Case("train-reward-unknown", T + ["--reward", "tooy=1"], ("--reward", "tooy")),
        Case("train-reward-weight", T + ["--reward", "toy=abc"], ("--reward", "abc")),
        Case("train-reward-empty", T + ["--reward", ""], ("--reward",)),
        Case("train-data-missing", T + ["--data_json_path", "{w}/nope.json"], ("--data_json_path", "nope.json")),
        Case("train-index-not-json", T + ["--data_json_path", "{w}/index.json"], ("index.json",),
             setup=files(**{"index.json": "{not json"})),
        Case("train-index-prompt-without-text", T + ["--data_json_path", "{w}/emb/train/index.json"],
             ("index.json", "text"), setup=copied_embeddings(_no_text)),
        Case("train-index-shard-dtype", T + ["--data_json_path", "{w}/emb/train/index.json"], ("index.json", "dtype"),
             setup=copied_embeddings(_shard_dtype)),
        Case("train-index-prompt-count", T + ["--data_json_path", "{w}/emb/train/index.json"],
             ("index.json", "num_prompts"), setup=copied_embeddings(lambda i, f: i.update(num_prompts=7))),
        Case("train-index-shard-outside", T + ["--data_json_path", "{w}/emb/train/index.json"], ("index.json",),
             setup=copied_embeddings(lambda i, f: i["shards"][0].update(file="../../x.safetensors"))),
        Case("train-index-model", T + ["--data_json_path", "{w}/emb/train/index.json"], ("--data_json_path",),
             setup=copied_embeddings(lambda i, f: i.update(model="flux"))),
        Case("train-adam-beta1", T + ["--adam_beta1", "1.0"], ("--adam_beta1",)),
        Case("train-adam-beta2", T + ["--adam_beta2", "-0.1"], ("--adam_beta2",)),
        Case("train-adam-epsilon", T + ["--adam_epsilon", "0"], ("--adam_epsilon",)),
        Case("train-weight-decay", T + ["--weight_decay", "-1"], ("--weight_decay",)),
        Case("train-lr-power", T + ["--lr_scheduler", "polynomial", "--lr_power", "0"], ("--lr_power",)),
        Case("train-warmup-longer-than-run", T + ["--lr_warmup_steps", "1000"], expect="warn",
             warns=("--lr_warmup_steps",)),
        Case("train-repeated-flag", T + ["--seed", "1", "--seed", "2", "--max_train_steps", "0"],
             ("--max_train_steps",), warns=("--seed",)),
        Case("train-feature-weights-text", T + ["--hacking_features", "clip", "--hacking_feature_weights", "{w}/w.pt"],
             ("--hacking_feature_weights", "w.pt"), setup=files(**{"w.pt": "not weights\n"})),
        Case("train-feature-weights-dir", T + ["--hacking_features", "inception", "--hacking_feature_weights", "{w}"],
             ("--hacking_feature_weights",)),
        Case("train-num-threads", T + ["--num_threads", "-1"], ("--num_threads",)),
        Case("train-nonfinite-fraction", T + ["--max_nonfinite_fraction", "2"], ("--max_nonfinite_fraction",)),
        Case("train-split-points", T + ["--tree_split_points", "0,x"], ("--tree_split_points",)),
        Case("train-eta-nan", T + ["--eta", "nan"], ("--eta",)),
        Case("train-model-unknown", T + ["--model", "sdxl"], ("--model", "sdxl")),
        Case("train-pretrained-missing", T + ["--pretrained_model_name_or_path", "{w}/nope"],
             ("--pretrained_model_name_or_path",)),
        Case("train-ema-decay", T + ["--use_ema", "--ema_decay", "1"], ("--ema_decay",)),
        Case("train-report-to", T + ["--report_to", "tensorbord"], ("--report_to",)),
        Case("train-checkpointing-steps", T + ["--checkpointing_steps", "-1"], ("--checkpointing_steps",)),
        Case("train-collective-timeout", T + ["--collective_timeout_s", "0"], ("--collective_timeout_s",)),
        Case("train-batch-zero", T + ["--train_batch_size", "0"], ("--train_batch_size",)),
        Case("train-bool-with-value", T + ["--use_lora=yes"], ("--use_lora",)),
        Case("train-disk-full", ["branchgrpo.cli.train", *flags("{emb}", "{w}/mnt/run"), "--checkpointing_steps", "1"],
             ("{w}/mnt", "free"), code=4, needs_mount=True, setup=mounted("size=1200k")),
        Case("train-read-only", T + ["--output_dir", "{w}/mnt/run"], ("--output_dir",), needs_mount=True,
             setup=mounted("size=64k,ro")),
    ]
    return cases


def tool_cases() -> list[Case]:
    P = ["branchgrpo.cli.preprocess", "--model", "toy", "--device", "cpu", "--output_dir", "{out}"]
    E = ["branchgrpo.cli.eval", "--model", "toy", "--device", "cpu", "--num_prompts", "1", "--samples_per_prompt", "1",
         "--steps", "2", "--bootstrap", "0"]
    prompts = files(**{"p.txt": "a bold seven\n"})
    return [
        Case("preprocess-device-gpu", [*P, "--prompts", "{w}/p.txt", "--device", "gpu"], ("--device",), setup=prompts),
        Case("preprocess-prompts-dir", [*P, "--prompts", "{w}"], ("--prompts", "folder")),
        Case("preprocess-prompts-missing", [*P, "--prompts", "{w}/nope.txt"], ("--prompts", "nope.txt")),
        Case("preprocess-prompts-empty", [*P, "--prompts", "{w}/p.txt"], ("--prompts", "p.txt"),
             setup=files(**{"p.txt": "\n\n"})),
        Case("preprocess-prompts-binary", [*P, "--prompts", "{w}/p.txt"], ("--prompts", "p.txt"),
             setup=files(**{"p.txt": b"\xff\xfe\xfa\x00"})),
        Case("preprocess-output-empty", [*P[:-2], "--output_dir", "", "--prompts", "{w}/p.txt"], ("--output_dir",),
             setup=prompts),
        Case("preprocess-output-file", [*P[:-2], "--output_dir", "{w}/p.txt", "--prompts", "{w}/p.txt"],
             ("--output_dir",), setup=prompts),
        Case("preprocess-shard-size", [*P, "--prompts", "{w}/p.txt", "--shard_size", "0"], ("--shard_size",),
             setup=prompts),
        Case("preprocess-batch-size", [*P, "--prompts", "{w}/p.txt", "--batch_size", "-1"], ("--batch_size",),
             setup=prompts),
        Case("preprocess-dtype", [*P, "--prompts", "{w}/p.txt", "--dtype", "fp16"], ("--dtype",), setup=prompts),
        Case("preprocess-model", [*P[:2], "sd3", "--prompts", "{w}/p.txt", "--output_dir", "{out}"], ("--model",),
             setup=prompts),
        Case("preprocess-no-prompts", P, ("--prompts",)),
        Case("preprocess-jsonl-bad-line", ["branchgrpo.cli.preprocess", "--model", "wan_i2v", "--device", "cpu",
                                           "--prompts", "{w}/p.jsonl", "--output_dir", "{out}"],
             ("p.jsonl", "line 1"), setup=files(**{"p.jsonl": "{broken\n"})),
        Case("eval-device-gpu", [*E, "--device", "gpu", "--output_dir", "{out}"], ("--device",)),
        Case("eval-output-empty", [*E, "--output_dir", ""], ("--output_dir",)),
        Case("eval-output-file", [*E, "--output_dir", "{w}/afile"], ("--output_dir", "afile"), setup=files(afile="x")),
        Case("eval-save-images-file", [*E, "--output_dir", "{out}", "--save_images", "{w}/afile"],
             ("--save_images", "afile"), setup=files(afile="x")),
        Case("eval-rewards-unknown", [*E, "--output_dir", "{out}", "--rewards", "tooy"], ("--rewards", "tooy")),
        Case("eval-reward-options-type", [*E, "--output_dir", "{out}", "--reward_options", '{"toy": {"path": []}}'],
             ("--reward_options", "path")),
        Case("eval-reward-options-unused", [*E, "--output_dir", "{out}", "--rewards", "toy", "--reward_options",
                                            '{"hps": {"arch": "ViT-H-14"}}'], ("--reward_options", "hps")),
        Case("eval-prompts-dir", [*E, "--output_dir", "{out}", "--prompts", "{w}"], ("--prompts", "folder")),
        Case("eval-checkpoint-missing", [*E, "--output_dir", "{out}", "--checkpoint", "{w}/nope"], ("--checkpoint",)),
        Case("eval-checkpoint-bad-state", [*E, "--output_dir", "{out}", "--checkpoint", "{w}/ck"],
             ("trainer_state.json",), setup=files(**{"ck__trainer_state.json": "{oops", "ck__model__x.txt": ""})),
        Case("eval-samples-zero", [*E, "--output_dir", "{out}", "--samples_per_prompt", "0"], ("--samples_per_prompt",)),
        Case("eval-shift-negative", [*E, "--output_dir", "{out}", "--shift", "-1e-3"], ("--shift",)),
        Case("eval-inapplicable-size", [*E, "--output_dir", "{out}", "--h", "64"], ("--h",)),
        Case("eval-bootstrap-negative", [*E, "--output_dir", "{out}", "--bootstrap", "-5"], ("--bootstrap",)),
        Case("eval-eta-negative", [*E, "--output_dir", "{out}", "--sampler", "sde", "--eta", "-0.5"], ("--eta",)),
        Case("plan-split-points", ["branchgrpo.plan", "--tree_split_points", "0,x"], ("--tree_split_points",)),
        Case("plan-transformer-config-json", ["branchgrpo.plan", "--model", "flux", "--gpus", "8",
                                              "--transformer_config", "{w}/c.json"], ("c.json",),
             setup=files(**{"c.json": "{oops"})),
        Case("plan-transformer-config-dir", ["branchgrpo.plan", "--model", "flux", "--gpus", "8",
                                             "--transformer_config", "{w}"], ("--transformer_config",)),
        Case("plan-gpus-zero", ["branchgrpo.plan", "--gpus", "0"], ("--gpus",)),
        Case("plan-memory-negative", ["branchgrpo.plan", "--gpu_memory_gb", "-80"], ("--gpu_memory_gb",)),
        Case("plan-repeated-flag", ["branchgrpo.plan", "--branch_factor", "2", "--branch_factor", "3"], expect="warn",
             warns=("--branch_factor",)),
        Case("plan-config-empty", ["branchgrpo.plan", "--config", "{w}/e.yaml"], ("--config", "e.yaml"),
             setup=files(**{"e.yaml": ""})),
        Case("plan-branch-factor", ["branchgrpo.plan", "--branch_factor", "0"], ("--branch_factor",)),
        Case("plan-iteration-negative", ["branchgrpo.plan", "--iteration", "-1"], ("--iteration",)),
        Case("make-tiny-kind", ["branchgrpo.make_tiny", "sdxl", "{out}"], ("sdxl",)),
        Case("make-tiny-out-file", ["branchgrpo.make_tiny", "hps", "{w}/afile"], ("afile",), setup=files(afile="x")),
        Case("make-tiny-out-empty", ["branchgrpo.make_tiny", "hps", ""], ("out_dir",)),
        Case("make-tiny-seed", ["branchgrpo.make_tiny", "hps", "{out}", "--seed", "x"], ("--seed",)),
        Case("bench-device-gpu", ["branchgrpo.bench", "--device", "gpu", "--output", "{out}/b.json"], ("--device",)),
        Case("bench-output-under-file", ["branchgrpo.bench", "--device", "cpu", "--output", "{w}/afile/b.json"],
             ("--output",), setup=files(afile="x")),
        Case("bench-split-points", ["branchgrpo.bench", "--tree_split_points", "x"], ("--tree_split_points",)),
        Case("bench-repeats", ["branchgrpo.bench", "--device", "cpu", "--repeats", "0", "--output", "{out}/b.json"],
             ("--repeats",)),
        Case("bench-compiled-device", ["branchgrpo.bench.compiled", "--device", "gpu0"], ("--device",)),
        Case("bench-compiled-steps", ["branchgrpo.bench.compiled", "--steps", "5"], ("--steps",)),
        Case("bench-gpu-check-output-file", ["branchgrpo.bench.gpu_check", "--tiny", "--output_dir", "{w}/afile"],
             ("--output_dir",), setup=files(afile="x")),
        Case("compare-methods", ["branchgrpo.cli.compare", "--methods", "nope", "--output_dir", "{out}"], ("--methods",)),
        Case("compare-iterations", ["branchgrpo.cli.compare", "--iterations", "0", "--output_dir", "{out}"],
             ("--iterations",)),
        Case("compare-output-empty", ["branchgrpo.cli.compare", "--output_dir", "", "--collect_only"],
             ("--output_dir",)),
        Case("dynamic-seeds", ["branchgrpo.bench.dynamic", "--seeds", "0,x", "--output_dir", "{out}"], ("--seeds",)),
        Case("dynamic-methods", ["branchgrpo.bench.dynamic", "--methods", "nope", "--output_dir", "{out}"],
             ("--methods",)),
        Case("diversity-missing", ["branchgrpo.cli.diversity", "--a", "{w}/nope", "--b", "{w}"], ("--a", "nope")),
        Case("diversity-device", ["branchgrpo.cli.diversity", "--a", "{w}/a", "--b", "{w}/a", "--device", "gpu"],
             ("--device",), setup=images),
        Case("diversity-output-dir", ["branchgrpo.cli.diversity", "--a", "{w}/a", "--b", "{w}/a", "--output", "{w}"],
             ("--output",), setup=images),
        Case("pretrain-out-empty", ["branchgrpo.cli.pretrain_toy", "--out", ""], ("--out",)),
        Case("pretrain-out-file", ["branchgrpo.cli.pretrain_toy", "--out", "{w}/afile"], ("--out", "afile"),
             setup=files(afile="x")),
        Case("pretrain-steps", ["branchgrpo.cli.pretrain_toy", "--out", "{out}", "--steps", "0"], ("--steps",)),
    ]


def launcher_cases() -> list[Case]:
    toy, flux = "scripts/finetune/finetune_toy_branchgrpo.sh", "scripts/finetune/finetune_flux_branchgrpo_8gpus.sh"
    wan, pre = "scripts/finetune/finetune_wan_branchgrpo_8gpus.sh", "scripts/preprocess/preprocess_flux_rl_embeddings.sh"
    ev, evw = "scripts/eval/eval_flux.sh", "scripts/eval/eval_wan.sh"
    model = files(**{"flux__transformer__x": "", "flux__vae__x": "", "flux__model_index.json": "{}",
                     "flux__text_encoder__x": "", "flux__text_encoder_2__x": "", "flux__tokenizer__x": "",
                     "flux__tokenizer_2__x": "", "data.json": "{}", "hps__HPS_v2.1_compressed.pt": "",
                     "hps__VideoReward__x": "", "p.txt": "a cat\n"})
    base = dict(OUTPUT_DIR="{out}", SKIP_SETUP="1", NPROC="1", MODEL_PATH="{w}/flux", DATA_JSON="{w}/data.json",
                HPS_CKPT_DIR="{w}/hps", PROMPTS="{w}/p.txt")

    def L(cid, script, env, names=(), expect="error", args=()):
        return Case(cid, [script, *args], names, expect=expect, env=dict(base, **env), setup=model, kind="launcher")

    return [
        L("launcher-toy-skip-setup-word", toy, {"SKIP_SETUP": "maybe"}, ("SKIP_SETUP",)),
        L("launcher-toy-skip-setup-yes", toy, {"SKIP_SETUP": "yes"}, ("branchgrpo.cli.train",), expect="launch"),
        L("launcher-toy-config-missing", toy, {"CONFIG": "{w}/nope.yaml"}, ("CONFIG", "nope.yaml")),
        L("launcher-toy-algo", toy, {"ALGO": "ppo"}, ("ALGO", "ppo")),
        L("launcher-toy-nproc", toy, {"NPROC": "abc"}, ("NPROC",)),
        L("launcher-toy-nnodes", toy, {"NNODES": "abc"}, ("NNODES",)),
        L("launcher-toy-node-rank", toy, {"NNODES": "2", "NODE_RANK": "-1"}, ("NODE_RANK",)),
        L("launcher-toy-master-port", toy, {"NPROC": "2", "MASTER_PORT": "http"}, ("MASTER_PORT",)),
        L("launcher-flux-lora-true", flux, {"USE_LORA": "true"}, ("--use_lora",), expect="launch"),
        L("launcher-flux-lora-yes", flux, {"USE_LORA": "yes"}, ("--use_lora",), expect="launch"),
        L("launcher-flux-lora-word", flux, {"USE_LORA": "maybe"}, ("USE_LORA",)),
        L("launcher-flux-lora-off", flux, {"USE_LORA": "off"}, ("--model",), expect="launch"),
        L("launcher-flux-variant", flux, {"VARIANT": "fast"}, ("VARIANT",)),
        L("launcher-flux-model-missing", flux, {"MODEL_PATH": "{w}/none"}, ("MODEL_PATH",)),
        L("launcher-flux-nnodes", flux, {"NNODES": "two"}, ("NNODES",)),
        L("launcher-flux-height", flux, {"H": "abc"}, ("H",)),
        L("launcher-flux-steps", flux, {"MAX_STEPS": "1e3"}, ("MAX_STEPS",)),
        L("launcher-flux-lr", flux, {"LR": "fast"}, ("LR",)),
        L("launcher-wan-lora-on", wan, {"USE_LORA": "on", "MODEL_PATH": "{w}/flux"}, ("--use_lora",), expect="launch"),
        L("launcher-wan-frames", wan, {"FRAMES": "thirty"}, ("FRAMES",)),
        L("launcher-preprocess-nproc", pre, {"NPROC": "0"}, ("NPROC",)),
        L("launcher-preprocess-prompts", pre, {"PROMPTS": "{w}/nope.txt"}, ("PROMPTS",)),
        L("launcher-preprocess-seq-len", pre, {"MAX_SEQUENCE_LENGTH": "long"}, ("MAX_SEQUENCE_LENGTH",)),
        L("launcher-eval-ema-true", ev, {"USE_EMA": "true", "CHECKPOINT": "{w}/flux"}, ("--use_ema",), expect="launch"),
        L("launcher-eval-ema-word", ev, {"USE_EMA": "2", "CHECKPOINT": "{w}/flux"}, ("USE_EMA",)),
        L("launcher-eval-wan-ema-no-checkpoint", evw, {"USE_EMA": "yes", "MODEL_PATH": "{w}/flux"},
          ("USE_EMA", "CHECKPOINT")),
        L("launcher-eval-samples", ev, {"SAMPLES": "four"}, ("SAMPLES",)),
        L("launcher-compare-skip-setup", "scripts/bench/compare_methods.sh", {"SKIP_SETUP": "y"}, ("SKIP_SETUP",)),
        L("launcher-compare-threads", "scripts/bench/compare_methods.sh", {"NUM_THREADS": "-"}, ("NUM_THREADS",)),
        L("launcher-dynamic-skip-setup", "scripts/bench/dynamic_branching.sh", {"SKIP_SETUP": "2"}, ("SKIP_SETUP",)),
        L("launcher-pretrain-threads", "scripts/pretrain/pretrain_toy.sh", {"THREADS": "abc"}, ("THREADS",)),
        L("launcher-gpu-check-nproc", "scripts/bench/gpu_check.sh", {"NPROC": "x"}, ("NPROC",), args=("--tiny",)),
    ]


def build_cases(flags) -> list[Case]:
    cases = train_cases(flags) + tool_cases() + launcher_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases
