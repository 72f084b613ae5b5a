"""The OCR reward: its string rules against independent references, and the real RapidOCR models (shipped in the
rapidocr wheel, CPU, offline) on text rendered with PIL in a TrueType font found on this machine."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.rewards import available_rewards, build_reward
from branchgrpo.rewards.ocr import check_ocr_prompts, levenshtein, ocr_similarity, quoted_target

FONT_NAMES = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "LiberationSans-Bold.ttf")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")


def _reference_distance(a: str, b: str) -> int:
    """Edit distance straight from its recursive definition (exponential; short strings only)."""
    if not a or not b:
        return len(a) + len(b)
    return min(_reference_distance(a[1:], b) + 1, _reference_distance(a, b[1:]) + 1,
               _reference_distance(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_matches_the_recursive_definition():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
        assert levenshtein(a, b) == _reference_distance(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2


def test_ocr_similarity_rules():
    assert ocr_similarity("WELCOME HOME to all", "home") == 1.0  # substring, after case and spaces
    assert ocr_similarity("Op en", "open") == 1.0
    assert ocr_similarity("opn", "open") == pytest.approx(1 - 1 / 4)  # one insertion
    assert ocr_similarity("", "open") == 0.0
    assert ocr_similarity("a much longer unrelated line", "open") == 0.0  # distance capped at the target's length
    with pytest.raises(ValueError):
        ocr_similarity("x", "   ")


def test_quoted_target_and_prompt_check():
    assert quoted_target('a sign that says "Open Late" and "Closed"') == "Open Late"
    assert quoted_target("no quotes here") is None
    assert quoted_target('one "unclosed quote') is None
    assert quoted_target('empty "  " span') is None
    assert check_ocr_prompts(['a "cat"', 'b "dog" sign']) == ["cat", "dog"]
    with pytest.raises(ValueError, match=r"prompt 'a plain prompt' has no text in double quotes"):
        check_ocr_prompts(['ok "yes"', "a plain prompt"])
    with pytest.raises(ValueError, match=r"prompts\.txt:2: prompt 'a plain prompt'"):
        check_ocr_prompts(['ok "yes"', "a plain prompt"], source="prompts.txt")


def test_registered_and_bad_options_refused():
    assert "ocr" in available_rewards()
    with pytest.raises(ValueError, match="text_score"):
        build_reward("ocr", text_score=1.5)
    with pytest.raises(ValueError, match="takes no option 'det_model'"):
        build_reward("ocr", det_model="x.onnx")


def _font_path() -> Path | None:
    for folder in FONT_DIRS:
        for name in FONT_NAMES:
            found = next(Path(folder).rglob(name), None) if Path(folder).is_dir() else None
            if found is not None:
                return found
    return None


@pytest.fixture(scope="module")
def render():
    """text -> image [3, 128, 384] in [0, 1]: black text centred on white, 40 px type."""
    from PIL import Image, ImageDraw, ImageFont

    path = _font_path()
    if path is None:
        pytest.skip(f"no TrueType font ({', '.join(FONT_NAMES)}) under {', '.join(FONT_DIRS)}; install Debian's "
                    "fonts-dejavu-core to run the OCR tests on rendered text")
    font = ImageFont.truetype(str(path), 40)

    def draw(text: str) -> torch.Tensor:
        image = Image.new("RGB", (384, 128), "white")
        canvas = ImageDraw.Draw(image)
        left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
        canvas.text(((384 - (right - left)) / 2 - left, (128 - (bottom - top)) / 2 - top), text, fill="black",
                    font=font)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0

    return draw


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr", reason="the OCR reward needs rapidocr + onnxruntime (requirements-rewards.txt)")
    return build_reward("ocr", num_threads=1)


@pytest.mark.slow
def test_rendered_text_scores(ocr, render, caplog):
    prompt = 'a shop sign that says "Open Late"'
    images = torch.stack([render("Open Late"), render("Opne Lat"), render("Branch"), torch.ones(3, 128, 384)])
    before = ocr.num_unreadable
    with caplog.at_level(logging.WARNING, logger="branchgrpo.rewards.ocr"):
        scores = ocr(images, [prompt, prompt, 'a logo "GRPO Branch"', prompt])
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores[0] >= 0.9, scores
    assert scores[1] < scores[0], scores  # a misspelling scores less
    assert 0.0 < scores[2] < 1.0, scores  # part of the target only
    assert scores[3] == 0.0  # blank: no text found, counted, one warning line
    assert ocr.num_unreadable == before + 1
    assert "1 of 4 images unreadable" in caplog.text


@pytest.mark.slow
def test_nonfinite_image_scores_zero_and_is_counted(ocr, render):
    broken = render("Open Late").clone()
    broken[0, 0, 0] = float("nan")
    before = ocr.num_failed
    scores = ocr(torch.stack([broken, render("Open Late")]), ['"Open Late"', '"Open Late"'])
    assert scores[0] == 0.0 and scores[1] >= 0.9
    assert ocr.num_failed == before + 1


@pytest.mark.slow
def test_prompt_without_quotes_refused_before_reading(ocr, render):
    before = (ocr.num_unreadable, ocr.num_failed)
    with pytest.raises(ValueError, match="prompt 'a photo of a cat' has no text in double quotes"):
        ocr(torch.ones(2, 3, 64, 64), ['"ok"', "a photo of a cat"])
    assert (ocr.num_unreadable, ocr.num_failed) == before  # no image was read


@pytest.mark.slow
def test_missing_model_file_is_named(tmp_path):
    pytest.importorskip("rapidocr")
    with pytest.raises(FileNotFoundError, match="rec_model_path .*missing.onnx does not exist"):
        build_reward("ocr", rec_model_path=str(tmp_path / "missing.onnx"))


@pytest.mark.slow  # builds the OCR engine twice and preprocesses prompts
def test_prompts_without_quotes_are_refused_at_start_up(tmp_path, capsys):
    """Under --reward ocr=1.0, a prompt file with a prompt that has no double-quoted text is refused before any model
    is loaded, naming the file and the prompt's line: in training (the preprocessed index) and in evaluation."""
    pytest.importorskip("rapidocr", reason="the OCR reward needs rapidocr + onnxruntime (requirements-rewards.txt)")
    from branchgrpo.cli.eval import main as eval_main
    from branchgrpo.cli.train import main as train_main
    from branchgrpo.data.preprocess import run_preprocess
    from branchgrpo.models.toy import build_prompt_encoder

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "one"\na bold three\n')
    code = eval_main(["--model", "toy", "--prompts", str(prompts), "--rewards", "ocr", "--output_dir",
                      str(tmp_path / "eval")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith(f"error: reward 'ocr': {prompts}:2: prompt 'a bold three' has no text in "
                                          "double quotes"), error
    toy_prompts = tmp_path / "toy_prompts.txt"  # the toy's vocabulary has no quotes: its prompts have no target
    toy_prompts.write_text("one\na bold three\n")
    index = run_preprocess(toy_prompts, tmp_path / "emb", "toy", build_prompt_encoder(None, "cpu"), shard_size=8)
    code = train_main(["--model", "toy", "--device", "cpu", "--reward", "ocr=1.0", "--data_json_path", str(index),
                       "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith(f"error: reward 'ocr': {index}:1: prompt 'one' has no text"), error
