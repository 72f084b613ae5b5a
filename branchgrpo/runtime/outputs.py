"""What a run leaves behind (rank 0 writes): metrics.jsonl, TensorBoard events, optional wandb, sample grids (PNG),
rollout videos (MP4/GIF), the reward curve (PNG) and summary.json; and the checks of --output_dir before a run
starts. Numbers that are not finite, or that do not exist (no finite reward in an iteration), are written as JSON
null, never as NaN and never as a 0.0 that stands for "no data"."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from branchgrpo.core.flags import require_path

log = logging.getLogger(__name__)

# what the trainer writes at the top of --output_dir: a folder holding any of them holds a run
RUN_FILES = ("config.json", "sizes.json", "metrics.jsonl", "eval.jsonl", "summary.json", "reward_curve.png",
             "checkpoints", "samples", "tensorboard")


# what a run writes inside the RUN_FILES folders (anything else there is someone else's file)
_OWN_CONTENTS = {
    "checkpoints": re.compile(r"(\.tmp-|\.replaced-)?checkpoint-[0-9]+|\.trash-.+|latest|\.latest\.tmp"),
    "samples": re.compile(r"(eval|rollout)_step[0-9]+.*\.(png|mp4|gif)"),
    "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
}
# files a kill may leave at the top of --output_dir: write_atomically's temporary files, the writability probe
_OWN_LEFTOVERS = re.compile(r"\.(" + "|".join(map(re.escape, RUN_FILES)) + r")\.tmp|\.write-test-.+")


def run_files(output_dir: Path) -> list[str]:
    """The run files present in `output_dir` (other files, e.g. the toy launcher's embeddings/, are not a run)."""
    return [name for name in RUN_FILES if (output_dir / name).exists()]


def writable_folder(path: str | Path | None, flag: str) -> Path:
    """`path` as a folder that exists (made if needed) and can be written, checked before anything expensive: an
    empty or blank path (an unset shell variable, which would mean the current folder), a path that is a file or lies
    under one, and a folder that cannot be written (permissions, a read-only file system) are a ValueError naming
    the flag."""
    folder = Path(require_path(path, flag))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{flag}: {folder} is not a writable folder ({reason})") from None
    return folder


def writable_file(path: str | Path | None, flag: str) -> Path:
    """`path` as a file that can be written once the work is done: not a folder, in a writable folder (made if
    needed); checked before the work, so that a bad path does not cost it. ValueError naming the flag."""
    file = Path(require_path(path, flag))
    if file.is_dir():
        raise ValueError(f"{flag}: {file} is a folder; give a file name")
    writable_folder(file.parent, flag)
    return file


def foreign_file(output_dir: Path) -> Path | None:
    """The first entry of `output_dir` that no run of ours wrote (None: every one is a run file, a leftover of one,
    a folder of prompt embeddings written by preprocessing, such as the toy launcher's embeddings/, or a folder
    without any file)."""
    for entry in sorted(output_dir.iterdir()):
        name = entry.name
        if name == "config.json" and not _is_run_config(entry):
            return entry
        if name in _OWN_CONTENTS and entry.is_dir() and not entry.is_symlink():
            other = next((p for p in sorted(entry.iterdir()) if not _OWN_CONTENTS[name].fullmatch(p.name)), None)
            if other is not None:
                return other
        elif name not in RUN_FILES and not _OWN_LEFTOVERS.fullmatch(name) and not _holds_embeddings(entry) \
                and not _holds_no_file(entry):
            return entry
    return None


def _is_run_config(path: Path) -> bool:
    try:
        flags = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable, JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(flags, dict) and "output_dir" in flags and "algo" in flags


def _holds_no_file(path: Path) -> bool:
    """An empty folder, or one of empty folders only: nothing in it to lose."""
    return path.is_dir() and not path.is_symlink() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*"))


def _holds_embeddings(path: Path) -> bool:
    """A folder written by preprocessing (its manifest.json), or a folder of such folders."""
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / "manifest.json").is_file():
        return True
    subfolders = list(path.iterdir())
    return bool(subfolders) and all(p.is_dir() and (p / "manifest.json").is_file() for p in subfolders)


def prepare_output_dir(output_dir: Path, resuming: bool, overwrite: bool, is_main: bool) -> None:
    """Checked on every rank before anything is loaded: --output_dir is (or can be made) a writable folder, and it
    holds no earlier run unless the run resumes (--resume_from_checkpoint) or replaces it (--overwrite_output_dir:
    the main rank deletes the RUN_FILES present and nothing else, and only in a folder that holds nothing but what
    runs of ours write). Raises ValueError naming the flag."""
    if resuming and overwrite:
        raise ValueError("--overwrite_output_dir and --resume_from_checkpoint: choose one (overwriting would delete "
                         "the run being resumed)")
    writable_folder(output_dir, "--output_dir")
    found = run_files(output_dir)
    if not found or resuming:
        return
    if not overwrite:
        raise ValueError(f"--output_dir: {output_dir} holds an earlier run ({', '.join(found)}); pass "
                         "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to delete it and "
                         "start over, or choose another folder")
    _delete_run_files(output_dir, found, "--overwrite_output_dir", is_main)
    if is_main:
        log.warning("--overwrite_output_dir: deleted the earlier run's %s in %s", ", ".join(found), output_dir)


def start_without_checkpoint(output_dir: Path, changes: Callable[[dict], str], is_main: bool) -> None:
    """`--resume_from_checkpoint latest` on a folder without any checkpoint (a requeued job that was stopped before
    its first save): start from the beginning, so that a requeue repeats one command. The files an earlier attempt
    of this same run wrote before it trained anything - its config.json has the same flags: `changes(flags)` is ''
    - are replaced; results (a summary, trained iterations, later evaluations) are never deleted: such a folder,
    the run files of another run, and run files without a config.json to tell are refused."""
    found = run_files(output_dir)
    flag = "--resume_from_checkpoint latest"
    if found:
        _check_same_run(output_dir, found, changes, flag)
    results = run_results(output_dir)
    if results:
        raise ValueError(f"{flag}: {output_dir} holds results ({', '.join(results)}) but no checkpoint to continue "
                         "from; nothing was deleted. To start over and replace them pass --overwrite_output_dir "
                         "instead of --resume_from_checkpoint, or choose another --output_dir")
    if found:
        _delete_run_files(output_dir, found, flag, is_main)
    if is_main:
        log.warning("%s: no checkpoint in %s yet; starting from the beginning%s", flag, output_dir,
                    f" (deleted the files of an earlier attempt: {', '.join(found)})" if found else "")


def _check_same_run(output_dir: Path, found: list[str], changes: Callable[[dict], str], flag: str) -> None:
    """The run files `found` are this run's: its config.json is readable and `changes(flags)` is ''."""
    config = output_dir / "config.json"
    if not config.is_file():
        raise ValueError(f"{flag}: {output_dir} has no checkpoint, and holds run files ({', '.join(found)}) "
                         "without a config.json to tell whose; choose another --output_dir, or replace them with "
                         "--overwrite_output_dir (without --resume_from_checkpoint)")
    try:
        flags = json.loads(config.read_text())
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        flags = None
    if not isinstance(flags, dict):
        raise ValueError(f"{flag}: {output_dir} has no checkpoint, and its {config.name} cannot be read to tell "
                         "whose run files it holds; choose another --output_dir")
    detail = changes(flags)
    if len(detail) > 300:
        detail = detail[:300].rsplit(", --", 1)[0] + ", ..."
    if detail:
        raise ValueError(f"{flag}: {output_dir} has no checkpoint, and its run files belong to another run "
                         f"({config.name}: {detail}); choose another --output_dir")


def run_results(output_dir: Path) -> list[str]:
    """What a run reported once it trained: summary.json, iterations in metrics.jsonl, evaluations after step 0 (a
    restart would delete them); each as a short description."""
    out = ["summary.json"] if (output_dir / "summary.json").exists() else []
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and (entries := read_jsonl(metrics)):
        out.append(f"metrics.jsonl: {len(entries)} iteration(s)")
    evals = output_dir / "eval.jsonl"
    if evals.is_file() and any(isinstance(r, dict) and r.get("step") != 0 for r in read_jsonl(evals)):
        out.append("eval.jsonl: evaluations after step 0")
    return out


def _delete_run_files(output_dir: Path, found: list[str], flag: str, is_main: bool) -> None:
    """Delete the run files `found` (on the main rank), after checking on every rank that the folder holds nothing
    that a run of ours did not write: a user's file among them is refused, naming it, and nothing is deleted."""
    other = foreign_file(output_dir)
    if other is not None:
        raise ValueError(f"{flag}: {output_dir} holds {other}, which no run of ours wrote; nothing was deleted - "
                         "move it, or choose another --output_dir")
    if not is_main:
        return
    for name in found:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def read_jsonl(path: Path) -> list:
    """The objects of a JSON-lines file that branchgrpo appends to. A last line that does not parse is a write cut
    short by a kill (it belongs to the interrupted iteration): dropped with a warning naming the file. Any other line
    that does not parse is an error naming the file and the line."""
    lines = path.read_bytes().split(b"\n")
    entries = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entries.append(json.loads(raw.decode()))
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            if all(not rest.strip() for rest in lines[number:]):
                log.warning("%s: dropped its last line, cut short by a kill while it was written (%d bytes)", path,
                            len(raw))
                break
            raise ValueError(f"{path}: line {number} is not JSON ({type(err).__name__}); the file is damaged") from None
    return entries


def write_atomically(path: Path, text: str) -> None:
    """`path` holds the old text or the new one, never half of it (a stop signal may end the process at once)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finite_or_none(value):
    """A float that is not finite -> None (JSON null); anything else unchanged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_safe(obj):
    """`obj` with every non-finite float, however deeply nested, replaced by None."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return finite_or_none(obj)


class MetricsLog:
    """One JSON object per training iteration; on resume, entries at or after the resumed step are dropped so the
    file continues exactly as an unbroken run would have written it."""

    def __init__(self, output_dir: Path, report_to: str, run_name: str, config: dict, wandb_project: str,
                 resume_step: int | None = None):
        self.path = output_dir / "metrics.jsonl"
        self.entries: list[dict] = []
        if resume_step is not None and self.path.exists():
            kept = read_jsonl(self.path)
            if not all(isinstance(e, dict) and isinstance(e.get("step"), int) for e in kept):
                raise ValueError(f"{self.path}: an entry without an integer 'step'; the file is damaged")
            self.entries = [e for e in kept if e["step"] < resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in self.entries))
        loggers = {x.strip() for x in report_to.split(",")}
        self.tb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step)
        self.wandb = None
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise ValueError("--report_to wandb: the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def log(self, entry: dict) -> None:
        entry = json_safe(entry)
        self.entries.append(entry)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry, allow_nan=False) + "\n")
        step = entry["step"]
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in entry.items() if k != "step" and v is not None}, step=step)

    def log_scalars(self, record: dict) -> None:
        """An evaluation record's numbers (eval rewards, the reward-hacking monitor) to TensorBoard and wandb at its
        step; metrics.jsonl is not touched (eval.jsonl holds them)."""
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def to_uint8(media: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] or [N, C, F, H, W] in [0, 1] -> uint8 HWC arrays (grey channels repeated to RGB)."""
    x = (media.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.repeat_interleave(3, dim=1)
    return x.movedim(1, -1).numpy()


def save_grid(images: torch.Tensor, path: Path, columns: int, labels: Sequence[str] | None = None,
              scale: int = 1) -> Path:
    """Images [N, C, H, W] in [0, 1] as one PNG, `columns` per row (e.g. the seeds of one prompt)."""
    from PIL import Image, ImageDraw

    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    rows = math.ceil(n / columns)
    label_h = 12 if labels else 0
    canvas = Image.new("RGB", (columns * w * scale, rows * (h * scale + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, columns)
        tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
        y = r * (h * scale + label_h)
        canvas.paste(tile, (c * w * scale, y + label_h))
        if labels and c == 0:
            draw.text((2, y), labels[r][:60], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_videos(videos: torch.Tensor, folder: Path, stem: str, fps: int = 16) -> list[Path]:
    """Videos [N, C, F, H, W] in [0, 1] as MP4 (GIF when no ffmpeg is available)."""
    import imageio.v2 as imageio

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, clip in enumerate(to_uint8(videos.transpose(1, 2).flatten(0, 1)).reshape(videos.shape[0], videos.shape[2],
                                                                                    *videos.shape[3:], 3)):
        path = folder / f"{stem}_{i:02d}.mp4"
        try:
            imageio.mimwrite(path, list(clip), fps=fps, macro_block_size=1)
        except Exception:  # no ffmpeg backend: fall back to GIF
            path = path.with_suffix(".gif")
            imageio.mimwrite(path, list(clip), duration=1.0 / fps)
        paths.append(path)
    return paths


def still_frames(media: torch.Tensor, kind: str) -> torch.Tensor:
    """What stands for each sample in a picture: images [N, C, H, W] as they are; videos ([N, C, F, H, W], `kind`
    "video": a backbone spec's `media`) their middle frames [N, C, H, W]."""
    return media[:, :, media.shape[2] // 2] if kind == "video" else media


def save_media(media: torch.Tensor, stem: Path, kind: str, columns: int, labels: Sequence[str] | None = None,
               fps: int = 16, clips: int = 4) -> None:
    """Samples of a backbone whose media is `kind`: `stem`.png, a grid of the images or of the videos' middle
    frames (`columns` per row, small images enlarged to about 64 px), and for videos the first `clips` clips
    (`stem`_NN.mp4, GIF without ffmpeg)."""
    if kind == "video":
        save_videos(media[:clips], stem.parent, stem.name, fps=fps)
    stills = still_frames(media, kind)
    save_grid(stills, stem.with_suffix(".png"), columns=columns, labels=labels, scale=max(1, 64 // stills.shape[-1]))


def plot_rewards(entries: list[dict], evals: list[dict], path: Path, reward_max: float | None = None,
                 thresholds: dict | None = None) -> Path:
    """The reward curve; with the reward-hacking monitor's values in the evaluations (`monitor_*`), two panels
    beside it: the high-frequency share and within-prompt diversity as ratios to the base model's (with the
    configured thresholds, `{key: (direction, value)}`), and KID with the MMD^2 permutation p-value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitored = [e for e in evals if e.get("monitor_hf_ratio") is not None or e.get("monitor_kid") is not None]
    fig, axes = plt.subplots(1, 3 if monitored else 1, figsize=(16 if monitored else 6, 4), squeeze=False)
    ax = axes[0, 0]
    steps = [e["step"] for e in entries]
    nan = float("nan")  # null (no finite reward) leaves a gap in the curve
    ax.plot(steps, [nan if e["reward_mean"] is None else e["reward_mean"] for e in entries],
            label="rollout reward (mean over leaves)", alpha=0.7)
    if evals:
        ax.plot([e["step"] for e in evals], [nan if e["eval_reward"] is None else e["eval_reward"] for e in evals],
                "o-", label="held-out eval reward")
    if reward_max is not None:
        ax.axhline(reward_max, color="grey", linestyle="--", label="reward maximum")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    if monitored:
        _plot_monitor(axes[0, 1], axes[0, 2], monitored, thresholds or {})
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_monitor(ratios_ax, kid_ax, evals: list[dict], thresholds: dict) -> None:
    steps = [e["step"] for e in evals]

    def series(key):
        return [float("nan") if e.get(key) is None else e[key] for e in evals]

    for key, label, color in (("monitor_hf_ratio", "high-frequency share / base", "tab:red"),
                              ("monitor_diversity_ratio", "within-prompt diversity / base", "tab:blue")):
        ratios_ax.plot(steps, series(key), "o-", color=color, label=label)
        if key in thresholds:
            ratios_ax.axhline(thresholds[key][1], color=color, linestyle="--", alpha=0.6,
                              label=f"alarm {thresholds[key][0]} {thresholds[key][1]:g}")
    ratios_ax.axhline(1.0, color="grey", linewidth=0.8)
    ratios_ax.set_xlabel("iteration")
    ratios_ax.set_ylabel("ratio to the step-0 samples")
    ratios_ax.set_title("reward-hacking monitor")
    ratios_ax.legend(fontsize=8)
    ratios_ax.grid(alpha=0.3)
    kid_ax.plot(steps, series("monitor_kid"), "o-", color="tab:purple", label="KID to the step-0 samples")
    if "monitor_kid" in thresholds:
        kid_ax.axhline(thresholds["monitor_kid"][1], color="tab:purple", linestyle="--", alpha=0.6, label="alarm")
    kid_ax.set_xlabel("iteration")
    kid_ax.set_ylabel("KID")
    kid_ax.grid(alpha=0.3)
    p_ax = kid_ax.twinx()
    p_ax.plot(steps, series("monitor_mmd2_p"), "s:", color="tab:green", label="MMD^2 permutation p-value")
    p_ax.set_ylim(0, 1.05)
    p_ax.set_ylabel("p-value")
    lines = kid_ax.get_legend_handles_labels(), p_ax.get_legend_handles_labels()
    kid_ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8)


class EvalLog:
    """The held-out evaluations of a run, one record per evaluation: kept in memory (and checkpointed, so a
    resumed run reports them) and appended to `<output_dir>/eval.jsonl` by the main rank (`path` None elsewhere)."""

    def __init__(self, path: Path | None):
        self.path, self.records = path, []

    def append(self, record: dict) -> None:
        record = json_safe(record)
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")

    def rewrite(self) -> None:
        """After a resume: the file holds exactly the checkpoint's evaluations (later ones belong to the lost
        attempt)."""
        if self.path is not None:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def state_dict(self) -> list[dict]:
        return self.records

    def load_state_dict(self, records: list[dict]) -> None:
        self.records = list(records)


class Stopwatch:
    """Training wall-clock time across attempts: a resumed run continues the count of the run it resumes."""

    def __init__(self):
        self.before, self.since = 0.0, None

    def start(self) -> None:
        self.since = time.time()

    def stop(self) -> None:
        self.before, self.since = self.elapsed(), None

    def elapsed(self) -> float:
        return self.before + (time.time() - self.since if self.since is not None else 0.0)

    def state_dict(self) -> float:
        return self.elapsed()

    def load_state_dict(self, seconds: float) -> None:
        self.before = float(seconds)
