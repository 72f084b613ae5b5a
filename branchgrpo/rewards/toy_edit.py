"""The edit toy's offline reward: did the asked edit happen, and did everything else stay?

"toy_edit" reads each sample's source through the conditioning extension of the reward call (rewards/base.py), the
per-prompt `source_image` the edit preprocessing stores (as for the real edit backbones, rewards/edit.py), and
scores result against source in [0, 1] as the product of four terms:

    edit_done    attribute edit: the asked attribute moved the asked way, judged against the source: the change
                 sign * (m(result) - m(source)) over `full` (the 75th percentile of the change the exact edit makes,
                 toy/edit.py), capped at 1, and falling back to 0 between `over_start` and `over_end` (2x and 3x the
                 exact edit's 95th percentile): over-editing is not a better edit. `full` sits high on purpose: with
                 a lower cap (the 25th percentile, measured) a model that already edits most of the way scores 1 on
                 edit_done, so within a group only the keep terms differ, and they all favour editing less - GRPO
                 then drifted every edit toward "more ink" (thinner and narrower fell to 0 in 30 iterations).
                 class edit: p(asked digit | result) from the toy's digit classifier.
    class_kept   attribute edits: min(1, 2 p(source's class | result)) - the digit stays what it was; 1 for class edits
    style_kept   mean over the attributes the instruction does not ask about (all three for a class edit) of a
                 tolerance score: 1 while |m(result) - m(source)| is within what the exact edits change it by (95th
                 percentile, `tolerance`), falling to 0 at twice that
    pixels_kept  1 while the mean absolute pixel change is within the exact edits' 95th percentile (`l1_limit`),
                 falling to 0 at twice that: the guard against redrawing the whole image

Both known hacks score near 0: returning the source unchanged (no edit: edit_done = 0, or the wrong class) and
over-editing or destroying the digit (edit_done falls past over_end, the class and style terms and the pixel guard
fall). The thresholds are measured on the exact edits of real digits at pretraining (`fit_reward_config`) and
stored in `reward_edit.json` beside the edit toy's checkpoint.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from branchgrpo.core.files import read_json
from branchgrpo.rewards.base import LocalPath, register_reward
from branchgrpo.rewards._image import as_unit_images
from branchgrpo.rewards.edit import SOURCE_KEY
from branchgrpo.rewards.toy import DigitClassifier, to_digit_images
from branchgrpo.toy.data import ASSETS_DIR, ATTRIBUTE_AXES, measure_attributes
from branchgrpo.toy.edit import EDIT_ASSETS_DIR, Instruction, all_instructions, parse_instruction, \
    render_instruction

REWARD_CONFIG = "reward_edit.json"
CLASS_EDIT = "class edit"  # the key of the class edits' shared thresholds in reward_edit.json
AXES = tuple(ATTRIBUTE_AXES)
TOLERANCE_FLOOR = 0.25  # the smallest style tolerance, in standard deviations of the attribute over real digits


def _key(instruction: Instruction) -> str:
    return CLASS_EDIT if instruction.is_class_edit else render_instruction(instruction)


@lru_cache(maxsize=4096)
def _parse(text: str) -> Instruction:
    return parse_instruction(text)


def edit_changes(results: torch.Tensor, sources: torch.Tensor) -> dict[str, torch.Tensor]:
    """{axis: `[B]` m(result) - m(source)} for each measured attribute, and "l1": `[B]` mean |result - source|."""
    results, sources = to_digit_images(results), to_digit_images(sources)
    m_r, m_s = measure_attributes(results), measure_attributes(sources)
    return {**{axis: m_r[axis] - m_s[axis] for axis in AXES}, "l1": (results - sources).abs().mean(dim=(1, 2, 3))}


def fit_reward_config(changes: dict[str, dict[str, torch.Tensor]], spread: dict[str, float]) -> dict:
    """reward_edit.json's thresholds from the exact edits' changes (`edit_changes` per instruction key); a tolerance
    is at least TOLERANCE_FLOOR x the attribute's `spread` over real digits (a shear keeps the ink exactly, and a
    tolerance of 0 would leave no room at all)."""
    config = {}
    for key, change in changes.items():
        instruction = None if key == CLASS_EDIT else _parse(key)
        entry = {"l1_limit": torch.quantile(change["l1"], 0.95).item(), "tolerance": {}}
        for axis in AXES:
            if instruction is not None and axis == instruction.axis:
                moved = instruction.sign * change[axis]
                entry.update(full=torch.quantile(moved, 0.75).item(), over_start=2 * torch.quantile(moved, 0.95).item(),
                             over_end=3 * torch.quantile(moved, 0.95).item())
            else:
                entry["tolerance"][axis] = max(torch.quantile(change[axis].abs(), 0.95).item(),
                                               TOLERANCE_FLOOR * spread[axis])
        config[key] = entry
    return config


def _threshold_tables(instructions: list[Instruction], thresholds: dict) -> dict[str, torch.Tensor]:
    """Per-instruction tensors `[I]` (`[I, 3]` for the per-axis ones) of reward_edit.json's thresholds; entries that
    do not apply (the edited axis's tolerance, a class edit's attribute limits) hold 1 and are never read."""
    rows = []
    for instruction in instructions:
        entry = thresholds[_key(instruction)]
        rows.append({
            "is_class": instruction.is_class_edit, "digit": instruction.digit or 0,
            "axis": AXES.index(instruction.axis) if instruction.axis else 0, "sign": float(instruction.sign),
            "full": entry.get("full", 1.0), "over_start": entry.get("over_start", 1.0),
            "over_end": entry.get("over_end", 2.0), "l1_limit": entry["l1_limit"],
            "tolerance": [entry["tolerance"].get(axis, 1.0) for axis in AXES],
            "judged": [float(axis in entry["tolerance"]) for axis in AXES],
        })
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def _falloff(excess: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """1 up to `limit`, linearly down to 0 at twice it."""
    return 1.0 - ((excess - limit) / limit).clamp(0.0, 1.0)


class ToyEditReward:
    """Images `[B, C, H, W]` in [0, 1] + instructions + conditions[source_image] -> float32 `[B]` in [0, 1] (CPU)."""

    name = "toy_edit"
    reward_max = 1.0
    conditioning = (SOURCE_KEY,)  # the per-prompt tensor it reads (rewards/base.py)

    def __init__(self, folder: str | Path | None = None):
        folder = Path(folder) if folder is not None else EDIT_ASSETS_DIR
        thresholds = read_json(folder / REWARD_CONFIG)["thresholds"]
        self.instructions = all_instructions()
        missing = {_key(i) for i in self.instructions} - set(thresholds)
        if missing:
            raise ValueError(f"{folder / REWARD_CONFIG}: no thresholds for {sorted(missing)}")
        self.index = {i: n for n, i in enumerate(self.instructions)}
        self.tables = _threshold_tables(self.instructions, thresholds)
        self.classifier = DigitClassifier.from_folder(ASSETS_DIR)  # the toy's reward classifier (real digits)

    @torch.no_grad()
    def components(self, media: torch.Tensor, prompts: Sequence[str],
                   conditions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every term `[B]` (module docstring) and their product "toy_edit"."""
        if media.shape[0] != len(prompts):
            raise ValueError(f"reward 'toy_edit': {media.shape[0]} images but {len(prompts)} instructions")
        results = to_digit_images(media.detach().cpu())
        sources = self.sources(len(prompts), conditions)
        t = {k: v[torch.tensor([self.index[_parse(p)] for p in prompts])] for k, v in self.tables.items()}
        change = edit_changes(results, sources)
        change_BA = torch.stack([change[axis] for axis in AXES], dim=1)
        probs_BK = self.classifier.probs(results)
        moved_B = t["sign"] * change_BA.gather(1, t["axis"][:, None])[:, 0]
        over_B = ((moved_B - t["over_start"]) / (t["over_end"] - t["over_start"])).clamp(0.0, 1.0)
        asked_B = probs_BK.gather(1, t["digit"][:, None])[:, 0]
        kept_BA = _falloff(change_BA.abs(), t["tolerance"]) * t["judged"]
        source_class_B = self.classifier.predict(sources)
        terms = {
            "edit_done": torch.where(t["is_class"], asked_B, (moved_B / t["full"]).clamp(0.0, 1.0) * (1.0 - over_B)),
            "class_kept": torch.where(t["is_class"], torch.ones_like(asked_B),
                                      (2.0 * probs_BK.gather(1, source_class_B[:, None])[:, 0]).clamp(max=1.0)),
            "style_kept": kept_BA.sum(dim=1) / t["judged"].sum(dim=1),
            "pixels_kept": _falloff(change["l1"], t["l1_limit"]),
        }
        total = terms["edit_done"] * terms["class_kept"] * terms["style_kept"] * terms["pixels_kept"]
        return {"toy_edit": total.float(), **{k: v.float() for k, v in terms.items()}}

    def sources(self, batch: int, conditions: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Each sample's source digit `[B, 1, 8, 8]` in [0, 1] from conditions[source_image] (uint8 or float)."""
        source = (conditions or {}).get(SOURCE_KEY)
        if source is None or source.dim() != 4 or source.shape[0] != batch:
            got = "none" if source is None else tuple(source.shape)
            raise ValueError(f"reward '{self.name}': needs each image's conditions['{SOURCE_KEY}'] as [{batch}, C, H, "
                             f"W] (stored by `python -m branchgrpo.cli.preprocess --model toy_edit`), got {got}")
        return to_digit_images(as_unit_images(source.cpu()))

    def __call__(self, media: torch.Tensor, prompts: Sequence[str],
                 conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.components(media, prompts, conditions)["toy_edit"]


@register_reward("toy_edit")
def build_toy_edit_reward(device="cpu", model_dir: str = "hps_ckpt", path: LocalPath | None = None) -> ToyEditReward:
    """Edit done x class kept x style kept x pixels kept (runs on the CPU; `device` and `model_dir` are ignored: the
    thresholds ship with the edit toy, or come from `path`, a folder holding reward_edit.json)."""
    return ToyEditReward(path)
