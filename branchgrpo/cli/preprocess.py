"""Encode a prompt file into sharded embeddings (run under torchrun; each rank takes its share of the shards).

    torchrun --nproc_per_node 8 -m branchgrpo.cli.preprocess --model flux \\
        --model_path data/flux --prompts assets/prompts.txt --output_dir data/rl_embeddings
    torchrun --nproc_per_node 8 -m branchgrpo.cli.preprocess --model wan_i2v --model_path data/wan_i2v \\
        --prompts assets/i2v_prompts.jsonl --h 480 --w 832 --num_frames 33 --output_dir data/wan_i2v_embeddings

The backbone's encoders (its spec's `prompt_encoder`) are loaded from `--model_path` (local folder, nothing
downloaded); the prompt file is in the format the spec declares (one prompt per line, or JSONL lines with a
conditioning image). A killed run resumes: shards already written are skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from branchgrpo.core import distributed
from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.runtime.outputs import writable_folder
from branchgrpo.data.preprocess import BAD_LINES, read_prompts, run_preprocess
from branchgrpo.config.train import add_backbone_flags, given_backbone_flags
from branchgrpo.models import backbones, get_backbone

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    specs = backbones()
    p = argparse.ArgumentParser(prog="python -m branchgrpo.cli.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=list(specs), help="which backbone's encoders")
    p.add_argument("--model_path", default=None, help="local checkpoint folder (diffusers layout); toy: optional")
    jsonl = ", ".join(b for b, spec in specs.items() if spec.prompt_format == "jsonl") or "none"
    p.add_argument("--prompts", required=True, help="text file, one prompt per line; for " + jsonl + " JSONL, one "
                   '{"prompt": ..., "image": "path/to/first_frame.png"} per line (paths relative to the file)')
    p.add_argument("--bad_lines", choices=BAD_LINES, default="refuse",
                   help="JSONL: a line without a usable image (missing, unreadable, wrong aspect ratio) stops the run "
                   "listing the bad lines (refuse) or is left out with a warning naming its line (skip)")
    read = {b: list(spec.encoder_sizes(spec.Config())) for b, spec in specs.items()}  # the flags each encoder reads
    sizes = p.add_argument_group("the size the stored conditioning is built for (read by the prompt encoders of " +
                                 (", ".join(b for b, names in read.items() if names) or "none") +
                                 "): use the training run's")
    add_backbone_flags(sizes, {name for names in read.values() for name in names})
    p.add_argument("--output_dir", required=True, help="where shards and index.json go")
    takers = {name: ", ".join(b for b, spec in specs.items() if name in spec.encoder_flags) or "none"
              for name in ("max_sequence_length", "negative_prompt")}
    p.add_argument("--max_sequence_length", type=int, default=512,
                   help=f"text-encoder tokens per prompt ({takers['max_sequence_length']})")
    p.add_argument("--negative_prompt", default=None, help=f"negative prompt for classifier-free guidance "
                   f"({takers['negative_prompt']}; default: the backbone's own)")
    p.add_argument("--shard_size", type=int, default=1024, help="prompts per shard file")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per encoder forward")
    p.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda (each rank its local rank's GPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="encoder dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_cli(_preprocess, argv)


def _preprocess(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("shard_size", "batch_size", "max_sequence_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: need >= 1, got {getattr(args, name)}")
    writable_folder(args.output_dir, "--output_dir")  # before the encoders load
    info = distributed.init_distributed(args.device)
    try:
        spec = get_backbone(args.model)
        for name in ("negative_prompt", *given_backbone_flags(args)):
            if getattr(args, name, None) is not None and name not in spec.encoder_flags:
                log.warning("--%s has no effect with --model %s (its prompt encoder does not read it)", name,
                            spec.name)
        sizes = spec.encoder_sizes(args)  # resolved: what the stored conditioning is built for
        for name, value in sizes.items():
            setattr(args, name, value)
        # read (and, for JSONL, every image decoded and checked) before the encoders load: bad lines fail in seconds
        prompts = read_prompts(args.prompts, spec.prompt_format, args.bad_lines, spec.image_size(args),
                               spec.max_images)
        encode = spec.prompt_encoder(args.model_path, info.device, args)
        run_preprocess(
            prompts,
            args.output_dir,
            model=args.model,
            encode=encode,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            barrier=distributed.barrier,
            encoder_settings={"max_sequence_length": args.max_sequence_length, "dtype": args.dtype,
                              "negative_prompt": args.negative_prompt, **sizes},
        )
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
