"""The field's benchmark prompt suites, read from the user's copies of their public files, and their per-task reports.

| suite | `--suite_path` | tasks | scored by (default `--rewards`) | headline |
|---|---|---|---|---|
| geneval | GenEval's `prompts/evaluation_metadata.jsonl` (`tag`, `include`, `exclude`, `prompt` per line) | the six tags | `geneval`: GenEval's binary `correct`, plus `geneval_strict` and `geneval_partial` columns | mean over tasks of each task's accuracy (GenEval's "overall") |
| ocr | a text file, one prompt per line, the text to render in double quotes (Flow-GRPO's OCR test prompts) | one | `ocr` | mean OCR similarity; `ocr_exact`: share of images read exactly |
| drawbench | DrawBench's CSV (header with `Prompts` and `Category`) | the 11 categories | the backbone's evaluation rewards | mean per category and overall |
| hpsv2 | a folder with HPSv2's benchmark prompt files `anime.json`, `concept-art.json`, `paintings.json`, `photo.json` (each a JSON list of prompts) | the four styles | `hps` | mean over styles of each style's mean HPS-v2.1 |

Every file is checked before anything is loaded: a missing file, a malformed line or a missing column is one error
naming the file (and line) and what was expected. Per task, each metric gets its mean and a 95% interval from a
bootstrap over that task's prompts (all seeds of a drawn prompt kept, as in eval/report.py); the overall
mean-of-task-means gets a stratified bootstrap (prompts redrawn within each task).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from branchgrpo.eval.report import summarize
from branchgrpo.rewards.geneval_rules import parse_metadata_lines
from branchgrpo.rewards.ocr import check_ocr_prompts
from branchgrpo.runtime.outputs import save_grid

HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
DRAWBENCH_COLUMNS = ("Prompts", "Category")


@dataclass(frozen=True)
class Suite:
    name: str
    path: str
    texts: list[str]
    tasks: list[str]  # the task (tag, category, style) of each prompt
    rewards: str  # the default --rewards for the suite ("default": the backbone's)
    reward_options: dict = field(default_factory=dict)  # options the suite gives its rewards

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(self.tasks))


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"--suite_path: {path} is not a file (expected {what})")
    return path


def read_geneval(path: Path) -> Suite:
    _require_file(path, "GenEval's evaluation_metadata.jsonl")
    specs = [spec for _, spec in parse_metadata_lines(path.read_text(), f"--suite_path {path}")]
    texts, tasks = [s.prompt for s in specs], [s.tag for s in specs]
    return Suite("geneval", str(path), texts, tasks, "geneval", {"geneval": {"metadata": str(path), "score": "correct"}})


def read_ocr(path: Path) -> Suite:
    _require_file(path, "a text file with one prompt per line")
    lines = path.read_text().splitlines()
    numbered = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    for number, text in numbered:  # the line numbers of the file, blank lines counted
        try:
            check_ocr_prompts([text])
        except ValueError as err:
            raise ValueError(f"--suite_path {path}:{number}: {err}") from None
    texts = [text for _, text in numbered]
    return Suite("ocr", str(path), texts, ["ocr"] * len(texts), "ocr")


def read_drawbench(path: Path) -> Suite:
    _require_file(path, "DrawBench's CSV with columns Prompts and Category")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in DRAWBENCH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"--suite_path {path}: the header must name the columns {', '.join(DRAWBENCH_COLUMNS)} "
                             f"(DrawBench's CSV); missing {', '.join(missing)}, found {reader.fieldnames}")
        texts, tasks = [], []
        for number, row in enumerate(reader, start=2):
            prompt, category = (row.get("Prompts") or "").strip(), (row.get("Category") or "").strip()
            if not prompt or not category:
                raise ValueError(f"--suite_path {path}:{number}: empty {'Prompts' if not prompt else 'Category'}")
            texts.append(prompt)
            tasks.append(category)
    return Suite("drawbench", str(path), texts, tasks, "default")


def read_hpsv2(path: Path) -> Suite:
    if not path.is_dir():
        raise ValueError(f"--suite_path: {path} is not a folder (expected HPSv2's benchmark prompts: "
                         f"{', '.join(s + '.json' for s in HPSV2_STYLES)})")
    texts, tasks = [], []
    for style in HPSV2_STYLES:
        file = path / f"{style}.json"
        if not file.is_file():
            raise ValueError(f"--suite_path: {file} is missing (HPSv2's benchmark has one JSON list of prompts per "
                             f"style: {', '.join(s + '.json' for s in HPSV2_STYLES)})")
        try:
            prompts = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--suite_path {file}: not valid JSON ({err})") from None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"--suite_path {file}: expected a non-empty JSON list of prompt strings")
        texts += [p.strip() for p in prompts]
        tasks += [style] * len(prompts)
    return Suite("hpsv2", str(path), texts, tasks, "hps")


READERS = {"geneval": read_geneval, "ocr": read_ocr, "drawbench": read_drawbench, "hpsv2": read_hpsv2}


def load_suite(name: str, path: str | None, num_prompts: int = 0) -> Suite:
    """The suite's prompts and tasks; `num_prompts` > 0 keeps the first N prompts of EACH task (a quick run that still
    covers every task)."""
    if name not in READERS:
        raise ValueError(f"--suite: expected one of {', '.join(READERS)}, got '{name}'")
    if not path:
        raise ValueError(f"--suite {name}: --suite_path must name the suite's prompt file (see docs/evaluation.md)")
    suite = READERS[name](Path(path))
    if not suite.texts:
        raise ValueError(f"--suite_path {path}: holds no prompt")
    if num_prompts > 0:
        keep = first_per_task(suite.tasks, num_prompts)
        suite = Suite(suite.name, suite.path, [suite.texts[i] for i in keep], [suite.tasks[i] for i in keep],
                      suite.rewards, suite.reward_options)
    return suite


class GenEvalColumns:
    """The `geneval` reward of a GenEval suite: scores GenEval's binary `correct` (the suite's headline) and keeps
    the strict and partial scores of every image it scored, which `extra_columns` hands over once per chunk - so the
    detector runs once per image for all three columns."""

    def __init__(self, reward):
        self.reward = reward
        self.reward_max = 1.0
        self.pending: list = []

    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        results = self.reward.evaluate(media, prompts)
        self.pending += results
        return torch.tensor([float(r.correct) for r in results], dtype=torch.float32)

    def extra_columns(self, media: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if len(self.pending) != media.shape[0]:
            raise RuntimeError(f"geneval suite: {len(self.pending)} scored images for a chunk of {media.shape[0]}")
        results, self.pending = self.pending, []
        return {"geneval_strict": torch.tensor([float(r.strict) for r in results], dtype=torch.float32),
                "geneval_partial": torch.tensor([float(r.partial) for r in results], dtype=torch.float32)}


def ocr_exact(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The share of images whose text is read exactly (similarity 1), beside the mean similarity."""
    return {"ocr_exact": (scores["ocr"] == 1.0).float()} if "ocr" in scores else {}


def _stratified_bootstrap(x: np.ndarray, prompts: np.ndarray, tasks: np.ndarray, num_bootstrap: int,
                          seed: int) -> list[float] | None:
    """95% percentile interval of the mean over tasks of each task's mean, prompts redrawn within each task."""
    names = np.unique(tasks)
    if num_bootstrap <= 0 or names.size == 0:
        return None
    rng = np.random.default_rng(seed)
    draws = np.zeros(num_bootstrap)
    for t in names:
        ids, inverse = np.unique(prompts[tasks == t], return_inverse=True)
        sums = np.bincount(inverse, weights=x[tasks == t])
        counts = np.bincount(inverse).astype(np.float64)
        pick = rng.integers(0, ids.size, size=(num_bootstrap, ids.size))
        draws += sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    low, high = np.percentile(draws / names.size, [2.5, 97.5])
    return [float(low), float(high)]


def task_report(suite: Suite, scores: dict[str, torch.Tensor], prompt_index: torch.Tensor, num_bootstrap: int,
                seed: int) -> dict:
    """{"tasks": {task: {"prompts": n, metric: summary}}, "overall": {metric: {"mean_of_tasks", "ci95_bootstrap",
    "mean_of_samples"}}}: per task each metric's summary (eval/report.py `summarize`, bootstrap over the task's
    prompts), and the mean of the task means with its stratified interval. Non-finite scores are counted, not used."""
    task_of_sample = np.array([suite.tasks[int(p)] for p in prompt_index])
    prompts = prompt_index.numpy()
    out: dict = {"tasks": {}, "overall": {}}
    for task in suite.task_names:
        rows = torch.from_numpy(np.flatnonzero(task_of_sample == task))
        out["tasks"][task] = {"prompts": int(np.unique(prompts[rows.numpy()]).size),
                              **{name: summarize(values[rows], prompt_index[rows], num_bootstrap, seed)
                                 for name, values in scores.items()}}
    for name, values in scores.items():
        x = values.double().numpy()
        finite = np.isfinite(x)
        task_means = [out["tasks"][t][name]["mean"] for t in suite.task_names]
        known = [m for m in task_means if m is not None]
        out["overall"][name] = {
            "mean_of_tasks": float(np.mean(known)) if len(known) == len(task_means) else None,
            "ci95_bootstrap": _stratified_bootstrap(x[finite], prompts[finite], task_of_sample[finite], num_bootstrap,
                                                    seed) if len(known) == len(task_means) else None,
            "mean_of_samples": float(x[finite].mean()) if finite.any() else None}
    return out


def _fmt(summary_mean, interval) -> str:
    if summary_mean is None:
        return "-"
    text = f"{summary_mean:.4f}"
    return text + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def task_markdown(suite: Suite, report: dict) -> str:
    """suite.md: one row per task, one column per metric (mean [95% CI over prompts]), then the overall row."""
    names = list(report["overall"])
    lines = [f"# Suite {suite.name}: {len(suite.texts)} prompts in {len(suite.task_names)} tasks ({suite.path})", "",
             "| task | prompts | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, row in report["tasks"].items():
        lines.append(f"| {task} | {row['prompts']} | " +
                     " | ".join(_fmt(row[n]["mean"], row[n]["ci95_bootstrap"]) for n in names) + " |")
    lines.append(f"| **overall (mean of tasks)** | {len(suite.texts)} | " +
                 " | ".join(_fmt(report["overall"][n]["mean_of_tasks"], report["overall"][n]["ci95_bootstrap"])
                            for n in names) + " |")
    lines += ["", "Intervals: 95% percentile bootstrap over the task's prompts (all seeds of a drawn prompt kept; none "
              "for a task of one prompt); overall: prompts redrawn within each task."]
    if suite.name == "geneval":
        lines.append("GenEval's published score is the overall `geneval` column (its binary `correct`).")
    lines.append("")
    return "\n".join(lines)


def write_suite(out_dir: Path, suite: Suite, report: dict) -> None:
    (out_dir / "suite.json").write_text(json.dumps({"suite": suite.name, "suite_path": suite.path, **report},
                                                   indent=1))
    (out_dir / "suite.md").write_text(task_markdown(suite, report))


def first_per_task(tasks: Sequence[str], per_task: int) -> list[int]:
    """Indices of the first `per_task` prompts of each task, in order."""
    taken: dict[str, int] = {}
    keep = []
    for i, task in enumerate(tasks):
        taken[task] = taken.get(task, 0) + 1
        if taken[task] <= per_task:
            keep.append(i)
    return keep


def write_task_grids(out_dir: Path, suite: Suite, shown: Sequence[int], tiles: torch.Tensor, columns: int
                     ) -> list[str]:
    """grid_<task>.png per task from the tiles of the `shown` prompts (in prompt order, `columns` tiles each)."""
    written = []
    for task in suite.task_names:
        rows = [k for k, p in enumerate(shown) if suite.tasks[p] == task]
        if not rows:
            continue
        index = torch.tensor([k * columns + c for k in rows for c in range(columns)])
        name = "grid_" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in task) + ".png"
        save_grid(tiles[index], out_dir / name, columns=columns, labels=[suite.texts[shown[k]] for k in rows],
                  scale=max(1, 64 // tiles.shape[-1]))
        written.append(name)
    return written
