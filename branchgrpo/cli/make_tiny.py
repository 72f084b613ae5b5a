"""Write tiny random checkpoints in the real folder layouts, for tests and cluster smoke tests.

    python -m branchgrpo.make_tiny flux DIR     tiny FLUX.1-style pipeline (diffusers layout)
    python -m branchgrpo.make_tiny wan DIR      tiny Wan2.1-style pipeline (diffusers layout)
    python -m branchgrpo.make_tiny wan_i2v DIR  tiny Wan2.1-I2V-style pipeline (+ CLIP image encoder and processor)
    python -m branchgrpo.make_tiny hps DIR      tiny HPS-style open_clip checkpoint + its model config

Backbones are the registered specs that have a tiny checkpoint (`FixtureSupport.tiny`, models/support.py); rewards are
listed in `branchgrpo.testing.TINY_REWARDS`. Everything is built from configs in code with fixed seeds; nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import sys

from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.runtime.outputs import writable_folder
from branchgrpo.models import backbones
from branchgrpo.models.support import FixtureSupport, require_support
from branchgrpo.testing import TINY_REWARDS, call_writer


def kinds() -> list[str]:
    """Backbones with a tiny checkpoint, then rewards."""
    return [name for name, spec in backbones().items() if isinstance(spec, FixtureSupport)] + list(TINY_REWARDS)


def make_tiny(kind: str, out_dir: str, seed: int = 0) -> None:
    specs = backbones()
    if kind in specs:
        call_writer(require_support(specs[kind], FixtureSupport, "make_tiny", f"make_tiny {kind}").tiny, out_dir, seed)
    elif kind in TINY_REWARDS:
        call_writer(TINY_REWARDS[kind], out_dir, seed)
    else:
        raise ValueError(f"make_tiny: unknown kind '{kind}'; expected one of {', '.join(kinds())}")


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m branchgrpo.make_tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=kinds())
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    writable_folder(args.out_dir, "out_dir")
    make_tiny(args.kind, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.kind} checkpoint to {args.out_dir}")



if __name__ == "__main__":
    sys.exit(main())
