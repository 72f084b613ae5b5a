"""One backbone's row of the backbone matrix (branchgrpo.bench.matrix), run by every process of its torchrun job:
a Trainer per algorithm in this one process (imports paid once), each trained for a few iterations and checked.

    torchrun --nproc_per_node 2 -m branchgrpo.bench.matrix_worker PLAN.json

PLAN.json (written by branchgrpo.bench.matrix) lists the runs: {"runs": [{"algo", "mode", "args"}], "results": DIR}.
Each rank appends one JSON line per run to DIR/rank<r>.jsonl as soon as the run ends (a later crash keeps the
earlier lines): rank 0 the measurements and checks, every rank its error if the run failed there.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from branchgrpo.core import distributed

def run_plan(plan: dict) -> None:
    info = distributed.init_distributed("cpu")
    results = Path(plan["results"]) / f"rank{info.rank}.jsonl"
    broken = None
    for run in plan["runs"]:
        if broken is not None:  # a rank-local failure left the ranks in different collectives: nothing else runs
            _append(results, dict(algo=run["algo"], mode=run["mode"], error=broken))
            continue
        record = dict(algo=run["algo"], mode=run["mode"], **_run_one(run["args"], info.is_main))
        if info.is_main or "error" in record:
            _append(results, record)
        gc.collect()
        try:
            distributed.barrier()  # the next run starts together, or not at all
        except RuntimeError as err:
            broken = f"not run: the process group broke after {run['algo']} ({one_line(err)})"
    distributed.shutdown(clean=broken is None)


def _run_one(args: list[str], is_main: bool) -> dict:
    """Train one configuration and check it; {"error": one line} when anything raised."""
    from branchgrpo.config import parse_train_config
    from branchgrpo.runtime.trainer import Trainer
    from branchgrpo.runtime.update import EdgeObjective

    start = time.time()
    try:
        trainer = Trainer(parse_train_config(args))
        trainer.train()
        record = dict(parallel=trainer.prepared.mode, **export_check(trainer))
        if is_main:  # the clipped surrogate over rollout edges trains on ratios; a unit's own objective may not
            record.update(iteration_checks(trainer.metrics.entries,
                                           isinstance(trainer.updater.objective, EdgeObjective)))
    except Exception as err:  # noqa: BLE001 - any failure is a row of the table, with its line
        return {"error": one_line(err), "run_s": time.time() - start}
    record["run_s"] = time.time() - start
    return record


def iteration_checks(entries: list[dict], has_ratios: bool) -> dict:
    """What the metrics of the iterations must show: a finite loss and finite rewards in each, and, where the
    algorithm trains on ratios, the first ratio of each iteration at 1 (it re-scores the weights that rolled out;
    without ratios, as DiffusionNFT, `first_ratio_dev` is None)."""
    from branchgrpo.runtime.update import ratio_deviation

    def finite(key):
        return all(e[key] is not None and math.isfinite(e[key]) for e in entries)

    ratios = [ratio_deviation(e["first_ratio_min"], e["first_ratio_max"]) for e in entries
              if has_ratios and e.get("first_ratio_min") is not None and math.isfinite(e["first_ratio_min"])]
    times = [e["iter_time_s"] for e in entries]
    return dict(iterations=len(entries), loss_finite=finite("loss"),
                rewards_finite=finite("reward_mean") and all(e["nonfinite_rewards"] == 0 for e in entries),
                first_ratio_dev=max(ratios) if ratios else None, iter_time_s=times,
                median_iter_time_s=statistics.median(times) if times else None,
                reward_mean=[e["reward_mean"] for e in entries], loss=[e["loss"] for e in entries])


@torch.no_grad()
def export_check(trainer) -> dict:
    """The last checkpoint's user-facing export, loaded as the evaluation CLI loads it, against the trained model
    and the base, on one fixed batch: the reload must predict as the trained model does, and training must have
    moved the prediction. Every rank runs it (the trained model's forward is collective under FSDP2)."""
    from branchgrpo.data.embeddings import with_extras
    from branchgrpo.eval.checkpoints import load_eval_model
    from branchgrpo.models.base import velocity_fn
    from branchgrpo.runtime.parallel import using_module

    cfg, adapter, device = trainer.cfg, trainer.adapter, trainer.device
    embeddings = with_extras(trainer.store.batch([0]), trainer.store.extras, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *adapter.latent_shape), generator=gen).to(device)
    sigma, prompt = torch.tensor([0.8, 0.4], device=device), torch.zeros(2, dtype=torch.long, device=device)
    with using_module(adapter, trainer.prepared.bare):
        trained = velocity_fn(adapter, embeddings, trainer.prepared.autocast)(x, sigma, prompt)
    checkpoint = trainer.checkpoints.resolve("latest")
    reloaded, base = (load_eval_model(trainer.spec, cfg.model, weights, False, device).adapter
                      for weights in (str(checkpoint), None))
    scale = max(float(trained.abs().max()), 1e-12)

    def relative_difference(other) -> float:  # max |v_other - v_trained| / max |v_trained|
        return float((velocity_fn(other, embeddings)(x, sigma, prompt) - trained).abs().max()) / scale

    return dict(export=checkpoint.name, reload_rel_diff=relative_difference(reloaded),
                training_rel_change=relative_difference(base))


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_plan(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
