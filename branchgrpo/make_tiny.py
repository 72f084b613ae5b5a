"""Write tiny random checkpoints in the real folder layouts, for tests and cluster smoke tests.

    python -m branchgrpo.make_tiny flux DIR     tiny FLUX.1-style pipeline (diffusers layout)
    python -m branchgrpo.make_tiny hps DIR      tiny HPS-style open_clip checkpoint + its model config
    python -m branchgrpo.make_tiny wan DIR      tiny Wan2.1-style pipeline (diffusers layout)

Everything is built from configs in code with fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib

# kind -> "module:function(out_dir, seed)"; imported lazily so that one kind's dependencies never block another.
KINDS = {
    "flux": "branchgrpo.models.flux_tiny:make_tiny_flux",
    "hps": "branchgrpo.rewards.clip_tiny:make_tiny_hps",
    "clip": "branchgrpo.rewards.clip_tiny:make_tiny_clip",
    "pickscore": "branchgrpo.rewards.clip_tiny:make_tiny_pickscore",
    "imagereward": "branchgrpo.rewards.imagereward_tiny:make_tiny_imagereward",
    "wan": "branchgrpo.models.wan_tiny:make_tiny_wan",
    "videoalign": "branchgrpo.rewards.videoalign_tiny:make_tiny_videoalign",
}


def make_tiny(kind: str, out_dir: str, seed: int = 0) -> None:
    if kind not in KINDS:
        raise ValueError(f"make_tiny: unknown kind '{kind}'; expected one of {', '.join(KINDS)}")
    module, _, func = KINDS[kind].partition(":")
    getattr(importlib.import_module(module), func)(out_dir, seed=seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m branchgrpo.make_tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_tiny(args.kind, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.kind} checkpoint to {args.out_dir}")


if __name__ == "__main__":
    main()
