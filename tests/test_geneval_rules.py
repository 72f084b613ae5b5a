"""GenEval's rules on hand-made detections (no model): every task type passing and failing, the thresholds and the
position margins at their edges, the metadata checks, and properties tying the three scores together."""

from __future__ import annotations

import json
import random

import pytest

from branchgrpo.rewards.geneval_rules import (COLORS, RELATIONS, Detection, parse_metadata, read_metadata,
                                              relative_position, score_geneval, select_detections)

BOX = (10.0, 10.0, 20.0, 20.0)  # a 10 x 10 box centred at (15, 15)


def _spec(tag, include, exclude=(), prompt="p"):
    return parse_metadata({"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": prompt}, "test")


def _det(cx=15.0, cy=15.0, size=10.0, score=0.95, color=None):
    return Detection((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), score, color)


def _score(spec, candidates):
    return score_geneval(spec, select_detections(candidates, spec.tag))


def test_single_object():
    spec = _spec("single_object", [{"class": "dog", "count": 1}])
    result = _score(spec, {"dog": [_det()]})
    assert (result.correct, result.strict, result.partial) == (True, True, 1.0)
    result = _score(spec, {"cat": [_det()]})
    assert (result.correct, result.strict, result.partial) == (False, False, 0.0)
    assert result.reasons == ("expected dog>=1, found 0",)
    # two dogs: GenEval's "at least" passes, the exact count fails, partial 1 - |1 - 2| / 1 = 0
    result = _score(spec, {"dog": [_det(), _det(40)]})
    assert (result.correct, result.strict, result.partial) == (True, False, 0.0)


def test_confidence_thresholds_are_strict_and_per_task():
    spec = _spec("single_object", [{"class": "dog", "count": 1}])
    assert not _score(spec, {"dog": [_det(score=0.3)]}).correct  # GenEval keeps scores strictly above 0.3
    assert _score(spec, {"dog": [_det(score=0.3001)]}).correct
    counting = _spec("counting", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
    kept = select_detections({"cat": [_det(score=0.95), _det(score=0.9), _det(score=0.91)]}, "counting")
    assert [d.score for d in kept["cat"]] == [0.95, 0.91]  # 0.9 is not above the counting threshold; sorted
    assert score_geneval(counting, kept).strict
    many = {"cat": [_det(score=0.5 + i / 100) for i in range(20)]}
    assert len(select_detections(many, "two_object")["cat"]) == 16  # at most 16 per class, the best ones
    assert min(d.score for d in select_detections(many, "two_object")["cat"]) == pytest.approx(0.54)


def test_two_object():
    spec = _spec("two_object", [{"class": "cat", "count": 1}, {"class": "tv remote", "count": 1}])
    assert _score(spec, {"cat": [_det()], "tv remote": [_det(50)]}).strict
    result = _score(spec, {"cat": [_det()]})
    assert not result.correct and result.partial == pytest.approx(0.5)


def test_counting():
    spec = _spec("counting", [{"class": "cat", "count": 3}], [{"class": "cat", "count": 4}])
    cats = [_det(10 * i) for i in range(5)]
    result = _score(spec, {"cat": cats[:3]})
    assert (result.correct, result.strict, result.partial) == (True, True, 1.0)
    result = _score(spec, {"cat": cats[:4]})  # the exclude clause: four is too many
    assert (result.correct, result.strict) == (False, False)
    assert result.partial == pytest.approx(1 - 1 / 3) and result.reasons == ("expected cat<4, found 4",)
    result = _score(spec, {"cat": cats[:2]})
    assert (result.correct, result.strict) == (False, False) and result.partial == pytest.approx(2 / 3)
    result = _score(spec, {"cat": cats[:3] + [_det(score=0.85)]})  # below the counting threshold: not counted
    assert result.strict


def test_colors():
    spec = _spec("colors", [{"class": "car", "count": 1, "color": "red"}])
    result = _score(spec, {"car": [_det(color="red")]})
    assert (result.correct, result.strict, result.partial) == (True, True, 1.0)
    result = _score(spec, {"car": [_det(color="blue")]})
    assert (result.correct, result.strict, result.partial) == (False, False, 0.5)
    # GenEval looks at the most confident car only; the exact count fails and its colour term is 0
    result = _score(spec, {"car": [_det(score=0.9, color="red"), _det(40, score=0.8, color="blue")]})
    assert (result.correct, result.strict, result.partial) == (True, False, 0.0)
    with pytest.raises(ValueError, match="not classified"):
        _score(spec, {"car": [_det()]})


def test_position():
    spec = _spec("position", [{"class": "cat", "count": 1},
                              {"class": "dog", "count": 1, "position": ["right of", 0]}])
    result = _score(spec, {"cat": [_det(15)], "dog": [_det(45)]})
    assert (result.correct, result.strict, result.partial) == (True, True, 1.0)
    result = _score(spec, {"cat": [_det(45)], "dog": [_det(15)]})
    assert (result.correct, result.strict) == (False, False)
    assert result.partial == pytest.approx(2 / 3) and result.reasons == ("expected dog right of cat",)
    result = _score(spec, {"dog": [_det(45)]})  # no cat: nothing to be right of
    assert not result.correct and result.reasons[-1] == "no cat for dog to be right of"
    assert result.partial == pytest.approx((0 + 1 + 0) / 3)


def test_color_attr():
    spec = _spec("color_attr", [{"class": "bench", "count": 1, "color": "blue"},
                                {"class": "cup", "count": 1, "color": "white"}])
    good = {"bench": [_det(color="blue")], "cup": [_det(40, color="white")]}
    assert _score(spec, good).strict and _score(spec, good).partial == 1.0
    swapped = {"bench": [_det(color="white")], "cup": [_det(40, color="blue")]}
    result = _score(spec, swapped)
    assert (result.correct, result.strict, result.partial) == (False, False, 0.5)


def test_position_margin_edges():
    # equal 10-pixel boxes: each axis shrinks by 0.1 * (10 + 10) = 2; a horizontal offset d gives x = (d - 2) / d,
    # which passes 0.5 only beyond d = 4
    assert relative_position((14.0, 10.0, 24.0, 20.0), BOX) == set()  # d = 4: x = 0.5 exactly
    assert relative_position((14.01, 10.0, 24.01, 20.0), BOX) == {"right of"}
    assert relative_position((6.0, 10.0, 16.0, 20.0), BOX) == set()
    assert relative_position((5.99, 10.0, 15.99, 20.0), BOX) == {"left of"}
    assert relative_position((12.0, 10.0, 22.0, 20.0), BOX) == set()  # inside the margin: no relation at all
    assert relative_position((10.0, 24.5, 20.0, 34.5), BOX) == {"below"}  # image y grows downwards
    assert relative_position((10.0, -4.5, 20.0, 5.5), BOX) == {"above"}
    assert relative_position((25.0, 25.0, 35.0, 35.0), BOX) == {"right of", "below"}  # a diagonal: both
    assert relative_position((25.0, 15.0, 35.0, 25.0), BOX) == {"right of"}  # dy = 5 -> (3 / 11.2) < 0.5
    # a 40-pixel-wide A widens the margin to 0.1 * (40 + 10) = 5: d = 10 gives x = 0.5 (none), d = 15 gives 2/3
    assert relative_position((0.0, 10.0, 40.0, 20.0), (0.0, 10.0, 10.0, 20.0)) == {"right of"}
    assert relative_position((-5.0, 10.0, 35.0, 20.0), (0.0, 10.0, 10.0, 20.0)) == set()


def test_metadata_validation(tmp_path):
    assert parse_metadata({"tag": "position", "prompt": "a", "include": [
        {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}]}, "x").include[1] \
        .position == ("above", 0)
    bad = [
        ({"tag": "odd", "prompt": "a", "include": [{"class": "cat", "count": 1}]}, "tag must be one of"),
        ({"tag": "colors", "prompt": "a", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, "color must"),
        ({"tag": "counting", "prompt": "a", "include": [{"class": "cat", "count": 0}]}, "count must be"),
        ({"tag": "position", "prompt": "a", "include": [{"class": "cat", "count": 1, "position": ["above", 0]}]},
         "position must be"),
        ({"tag": "single_object", "prompt": "a", "include": []}, "include must be a non-empty list"),
        ({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, "missing prompt"),
    ]
    for record, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_metadata(record, "file.jsonl:3")
    path = tmp_path / "meta.jsonl"
    lines = [{"tag": "single_object", "prompt": "a cat", "include": [{"class": "cat", "count": 1}]},
             {"tag": "single_object", "prompt": "a cat", "include": [{"class": "cat", "count": 2}]}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(ValueError, match=r"meta\.jsonl:2: prompt 'a cat' is listed earlier with other metadata"):
        read_metadata(path)
    path.write_text(json.dumps(lines[0]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"meta\.jsonl:3: not valid JSON"):
        read_metadata(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_metadata(tmp_path / "missing.jsonl")


def _random_case(rng: random.Random):
    """A GenEval-shaped prompt of a random task and random detections of its classes."""
    tag = rng.choice(["single_object", "two_object", "counting", "colors", "position", "color_attr"])
    count = rng.randint(2, 4) if tag == "counting" else 1
    include = [{"class": "cat", "count": count}]
    if tag in ("two_object", "position", "color_attr"):
        include.append({"class": "dog", "count": 1})
    if tag == "position":
        include[1]["position"] = [rng.choice(RELATIONS), 0]
    for entry in include if tag in ("colors", "color_attr") else ():
        entry["color"] = rng.choice(COLORS[:3])
    exclude = [{"class": "cat", "count": count + 1}] if tag == "counting" else []
    candidates = {cls: [_det(rng.uniform(0, 60), rng.uniform(0, 60), rng.uniform(4, 20), rng.uniform(0.2, 1.0),
                             rng.choice(COLORS[:3])) for _ in range(rng.randint(0, 5))] for cls in ("cat", "dog")}
    return _spec(tag, include, exclude), candidates


def test_scores_agree_on_random_cases():
    """strict implies GenEval's correct, strict holds exactly when partial is 1, partial never exceeds 1."""
    rng = random.Random(0)
    seen = set()
    for _ in range(2000):
        spec, candidates = _random_case(rng)
        result = _score(spec, candidates)
        assert not result.strict or result.correct
        assert result.strict == (result.partial == 1.0)
        assert result.partial <= 1.0
        assert result.correct == (not result.reasons)
        seen.add((spec.tag, result.correct, result.strict))
    assert len({tag for tag, _, _ in seen}) == 6 and len(seen) >= 15  # every task, passing and failing
