"""The toy's world: real 8x8 handwritten digits, their measured attributes, and the grammar of its prompts.

Images are sklearn's `load_digits()` (1797 real scans, shipped inside scikit-learn, no download). They stay 8x8:
upsampling would cost 4x per forward on the 2-core CPUs the toy is meant for, and 8x8 is enough to measure what the
prompts ask for. Pixel values are in [0, 1]; latents are `2 x - 1`.

Prompts come from a tiny grammar, e.g. "a bold seven", "a thin wide slanted two", "an upright four": an optional
article, at most one word per attribute axis, exactly one digit word. Each axis is a measured attribute with two
poles (low word, high word):

    weight  ink amount (mean intensity)                                thin    <-> bold
    width   horizontal spread (sqrt of the second moment along x)      narrow  <-> wide
    slant   shear of the strokes (-mu11 / mu02, > 0 leans right)       upright <-> slanted

Shapes differ by digit (a one is narrow, a seven leans right), so poles are judged against the digit's own real
distribution (class-wise percentiles), in the pretraining labels and in the reward alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 8
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: axis -> (low-pole word, high-pole word); the order of the axes is the canonical word order of a prompt
ATTRIBUTE_AXES: dict[str, tuple[str, str]] = {
    "weight": ("thin", "bold"),
    "width": ("narrow", "wide"),
    "slant": ("upright", "slanted"),
}
ARTICLES = ("a", "an")
PAD_TOKEN = "<pad>"
#: every word the toy's tokenizer knows; index = token id (0 = padding)
VOCAB: tuple[str, ...] = (
    (PAD_TOKEN,) + ARTICLES + tuple(w for poles in ATTRIBUTE_AXES.values() for w in poles) + DIGIT_WORDS
)
_WORD_TO_POLE = {word: (axis, sign) for axis, poles in ATTRIBUTE_AXES.items() for sign, word in zip((-1, 1), poles)}

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TRAIN_PROMPTS_FILE = "prompts_train.txt"
EVAL_PROMPTS_FILE = "prompts_eval.txt"


def train_prompts_path() -> Path:
    """The shipped training prompt list (every grammar prompt except the held-out ones), one per line."""
    return ASSETS_DIR / TRAIN_PROMPTS_FILE


def eval_prompts_path() -> Path:
    """The shipped held-out prompt list: digit/attribute combinations never seen in pretraining or training."""
    return ASSETS_DIR / EVAL_PROMPTS_FILE


# ----------------------------------------------------------------------------------------------------------------
# Grammar
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: a digit and, per mentioned axis, a pole (-1 = low word, +1 = high word)."""

    digit: int
    poles: tuple[tuple[str, int], ...] = ()  # ((axis, sign), ...) in ATTRIBUTE_AXES order

    def pole(self, axis: str) -> int:
        """-1, +1, or 0 when the prompt says nothing about `axis`."""
        return dict(self.poles).get(axis, 0)


def prompt_words(text: str) -> list[str]:
    """Lower-cased words with surrounding punctuation removed (shared by the parser and the tokenizer)."""
    return [w for w in (raw.strip(".,;:!?\"'") for raw in text.lower().split()) if w]


def parse_prompt(text: str) -> PromptSpec:
    """Parse a toy prompt; raises ValueError naming the problem (unknown word, no digit, two digits, clashes)."""
    digit, poles = None, {}
    words = prompt_words(text)
    for word in words:
        if word in ARTICLES:
            continue
        if word in DIGIT_WORDS:
            if digit is not None:
                raise ValueError(f"toy prompt {text!r}: names two digits ('{DIGIT_WORDS[digit]}' and '{word}')")
            digit = DIGIT_WORDS.index(word)
        elif word in _WORD_TO_POLE:
            axis, sign = _WORD_TO_POLE[word]
            if axis in poles:
                raise ValueError(f"toy prompt {text!r}: says '{word}' and another {axis} word; use one per axis")
            poles[axis] = sign
        else:
            raise ValueError(unknown_word_message(text, word))
    if digit is None:
        raise ValueError(f"toy prompt {text!r}: names no digit (one of {', '.join(DIGIT_WORDS)})")
    return PromptSpec(digit, tuple((axis, poles[axis]) for axis in ATTRIBUTE_AXES if axis in poles))


def unknown_word_message(text: str, word: str, vocab: tuple[str, ...] = VOCAB) -> str:
    allowed = ", ".join(w for w in vocab if w != PAD_TOKEN)
    return f"toy prompt {text!r}: unknown word '{word}'; the toy's vocabulary is: {allowed}"


def render_prompt(spec: PromptSpec) -> str:
    """Canonical text: article (a/an by sound), attribute words in axis order, digit word."""
    words = [ATTRIBUTE_AXES[axis][0 if sign < 0 else 1] for axis, sign in spec.poles] + [DIGIT_WORDS[spec.digit]]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def all_prompt_specs() -> list[PromptSpec]:
    """Every prompt of the grammar: 10 digits x 3 choices (low, none, high) per axis = 270."""
    specs = []
    for digit in range(10):
        for code in range(3 ** len(ATTRIBUTE_AXES)):
            poles = []
            for axis in ATTRIBUTE_AXES:
                code, choice = divmod(code, 3)
                if choice:
                    poles.append((axis, -1 if choice == 1 else 1))
            specs.append(PromptSpec(digit, tuple(poles)))
    return specs


def is_held_out(spec: PromptSpec) -> bool:
    """Held out: two of the 8 fully specified (weight, width, slant) combinations per digit, different per digit,
    so evaluation asks for combinations the model has only seen in parts."""
    if len(spec.poles) != len(ATTRIBUTE_AXES):
        return False
    combo = sum((1 if sign > 0 else 0) << i for i, (_, sign) in enumerate(spec.poles))  # 0..7
    return combo in (spec.digit % 8, (spec.digit + 3) % 8)


def train_prompts() -> list[str]:
    return [render_prompt(s) for s in all_prompt_specs() if not is_held_out(s)]


def eval_prompts() -> list[str]:
    return [render_prompt(s) for s in all_prompt_specs() if is_held_out(s)]


def read_prompts(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Real digits and their attributes
# ----------------------------------------------------------------------------------------------------------------


def load_real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 real digits: images `[N, 1, 8, 8]` float32 in [0, 1] and labels `[N]` int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_N1HW = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return images_N1HW, torch.from_numpy(digits.target.astype(np.int64))


def holdout_split(num: int, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (seeded) split of `num` indices into (train, held-out); the classifier's accuracy is reported on
    the held-out part, and tests recompute it from the same split."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_held_out = int(round(num * fraction))
    return order[num_held_out:].sort().values, order[:num_held_out].sort().values


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    return images * 2.0 - 1.0


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    return ((latents.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def measure_attributes(images_B1HW: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image measurements `[B]` (float32) for every axis, from intensity moments of the image in [0, 1]."""
    img_BHW = images_B1HW.float().clamp(0.0, 1.0)[:, 0]
    height, width = img_BHW.shape[-2:]
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    mass_B = img_BHW.sum(dim=(1, 2)).clamp_min(1e-6)  # an empty image gets moments 0, not NaN

    def moment(f):
        return (img_BHW * f).sum(dim=(1, 2)) / mass_B

    cx_B, cy_B = moment(xs), moment(ys)
    dx = xs - cx_B.view(-1, 1, 1)
    dy = ys - cy_B.view(-1, 1, 1)
    mu20_B, mu02_B, mu11_B = moment(dx * dx), moment(dy * dy), moment(dx * dy)
    # Rows grow downward, so a stroke leaning right has x falling as y grows: mu11 < 0 -> slant > 0.
    return {
        "weight": img_BHW.mean(dim=(1, 2)),
        "width": mu20_B.sqrt(),
        "slant": -mu11_B / mu02_B.clamp_min(1e-6),
    }


def class_percentiles(images_N1HW: torch.Tensor, labels_N: torch.Tensor, qs: tuple[float, ...]) -> dict:
    """{axis: [num_classes][len(qs)]} percentiles of each measured attribute within each digit class."""
    measured = measure_attributes(images_N1HW)
    q = torch.tensor(qs, dtype=torch.float64) / 100.0
    return {
        axis: [torch.quantile(values[labels_N == c].double(), q).tolist() for c in range(10)]
        for axis, values in measured.items()
    }
