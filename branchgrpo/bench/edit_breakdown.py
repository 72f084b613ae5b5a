"""Held-out reward of the edit toy by instruction (docs/editing.md section 9): which edits a training run learned.

    python -m branchgrpo.bench.edit_breakdown --out breakdown.md \
        BranchGRPO=outputs/compare_toy_edit/runs/branchgrpo/seed1,outputs/compare_toy_edit/runs/branchgrpo/seed2 \
        DanceGRPO=outputs/compare_toy_edit/runs/dancegrpo_tf1.0/seed1,outputs/compare_toy_edit/runs/dancegrpo_tf1.0/seed2

Every built-in held-out edit (40: 20 attribute edits, 20 class edits) is sampled `--samples` times by ODE from the
same noise for the shipped base and for each run (a training output folder - its last checkpoint's export - or an
export folder, as `branchgrpo.bench.edit_grid` reads them), and scored by "toy_edit". The table has one row per
instruction (the class edits "turn it into a <digit>" pooled) and one for all edits; a column per label holds the
mean over its runs (seeds), with the 95% t-interval over runs when there are several. The "all" row estimates what
the trainer's held-out evaluation logs (the same edits and sampler, other noise: the digits differ by sampling
noise); the other rows show where it comes from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from branchgrpo.bench.dynamic import mean_ci
from branchgrpo.bench.edit_grid import add_sampling_flags, edit_results, held_out_edits, labelled_runs
from branchgrpo.runtime.entry import run_cli

ALL = "all edits"


def instruction_kind(text: str) -> str:
    """The row an instruction is counted in: its canonical text, or "class edit" for "turn it into a <digit>"."""
    from branchgrpo.rewards.toy_edit import CLASS_EDIT
    from branchgrpo.toy.edit import parse_instruction, render_instruction

    instruction = parse_instruction(text)
    return CLASS_EDIT if instruction.is_class_edit else render_instruction(instruction)


def kind_means(scores: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    """{kind: mean score of its samples} and ALL: the mean over every sample."""
    means = {kind: scores[[k == kind for k in kinds]].mean().item() for kind in sorted(set(kinds))}
    return {**means, ALL: scores.mean().item()}


def breakdown(columns: dict[str, list[Path | None]], samples: int, steps: int, seed: int) -> dict:
    """{label: {kind: (mean over runs, 95% half-width or None)}} and the samples per kind."""
    from branchgrpo.rewards.toy_edit import ToyEditReward

    texts, cond = held_out_edits(None, samples)
    kinds = [instruction_kind(t) for t in texts]
    reward = ToyEditReward()
    noise = torch.randn(len(texts), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    table = {}
    for label, folders in columns.items():
        runs = [kind_means(reward(edit_results(f, cond, noise, steps), texts, cond), kinds) for f in folders]
        table[label] = {kind: mean_ci([run[kind] for run in runs]) for kind in runs[0]}
    counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    return {"table": table, "counts": {**counts, ALL: len(kinds)}}


def format_markdown(result: dict, runs_per_label: dict[str, int]) -> str:
    labels = list(result["table"])
    head = [f"{label} ({runs_per_label[label]} runs)" if runs_per_label[label] > 1 else label for label in labels]
    lines = ["| instruction (samples) | " + " | ".join(head) + " |", "|---" * (len(labels) + 1) + "|"]
    for kind, count in result["counts"].items():
        cells = []
        for label in labels:
            mean, half = result["table"][label][kind]
            cells.append(f"{mean:.3f}" if half is None else f"{mean:.3f} +- {half:.3f}")
        lines.append(f"| {kind} ({count}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    from branchgrpo.runtime.outputs import writable_file

    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.edit_breakdown", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=FOLDER[,FOLDER...]: training runs or toy_edit exports (seeds of "
                                           "one method), one column each")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out edit (the trainer's evaluation: 4)")
    add_sampling_flags(p)
    args = p.parse_args(argv)
    if args.samples < 1 or args.steps < 1:
        raise ValueError("--samples and --steps: need >= 1")
    columns: dict[str, list[Path | None]] = {"base": [None], **labelled_runs(args.runs)}
    out = writable_file(args.out, "--out") if args.out else None
    text = format_markdown(breakdown(columns, args.samples, args.steps, args.seed),
                           {label: len(folders) for label, folders in columns.items()})
    if out is not None:
        out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    sys.exit(main())
