"""Evaluation suites (`python -m branchgrpo.cli.eval --suite geneval|ocr|drawbench|hpsv2`): the four public prompt
formats read from small files the tests write, refused with file:line when malformed, per-task tables whose numbers
are recomputed here from the per-sample scores, and the GenEval suite's three scores from one detector pass."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.cli.eval import main as eval_main
from branchgrpo.eval.suites import (GenEvalColumns, first_per_task, load_suite, task_report)

TOY = ["--model", "toy", "--steps", "3", "--samples_per_prompt", "2", "--num_threads", "1", "--bootstrap", "200"]


def _drawbench(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Prompts", "Category"])
        writer.writerows(rows)
    return path


def _hpsv2(folder: Path, per_style: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for style, prompts in per_style.items():
        (folder / f"{style}.json").write_text(json.dumps(prompts))
    return folder


def test_readers_give_prompts_and_tasks_in_file_order(tmp_path):
    geneval = tmp_path / "meta.jsonl"
    geneval.write_text(json.dumps({"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "two dogs"})
                       + "\n\n" + json.dumps({"tag": "colors", "include": [{"class": "cup", "count": 1,
                                                                               "color": "red"}], "prompt": "a red cup"})
                       + "\n")
    suite = load_suite("geneval", str(geneval))
    assert suite.texts == ["two dogs", "a red cup"] and suite.tasks == ["counting", "colors"]
    assert suite.rewards == "geneval" and suite.reward_options["geneval"]["metadata"] == str(geneval)

    ocr = tmp_path / "ocr.txt"
    ocr.write_text('a sign that says "OPEN"\n\na mug with "hello world" on it\n')
    assert load_suite("ocr", str(ocr)).texts == ['a sign that says "OPEN"', 'a mug with "hello world" on it']

    draw = _drawbench(tmp_path / "db.csv", [("a zero", "Colors"), ("a one", "Text"), ("a two", "Colors")])
    suite = load_suite("drawbench", str(draw), num_prompts=1)  # first prompt of each task
    assert suite.texts == ["a zero", "a one"] and suite.tasks == ["Colors", "Text"]

    hps = _hpsv2(tmp_path / "hps", {"anime": ["a", "b"], "concept-art": ["c"], "paintings": ["d"], "photo": ["e", "f"]})
    suite = load_suite("hpsv2", str(hps))
    assert suite.tasks == ["anime", "anime", "concept-art", "paintings", "photo", "photo"] and suite.rewards == "hps"
    assert first_per_task(["x", "y", "x", "x", "y"], 2) == [0, 1, 2, 4]


def test_malformed_suite_files_are_refused_by_name_and_line(tmp_path):
    bad_json = tmp_path / "meta.jsonl"
    bad_json.write_text(json.dumps({"tag": "colors", "include": [{"class": "cup", "count": 1}], "prompt": "a cup"})
                        + "\n{not json\n")
    with pytest.raises(ValueError, match=r"--suite_path .*meta\.jsonl:2: not valid JSON"):
        load_suite("geneval", str(bad_json))
    bad_tag = tmp_path / "tag.jsonl"
    bad_tag.write_text(json.dumps({"tag": "shapes", "include": [{"class": "cup", "count": 1}], "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"tag\.jsonl:1: tag must be one of"):
        load_suite("geneval", str(bad_tag))
    ocr = tmp_path / "ocr.txt"
    ocr.write_text('a sign that says "OPEN"\n\na mug without a quote\n')
    with pytest.raises(ValueError, match=r"ocr\.txt:3: .*no text in double quotes"):
        load_suite("ocr", str(ocr))
    columns = tmp_path / "db.csv"
    columns.write_text("prompt,category\na zero,Colors\n")
    with pytest.raises(ValueError, match=r"db\.csv: the header must name the columns Prompts, Category"):
        load_suite("drawbench", str(columns))
    empty = _drawbench(tmp_path / "db2.csv", [("a zero", "Colors"), ("", "Text")])
    with pytest.raises(ValueError, match=r"db2\.csv:3: empty Prompts"):
        load_suite("drawbench", str(empty))
    hps = _hpsv2(tmp_path / "hps", {"anime": ["a"], "concept-art": ["b"], "paintings": ["c"]})
    with pytest.raises(ValueError, match=r"photo\.json is missing"):
        load_suite("hpsv2", str(hps))
    (hps / "photo.json").write_text(json.dumps({"prompts": ["d"]}))
    with pytest.raises(ValueError, match=r"photo\.json: expected a non-empty JSON list"):
        load_suite("hpsv2", str(hps))
    with pytest.raises(ValueError, match="--suite_path must name"):
        load_suite("ocr", None)
    with pytest.raises(ValueError, match=r"--suite_path: .*missing\.csv is not a file"):
        load_suite("drawbench", str(tmp_path / "missing.csv"))


def test_task_report_against_numpy():
    rng = np.random.default_rng(0)
    tasks = ["a"] * 3 + ["b"] * 5
    texts = [f"p{i}" for i in range(8)]
    from branchgrpo.eval.suites import Suite

    suite = Suite("drawbench", "x.csv", texts, tasks, "default")
    prompt_index = torch.arange(8).repeat_interleave(3)
    values = torch.from_numpy(rng.normal(size=24)).float()
    values[5] = float("nan")  # counted, not used
    report = task_report(suite, {"r": values}, prompt_index, num_bootstrap=500, seed=1)
    x = values.double().numpy()
    means = {t: np.nanmean(x[[i for i in range(24) if tasks[i // 3] == t]]) for t in "ab"}
    assert report["tasks"]["a"]["r"]["mean"] == pytest.approx(means["a"], abs=1e-12)
    assert report["tasks"]["a"]["r"]["nonfinite"] == 1 and report["tasks"]["b"]["prompts"] == 5
    overall = report["overall"]["r"]
    assert overall["mean_of_tasks"] == pytest.approx((means["a"] + means["b"]) / 2, abs=1e-12)
    assert overall["mean_of_samples"] == pytest.approx(np.nanmean(x), abs=1e-12)
    low, high = overall["ci95_bootstrap"]
    assert low < overall["mean_of_tasks"] < high
    assert task_report(suite, {"r": values}, prompt_index, 0, 1)["overall"]["r"]["ci95_bootstrap"] is None


@pytest.mark.slow
def test_drawbench_and_hpsv2_suites_on_the_toy(tmp_path, capsys):
    draw = _drawbench(tmp_path / "db.csv", [("a thin zero", "Colors"), ("a bold one", "Counting"),
                                            ("a bold wide two", "Colors"), ("a thin three", "Counting"),
                                            ("a thin four", "Colors")])
    out = tmp_path / "draw"
    assert eval_main([*TOY, "--suite", "drawbench", "--suite_path", str(draw), "--output_dir", str(out)]) == 0
    report = json.loads((out / "suite.json").read_text())
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and [r["prompt"] for r in rows[::2]] == ["a thin zero", "a bold one", "a bold wide two",
                                                                     "a thin three", "a thin four"]
    for task, prompts in (("Colors", (0, 2, 4)), ("Counting", (1, 3))):
        toy = [float(r["toy"]) for r in rows if int(r["prompt_index"]) in prompts]
        assert report["tasks"][task]["toy"]["mean"] == pytest.approx(np.mean(toy), abs=1e-6)
        assert report["tasks"][task]["toy"]["n"] == 2 * len(prompts)
    assert {p.name for p in out.glob("grid_*.png")} == {"grid_Colors.png", "grid_Counting.png"}
    assert "| Colors | 3 |" in (out / "suite.md").read_text()

    hps = _hpsv2(tmp_path / "hps", {"anime": ["a zero", "a one"], "concept-art": ["a two"], "paintings": ["a three"],
                                    "photo": ["a four", "a five"]})
    out = tmp_path / "hps_out"
    assert eval_main([*TOY, "--suite", "hpsv2", "--suite_path", str(hps), "--rewards", "toy", "--output_dir", str(out),
                      "--num_prompts", "1"]) == 0
    report = json.loads((out / "suite.json").read_text())
    assert list(report["tasks"]) == ["anime", "concept-art", "paintings", "photo"]
    assert all(row["prompts"] == 1 for row in report["tasks"].values())
    capsys.readouterr()


def test_suite_flags_are_checked_before_loading(tmp_path, capsys):
    draw = _drawbench(tmp_path / "db.csv", [("a zero", "Colors")])
    assert eval_main([*TOY, "--suite", "drawbench", "--suite_path", str(draw), "--prompts", str(draw),
                      "--output_dir", str(tmp_path / "o")]) == 2
    assert "--prompts: not with --suite" in capsys.readouterr().err
    assert eval_main([*TOY, "--suite_path", str(draw), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--suite_path: only with --suite" in capsys.readouterr().err
    assert eval_main([*TOY, "--suite", "ocr", "--suite_path", str(draw), "--output_dir", str(tmp_path / "o")]) == 2
    assert "no text in double quotes" in capsys.readouterr().err


@pytest.mark.slow
def test_geneval_columns_come_from_one_detector_pass(tmp_path):
    """GenEvalColumns scores `correct` and hands over strict and partial per chunk, equal to the reward's own
    evaluation of the same images (the tiny Mask2Former + CLIP of the GenEval fixture)."""
    from branchgrpo.rewards.base import build_reward
    from branchgrpo.testing.geneval_tiny import SAMPLE_METADATA, make_tiny_geneval

    root = make_tiny_geneval(str(tmp_path))
    reward = build_reward("geneval", model_dir=str(root), metadata=str(root / "evaluation_metadata.jsonl"),
                          image_scale=[64, 64])
    prompts = [r["prompt"] for r in SAMPLE_METADATA][:4]
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    columns = GenEvalColumns(reward)
    first, second = columns(images[:3], prompts[:3]), columns(images[3:], prompts[3:])  # two reward batches
    extra = columns.extra_columns(images, prompts)
    expected = reward.evaluate(images, prompts)
    assert torch.cat([first, second]).tolist() == [float(e.correct) for e in expected]
    assert extra["geneval_strict"].tolist() == [float(e.strict) for e in expected]
    assert extra["geneval_partial"].tolist() == pytest.approx([e.partial for e in expected], abs=0)
    assert columns.pending == []
    with pytest.raises(RuntimeError, match="0 scored images for a chunk of 4"):
        columns.extra_columns(images, prompts)


@pytest.mark.slow
def test_geneval_and_ocr_suites_through_the_cli_on_a_tiny_flux(tmp_path, capsys):
    """The suites end to end on a tiny FLUX: GenEval's three columns per task (tiny Mask2Former + CLIP), and the OCR
    suite with the real shipped PP-OCR models (random images: text is not read, so similarity is low and exact 0)."""
    pytest.importorskip("rapidocr")
    from branchgrpo.cli.make_tiny import make_tiny
    from branchgrpo.testing.geneval_tiny import make_tiny_geneval

    make_tiny("flux", str(tmp_path / "flux"))
    models = make_tiny_geneval(str(tmp_path / "rewards"))
    flux = ["--model", "flux", "--pretrained_model_name_or_path", str(tmp_path / "flux"), "--h", "64", "--w", "64",
            "--max_sequence_length", "16", "--steps", "2", "--samples_per_prompt", "2", "--num_threads", "1",
            "--bootstrap", "100", "--reward_model_dir", str(models)]
    out = tmp_path / "geneval"
    assert eval_main([*flux, "--suite", "geneval", "--suite_path", str(models / "evaluation_metadata.jsonl"),
                      "--reward_options", '{"geneval": {"image_scale": [64, 64]}}', "--num_prompts", "1",
                      "--output_dir", str(out)]) == 0
    report = json.loads((out / "suite.json").read_text())
    tasks = list(dict.fromkeys(json.loads(line)["tag"] for line in
                               (models / "evaluation_metadata.jsonl").read_text().splitlines()))
    assert list(report["tasks"]) == tasks
    assert set(report["overall"]) == {"geneval", "geneval_strict", "geneval_partial"}
    for row in report["tasks"].values():  # binary correct implies partial = 1; strict implies correct
        assert row["geneval"]["mean"] <= row["geneval_partial"]["mean"] + 1e-9
        assert row["geneval_strict"]["mean"] <= row["geneval"]["mean"] + 1e-9
    assert len(list(out.glob("grid_*.png"))) == len(tasks)

    prompts = tmp_path / "ocr.txt"
    prompts.write_text('a sign that says "OPEN"\na mug with "hello" on it\n')
    out = tmp_path / "ocr"
    assert eval_main([*flux, "--suite", "ocr", "--suite_path", str(prompts), "--output_dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert list(result["metrics"]) == ["ocr", "ocr_exact"]
    ocr = [s["scores"]["ocr"] for s in result["samples"]]
    assert [s["scores"]["ocr_exact"] for s in result["samples"]] == [float(v == 1.0) for v in ocr]
    assert all(0.0 <= v <= 1.0 for v in ocr)
    capsys.readouterr()
