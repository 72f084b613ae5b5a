"""Overlap benchmark (issue 24 item 5): sequential scoring against scoring that overlaps the rollout
(--overlap_scoring), on CPU, with the toy's reward served by a reward server whose answers take about as long as
the rollout.

    python -m branchgrpo.bench.overlap --iterations 6 --repeats 3 --chunks 2,4,8 --output outputs/bench/overlap.json

The run is the main job's configuration (configs/toy_branchgrpo.yaml: 8 prompts x 16 leaves, reward batches of 16 ->
8 requests per iteration) with `--reward remote`. The server (`python -m branchgrpo.serve_reward --reward toy`) is
started with `--delay_s` = (the sequential rollout time, measured first) / (requests per iteration): a stand-in
for a reward model on another machine that takes as long as the rollout, using no CPU here. Then, repeated and
interleaved (sequential, then --overlap_chunks K for each K of --chunks, the order rotated every repeat), short
training runs in this process; per run the median over its iterations
after the first of: rollout time, reward time (after the rollout: with the overlap, the wait for the last chunks'
scores), their sum (the phase the overlap shortens) and the whole iteration (with the update). The ratio the issue
targets: overlapped rollout + reward against max(sequential rollout, sequential reward), target <= 1.15 (sequential:
about 2). Load averages are recorded before and after every run: the machine is shared. Writes --output (JSON) and
the markdown table next to it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from branchgrpo.bench.compare import builtin_embeddings
from branchgrpo.core.flags import parse_int_list
from branchgrpo.runtime.entry import add_debug_flag, run_cli

REPO = Path(__file__).resolve().parents[2]
PHASES = ("rollout_time_s", "reward_time_s", "iter_time_s")


def start_server(delay_s: float):
    """A reward server process serving the toy reward, each answer held back `delay_s`; (process, url)."""
    command = [sys.executable, "-m", "branchgrpo.serve_reward", "--reward", "toy", "--device", "cpu", "--port", "0",
               "--delay_s", f"{delay_s:.4f}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"the reward server did not start (got {line!r})")
    return process, line.split()[-1]


def run_training(embeddings, out: Path, url: str, chunks: int, iterations: int) -> dict:
    """One short toy training run scored by the server at `url`, sequentially (`chunks` 0) or overlapped in `chunks`
    chunks; medians of its iterations after the first."""
    from branchgrpo.config import parse_train_config
    from branchgrpo.runtime.trainer import Trainer

    options = json.dumps({"remote": {"url": url, "reward": "toy"}})
    args = ["--config", str(REPO / "configs" / "toy_branchgrpo.yaml"), "--device", "cpu",
            "--data_json_path", str(embeddings[0]), "--eval_data_json_path", str(embeddings[1]),
            "--output_dir", str(out), "--reward", "remote", "--reward_options", options,
            "--overlap_scoring", "on" if chunks else "off", "--overlap_chunks", str(max(chunks, 1)),
            "--max_train_steps", str(iterations), "--validation_steps", "0", "--checkpointing_steps", "0",
            "--num_eval_prompts", "2", "--eval_samples_per_prompt", "1", "--save_rollout_samples", "0",
            "--report_to", "none"]
    load_before = os.getloadavg()[0]
    Trainer(parse_train_config(args)).train()
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    medians = {key: statistics.median(e[key] for e in entries) for key in PHASES}
    medians["phase_s"] = statistics.median(e["rollout_time_s"] + e["reward_time_s"] for e in entries)
    return dict(medians, chunks=chunks, load_before=load_before, load_after=os.getloadavg()[0])


def summarize(runs: list[dict], delay_s: float, requests: int) -> dict:
    modes = sorted({r["chunks"] for r in runs})
    table = {k: {key: statistics.median(r[key] for r in runs if r["chunks"] == k) for key in (*PHASES, "phase_s")}
             for k in modes}
    bound = max(table[0]["rollout_time_s"], table[0]["reward_time_s"])
    for row in table.values():
        row["phase_over_max"] = row["phase_s"] / bound
    loads = [r[key] for r in runs for key in ("load_before", "load_after")]
    return {"delay_s": delay_s, "requests_per_iteration": requests, "max_rollout_reward_s": bound, "table": table,
            "load_average_1min": {"min": min(loads), "max": max(loads)}, "runs": runs}


def markdown(result: dict) -> str:
    lines = ["| scoring | rollout (s) | reward wait (s) | rollout + reward (s) | / max(rollout, reward) | iteration (s) |",
             "|---|---|---|---|---|---|"]
    for chunks, r in result["table"].items():
        label = f"overlapped, {chunks} chunks" if int(chunks) else "sequential"
        lines.append(f"| {label} | {r['rollout_time_s']:.3f} | {r['reward_time_s']:.3f} | {r['phase_s']:.3f} | "
                     f"{r['phase_over_max']:.3f} | {r['iter_time_s']:.3f} |")
    load = result["load_average_1min"]
    lines.append(f"\nServer delay {result['delay_s']:.3f} s x {result['requests_per_iteration']} requests per "
                 f"iteration; max(sequential rollout, reward) = {result['max_rollout_reward_s']:.3f} s; "
                 f"{len(result['runs'])} runs; 1-minute load average {load['min']:.1f}-{load['max']:.1f}.")
    return "\n".join(lines)


def _main(argv) -> None:
    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.overlap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=6, help="training iterations per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved")
    p.add_argument("--chunks", default="2,4,8", help="--overlap_chunks of the overlapped runs, comma-separated")
    p.add_argument("--output", default="outputs/bench/overlap.json", help="JSON result (and .md beside it)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    chunks = parse_int_list(args.chunks, "--chunks")
    if args.iterations < 2 or args.repeats < 1 or not chunks or min(chunks) < 1:
        raise ValueError("--iterations: need >= 2; --repeats: need >= 1; --chunks: need counts >= 1")
    modes = [0, *chunks]
    requests = 8 * 16 // 16  # prompts x leaves / reward batch size of configs/toy_branchgrpo.yaml
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        embeddings = builtin_embeddings("toy", root)
        server, url = start_server(0.0)
        try:  # calibration: the sequential rollout time, with an instant server
            rollout = run_training(embeddings, root / "calibrate", url, 0, args.iterations)["rollout_time_s"]
        finally:
            server.kill()
        delay_s = rollout / requests
        server, url = start_server(delay_s)
        runs = []
        try:
            for repeat in range(args.repeats):
                for k in modes[repeat % len(modes):] + modes[:repeat % len(modes)]:
                    runs.append(run_training(embeddings, root / f"chunks{k}_{repeat}", url, k, args.iterations))
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            server.kill()
    result = summarize(runs, delay_s, requests)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    output.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
