"""GenEval's rules (Ghosh et al. 2023) as pure functions of detections: metadata, thresholds, positions, scores.

No model here: `geneval.py` turns images into `Detection`s (a Mask2Former instance segmenter, CLIP for colours) and
these functions decide. The facts follow GenEval's public evaluator (`evaluation/evaluate_images.py`) and, for the
training scores, Flow-GRPO's GenEval reward server:

- Metadata: one JSON object per line (GenEval's `evaluation_metadata.jsonl`) with `tag` (one of TASKS), `prompt`,
  `include` (a list of {class, count, optional color, optional position: [relation, index of an earlier include
  entry]}) and optional `exclude` ({class, count}: fewer than `count` must be found).
- Detections per class: confidence > 0.3 (> 0.9 for the counting task), at most 16 per class, most confident first,
  no non-maximum suppression (GenEval's default overlap 1.0 keeps every instance).
- Position of A relative to B: the offset of the box centres, each axis shrunk towards 0 by 0.1 x (size of A + size
  of B) along it (not past 0); no relation if both shrunk components are below 1e-3; otherwise each shrunk
  component divided by the length of the unshrunk offset gives a direction, and a component beyond 0.5 (strictly)
  names the relation: x < -0.5 "left of", x > 0.5 "right of", y < -0.5 "above", y > 0.5 "below" (image y grows down).
- `correct` (GenEval's binary score): every include entry's `count` most confident detections exist, have the
  colour (when asked) and stand in the relation to every object of the entry they refer to (when asked, and only if
  that entry matched); no exclude entry reaches its count.
- `strict`: the same with exact counts, all detections of each class counted (Flow-GRPO's `strict_correct`); exclude
  entries are checked too (GenEval's counting prompts exclude count + 1, which an exact count implies).
- `partial` (what Flow-GRPO trains on): the mean of one term per include entry's count, 1 - |count - found| / count
  (negative when far more are found than asked), plus one term per colour (1 - |count - of that colour| / count)
  and per position (1 if every pair stands in the relation, else 0) it asks for, each 0 when the count is not exact
  or an earlier requirement of the entry failed. Flow-GRPO's server appends an extra 1 after a failed position check
  (a failed position there averages 0 and 1); here it counts 0 once. Exclude entries do not enter `partial`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1


@dataclass(frozen=True)
class Requirement:
    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None  # (relation, index of the include entry it is relative to)


@dataclass(frozen=True)
class GenEvalPrompt:
    tag: str
    prompt: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = ()

    @property
    def classes(self) -> set[str]:
        return {req.cls for req in self.include + self.exclude}


@dataclass(frozen=True)
class Detection:
    """One detected instance: box (x0, y0, x1, y1) in pixels, confidence, and its colour once classified. `mask`
    (the model's binary mask, for colour classification) plays no part in the rules."""

    box: tuple[float, float, float, float]
    score: float
    color: str | None = None
    mask: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenEvalScore:
    correct: bool
    strict: bool
    partial: float
    reasons: tuple[str, ...] = ()


def _requirement(entry: Any, index: int, where: str, kind: str) -> Requirement:
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not entry["class"]:
        raise ValueError(f"{where}: {kind}[{index}] must be an object with a class name, got {entry!r}")
    count = entry.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}: {kind}[{index}] count must be an integer >= 1, got {count!r}")
    color, position = entry.get("color"), entry.get("position")
    if color is not None and (kind == "exclude" or color not in COLORS):
        raise ValueError(f"{where}: {kind}[{index}] color must be one of {', '.join(COLORS)}, got {color!r}")
    if position is not None:
        valid = (kind == "include" and isinstance(position, (list, tuple)) and len(position) == 2
                 and position[0] in RELATIONS and isinstance(position[1], int) and 0 <= position[1] < index)
        if not valid:
            raise ValueError(f"{where}: include[{index}] position must be [relation, index of an earlier include "
                             f"entry] with relation one of {', '.join(RELATIONS)}, got {position!r}")
        position = (position[0], position[1])
    return Requirement(entry["class"], count, color, position)


def parse_metadata(record: Any, where: str) -> GenEvalPrompt:
    """One GenEval metadata record, validated; `where` (e.g. 'file.jsonl:12') starts every error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("tag") not in TASKS:
        raise ValueError(f"{where}: tag must be one of {', '.join(TASKS)}, got {record.get('tag')!r}")
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise ValueError(f"{where}: missing prompt")
    include, exclude = record.get("include"), record.get("exclude", [])
    if not isinstance(include, list) or not include or not isinstance(exclude, list):
        raise ValueError(f"{where}: include must be a non-empty list and exclude a list")
    return GenEvalPrompt(record["tag"], record["prompt"],
                         tuple(_requirement(e, i, where, "include") for i, e in enumerate(include)),
                         tuple(_requirement(e, i, where, "exclude") for i, e in enumerate(exclude)))


def parse_metadata_lines(text: str, where: str) -> list[tuple[str, GenEvalPrompt]]:
    """Every record of a metadata JSONL's `text` in order, with its `where:line` (blank lines skipped)."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}:{number}: not valid JSON ({err})") from None
        out.append((f"{where}:{number}", parse_metadata(record, f"{where}:{number}")))
    return out


def read_metadata(path: str | Path) -> dict[str, GenEvalPrompt]:
    """GenEval's metadata JSONL -> {prompt: its metadata}; a prompt listed twice with different metadata is refused
    (the reward finds an image's metadata by its prompt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward 'geneval': metadata file {path} does not exist (GenEval's "
                                "prompts/evaluation_metadata.jsonl, one JSON object per line)")
    out: dict[str, GenEvalPrompt] = {}
    for where, spec in parse_metadata_lines(path.read_text(), f"reward 'geneval': {path}"):
        if out.get(spec.prompt, spec) != spec:
            raise ValueError(f"{where}: prompt {spec.prompt!r} is listed earlier with other metadata")
        out[spec.prompt] = spec
    if not out:
        raise ValueError(f"reward 'geneval': metadata file {path} holds no record")
    return out


def select_detections(candidates: dict[str, list[Detection]], tag: str) -> dict[str, list[Detection]]:
    """GenEval's kept detections: confidence strictly above the task's threshold, most confident first, at most
    MAX_OBJECTS per class; classes with none are left out."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for cls, found in candidates.items():
        above = sorted((d for d in found if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        if above:
            kept[cls] = above
    return kept


def relative_position(box_a, box_b, margin: float = POSITION_MARGIN) -> set[str]:
    """The relations of box A to box B (module docstring), from (x0, y0, x1, y1) boxes."""
    offset, shrunk = [], []
    for axis in (0, 1):
        centre_a = (box_a[axis] + box_a[axis + 2]) / 2
        centre_b = (box_b[axis] + box_b[axis + 2]) / 2
        size_a, size_b = abs(box_a[axis + 2] - box_a[axis]), abs(box_b[axis + 2] - box_b[axis])
        delta = centre_a - centre_b
        offset.append(delta)
        shrunk.append(max(abs(delta) - margin * (size_a + size_b), 0.0) * ((delta > 0) - (delta < 0)))
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    norm = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


def _num_with_color(found: list[Detection], color: str) -> int:
    if any(d.color is None for d in found):
        raise ValueError("geneval: a detection whose colour is asked for was not classified")
    return sum(d.color == color for d in found)


def _all_related(found: list[Detection], targets: list[Detection], relation: str) -> bool:
    return all(relation in relative_position(a.box, b.box) for a in found for b in targets)


def geneval_correct(spec: GenEvalPrompt, detections: dict[str, list[Detection]]) -> tuple[bool, list[str]]:
    """GenEval's binary score and its reasons for a failure (module docstring)."""
    correct, reasons, groups = True, [], []
    for req in spec.include:
        found = detections.get(req.cls, [])[: req.count]
        matched = len(found) == req.count
        if not matched:
            reasons.append(f"expected {req.cls}>={req.count}, found {len(found)}")
        if matched and req.color is not None and _num_with_color(found, req.color) < req.count:
            matched = False
            reasons.append(f"expected {req.color} {req.cls}>={req.count}, found "
                           f"{_num_with_color(found, req.color)} {req.color}")
        if matched and req.position is not None:
            relation, target = req.position
            if groups[target] is None:
                matched = False
                reasons.append(f"no {spec.include[target].cls} for {req.cls} to be {relation}")
            elif not _all_related(found, groups[target], relation):
                matched = False
                reasons.append(f"expected {req.cls} {relation} {spec.include[target].cls}")
        correct &= matched
        groups.append(found if matched else None)
    for req in spec.exclude:
        if len(detections.get(req.cls, [])) >= req.count:
            correct = False
            reasons.append(f"expected {req.cls}<{req.count}, found {len(detections[req.cls])}")
    return correct, reasons


def geneval_exact(spec: GenEvalPrompt, detections: dict[str, list[Detection]]) -> tuple[bool, float]:
    """(strict, partial): exact-count correctness and the partial score (module docstring)."""
    strict, terms, groups = True, [], []
    for req in spec.include:
        found = detections.get(req.cls, [])
        terms.append(1.0 - abs(req.count - len(found)) / req.count)
        matched = len(found) == req.count
        if req.color is not None:
            num_colored = _num_with_color(found, req.color) if matched else 0
            terms.append(1.0 - abs(req.count - num_colored) / req.count if matched else 0.0)
            matched = matched and num_colored == req.count
        if req.position is not None:
            relation, target = req.position
            matched = matched and groups[target] is not None and _all_related(found, groups[target], relation)
            terms.append(float(matched))
        strict &= matched
        groups.append(found if matched else None)
    strict &= all(len(detections.get(req.cls, [])) < req.count for req in spec.exclude)
    return strict, sum(terms) / len(terms)


def score_geneval(spec: GenEvalPrompt, detections: dict[str, list[Detection]]) -> GenEvalScore:
    """All three scores of one image from its kept detections (`select_detections`), colours classified for the
    `count` most confident detections of every include entry that asks for a colour (`needs_color`)."""
    correct, reasons = geneval_correct(spec, detections)
    strict, partial = geneval_exact(spec, detections)
    return GenEvalScore(correct, strict, partial, tuple(reasons))


def needs_color(spec: GenEvalPrompt, detections: dict[str, list[Detection]]) -> dict[str, int]:
    """{class: how many of its most confident detections need a colour}: the include entries asking for one whose
    class has at least `count` detections (the rules read no other colour)."""
    out: dict[str, int] = {}
    for req in spec.include:
        if req.color is not None and len(detections.get(req.cls, [])) >= req.count:
            out[req.cls] = max(out.get(req.cls, 0), req.count)
    return out
