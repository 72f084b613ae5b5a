"""Method comparison harness: every row of the paper's Table 1 (plus G2RPO) trained on the SAME model, prompts and
seeds for the same number of iterations, one method after another, then tabulated and plotted.

    python -m branchgrpo.cli.compare                                   # the toy, all methods, defaults below
    python -m branchgrpo.cli.compare --iterations 2 --methods branchgrpo,dancegrpo_tf1.0 --output_dir /tmp/c
    python -m branchgrpo.cli.compare --model flux --launcher torchrun --nproc 8 -- \
        --pretrained_model_name_or_path data/flux --data_json_path data/rl_embeddings/index.json
    (or `bash scripts/bench/compare_methods.sh`, which sets these from environment variables)

Arguments after `--` (and any this parser does not know) go to EVERY method's trainer after the harness's own
flags, so they win. Fairness: 16 leaves per prompt wherever the method has leaves to choose (G = 16 chains for
DanceGRPO and MixGRPO; the K = 2, 4-split tree for BranchGRPO), and the same learning rate, batch, seed and
evaluation for all. G2RPO's leaves are not free samples: it has G = 16 members at each of its branch steps
{0, 3, 6, 9} (BranchGRPO's split points), each finished by ODE at strides {1, 2, 3}: 16 x 4 x 3 + 1 = 193 leaves,
12 groups of 16. Sliding schedules (MixGRPO's window, DepPru's and Mix's windows) move every iterations // 10
iterations, so that they slide within a short run as they do within the paper's 300 iterations.

Each method writes a normal training run to `<output_dir>/runs/<method>/` (with `--seeds 1,2,3`: one per seed,
`runs/<method>/seed<s>/`); a finished run with identical flags is reused, so an interrupted comparison resumes.
Results: table.json / table.md / table.csv, methods.json (every run's full flags) and reward_vs_time.png (eval and
rollout reward against training wall-clock time); with several seeds also seeds.json, a table of means with 95%
intervals over the seeds (final eval reward, forward-pass equivalents - rollout forwards + 3 x training forwards +
forwards without a backward -, compute and time to reach DanceGRPO tf1.0's final reward, diversity and KID against
the base model's samples) and reward_vs_compute.png (eval reward against compute and against time).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from branchgrpo.bench.compare import (
    BASELINE,
    builtin_embeddings,
    common_flags,
    comparable_backbones,
    method_args,
    method_flags,
    methods,
    run_id,
    run_method,
)
from branchgrpo.core.flags import parse_int_list
from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.runtime.outputs import writable_folder


def _load() -> list[float] | None:
    """The 1/5/15-minute load averages: the CPUs may be shared, and timings should say so."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m branchgrpo.cli.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    models = comparable_backbones()
    p.add_argument("--model", choices=models, default=models[0], help="backbone (one whose spec gives the settings "
                   "every method shares)")
    p.add_argument("--methods", default="all", help="comma list of rows (the registered algorithms' presets: "
                   f"{', '.join(methods())}) or 'all'")
    p.add_argument("--iterations", type=int, default=100, help="training iterations per method (the default toy "
                   "run took 12.5 minutes for all methods on 2 CPU cores)")
    p.add_argument("--seeds", default="", help="comma list of seeds: every method trains once per seed (runs/"
                   "<method>/seed<s>/), and the table adds means with 95%% intervals over them, the compute and time "
                   "to reach the baseline's final reward, and eval reward against compute (default: one run with the "
                   "backbone's comparison seed)")
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
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_cli(run, argv)


def run(argv=None) -> dict:
    """Train (or reuse) every method and tabulate them; input errors raise."""
    from branchgrpo.bench.compare_report import collect, write_outputs

    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args, unknown = build_parser().parse_known_args(own)
    extra = unknown + extra
    rows_by_name = methods()
    names = list(rows_by_name) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in rows_by_name]
    if bad or not names:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(rows_by_name)}")
    for name, low in (("iterations", 1), ("nproc", 1), ("eval_every", 0), ("num_threads", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name}: need >= {low}, got {getattr(args, name)}")
    output_dir = writable_folder(args.output_dir, "--output_dir")
    eval_every = args.eval_every or max(1, args.iterations // 5)
    common = common_flags(args.model)
    embeddings = None if "--data_json_path" in extra else builtin_embeddings(args.model, output_dir)
    if embeddings is not None:
        common += ["--data_json_path", str(embeddings[0]), "--eval_data_json_path", str(embeddings[1])]
    seeds = parse_int_list(args.seeds, "--seeds") if args.seeds.strip() else [None]
    runs = {run_id(name, seed): method_args(name, args.iterations, eval_every, output_dir, common, extra, seed)
            for name in names for seed in seeds}
    start, load_start = time.time(), _load()
    for run, method in runs.items():
        if not args.collect_only:
            run_method(run, method, args.launcher, args.nproc, args.num_threads)
    flags = {name: method_flags(name, args.iterations) for name in names}
    rows = collect(output_dir, runs, rows_by_name, flags, BASELINE)
    write_outputs(output_dir, rows, runs, rows_by_name, {"model": args.model, "iterations": args.iterations,
                                                   "eval_every": eval_every, "common_flags": common,
                                                   "baseline": BASELINE, "seeds": seeds,
                                                   "extra_flags": extra, "harness_wall_time_s": time.time() - start,
                                                   "launcher": args.launcher, "num_threads": args.num_threads,
                                                   "cpu_count": os.cpu_count(), "load_average_start": load_start,
                                                   "load_average_end": _load()})
    print((output_dir / "table.md").read_text())
    return {"rows": rows}


if __name__ == "__main__":
    sys.exit(main())
