"""Evaluate a model on a prompt file: generate with fixed seeds, score with every available reward, write tables.

    python -m branchgrpo.cli.eval --model toy --output_dir outputs/eval/toy_base
    python -m branchgrpo.cli.eval --model toy --checkpoint outputs/toy_branchgrpo/checkpoints/checkpoint-150 \\
        --output_dir outputs/eval/toy_branchgrpo
    python -m branchgrpo.cli.eval --model flux --pretrained_model_name_or_path data/flux --prompts assets/prompts.txt \\
        --checkpoint outputs/flux_branchgrpo_base/checkpoints/checkpoint-300 --use_ema --rewards all \\
        --reward_model_dir hps_ckpt --output_dir outputs/eval/flux_branchgrpo
    python -m branchgrpo.cli.eval --model wan --pretrained_model_name_or_path data/wan --num_frames 33 \\
        --reward_model_dir hps_ckpt --output_dir outputs/eval/wan_base
    python -m branchgrpo.cli.eval --model flux --pretrained_model_name_or_path data/flux --suite geneval \\
        --suite_path geneval/prompts/evaluation_metadata.jsonl --reward_model_dir hps_ckpt \\
        --output_dir outputs/eval/geneval

Writes to --output_dir: results.md (table), results.csv, results.json (mean, std and two 95% CIs per reward,
per-prompt means, per-sample scores), scores.csv and grid.png (videos: first, middle and last frame of each sample);
with --suite (geneval | ocr | drawbench | hpsv2, eval/suites.py) also suite.md / suite.json (per-task means with 95%
CIs, the mean over tasks) and one grid_<task>.png per task; with --save_images DIR one PNG per sample (a video's
middle frame; the input of `python -m branchgrpo.cli.diversity`) and, for videos, one MP4 per sample. See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from branchgrpo.config.train import add_backbone_flags, given_backbone_flags
from branchgrpo.core.distributed import resolve_device
from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.runtime.outputs import writable_folder
from branchgrpo.models import backbones, get_backbone
from branchgrpo.eval.generate import resolve_reward_names
from branchgrpo.eval.suites import READERS as SUITES
from branchgrpo.rewards.base import check_reward_flags, parse_reward_options

log = logging.getLogger("branchgrpo.eval")

ENCODER_FLAGS = ("max_sequence_length", "negative_prompt")  # read by some backbones' prompt encoders


def _per_backbone(specs: dict, describe) -> str:
    """'flux: X; wan: Y' over the backbones for which `describe(spec)` says something."""
    return "; ".join(f"{name}: {text}" for name, spec in specs.items() if (text := describe(spec)))


def build_parser() -> argparse.ArgumentParser:
    specs = backbones()

    def takers(name):
        return ", ".join(b for b, spec in specs.items() if name in spec.encoder_flags)

    p = argparse.ArgumentParser(prog="python -m branchgrpo.cli.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(specs), default="toy", help="backbone (a registered spec)")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="base model folder (required for " +
                   ", ".join(b for b, spec in specs.items() if spec.needs_pretrained) +
                   "; the others default to the checkpoint shipped in the package)")
    g.add_argument("--checkpoint", default=None, help="a checkpoint-N/ folder of a training run (its model/), a run's "
                   "output dir (its latest checkpoint) or a weights folder; omitted: the base model")
    g.add_argument("--use_ema", action="store_true", help="take the checkpoint's ema/ weights instead of model/")
    g.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="transformer weights and autocast (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    g = p.add_argument_group("prompts and sampling")
    g.add_argument("--prompts", default=None, help="prompt file in the backbone's format: one prompt per line, or "
                   "JSONL {\"prompt\": ..., \"image\": ...} lines for " +
                   (", ".join(b for b, spec in specs.items() if spec.prompt_format == "jsonl") or "none") +
                   f" (default: {_per_backbone(specs, lambda spec: spec.default_prompts().name)})")
    g.add_argument("--num_prompts", type=int, default=0, help="use the first N prompts (0: all; with --suite: the "
                   "first N of each task)")
    g.add_argument("--suite", choices=tuple(SUITES), default=None, help="a benchmark suite instead of --prompts: its "
                   "prompts from --suite_path, per-task results in suite.md (docs/evaluation.md)")
    g.add_argument("--suite_path", default=None, help="--suite's prompt file: GenEval's evaluation_metadata.jsonl, the "
                   "OCR prompts (text, quoted targets), DrawBench's CSV, or the folder of HPSv2's four style JSONs")
    g.add_argument("--samples_per_prompt", type=int, default=4, help="seeds per prompt")
    g.add_argument("--seed", type=int, default=1234, help="noise seed (the trainer's --eval_seed default)")
    g.add_argument("--steps", type=int, default=20, help="denoising steps")
    g.add_argument("--shift", type=float, default=3.0, help="static time shift of the schedule")
    g.add_argument("--time_shift", choices=("static", "dynamic"), default="static",
                   help="static (--shift) or the backbone's resolution-dependent shift (" +
                   ", ".join(b for b, spec in specs.items() if spec.dynamic_shift) + ")")
    add_backbone_flags(g)  # each backbone's own flags (sizes, guidance, ...), as training takes them
    g.add_argument("--sampler", choices=("ode", "sde"), default="ode",
                   help="ode: deterministic Euler (default); sde: the stochastic training kernel")
    g.add_argument("--sde_kernel", choices=("dance", "flow"), default="dance", help="--sampler sde: kernel")
    g.add_argument("--eta", type=float, default=0.3, help="--sampler sde: noise level")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help=f"{takers('max_sequence_length')}: text-encoder tokens per prompt (default 512)")
    g.add_argument("--negative_prompt", default=None,
                   help=f"{takers('negative_prompt')}: the classifier-free-guidance negative prompt (default: the "
                   "backbone's own; use the one the run was trained with)")
    g.add_argument("--batch_size", type=int, default=16, help="latents per transformer call")
    g.add_argument("--chunk_prompts", type=int, default=8, help="prompts generated and scored together")
    g = p.add_argument_group("rewards")
    g.add_argument("--rewards", default="default", help="comma list (hps,pickscore,clip,imagereward,toy,...), "
                   f"'default' or 'all' ({_per_backbone(specs, lambda spec: ','.join(spec.eval_rewards))}; with "
                   "--suite, 'default' is the suite's: geneval, ocr, the backbone's for drawbench, hps for hpsv2)")
    g.add_argument("--reward_model_dir", default="hps_ckpt", help="folder of reward checkpoints (hps_ckpt/README.md)")
    g.add_argument("--reward_options", default="", help='JSON {reward: {option: value}} overriding the defaults')
    g.add_argument("--reward_batch_size", type=int, default=16, help="samples decoded and scored per call")
    g = p.add_argument_group("video metrics (VBench-style, from local files; docs/evaluation.md)")
    g.add_argument("--video_metrics", choices=("auto", "none"), default="auto",
                   help="auto: every metric the files allow, for video backbones (pixel ones need none); none: skip")
    g.add_argument("--dino_model", default=None, help="subject_consistency: a transformers DINO ViT folder "
                   "(default: REWARD_MODEL_DIR/dino-vitb16 if present)")
    g.add_argument("--video_clip", default=None, help="background_consistency, aesthetic_quality: a transformers CLIP "
                   "folder or open_clip file (default: REWARD_MODEL_DIR/clip-vit-large-patch14 if present)")
    g.add_argument("--video_clip_arch", default="ViT-B-32", help="open_clip architecture of a --video_clip file")
    g.add_argument("--raft_weights", default=None, help="dynamic_degree: torchvision RAFT weights, e.g. "
                   "raft_large_C_T_SKHT_V2-ff5fadd5.pth (default: under REWARD_MODEL_DIR if present; without it the "
                   "pixel-space fallback dynamic_degree_pixels)")
    g.add_argument("--aesthetic_head", default=None, help="aesthetic_quality: LAION's sa_0_4_vit_l_14_linear.pth "
                   "(default: under REWARD_MODEL_DIR if present; needs a ViT-L/14 --video_clip)")
    g.add_argument("--musiq_weights", default=None, help="imaging_quality: MUSIQ-SPAQ weights for pyiqa "
                   "(musiq_spaq_ckpt-358bb6af.pth; default: under REWARD_MODEL_DIR if present)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default="outputs/eval", help="where results.* and grid.png go")
    g.add_argument("--save_images", default=None, help="also write one PNG per sample (videos: the middle frame, and "
                   "an MP4) to this folder")
    g.add_argument("--grid_prompts", type=int, default=8, help="prompts shown in grid.png (seeds in columns)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI (0: none)")
    add_debug_flag(p)
    return p


def model_config(args):
    """The model section as training has it (sizes not given: the backbone's defaults); a flag of another backbone
    is refused."""
    from branchgrpo.config.sections import ModelConfig

    return ModelConfig.for_backbone(args.model, args.pretrained_model_name_or_path, **given_backbone_flags(args))


def _suite(args, spec):
    """The --suite's prompts and tasks (read and checked here, before anything is loaded), or None."""
    from branchgrpo.eval.suites import load_suite

    if args.suite is None:
        if args.suite_path is not None:
            raise ValueError("--suite_path: only with --suite (geneval | ocr | drawbench | hpsv2)")
        return None
    if args.prompts is not None:
        raise ValueError("--prompts: not with --suite (the suite's prompts come from --suite_path)")
    if spec.prompt_format != "text":
        raise ValueError(f"--suite: the {spec.name} backbone reads {spec.prompt_format} prompt files; the suites are "
                         "text prompts for text-to-image/video backbones")
    return load_suite(args.suite, args.suite_path, args.num_prompts)


def _reward_text(args, suite) -> str:
    """--rewards, where 'default' under a suite means the suite's own rewards."""
    return suite.rewards if suite is not None and args.rewards.strip() == "default" else args.rewards


def _reward_options(args, suite) -> dict:
    """--reward_options over the suite's own (e.g. GenEval's metadata file): the user's option wins."""
    given = parse_reward_options(args.reward_options)
    ours = suite.reward_options if suite is not None else {}
    return {name: {**ours.get(name, {}), **given.get(name, {})} for name in {**ours, **given}}


def _check(args, spec, model_cfg, suite) -> None:
    """Flag checks that need nothing loaded: fail in a second, not after loading a 12B model."""
    for name in ("samples_per_prompt", "steps", "batch_size", "chunk_prompts", "reward_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: need >= 1, got {getattr(args, name)}")
    for name, zero in (("num_prompts", "all"), ("num_threads", "torch's default"), ("bootstrap", "no interval"),
                       ("grid_prompts", "no grid")):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name}: need >= 0 (0 = {zero}), got {getattr(args, name)}")
    for name in ENCODER_FLAGS:
        if getattr(args, name) is not None and name not in spec.encoder_flags:
            raise ValueError(f"--{name}: does not apply to --model {spec.name} (its prompt encoder does not read it)")
    if not (args.shift > 0 and math.isfinite(args.shift)):
        raise ValueError(f"--shift: need a positive number, got {args.shift}")
    if args.sampler == "sde" and not (args.eta > 0 and math.isfinite(args.eta)):
        raise ValueError(f"--eta: need a positive number with --sampler sde, got {args.eta}")
    if args.time_shift == "dynamic" and not spec.dynamic_shift:
        raise ValueError(f"--time_shift dynamic: the {spec.name} backbone has no resolution-dependent shift")
    model_cfg.validate()
    check_reward_flags(resolve_reward_names(_reward_text(args, suite), spec), _reward_options(args, suite), "--rewards")
    writable_folder(args.output_dir, "--output_dir")  # written after generating: a bad folder must not cost that
    if args.save_images is not None:
        writable_folder(args.save_images, "--save_images")


def _prompts(args, spec, model_cfg, suite):
    """The prompt file as the backbone's encoder reads it (`PromptList`: items and texts), cut to --num_prompts (a
    suite's prompts as they are: cut per task). A JSONL file's images are all checked here, before anything is loaded
    (a bad line is an error)."""
    from branchgrpo.data.preprocess import PromptList, read_prompts

    if suite is not None:
        return PromptList(list(suite.texts), list(suite.texts), {})
    prompts = read_prompts(args.prompts or spec.default_prompts(), spec.prompt_format,
                           image_size=spec.image_size(model_cfg.backbone), max_images=spec.max_images)
    keep = slice(args.num_prompts or None)
    return PromptList(prompts.items[keep], prompts.texts[keep], prompts.skipped)


def _rewards(args, spec, device, suite):
    """Every requested reward whose files are found; the others are skipped with a one-line reason each (only a
    missing file skips a reward: a checkpoint that exists but cannot be read is an error). Under the GenEval suite the
    geneval reward also gives its strict and partial scores (`GenEvalColumns`)."""
    from branchgrpo.eval.suites import GenEvalColumns
    from branchgrpo.rewards.base import build_reward_set

    names = resolve_reward_names(_reward_text(args, suite), spec)
    rewards = build_reward_set(",".join(names), "sum", device, _reward_options(args, suite),
                               model_dir=args.reward_model_dir, skip_missing=True, reward_flag="--rewards")
    if suite is not None and suite.name == "geneval" and "geneval" in rewards.models:
        rewards.models["geneval"] = GenEvalColumns(rewards.models["geneval"])
    for name, reason in rewards.skipped.items():
        print(f"skipping reward '{name}': checkpoint not available ({reason})", flush=True)
    if not rewards.models:
        print("warning: no reward is available; generating media only", file=sys.stderr)
    return rewards


def _video_metrics(args, spec, device):
    """The VBench-style metrics the given (or default) local files allow, for video backbones; the others are
    skipped with a one-line reason each."""
    if spec.media != "video" or args.video_metrics == "none":
        return None
    from branchgrpo.eval.video_metrics import VideoMetricFiles, VideoMetrics

    files = VideoMetricFiles(args.dino_model, args.video_clip, args.video_clip_arch, args.raft_weights,
                             args.aesthetic_head, args.musiq_weights).resolve(args.reward_model_dir)
    metrics = VideoMetrics(files, device, fps=None)
    for name, reason in metrics.skipped.items():
        print(f"skipping video metric '{name}': {reason}", flush=True)
    return metrics


def run(args) -> dict:
    from branchgrpo.core import sde
    from branchgrpo.eval.checkpoints import load_eval_model
    from branchgrpo.eval.generate import SampleSettings, encode_prompts, generate_and_score
    from branchgrpo.eval.report import summarize, write_results
    from branchgrpo.eval.suites import first_per_task, ocr_exact, task_report, write_suite

    spec = get_backbone(args.model)
    model_cfg = model_config(args)
    device = resolve_device(args.device)
    suite = _suite(args, spec)
    _check(args, spec, model_cfg, suite)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    prompts = _prompts(args, spec, model_cfg, suite)
    texts = prompts.texts
    rewards = _rewards(args, spec, device, suite)  # first: a bad option fails before the backbone is loaded
    # e.g. the OCR reward's quoted targets
    rewards.check_prompts(texts, str((suite and suite.path) or args.prompts or spec.default_prompts()))
    video_metrics = _video_metrics(args, spec, device)
    bf16 = args.dtype == "bf16" or (args.dtype is None and device.type == "cuda")
    loaded = load_eval_model(spec, model_cfg, args.checkpoint, args.use_ema, device,
                             dtype=torch.bfloat16 if bf16 else torch.float32)
    adapter = loaded.adapter
    encoder_settings = SimpleNamespace(dtype="auto", **{name: getattr(args, name) for name in ENCODER_FLAGS
                                                        if getattr(args, name) is not None},
                                       **spec.encoder_sizes(model_cfg.backbone))
    embeddings = encode_prompts(spec, loaded.prompt_source, prompts.items, device, encoder_settings)
    dynamic = args.time_shift == "dynamic"
    settings = SampleSettings(steps=args.steps, shift=args.shift, mu=adapter.mu() if dynamic else None,
                              shift_terminal=adapter.shift_terminal if dynamic else None, sampler=args.sampler,
                              kernel=sde.Kernel(args.sde_kernel, args.eta), seed=args.seed,
                              samples_per_prompt=args.samples_per_prompt, batch_size=args.batch_size,
                              chunk_prompts=args.chunk_prompts, reward_batch_size=args.reward_batch_size)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None
    if video_metrics is not None:
        video_metrics.fps = adapter.video_fps  # dynamic degree takes frames about 8 per second apart
    shown = first_per_task(suite.tasks, args.grid_prompts) if suite else range(min(args.grid_prompts, len(texts)))
    start = time.time()
    out = generate_and_score(adapter, spec.media, embeddings, texts, rewards, settings, device, autocast,
                             args.save_images, shown,
                             progress=lambda done, total: log.info("%d / %d prompts", done, total),
                             media_metrics=_extra_columns(video_metrics, rewards))
    elapsed = time.time() - start
    if suite is not None and suite.name == "ocr":
        out.scores.update(ocr_exact(out.scores))
    output_dir = Path(args.output_dir)
    metrics = {n: summarize(v, out.prompt_index, args.bootstrap, seed=args.seed) for n, v in out.scores.items()}
    header = {
        "model": args.model, "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "checkpoint": args.checkpoint, "use_ema": args.use_ema, "weights": loaded.description,
        "prompts_file": str((suite and suite.path) or args.prompts or "(default)"), "num_prompts": len(texts),
        **({"suite": suite.name} if suite else {}),
        "samples_per_prompt": args.samples_per_prompt, "num_samples": len(texts) * args.samples_per_prompt,
        "seed": args.seed, "steps": args.steps, "sampler": args.sampler, "shift": args.shift,
        "time_shift": args.time_shift, "guidance_scale": getattr(adapter, "guidance_scale", None),
        "h": getattr(adapter, "height", None), "w": getattr(adapter, "width", None),
        **({"num_frames": adapter.num_frames} if hasattr(adapter, "num_frames") else {}),
        "rewards": list(rewards.models), "forward_passes": out.num_forward_passes,
        "generate_and_score_time_s": elapsed, "device": str(device),
    }
    if video_metrics is not None:
        header.update(video_metrics=video_metrics.backends, skipped_video_metrics=video_metrics.skipped)
    sample_ids = [int(p) * args.samples_per_prompt + int(s) for p, s in zip(out.prompt_index, out.seed_index)]
    result = write_results(output_dir, header, metrics, rewards.skipped, texts, out.scores, out.prompt_index,
                           out.seed_index, sample_ids, out.image_files, out.video_files)
    condition = embeddings.get(spec.grid_condition) if spec.grid_condition else None  # e.g. an edit's source
    grids = _write_grids(output_dir, out.grid_media, list(shown), texts, args.samples_per_prompt, suite, condition)
    if suite is not None:
        write_suite(output_dir, suite, task_report(suite, out.scores, out.prompt_index, args.bootstrap, args.seed))
        print((output_dir / "suite.md").read_text())
    print((output_dir / "results.md").read_text())
    print(f"wrote {output_dir}/results.{{md,csv,json}}, scores.csv, {', '.join(grids)}"
          + (", suite.{md,json}" if suite else "")
          + (f"; {len(out.image_files)} PNGs in {args.save_images}" if args.save_images else "")
          + (f"; {len(out.video_files)} videos in {args.save_images}" if out.video_files else ""))
    return result


def _extra_columns(video_metrics, rewards):
    """The per-chunk columns beside the rewards: video metrics, and the GenEval suite's strict and partial scores."""
    hooks = [hook for hook in (getattr(rewards.models.get("geneval"), "extra_columns", None),) if hook is not None]
    if video_metrics is not None:
        hooks.append(lambda media, prompts: video_metrics(media))
    if not hooks:
        return None
    return lambda media, prompts: {name: v for hook in hooks for name, v in hook(media, prompts).items()}


def _write_grids(output_dir: Path, tiles, shown: list[int], texts: list[str], samples: int, suite,
                 condition=None) -> list[str]:
    """grid.png (the shown prompts, seeds in columns; videos: first, middle and last frame; with a `condition` per
    prompt, e.g. an edit's source, that image first in each row), or one grid per task."""
    from branchgrpo.eval.generate import with_condition_tiles
    from branchgrpo.eval.suites import write_task_grids
    from branchgrpo.runtime.outputs import save_grid

    if not tiles.numel():
        return []
    columns = samples * (tiles.shape[0] // (len(shown) * samples))  # videos: 3 tiles per sample
    if condition is not None:
        tiles = with_condition_tiles(tiles, condition[torch.tensor(shown, device=condition.device)], columns)
        columns += 1
    if suite is not None:
        return write_task_grids(output_dir, suite, shown, tiles, columns)
    save_grid(tiles, output_dir / "grid.png", columns=columns, labels=[texts[p] for p in shown],
              scale=max(1, 64 // tiles.shape[-1]))
    return ["grid.png"]


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
