"""Before/after grid of the edit toy (docs/editing.md): held-out edits as columns, rows source | base | one row per
trained run, every model sampled by ODE from the same noise, each row labelled with its mean "toy_edit" reward.

    python -m branchgrpo.bench.edit_grid --out docs/images/toy_edit_grid.png --num_edits 10 \
        BranchGRPO=outputs/compare_toy_edit/runs/branchgrpo/seed1 DanceGRPO=outputs/compare_toy_edit/runs/dancegrpo_tf1.0/seed1

A run is a training output folder (its last checkpoint's full export is loaded) or a checkpoint's export folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from branchgrpo.runtime.entry import add_debug_flag, run_cli


def exported_model(run: Path) -> Path:
    """The full toy export of a training run's last checkpoint (or `run` itself when it is one)."""
    if (run / "transformer.safetensors").is_file():
        return run
    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        raise ValueError(f"{run}: neither a toy export (transformer.safetensors) nor a training run with "
                         "checkpoints/latest")
    return run / "checkpoints" / latest.read_text().strip() / "model"


def held_out_edits(num_edits: int | None = None, samples: int = 1) -> tuple[list[str], dict]:
    """The first `num_edits` built-in held-out edits (all: None), each repeated `samples` times: their instructions
    and their encoded conditioning (source pixels included)."""
    from branchgrpo.data.preprocess import read_prompts
    from branchgrpo.models.toy_edit import build_edit_encoder
    from branchgrpo.toy.edit import eval_edits_path

    records = read_prompts(eval_edits_path(), "jsonl").items[:num_edits]
    cond = {k: v.repeat_interleave(samples, dim=0) for k, v in build_edit_encoder(None, "cpu")(records).items()}
    return [r.text for r in records for _ in range(samples)], cond


@torch.no_grad()
def edit_results(folder: Path | None, cond: dict, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Images `[B, 1, 8, 8]` of the edit toy in `folder` (None: the shipped base) sampled by ODE from `noise`."""
    from branchgrpo.core import sde
    from branchgrpo.models.toy import load_toy
    from branchgrpo.models.toy_edit import ToyEditAdapter
    from branchgrpo.runtime.pretrain_toy import sample_latents

    adapter = load_toy(folder, "cpu", ToyEditAdapter)
    return adapter.decode(sample_latents(adapter, cond, noise, sde.make_sigmas(steps, shift=3.0)))


def edit_rows(models: dict[str, Path | None], num_edits: int, steps: int, seed: int) -> tuple[torch.Tensor, list]:
    """Images `[(1 + len(models)) * num_edits, 1, 8, 8]` (row-major: sources, then each model) and row labels."""
    from branchgrpo.models.spec import SOURCE_IMAGE_KEY
    from branchgrpo.models.toy_edit import source_pixels
    from branchgrpo.rewards.toy_edit import ToyEditReward

    texts, cond = held_out_edits(num_edits)
    reward = ToyEditReward()
    noise = torch.randn(len(texts), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    rows, labels = [source_pixels(cond[SOURCE_IMAGE_KEY])], ["source"]
    for name, folder in models.items():
        images = edit_results(folder, cond, noise, steps)
        rows.append(images)
        labels.append(f"{name} ({reward(images, texts, cond).mean().item():.2f})")
    return torch.cat(rows), labels


def labelled_runs(items: list[str]) -> dict[str, list[Path]]:
    """LABEL=FOLDER[,FOLDER...] arguments -> {label: each folder's toy export (`exported_model`)}; "base" is taken."""
    runs: dict[str, list[Path]] = {}
    for item in items:
        label, sep, folders = item.partition("=")
        paths = [Path(f) for f in folders.split(",") if f]
        if not sep or not label or not paths or not all(f.is_dir() for f in paths):
            raise ValueError(f"runs: expected LABEL=FOLDER[,FOLDER...] with existing folders, got '{item}'")
        if label in runs or label == "base":
            raise ValueError(f"runs: the label '{label}' is given twice (or is 'base', the shipped model's)")
        runs[label] = [exported_model(f) for f in paths]
    return runs


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--steps, --seed and --debug of the edit toy's bench tools (this one, edit_breakdown)."""
    p.add_argument("--steps", type=int, default=20, help="ODE sampling steps (shift 3, as the trainer samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared noise")
    add_debug_flag(p)


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    from branchgrpo.runtime.outputs import save_grid, writable_file

    p = argparse.ArgumentParser(prog="python -m branchgrpo.bench.edit_grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=FOLDER: a training run or a toy_edit export, one row each")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--num_edits", type=int, default=10, help="the first N built-in held-out edits (columns)")
    add_sampling_flags(p)
    args = p.parse_args(argv)
    if args.num_edits < 1 or args.steps < 1:
        raise ValueError("--num_edits and --steps: need >= 1")
    runs = labelled_runs(args.runs)
    several = [label for label, folders in runs.items() if len(folders) > 1]
    if several:
        raise ValueError(f"runs: one folder per label (a row each), got several for {', '.join(several)}")
    models = {"base": None, **{label: folders[0] for label, folders in runs.items()}}
    out = writable_file(args.out, "--out")
    images, labels = edit_rows(models, args.num_edits, args.steps, args.seed)
    save_grid(images, out, columns=len(images) // len(labels), labels=labels, scale=8)
    print(f"wrote {out}: " + ", ".join(labels))


if __name__ == "__main__":
    sys.exit(main())
