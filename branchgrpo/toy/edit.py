"""The edit toy's world: instructions that change a real 8x8 digit, and the exact edits they ask for.

Instructions come from a tiny grammar: an attribute edit moves one measured attribute (data.measure_attributes) of
the source one step toward a pole, a class edit redraws the source as another digit:

    make it bolder | thinner     weight: more ink (a soft dilation) | less ink (faint pixels fade, cores stay)
    make it wider | narrower     width: horizontal stretch about the centre of mass, x 4/3 | x 3/4
    make it slanted | upright    slant: shear, the top moving right | left by SHEAR pixels per row
    turn it into a seven         class: the real digit of the asked class nearest in style (weight, width, slant)

Attribute edits are deterministic transforms of the source (`attribute_edit`), so their target is known exactly;
class edits pair the source with a real digit (`nearest_in_style`). Both serve as pretraining pairs
(runtime/pretrain_toy_edit.py) and as the reward's reference of how far an edit should go (rewards/toy_edit.py).

Sources are stored as uint8 pixels (the edit backbones' `source_image`), so every source here is quantised to
multiples of 1/255 first (`quantise`): pretraining sees exactly the pixels that a PNG source gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from branchgrpo.toy.data import ARTICLES, ATTRIBUTE_AXES, DIGIT_WORDS, IMAGE_SIZE, PAD_TOKEN, measure_attributes, \
    prompt_words

EDIT_ASSETS_DIR = Path(__file__).resolve().parent / "edit_assets"
TRAIN_EDITS_FILE, EVAL_EDITS_FILE = "edits_train.jsonl", "edits_eval.jsonl"
SOURCES_DIR = "sources"  # the source PNGs the JSONL lines name, beside them
#: (axis, sign) -> the instruction word ("make it <word>")
EDIT_WORDS: dict[tuple[str, int], str] = {
    ("weight", 1): "bolder", ("weight", -1): "thinner",
    ("width", 1): "wider", ("width", -1): "narrower",
    ("slant", 1): "slanted", ("slant", -1): "upright",
}
EDIT_VOCAB: tuple[str, ...] = (PAD_TOKEN, "make", "it", "turn", "into") + ARTICLES + tuple(EDIT_WORDS.values()) \
    + DIGIT_WORDS
_WORD_TO_EDIT = {word: pole for pole, word in EDIT_WORDS.items()}
WIDTH_FACTOR = 4.0 / 3.0  # "wider" stretches x by this about the centre of mass, "narrower" by its inverse
SHEAR = 0.25  # pixels of horizontal shift per row of height ("slanted": the top moves right)
BOLD_GAIN = 0.6  # "bolder": each pixel rises to this fraction of its brightest 4-neighbour where that is brighter
THIN_POWER = 2.0  # "thinner": pixels are raised to this power (faint edges fade, stroke cores stay)
assert set(ATTRIBUTE_AXES) == {axis for axis, _ in EDIT_WORDS}


@dataclass(frozen=True)
class Instruction:
    """What an instruction asks: an attribute edit (`axis`, `sign`) or a class edit (`digit`)."""

    axis: str | None = None
    sign: int = 0
    digit: int | None = None

    @property
    def is_class_edit(self) -> bool:
        return self.digit is not None


def render_instruction(instruction: Instruction) -> str:
    if instruction.is_class_edit:
        word = DIGIT_WORDS[instruction.digit]
        return f"turn it into {'an' if word[0] in 'aeiou' else 'a'} {word}"
    return f"make it {EDIT_WORDS[(instruction.axis, instruction.sign)]}"


def all_instructions() -> list[Instruction]:
    """The 6 attribute edits, then the 10 class edits."""
    return [Instruction(axis, sign) for axis, sign in EDIT_WORDS] + [Instruction(digit=d) for d in range(10)]


def parse_instruction(text: str) -> Instruction:
    """Parse "make it <word>" or "turn it into a/an <digit>"; ValueError naming what is wrong."""
    words = prompt_words(text)
    if len(words) == 3 and words[:2] == ["make", "it"] and words[2] in _WORD_TO_EDIT:
        return Instruction(*_WORD_TO_EDIT[words[2]])
    if len(words) == 5 and words[:3] == ["turn", "it", "into"] and words[3] in ARTICLES and words[4] in DIGIT_WORDS:
        return Instruction(digit=DIGIT_WORDS.index(words[4]))
    raise ValueError(f"toy edit instruction {text!r}: expected 'make it <{'|'.join(EDIT_WORDS.values())}>' or "
                     f"'turn it into a <digit word>'")


# ----------------------------------------------------------------------------------------------------------------
# Exact edits
# ----------------------------------------------------------------------------------------------------------------


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] rounded to multiples of 1/255: what a uint8 source holds."""
    return (images.clamp(0.0, 1.0) * 255.0).round() / 255.0


def _resample(images_B1HW: torch.Tensor, source_x_BHW: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of each image at column positions `source_x` (same rows), zero outside the image."""
    size = images_B1HW.shape[-1]
    ys = torch.arange(size, dtype=torch.float32).view(1, size, 1).expand_as(source_x_BHW)
    grid = torch.stack([source_x_BHW, ys], dim=-1) * (2.0 / (size - 1)) - 1.0  # pixel centres -> [-1, 1]
    return F.grid_sample(images_B1HW.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def attribute_edit(images_B1HW: torch.Tensor, axis: str, sign: int) -> torch.Tensor:
    """The exact target of "make it <EDIT_WORDS[(axis, sign)]>" for images `[B, 1, 8, 8]` in [0, 1]."""
    x = images_B1HW.float()
    if axis == "weight" and sign > 0:
        padded = F.pad(x, (1, 1, 1, 1))
        neighbours = torch.stack([padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2],
                                  padded[..., 1:-1, 2:]]).amax(dim=0)
        return torch.maximum(x, BOLD_GAIN * neighbours)
    if axis == "weight":
        return x ** THIN_POWER
    xs = torch.arange(IMAGE_SIZE, dtype=torch.float32).view(1, 1, IMAGE_SIZE)
    ys = torch.arange(IMAGE_SIZE, dtype=torch.float32).view(1, IMAGE_SIZE, 1)
    mass = x[:, 0].sum(dim=(1, 2)).clamp_min(1e-6)
    cx = ((x[:, 0] * xs).sum(dim=(1, 2)) / mass).view(-1, 1, 1)
    cy = ((x[:, 0] * ys).sum(dim=(1, 2)) / mass).view(-1, 1, 1)
    if axis == "width":
        factor = WIDTH_FACTOR if sign > 0 else 1.0 / WIDTH_FACTOR
        return _resample(x, (cx + (xs - cx) / factor).expand(-1, IMAGE_SIZE, IMAGE_SIZE))
    if axis == "slant":  # the pixel at (x, y) comes from x + shear * (y - cy): rows above the centre move right
        return _resample(x, xs + sign * SHEAR * (ys - cy))
    raise ValueError(f"toy edit: unknown axis '{axis}'; expected one of {', '.join(ATTRIBUTE_AXES)}")


def style_vectors(images_N1HW: torch.Tensor) -> torch.Tensor:
    """`[N, 3]` measured (weight, width, slant), each divided by its spread over `images`: a style distance."""
    measured = torch.stack(list(measure_attributes(images_N1HW).values()), dim=1)
    return measured / measured.std(dim=0, keepdim=True)


def nearest_in_style(source_N1HW: torch.Tensor, pool_M1HW: torch.Tensor, pool_labels_M: torch.Tensor,
                     digit_N: torch.Tensor) -> torch.Tensor:
    """For each source, the index into the pool of the digit of class `digit_N[n]` nearest in style."""
    both = style_vectors(torch.cat([source_N1HW, pool_M1HW]))
    dist_NM = torch.cdist(both[: len(source_N1HW)], both[len(source_N1HW):])
    dist_NM = torch.where(pool_labels_M[None] == digit_N[:, None], dist_NM, torch.full_like(dist_NM, float("inf")))
    return dist_NM.argmin(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Shipped edit prompts
# ----------------------------------------------------------------------------------------------------------------


def train_edits_path() -> Path:
    return EDIT_ASSETS_DIR / TRAIN_EDITS_FILE


def eval_edits_path() -> Path:
    return EDIT_ASSETS_DIR / EVAL_EDITS_FILE


def write_edit_prompts(path: Path, lines: list[tuple[str, int]]) -> None:
    """JSONL prompt lines {"prompt": instruction, "image": "sources/<digit index>.png"} (the edit backbones' format)."""
    path.write_text("".join(json.dumps({"prompt": text, "image": f"{SOURCES_DIR}/{index:04d}.png"}) + "\n"
                            for text, index in lines))


def write_source_png(images_1HW: torch.Tensor, path: Path) -> None:
    """An 8x8 greyscale PNG of a source in [0, 1] (quantised as `quantise` does)."""
    from PIL import Image

    pixels = (quantise(images_1HW[0]) * 255.0).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)
