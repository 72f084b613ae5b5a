"""Method comparison harness: every row of the paper's Table 1 (plus G2RPO) trained on the SAME model, prompts and
seeds for the same number of iterations, one method after another, then tabulated and plotted.

    python -m branchgrpo.bench.compare                                   # the toy, all methods, defaults below
    python -m branchgrpo.bench.compare --iterations 2 --methods branchgrpo,dancegrpo_tf1.0 --output_dir /tmp/c
    python -m branchgrpo.bench.compare --model flux --launcher torchrun --nproc 8 -- \
        --pretrained_model_name_or_path data/flux --data_json_path data/rl_embeddings/index.json
    (or `bash scripts/bench/compare_methods.sh`, which sets these from environment variables)

Arguments after `--` (and any this parser does not know) go to EVERY method's trainer after the harness's own
flags, so they win. Fairness: 16 leaves per prompt wherever the method has leaves to choose (G = 16 chains for
DanceGRPO and MixGRPO; the K = 2, 4-split tree for BranchGRPO), and the same learning rate, batch, seed and
evaluation for all. G2RPO's leaves are not free samples: it has G = 16 members at each of its branch steps
{0, 3, 6, 9} (BranchGRPO's split points), each finished by ODE at strides {1, 2, 3}: 16 x 4 x 3 + 1 = 193 leaves,
12 groups of 16. Sliding schedules (MixGRPO's window, DepPru's and Mix's windows) move every iterations // 10
iterations, so that they slide within a short run as they do within the paper's 300 iterations.

Each method writes a normal training run to `<output_dir>/runs/<method>/`; a finished run with identical flags is
reused, so an interrupted comparison resumes. Results: table.json / table.md / table.csv, methods.json (every
method's full flags) and reward_vs_time.png (eval and rollout reward against training wall-clock time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("branchgrpo.compare")

# name -> (Table 1 label, flags). "{interval}" is replaced by the sliding-schedule interval of the run.
METHODS: dict[str, tuple[str, list[str]]] = {
    "dancegrpo_tf1.0": ("DanceGRPO (tf=1.0)", ["--algo", "dancegrpo", "--num_generations", "16",
                                               "--timestep_fraction", "1.0", "--sde_kernel", "dance", "--eta", "0.3"]),
    "dancegrpo_tf0.6": ("DanceGRPO (tf=0.6)", ["--algo", "dancegrpo", "--num_generations", "16",
                                               "--timestep_fraction", "0.6", "--sde_kernel", "dance", "--eta", "0.3"]),
    "mixgrpo": ("MixGRPO (20,5)", ["--algo", "mixgrpo", "--num_generations", "16", "--sde_kernel", "flow", "--eta",
                                   "0.7", "--mix_sde_window_size", "5", "--mix_window_interval", "{interval}",
                                   "--mix_window_stride", "1"]),
    "branchgrpo": ("BranchGRPO", ["--algo", "branchgrpo", "--tree_split_points", "0,3,6,9", "--branch_factor", "2",
                                  "--sde_kernel", "dance", "--eta", "0.3"]),
    "branchgrpo_widpru": ("BranchGRPO-WidPru", ["--algo", "branchgrpo", "--tree_split_points", "0,3,6,9",
                                                "--branch_factor", "2", "--sde_kernel", "dance", "--eta", "0.3",
                                                "--width_pruning_mode", "1"]),
    "branchgrpo_deppru": ("BranchGRPO-DepPru", ["--algo", "branchgrpo", "--tree_split_points", "0,3,6,9",
                                                "--branch_factor", "2", "--sde_kernel", "dance", "--eta", "0.3",
                                                "--depth_pruning", "15,16,17,18", "--depth_pruning_slide",
                                                "--depth_pruning_slide_interval", "{interval}",
                                                "--depth_pruning_stop_depth", "9"]),
    "branchgrpo_mix": ("BranchGRPO-Mix", ["--algo", "branchgrpo", "--tree_split_points", "0,3,6,9",
                                          "--branch_factor", "2", "--sde_kernel", "dance", "--eta", "0.3",
                                          "--mix_ode_sde_tree", "--mix_sde_window_size", "4",
                                          "--mix_window_interval", "{interval}"]),
    "g2rpo": ("G2RPO", ["--algo", "g2rpo", "--num_generations", "16", "--sde_kernel", "flow", "--eta", "0.7",
                        "--g2rpo_steps", "0,3,6,9", "--g2rpo_granularities", "1,2,3"]),
}
BASELINE = "dancegrpo_tf1.0"

# Shared by every method. toy: the settings of configs/toy_*.yaml; flux: those of scripts/lib/flux.sh.
COMMON = {
    "toy": ["--model", "toy", "--sampling_steps", "20", "--shift", "3", "--reward", "toy", "--train_batch_size", "8",
            "--learning_rate", "3e-4", "--max_grad_norm", "1.0", "--clip_range", "1e-3", "--adv_clip_max", "5",
            "--rollout_batch_size", "512", "--train_micro_batch_size", "256", "--gradient_accumulation_steps", "0",
            "--reward_batch_size", "512", "--num_eval_prompts", "20", "--eval_samples_per_prompt", "4",
            "--device", "cpu", "--seed", "42"],
    "flux": ["--model", "flux", "--sampling_steps", "20", "--shift", "3", "--reward", "hps=1.0", "--h", "720",
             "--w", "720", "--train_batch_size", "2", "--learning_rate", "1e-5", "--max_grad_norm", "0.01",
             "--clip_range", "1e-3", "--adv_clip_max", "5", "--rollout_batch_size", "8", "--train_micro_batch_size",
             "4", "--gradient_accumulation_steps", "3", "--reward_batch_size", "4", "--gradient_checkpointing",
             "--mixed_precision", "bf16", "--parallel", "fsdp", "--num_eval_prompts", "16",
             "--eval_samples_per_prompt", "4", "--seed", "42"],
}


def method_flags(name: str, iterations: int) -> list[str]:
    """The method's own flags, its sliding-schedule interval filled in (iterations // 10, at least 1)."""
    interval = str(max(1, iterations // 10))
    return [interval if f == "{interval}" else f for f in METHODS[name][1]]


def method_args(name: str, iterations: int, eval_every: int, output_dir: Path, common: list[str],
                extra: list[str]) -> list[str]:
    """The full trainer argument list of one method (the harness's flags first, the user's extra flags last)."""
    return [*common, *method_flags(name, iterations), "--max_train_steps", str(iterations),
            "--validation_steps", str(eval_every),
            "--checkpointing_steps", "0", "--checkpoints_total_limit", "1", "--report_to", "none",
            "--output_dir", str(output_dir / "runs" / name), *extra]


def toy_embeddings(output_dir: Path) -> tuple[Path, Path]:
    """The toy's train and held-out prompt embeddings, through the real preprocess step (once per output dir)."""
    from branchgrpo.data.preprocess import run_preprocess
    from branchgrpo.models.toy import build_prompt_encoder
    from branchgrpo.toy.data import eval_prompts_path, train_prompts_path

    encode = build_prompt_encoder(None, "cpu")
    root = output_dir / "embeddings"
    return (run_preprocess(train_prompts_path(), root / "train", "toy", encode, shard_size=256),
            run_preprocess(eval_prompts_path(), root / "eval", "toy", encode, shard_size=256))


def _finished(run_dir: Path, args: list[str]) -> bool:
    stamp = run_dir / "harness_args.json"
    return (run_dir / "summary.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == args


def run_method(name: str, args: list[str], launcher: str, nproc: int, num_threads: int) -> None:
    """Train one method (in this process, or under torchrun), unless a finished run with these flags exists."""
    run_dir = Path(args[args.index("--output_dir") + 1])
    if _finished(run_dir, args):
        print(f"[compare] {name}: reusing the finished run in {run_dir}", flush=True)
        return
    if run_dir.exists():  # a different or interrupted run: start clean (metrics.jsonl would mix runs)
        import shutil

        shutil.rmtree(run_dir)
    print(f"[compare] {name}: training -> {run_dir}", flush=True)
    if launcher == "inprocess":
        import torch

        from branchgrpo.train_config import parse_train_config
        from branchgrpo.trainer import Trainer

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        Trainer(parse_train_config(args)).train()
    else:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, num_threads)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               os.environ.get("MASTER_PORT", "29517"), "-m", "branchgrpo.cli.train", *args]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: training failed (exit {proc.returncode}); see its output above")
    (run_dir / "harness_args.json").write_text(json.dumps(args))


def _load() -> list[float] | None:
    """The 1/5/15-minute load averages: the CPUs may be shared, and timings should say so."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(COMMON), default="toy")
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)} (or 'all')")
    p.add_argument("--iterations", type=int, default=100, help="training iterations per method (the default toy "
                   "run took 12.5 minutes for all methods on 2 CPU cores)")
    p.add_argument("--eval_every", type=int, default=0, help="held-out evaluation every N iterations "
                   "(0: iterations // 5, at least 1)")
    p.add_argument("--output_dir", default="outputs/compare")
    p.add_argument("--launcher", choices=("inprocess", "torchrun"), default="inprocess",
                   help="inprocess: every method in this process, one after another; torchrun: one torchrun job "
                        "per method (multi-GPU), one after another")
    p.add_argument("--nproc", type=int, default=1, help="--launcher torchrun: processes per method")
    p.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (1 is fastest for the toy and "
                   "steadiest on a shared machine; 0: torch's default)")
    p.add_argument("--collect_only", action="store_true", help="only rebuild the table and plot from finished runs")
    return p


def main(argv=None) -> dict:
    from branchgrpo.bench.compare_report import collect, write_outputs

    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args, unknown = build_parser().parse_known_args(own)
    extra = unknown + extra
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise SystemExit(f"error: --methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if args.iterations < 1:
        raise SystemExit(f"error: --iterations: need >= 1, got {args.iterations}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    eval_every = args.eval_every or max(1, args.iterations // 5)
    common = list(COMMON[args.model])
    if args.model == "toy" and "--data_json_path" not in extra:
        train_json, eval_json = toy_embeddings(output_dir)
        common += ["--data_json_path", str(train_json), "--eval_data_json_path", str(eval_json)]
    runs = {name: method_args(name, args.iterations, eval_every, output_dir, common, extra) for name in names}
    start, load_start = time.time(), _load()
    for name, method in runs.items():
        if not args.collect_only:
            run_method(name, method, args.launcher, args.nproc, args.num_threads)
    flags = {name: method_flags(name, args.iterations) for name in names}
    rows = collect(output_dir, runs, METHODS, flags, BASELINE)
    write_outputs(output_dir, rows, runs, METHODS, {"model": args.model, "iterations": args.iterations,
                                                   "eval_every": eval_every, "common_flags": common,
                                                   "extra_flags": extra, "harness_wall_time_s": time.time() - start,
                                                   "launcher": args.launcher, "num_threads": args.num_threads,
                                                   "cpu_count": os.cpu_count(), "load_average_start": load_start,
                                                   "load_average_end": _load()})
    print((output_dir / "table.md").read_text())
    return {"rows": rows}


if __name__ == "__main__":
    main()
