"""Training entry point (launch with torchrun for several processes; plain python for one).

    python -m branchgrpo.cli.train --config configs/toy_branchgrpo.yaml --output_dir outputs/toy
    torchrun --nproc_per_node 8 -m branchgrpo.cli.train --model flux --pretrained_model_name_or_path data/flux ...

Every flag is documented in `--help`; YAML files in configs/ set defaults that flags override.
"""

from __future__ import annotations

import logging
import os
import sys

from branchgrpo import distributed


def main(argv=None) -> int:
    from branchgrpo.config import parse_train_config

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_train_config(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from branchgrpo.trainer import Trainer

    clean = False
    try:
        Trainer(cfg).train()
        clean = True
    except (ValueError, FileNotFoundError) as err:  # bad input found while loading: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(clean=clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
