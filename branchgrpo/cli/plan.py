"""Count what a configuration costs before renting GPUs: `python -m branchgrpo.plan --algo branchgrpo ...`.

Prints, per prompt: leaves, transformer forward passes in the rollout (total and per leaf), nodes, trainable edges
(SDE transitions) and the edges trained after pruning/selection (total and per leaf) - the papers' "NFE" columns,
counted honestly (forward passes, not nodes). `--iteration N` evaluates sliding windows at training iteration N.
With `--gpus N` and/or `--gpu_memory_gb G` it also predicts the memory per GPU of the training flags given (parameters,
gradients, optimizer, EMA, activations of a micro-batch, rollout latents, reward models, margin), whether it fits
and the largest --train_micro_batch_size that does (branchgrpo/cli/plan_memory.py, branchgrpo/memory.py).
Width pruning keeps a fixed number of edges per tree whatever the rewards, so the count uses a stand-in ranking.
"""

from __future__ import annotations

import json
import sys

from branchgrpo.cli import add_debug_flag, run_cli
from branchgrpo.cli.plan_memory import add_memory_flags, check_memory_flags, format_memory, plan_memory, wants_memory


def count(cfg, iteration: int = 0) -> dict:
    """The counts of a TrainConfig's algorithm at `iteration` (a fresh unit: no schedule state is touched)."""
    out = {"algo": cfg.run.algo, "iteration": iteration, "sampling_steps": cfg.sampling.sampling_steps}
    out.update(cfg.build_algorithm().counts(iteration))
    out["sequential_forward_passes_per_leaf"] = cfg.sampling.sampling_steps
    return out


def format_counts(c: dict) -> str:
    rows = [
        ("leaves (rewarded samples)", c["leaves"]),
        ("rollout forward passes", f"{c['forward_passes']}  ({c['forward_passes_per_leaf']:.4g} per leaf; "
                                   f"a sequential rollout needs {c['sequential_forward_passes_per_leaf']})"),
        ("nodes / edges", f"{c['nodes']} / {c['edges']}"),
        ("trainable edges (SDE)", f"{c['trainable_edges']}  ({c['trainable_edges_per_leaf']:.4g} per leaf)"),
        ("trained edges", f"{c['trained_edges']}  ({c['trained_edges_per_leaf']:.4g} per leaf)"),
        ("training forward passes", f"{c['train_forward_passes']}  ({c['train_forward_passes_per_leaf']:.4g} per leaf;"
                                    " siblings share one)"),
    ]
    rows += [(f"--{name}", text) for name, text in c.get("policies", {}).items()]  # dynamic branching's budgets
    width = max(len(k) for k, _ in rows)
    head = f"{c['algo']}, T = {c['sampling_steps']}, iteration {c['iteration']}, per prompt:"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    from branchgrpo.config import config_from_flags, parse_flags

    def extra(p):
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--iteration", type=int, default=0, help="training iteration for sliding windows")
        add_memory_flags(p)
        add_debug_flag(p)

    # the training flags and configs are accepted as they are; only the algorithm's are checked and used
    values, extras = parse_flags(argv, description=__doc__, extra_args=extra, prog="python -m branchgrpo.plan")
    cfg = config_from_flags(values, validate="algorithm")
    counts = count(cfg, extras.iteration)
    if not wants_memory(extras):
        print(json.dumps(counts) if extras.json else format_counts(counts))
        return
    check_memory_flags(extras)
    cfg.model.spec.check_flags(cfg.model)
    cfg.parallel.validate()
    planned = plan_memory(cfg, counts, extras)
    print(json.dumps({**counts, **planned}) if extras.json else format_counts(counts) + "\n" + format_memory(planned))


if __name__ == "__main__":
    sys.exit(main())
