"""Method comparison harness, the library part: every row of the paper's Table 1 (plus G2RPO) as trainer flags, and
how each row is run (in this process or one torchrun job per method). The command line is branchgrpo.cli.compare;
see its docstring for what is compared and how."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from branchgrpo.core.files import read_json

log = logging.getLogger("branchgrpo.compare")


def methods() -> dict[str, tuple[str, list[str]]]:
    """Every registered algorithm's comparison rows (its `presets`): id -> (Table 1 label, trainer flags);
    "{interval}" stands for the sliding-schedule interval of the run."""
    from branchgrpo.algorithms import algorithms

    return {row: preset for unit in algorithms().values() for row, preset in unit.presets.items()}


BASELINE = "dancegrpo_tf1.0"  # the row the iteration-time ratios are relative to (the paper's)

def common_flags(model: str) -> list[str]:
    """The trainer flags every method shares: the backbone's own (its spec's `comparison_flags`, models/support.py
    `BenchSupport`)."""
    from branchgrpo.models import get_backbone
    from branchgrpo.models.support import BenchSupport, require_support

    spec = require_support(get_backbone(model), BenchSupport, "the comparison harness")
    if not spec.comparison_flags:
        raise ValueError(f"--model {model}: the comparison harness has no settings for this backbone (its spec's "
                         "comparison_flags are empty)")
    return ["--model", model, *spec.comparison_flags]


def comparable_backbones() -> list[str]:
    """The backbones the harness can compare methods on (their specs give the shared flags)."""
    from branchgrpo.models import backbones
    from branchgrpo.models.support import BenchSupport

    return [name for name, spec in backbones().items() if isinstance(spec, BenchSupport) and spec.comparison_flags]


def method_flags(name: str, iterations: int) -> list[str]:
    """The method's own flags, its sliding-schedule interval filled in (iterations // 10, at least 1)."""
    interval = str(max(1, iterations // 10))
    return [interval if f == "{interval}" else f for f in methods()[name][1]]


def run_id(name: str, seed: int | None) -> str:
    """A run's key and folder under runs/: the method's name, or `<method>/seed<seed>` when seeds are given."""
    return name if seed is None else f"{name}/seed{seed}"


def method_of(run: str) -> str:
    return run.split("/", 1)[0]


def method_args(name: str, iterations: int, eval_every: int, output_dir: Path, common: list[str],
                extra: list[str], seed: int | None = None) -> list[str]:
    """The full trainer argument list of one method (the harness's flags first, the user's extra flags last);
    `seed`: the run's --seed (None: the common flags' own)."""
    seeded = [] if seed is None else ["--seed", str(seed)]
    return [*common, *method_flags(name, iterations), *seeded, "--max_train_steps", str(iterations),
            "--validation_steps", str(eval_every),
            "--checkpointing_steps", "0", "--checkpoints_total_limit", "1", "--report_to", "none",
            "--output_dir", str(output_dir / "runs" / run_id(name, seed)), *extra]


def builtin_embeddings(model: str, output_dir: Path) -> tuple[Path, Path] | None:
    """Train and held-out prompt embeddings of a backbone that ships its prompts (the toys), through the real
    preprocess step (once per output dir); None for backbones whose prompts the user provides."""
    from branchgrpo.data.preprocess import run_preprocess
    from branchgrpo.models import get_backbone

    spec = get_backbone(model)
    prompts = spec.builtin_prompts()
    if prompts is None:
        return None
    encode = spec.prompt_encoder(None, "cpu", None)
    root = output_dir / "embeddings"
    return tuple(run_preprocess(path, root / part, model, encode, shard_size=256, prompt_format=spec.prompt_format)
                 for path, part in zip(prompts, ("train", "eval")))


STAMP = "harness_args.json"  # written into a run folder before its training starts: the folder is the harness's


def _finished(run_dir: Path, args: list[str]) -> bool:
    stamp = run_dir / STAMP
    return (run_dir / "summary.json").is_file() and stamp.is_file() and read_json(stamp) == args


def run_method(name: str, args: list[str], launcher: str, nproc: int, num_threads: int) -> None:
    """Train one method (in this process, or under torchrun), unless a finished run with these flags exists. A run
    folder of the harness (it holds the stamp) with other flags, or interrupted, is deleted and trained again; a
    non-empty folder without the stamp is not the harness's and is refused, never deleted."""
    run_dir = Path(args[args.index("--output_dir") + 1])
    if _finished(run_dir, args):
        print(f"[compare] {name}: reusing the finished run in {run_dir}", flush=True)
        return
    if (run_dir / STAMP).is_file():  # the harness's, with other flags or interrupted: start clean
        import shutil

        shutil.rmtree(run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise SystemExit(f"error: {name}: {run_dir} holds files the comparison harness did not write (no {STAMP}); "
                         "move them away or choose another --output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STAMP).write_text(json.dumps(args))
    print(f"[compare] {name}: training -> {run_dir}", flush=True)
    if launcher == "inprocess":
        import torch

        from branchgrpo.config import parse_train_config
        from branchgrpo.runtime.trainer import Trainer

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

