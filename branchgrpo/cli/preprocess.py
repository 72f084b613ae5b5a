"""Encode a prompt file into sharded embeddings (run under torchrun; each rank takes its share of the shards).

    torchrun --nproc_per_node 8 -m branchgrpo.cli.preprocess --model flux \\
        --model_path data/flux --prompts assets/prompts.txt --output_dir data/rl_embeddings

The backbone's text encoders (its spec's `prompt_encoder`) are loaded from `--model_path` (local folder, nothing
downloaded). A killed run resumes: shards already written are skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from branchgrpo import distributed
from branchgrpo.cli import add_debug_flag, run_cli
from branchgrpo.data.preprocess import run_preprocess
from branchgrpo.models import backbones, get_backbone

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m branchgrpo.cli.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=list(backbones()), help="which backbone's text encoders")
    p.add_argument("--model_path", default=None, help="local checkpoint folder (diffusers layout); toy: optional")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--output_dir", required=True, help="where shards and index.json go")
    p.add_argument("--max_sequence_length", type=int, default=512, help="T5/UMT5 tokens per prompt (FLUX, Wan)")
    p.add_argument("--negative_prompt", default=None, help="Wan: negative prompt for CFG (default: Wan's own)")
    p.add_argument("--shard_size", type=int, default=1024, help="prompts per shard file")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per encoder forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="encoder dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_cli(_preprocess, argv)


def _preprocess(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    info = distributed.init_distributed(args.device)
    try:
        spec = get_backbone(args.model)
        if args.negative_prompt is not None and "negative_prompt" not in spec.encoder_flags:
            log.warning("--negative_prompt has no effect with --model %s (its prompt encoder does not read it)",
                        spec.name)
        encode = spec.prompt_encoder(args.model_path, info.device, args)
        run_preprocess(
            args.prompts,
            args.output_dir,
            model=args.model,
            encode=encode,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            barrier=distributed.barrier,
            encoder_settings={"max_sequence_length": args.max_sequence_length, "dtype": args.dtype,
                              "negative_prompt": args.negative_prompt},
        )
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
