"""Pretrain the toy from real digits and write the checkpoint it ships with (see branchgrpo.runtime.pretrain_toy),
or, with `--task edit`, the edit toy (branchgrpo.runtime.pretrain_toy_edit):

    python -m branchgrpo.cli.pretrain_toy --out branchgrpo/toy/assets --seed 0
    python -m branchgrpo.cli.pretrain_toy --task edit --out branchgrpo/toy/edit_assets --seed 0 --steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from safetensors.torch import save_file

from branchgrpo.runtime.entry import add_debug_flag, run_cli
from branchgrpo.runtime.outputs import writable_folder
from branchgrpo.models.toy import ToyAdapter
from branchgrpo.toy import data
from branchgrpo.runtime.pretrain_toy import attribute_labels, evaluate, fit_reward, speed, train_flow
from branchgrpo.rewards.toy import CLASSIFIER_WEIGHTS, REWARD_CONFIG, ToyReward


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m branchgrpo.cli.pretrain_toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("digits", "edit"), default="digits", help="digits: the text-to-digit toy; "
                   "edit: the edit toy (instruction + source digit -> edited digit; the --mention_prob, --ramp_* and "
                   "--classifier_c flags do not apply: it reuses the toy's classifier)")
    p.add_argument("--out", required=True, help="output folder (branchgrpo/toy/assets, or branchgrpo/toy/edit_assets "
                   "with --task edit, to refresh the shipped model)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random")
    p.add_argument("--steps", type=int, default=1500, help="flow-matching optimizer steps")
    p.add_argument("--batch_size", type=int, default=256, help="real digits per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (linear warm-up, cosine decay)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the shipped weights")
    p.add_argument("--train_shift", type=float, default=3.0, help="static shift of the training sigma distribution")
    p.add_argument("--mention_prob", type=float, default=0.7, help="chance a caption mentions each true attribute")
    p.add_argument("--ramp_start", type=float, default=50.0, help="class percentile where a style score leaves 0")
    p.add_argument("--ramp_end", type=float, default=95.0, help="class percentile where a high-pole score reaches 1 "
                                                               "(a low-pole score: 100 minus it)")
    p.add_argument("--classifier_c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--eval_samples", type=int, default=16, help="samples per held-out prompt (seeds) in evaluation")
    p.add_argument("--eval_steps", type=int, default=20, help="sampling steps in evaluation")
    p.add_argument("--eval_shift", type=float, default=3.0, help="static shift of the sampling schedule")
    p.add_argument("--eval_eta", type=float, default=0.3, help="eta of the dance SDE in evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log_every", type=int, default=250, help="log the loss every N steps")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        raise ValueError(f"--threads: need >= 0 (0 = torch's default), got {args.threads}")
    for name in ("steps", "batch_size", "warmup", "eval_samples", "eval_steps", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: need >= 1, got {getattr(args, name)}")
    out = writable_folder(args.out, "--out")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Bit-for-bit reruns: on CPU the backward of an index gather (index_put_ with accumulate) sums in a
    # thread-dependent order unless deterministic algorithms are requested.
    torch.use_deterministic_algorithms(True)
    if args.task == "edit":
        from branchgrpo.runtime.pretrain_toy_edit import pretrain_edit

        report = pretrain_edit(args, out)
        print(f"wrote {out} in {report['total_time_s']:.0f} s", flush=True)
        return
    start = time.time()
    images_N1HW, labels_N = data.load_real_digits()

    classifier, reward_config = fit_reward(images_N1HW, labels_N, args)
    save_file(classifier, str(out / CLASSIFIER_WEIGHTS), metadata={"format": "branchgrpo-toy-reward/1"})
    (out / REWARD_CONFIG).write_text(json.dumps(reward_config, indent=1) + "\n")
    print(f"classifier accuracy {reward_config['classifier']['accuracy']}", flush=True)
    for path, prompts in ((out / data.TRAIN_PROMPTS_FILE, data.train_prompts()),
                          (out / data.EVAL_PROMPTS_FILE, data.eval_prompts())):
        path.write_text("\n".join(prompts) + "\n")

    flow, text, train_metrics = train_flow(args, images_N1HW, labels_N, attribute_labels(images_N1HW, labels_N))
    adapter = ToyAdapter(flow, text)
    adapter.export(str(out))  # flow network + text encoder

    report = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "num_params": sum(p.numel() for p in flow.parameters()),
              "num_text_encoder_params": sum(p.numel() for p in text.parameters()),
              "classifier_accuracy": reward_config["classifier"]["accuracy"], **train_metrics}
    report["evaluation"] = evaluate(adapter, ToyReward("toy", out), args)
    report["speed_batch_256"] = speed(adapter)
    report["total_time_s"] = round(time.time() - start, 1)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} in {report['total_time_s']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
