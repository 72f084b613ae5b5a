"""Forward passes, nodes and edges of a configuration per prompt: what `python -m branchgrpo.plan` prints and the
comparison harness and GPU check count compute with."""

from __future__ import annotations


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
