"""Count what a configuration costs before renting GPUs: `python -m branchgrpo.plan --algo branchgrpo ...`.

Prints, per prompt: leaves, transformer forward passes in the rollout (total and per leaf), nodes, trainable edges
(SDE transitions) and the edges trained after pruning/selection (total and per leaf) - the papers' "NFE" columns,
counted honestly (forward passes, not nodes). `--iteration N` evaluates sliding windows at training iteration N.
With `--gpus N` and/or `--gpu_memory_gb G` it also predicts the memory per GPU of the training flags given (parameters,
gradients, optimizer, EMA, activations of a micro-batch, rollout latents, reward models, margin), whether it fits
and the largest --train_micro_batch_size that does (branchgrpo/planner/gpu_memory.py, branchgrpo/planner/memory.py).
Width pruning keeps a fixed number of edges per tree whatever the rewards, so the count uses a stand-in ranking.
"""

from __future__ import annotations

import json
import sys

from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.planner.counts import count, format_counts
from branchgrpo.planner.gpu_memory import check_memory_flags, format_memory, plan_memory


def add_memory_flags(parser) -> None:
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (processes) of the run: prints the memory plan")
    parser.add_argument("--gpu_memory_gb", type=float, default=None,
                        help="memory per GPU in GiB (default 80; giving it prints the memory plan)")
    parser.add_argument("--transformer_config", default=None,
                        help="a shipped transformer config (e.g. flux1-dev, wan2.1-t2v-14b) or a config.json path "
                             "(default: the checkpoint's, else the backbone's first shipped one)")
    parser.add_argument("--reward_memory_gb", type=float, default=None,
                        help="reward models resident per GPU, GiB (default: 4 for flux/wan - HPS-v2.1's ViT-H-14 in "
                             "fp32 - and 0 for the toy)")


def wants_memory(extras) -> bool:
    return extras.gpus is not None or extras.gpu_memory_gb is not None


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
    if extras.iteration < 0:
        raise ValueError(f"--iteration: need a training iteration >= 0, got {extras.iteration}")
    cfg = config_from_flags(values, validate="algorithm")
    counts = count(cfg, extras.iteration)
    if not wants_memory(extras):
        print(json.dumps(counts) if extras.json else format_counts(counts))
        return
    check_memory_flags(extras)
    cfg.model.backbone.validate()
    cfg.parallel.validate()
    planned = plan_memory(cfg, counts, extras)
    print(json.dumps({**counts, **planned}) if extras.json else format_counts(counts) + "\n" + format_memory(planned))



if __name__ == "__main__":
    sys.exit(main())
