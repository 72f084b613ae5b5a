"""Every algorithm on every backbone, measured: `python -m branchgrpo.bench.matrix` (scripts/bench/backbone_matrix.sh).

    python -m branchgrpo.bench.matrix --output_dir outputs/matrix
    python -m branchgrpo.bench.matrix --backbones sd3,wan22 --algos branchgrpo,diffusion_nft --modes lora

The rows are the registered backbones (branchgrpo.models), the columns the registered algorithms
(branchgrpo.algorithms): a new unit appears by itself. A backbone runs when its spec has a tiny checkpoint
(`FixtureSupport`: `tiny` writes it, `tiny_run` gives the sizes of a smoke run on it); one without is listed as
skipped. For each backbone, once: the tiny checkpoint, the training reward (the first of the spec's `eval_rewards`
that needs no file, else the first with a tiny checkpoint of its own, branchgrpo.testing), and the embeddings of the
first prompts of its default prompt file, encoded by its own encoders. Then ONE torchrun job of --nproc processes
(branchgrpo.bench.matrix_worker) trains every algorithm in turn, --iterations iterations at 6 sampling steps with the
algorithm's `tiny_flags`, under FSDP2 (`--parallel auto` with several processes), the full model and LoRA
(--modes both; `alternate` switches between them from algorithm to algorithm, starting one backbone with the full
model and the next with LoRA, so that every algorithm still meets both across the backbones).

A cell passes when every iteration's loss and rewards are finite, the first ratio of each iteration is 1 at
theta_old (within 1e-6; algorithms that do not train on ratios: n/a), and the last checkpoint's export, loaded as the evaluation
CLI loads it, predicts as the trained model (max relative difference 1e-5) while training moved the prediction.
A failure is the run's one-line error (or the check that failed). Writes matrix.json and matrix.md (pass/fail, the
median iteration time, the commit and the load average) into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.runtime.outputs import writable_folder

MODES = ("both", "alternate", "full", "lora")
SAMPLING_STEPS = 6  # what the algorithms' tiny_flags are written for
NUM_PROMPTS = 4  # prompts embedded per backbone: one per process and iteration at --nproc 2, plus the held-out one
LORA_FLAGS = ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8"]
RATIO_TOLERANCE = 1e-6  # |first ratio - 1|: exactly 1 by design; FSDP2's sharded forward may round the last bit
RELOAD_TOLERANCE = 1e-5  # max |v_reloaded - v_trained| / max |v_trained|: the same fp32 weights in another module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/bench/matrix", help="matrix.json, matrix.md and the work folders")
    p.add_argument("--backbones", default="", help="comma-separated backbones (default: every registered one)")
    p.add_argument("--algos", default="", help="comma-separated algorithms (default: every registered one)")
    p.add_argument("--modes", choices=MODES, default="both", help="full model or LoRA per algorithm: both (every "
                   "algorithm twice; the fixed costs dominate on tiny checkpoints), alternate (one per algorithm, "
                   "switching), full, or lora")
    p.add_argument("--iterations", type=int, default=2, help="training iterations per run")
    p.add_argument("--nproc", type=int, default=2, help="processes of each backbone's torchrun job (1: no torchrun, "
                   "the runs in this process)")
    p.add_argument("--timeout_s", type=float, default=1800, help="limit of one backbone's job; its cells not done by "
                   "then fail with the timeout")
    add_debug_flag(p)
    return p


def selected(given: str, registered: list[str], flag: str) -> list[str]:
    """The registered names `given` lists (comma-separated; empty: all), in registry order."""
    names = [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ValueError(f"{flag}: unknown {', '.join(unknown)}; expected some of {', '.join(registered)}")
    return [n for n in registered if not names or n in names]


def run_modes(modes: str, row: int, num_algos: int) -> list[list[str]]:
    """The modes each algorithm of backbone number `row` runs in."""
    if modes == "both":
        return [["full", "lora"]] * num_algos
    if modes == "alternate":
        return [["full" if (row + i) % 2 == 0 else "lora"] for i in range(num_algos)]
    return [[modes]] * num_algos


def choose_reward(spec, rewards_dir: Path) -> tuple[str, dict]:
    """(reward, its options) for a backbone's runs: the first of its `eval_rewards` that builds without any file,
    else the first that has a tiny checkpoint (written to `rewards_dir`)."""
    from branchgrpo.rewards.base import build_reward
    from branchgrpo.runtime.entry import USER_ERRORS
    from branchgrpo.testing import TINY_REWARDS, call_writer, tiny_reward_options

    empty = rewards_dir / "none"
    empty.mkdir(parents=True, exist_ok=True)
    for name in spec.eval_rewards:
        try:
            build_reward(name, "cpu", str(empty))
            return name, {}
        except USER_ERRORS:  # it needs files
            continue
    for name in spec.eval_rewards:
        if name in TINY_REWARDS:
            call_writer(TINY_REWARDS[name], str(rewards_dir))
            return name, tiny_reward_options(name, rewards_dir)
    raise ValueError(f"--model {spec.name}: none of its rewards ({', '.join(spec.eval_rewards) or 'none'}) works "
                     "without files or has a tiny checkpoint")


def prepare_backbone(spec, folder: Path) -> SimpleNamespace:
    """The backbone's tiny checkpoint, reward and embeddings (once), and the trainer flags every run shares."""
    from branchgrpo.config.sections import ModelConfig
    from branchgrpo.data.preprocess import PromptList, read_prompts, run_preprocess
    from branchgrpo.testing import call_writer

    if not spec.tiny_run:
        raise ValueError(f"--model {spec.name}: its spec gives no tiny_run sizes (models/support.py FixtureSupport)")
    sizes = {k: v for k, v in spec.tiny_run.items() if k != "max_sequence_length"}
    model_cfg = ModelConfig.for_backbone(spec.name, str(folder / "model"), **sizes)
    model_cfg.backbone.validate()
    call_writer(spec.tiny, str(folder / "model"))
    reward, options = choose_reward(spec, folder / "rewards")
    encoder_sizes = spec.encoder_sizes(model_cfg.backbone)
    settings = SimpleNamespace(max_sequence_length=spec.tiny_run.get("max_sequence_length", 512), dtype="fp32",
                               negative_prompt=None, **encoder_sizes)
    prompts = read_prompts(spec.default_prompts(), spec.prompt_format, "refuse", spec.image_size(settings),
                           spec.max_images)
    prompts = PromptList(prompts.items[:NUM_PROMPTS], prompts.texts[:NUM_PROMPTS], prompts.skipped)
    index = run_preprocess(prompts, folder / "embeddings", spec.name,
                           spec.prompt_encoder(str(folder / "model"), "cpu", settings), shard_size=NUM_PROMPTS,
                           encoder_settings=vars(settings))
    flags = ["--model", spec.name, "--pretrained_model_name_or_path", str(folder / "model"), "--data_json_path",
             str(index), "--reward", f"{reward}=1.0", "--reward_model_dir", str(folder / "rewards"),
             *(["--reward_options", json.dumps({reward: options})] if options else []),
             *[item for name, value in sizes.items() for item in (f"--{name}", str(value))]]
    return SimpleNamespace(reward=reward, flags=flags)


def run_flags(common: list[str], algo, mode: str, iterations: int, output_dir: Path) -> list[str]:
    return [*common, "--algo", algo.name, *algo.tiny_flags, *(LORA_FLAGS if mode == "lora" else []),
            "--device", "cpu", "--mixed_precision", "fp32", "--sampling_steps", str(SAMPLING_STEPS),
            "--max_train_steps", str(iterations), "--checkpointing_steps", str(iterations), "--train_batch_size",
            "1", "--learning_rate", "1e-3", "--num_eval_prompts", "1", "--eval_samples_per_prompt", "1",
            "--validation_steps", "0", "--report_to", "none", "--no-use_ema", "--output_dir", str(output_dir),
            "--overwrite_output_dir"]


def run_backbone(spec, row: int, algos: list, args, folder: Path) -> list[dict]:
    """One record per (algorithm, mode) of the backbone: its torchrun job's, or the error that kept it from running."""
    from branchgrpo.bench.matrix_worker import one_line, run_plan

    modes = run_modes(args.modes, row, len(algos))
    cells = [(algo, mode) for algo, algo_modes in zip(algos, modes) for mode in algo_modes]
    try:
        prepared = prepare_backbone(spec, folder)
    except Exception as err:  # noqa: BLE001 - a backbone that cannot even be prepared is a failing row, with its line
        return [dict(algo=a.name, mode=m, error=f"preparation: {one_line(err)}") for a, m in cells]
    results = folder / "results"
    results.mkdir(exist_ok=True)
    for old in results.glob("rank*.jsonl"):
        old.unlink()
    runs = [dict(algo=a.name, mode=m, args=run_flags(prepared.flags, a, m, args.iterations,
                                                     folder / "runs" / f"{a.name}_{m}")) for a, m in cells]
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"runs": runs, "results": str(results)}, indent=1))
    if args.nproc == 1:  # in this process, as the launchers run one process without torchrun
        run_plan(json.loads(plan.read_text()))
        job_error = None
    else:
        job_error = _launch(plan, args.nproc, args.timeout_s, folder / "worker.log")
    records = _merge(results, args.nproc)
    out = []
    for a, m in cells:
        record = records.get((a.name, m)) or dict(algo=a.name, mode=m, error=job_error or "no result")
        out.append(dict(record, reward=prepared.reward))
    return out


def _launch(plan: Path, nproc: int, timeout_s: float, log_path: Path) -> str | None:
    """Run the backbone's torchrun job; None when it exited cleanly, else what happened (for cells it left)."""
    import socket

    with socket.socket() as sock:  # a free port: jobs of other users may hold the default one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "branchgrpo.bench.matrix_worker", str(plan)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"timeout: the backbone's job ran past --timeout_s {timeout_s:g} (log: {log_path})"
    if proc.returncode == 0:
        return None
    lines = [line for line in log_path.read_text().splitlines() if "Error" in line or "error:" in line]
    return f"the job exited with {proc.returncode}: {lines[-1].strip()[:300] if lines else 'see ' + str(log_path)}"


def _merge(results: Path, nproc: int) -> dict[tuple[str, str], dict]:
    """(algo, mode) -> record: rank 0's, unless a rank reported an error (the lowest rank's error wins)."""
    merged: dict[tuple[str, str], dict] = {}
    for rank in range(nproc):
        path = results / f"rank{rank}.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            record = json.loads(line)
            current = merged.get((record["algo"], record["mode"]))
            if current is None or ("error" in record and "error" not in current):
                merged[(record["algo"], record["mode"])] = record
    return merged


def verdict(record: dict) -> str | None:
    """None when the cell passes, else why not (one line)."""
    if "error" in record:
        return record["error"]
    checks = [(record.get("loss_finite"), "non-finite loss"), (record.get("rewards_finite"), "non-finite rewards"),
              (record["first_ratio_dev"] is None or record["first_ratio_dev"] <= RATIO_TOLERANCE,
               f"first ratio off 1 by {record['first_ratio_dev']}"),
              (record["reload_rel_diff"] <= RELOAD_TOLERANCE,
               f"the reloaded export predicts {record['reload_rel_diff']:.2e} (relative) off the trained model"),
              (record["training_rel_change"] > 10 * max(record["reload_rel_diff"], RELOAD_TOLERANCE),
               f"training did not move the prediction ({record['training_rel_change']:.2e} relative)")]
    failed = [why for ok, why in checks if not ok]
    return "; ".join(failed) or None


def matrix_markdown(result: dict) -> str:
    """The table (one row per backbone, one column per algorithm: pass/FAIL, median iteration seconds, F = full
    model / L = LoRA), then each failure's line and the skipped backbones."""
    from branchgrpo.bench.report import md_table

    algos, rows, failures, skipped = result["algorithms"], [], [], []
    for name, entry in result["backbones"].items():
        if "skipped" in entry:
            skipped.append(f"- {name}: {entry['skipped']}")
            continue
        cells = {algo: [] for algo in algos}
        for record in entry["cells"]:
            mode = "F" if record["mode"] == "full" else "L"
            why = verdict(record)
            time_s = record.get("median_iter_time_s")
            cells[record["algo"]].append(f"{'pass' if why is None else 'FAIL'} {mode}" +
                                         (f" {time_s:.2f} s" if time_s is not None else ""))
            if why is not None:
                failures.append(f"- {name} x {record['algo']} ({record['mode']}): {why}")
        times = [r["median_iter_time_s"] for r in entry["cells"] if r.get("median_iter_time_s") is not None]
        rows.append([name, entry["reward"], *[" / ".join(cells[a]) or "-" for a in algos],
                     f"{statistics.median(times):.2f} s" if times else "-"])
    machine = result["machine"]
    parallel = sorted({cell["parallel"] for entry in result["backbones"].values() for cell in entry.get("cells", ())
                       if "parallel" in cell})
    text = [f"Backbone matrix: {result['iterations']} iterations per run, {result['sampling_steps']} sampling steps, "
            f"{result['nproc']} processes per backbone (parallel: {', '.join(parallel) or '-'}), modes "
            f"{result['modes']}; commit {result['commit']}; "
            f"{machine['cpu_count']} CPUs, torch {machine['torch']}, load average (1, 5, 15 min) "
            f"{_loads(machine['load_average_start'])} at the start, {_loads(machine['load_average_end'])} at the end; "
            f"{result['wall_s']:.0f} s in all.", "",
            "Cells: pass/FAIL, F (full model) or L (LoRA), median seconds per training iteration (the row median: "
            "over the row's cells).", "",
            md_table(["backbone", "reward", *algos, "row median"], rows)]
    if failures:
        text += ["", "Failures:", *failures]
    if skipped:
        text += ["", "Skipped:", *skipped]
    return "\n".join(text) + "\n"


def _loads(values: list[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "n/a"


def _commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def run(args) -> dict:
    import torch

    from branchgrpo.algorithms import algorithms
    from branchgrpo.bench.measure import machine_info
    from branchgrpo.bench.report import write_result
    from branchgrpo.models import backbones
    from branchgrpo.models.support import FixtureSupport

    for name, low in (("iterations", 1), ("nproc", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name}: need >= {low}, got {getattr(args, name)}")
    specs, units = backbones(), algorithms()
    names = selected(args.backbones, list(specs), "--backbones")
    algos = [units[a] for a in selected(args.algos, list(units), "--algos")]
    out = writable_folder(args.output_dir, "--output_dir")
    machine = machine_info(torch.device("cpu"))
    result = dict(commit=_commit(), iterations=args.iterations, sampling_steps=SAMPLING_STEPS, nproc=args.nproc,
                  modes=args.modes, algorithms=[a.name for a in algos], backbones={},
                  machine=dict(machine, load_average_start=machine.pop("load_average_1_5_15", None)))
    start = time.time()
    for row, name in enumerate(names):
        spec = specs[name]
        if not isinstance(spec, FixtureSupport):
            result["backbones"][name] = {"skipped": "no tiny checkpoint (its spec implements no FixtureSupport)"}
            continue
        print(f"[matrix] {name}: {len(algos)} algorithms, {args.nproc} processes", flush=True)
        began = time.time()
        cells = run_backbone(spec, row, algos, args, out / name)
        result["backbones"][name] = dict(reward=cells[0].get("reward") if cells else None, cells=cells,
                                         wall_s=time.time() - began)
        for record in cells:
            why = verdict(record)
            print(f"[matrix] {name} x {record['algo']} ({record['mode']}): {'pass' if why is None else why}",
                  flush=True)
    result["wall_s"] = time.time() - start
    result["machine"]["load_average_end"] = machine_info(torch.device("cpu")).get("load_average_1_5_15")
    write_result(str(out / "matrix.json"), result, matrix_markdown(result))
    return result


def main(argv=None) -> int:
    return run_cli(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
