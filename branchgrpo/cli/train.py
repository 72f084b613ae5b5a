"""Training entry point (launch with torchrun for several processes; plain python for one).

    python -m branchgrpo.cli.train --config configs/toy_branchgrpo.yaml --output_dir outputs/toy
    torchrun --nproc_per_node 8 -m branchgrpo.cli.train --model flux --pretrained_model_name_or_path data/flux ...

Every flag is documented in `--help`; YAML files in configs/ set defaults that flags override. Bad input is one line
`error: ...` and exit code 2 (`--debug` or BRANCHGRPO_DEBUG=1: with its traceback). A run that a guard halts
(branchgrpo.runtime.guards; a stalled rank too) ends with such a line after its checkpoint, and exit code 3.
"""

from __future__ import annotations

import logging
import os
import sys

from branchgrpo.core import distributed
from branchgrpo.runtime.entry import add_debug_flag, run_cli


def main(argv=None) -> int:
    return run_cli(_train, argv)


def _train(argv: list[str]) -> int:
    from branchgrpo.config import config_from_flags, parse_flags

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    values, _ = parse_flags(argv, extra_args=add_debug_flag)
    cfg = config_from_flags(values)  # every check that needs no model, before anything is loaded
    from branchgrpo.runtime.trainer import Trainer

    clean = False
    try:
        Trainer(cfg).train()
        clean = True
    finally:
        distributed.shutdown(clean=clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
