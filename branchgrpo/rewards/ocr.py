"""OCR reward (text rendering), as Flow-GRPO defines it, on RapidOCR's PP-OCR ONNX models.

The prompt names the text to render between double quotes: the target is the first double-quoted span
(`a sign that says "Open Late"` -> `Open Late`). The image is read by OCR; the recognised lines are joined, and in
both strings spaces are removed and letters lower-cased. Score: 1 if the target occurs in the recognised text,
else 1 - min(d, n) / n, where d is the Levenshtein distance between recognised text and target and n the target's
length (so in [0, 1]; `reward_max` 1).

Engine: the `rapidocr` package (3.x) with onnxruntime. Its wheel ships PP-OCR detection, recognition and
orientation-classifier ONNX models, so nothing is downloaded and nothing is needed under --reward_model_dir; the
options `det_model_path` / `rec_model_path` / `cls_model_path` point at other local ONNX files. Flow-GRPO uses
PaddleOCR with the angle classifier off and drops lines below 0.5 confidence: `use_cls` defaults to False and
`text_score` to 0.5 here. On a CUDA device the models run on onnxruntime's CUDA provider when the installed
onnxruntime has it (the `onnxruntime-gpu` build); otherwise on the CPU, with a warning at start-up.

Images the OCR cannot read (no text found, a non-finite pixel, an engine error) score 0 and are counted
(`num_unreadable`, `num_failed`), with one warning line per call that has any; scoring never raises for them.
A prompt without a quoted target is an input error (ValueError naming the prompt), checked before any image is read.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from branchgrpo.rewards._pixels import to_uint8_images
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, LocalPath, register_reward

log = logging.getLogger(__name__)

# option -> the RapidOCR config section of that model
MODEL_OPTIONS = {"det_model_path": "Det", "rec_model_path": "Rec", "cls_model_path": "Cls"}


def quoted_target(prompt: str) -> str | None:
    """The text between the first two double quotes of `prompt`, or None when there is no such non-blank span."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        return None
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions; each costs 1) between `a` and `b`, by the classic
    dynamic programme over prefixes, two rows at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_similarity(recognised: str, target: str) -> float:
    """The OCR reward of recognised text against the prompt's target (module docstring): in [0, 1]."""
    text = recognised.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        raise ValueError("ocr_similarity: empty target")
    if target in text:
        return 1.0
    return 1.0 - min(levenshtein(text, target), len(target)) / len(target)


def check_ocr_prompts(prompts: Sequence[str], source: str | None = None) -> list[str]:
    """The target of every prompt, or a ValueError naming the first prompt without one (and `source`:line, when the
    prompts are the lines of the file `source`)."""
    targets = []
    for line, prompt in enumerate(prompts, start=1):
        target = quoted_target(prompt)
        if target is None:
            where = f"{source}:{line}: " if source else ""
            raise ValueError(f'reward \'ocr\': {where}prompt {prompt!r} has no text in double quotes (expected e.g. '
                             'a sign that says "Open"); the OCR reward scores the first quoted span')
        targets.append(target)
    return targets


class OcrReward:
    """RapidOCR + the OCR similarity, per image of a batch (PP-OCR detects each image's text lines and recognises
    them in batches)."""

    name = "ocr"
    reward_max = 1.0

    def __init__(self, engine, use_cls: bool):
        self.engine, self.use_cls = engine, use_cls
        self.num_unreadable = 0  # images with no text found, since construction
        self.num_failed = 0  # images the OCR could not process (non-finite pixels, engine errors)

    check_prompts = staticmethod(check_ocr_prompts)

    def read_text(self, image_HWC: np.ndarray) -> str:
        """The recognised lines of one RGB uint8 image, joined ('' when none is found). RapidOCR takes arrays in
        OpenCV's BGR order; every step is named on each call, as RapidOCR keeps the last call's flags."""
        result = self.engine(np.ascontiguousarray(image_HWC[..., ::-1]), use_det=True, use_cls=self.use_cls,
                             use_rec=True)
        return "".join(result.txts or ())

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images, finite = to_uint8_images(media, self.name)
        if len(prompts) != len(images):
            raise ValueError(f"reward 'ocr': {len(images)} images but {len(prompts)} prompts")
        targets = self.check_prompts(prompts)
        scores, unreadable, failures = [], 0, []
        for image, finite_image, target in zip(images, finite, targets):
            text, failure = self._read_safely(image, finite_image)
            if failure is not None:
                failures.append(failure)
            elif not text.strip():
                unreadable += 1
            scores.append(ocr_similarity(text, target))  # 0 for no text
        self._count(len(images), unreadable, failures)
        return torch.tensor(scores, dtype=torch.float32)

    def _read_safely(self, image_HWC: np.ndarray, finite_image: bool) -> tuple[str, str | None]:
        """(text, None), or ('', why) for an image the OCR cannot process."""
        if not finite_image:
            return "", "non-finite pixels"
        try:
            return self.read_text(image_HWC), None
        except Exception as err:  # one unreadable image must not stop a training run
            return "", f"{type(err).__name__}: {err}".splitlines()[0]

    def _count(self, num_images: int, unreadable: int, failures: list[str]) -> None:
        self.num_unreadable += unreadable
        self.num_failed += len(failures)
        if unreadable or failures:
            first = f"; first failure: {failures[0]}" if failures else ""
            log.warning(f"reward 'ocr': {unreadable + len(failures)} of {num_images} images unreadable, scored 0 "
                        f"({unreadable} without text, {len(failures)} failed{first}; so far {self.num_unreadable} "
                        f"without text, {self.num_failed} failed)")


def _engine_params(device: torch.device, use_cls: bool, text_score: float, num_threads: int,
                   paths: dict[str, str | None]) -> dict:
    """RapidOCR's dotted config keys for these options; CUDA only where onnxruntime has the provider."""
    import onnxruntime

    params = {"Global.log_level": "error", "Global.use_cls": use_cls, "Global.text_score": float(text_score),
              # PaddleOCR's detector defaults, which Flow-GRPO ran with: shrink images whose longer side exceeds 960
              # (RapidOCR's own default enlarges every image to a shorter side of 736)
              "Det.limit_type": "max", "Det.limit_side_len": 960}
    if num_threads > 0:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = num_threads
    if device.type == "cuda":
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            params["EngineConfig.onnxruntime.use_cuda"] = True
            params["EngineConfig.onnxruntime.cuda_ep_cfg.device_id"] = device.index or 0
        else:
            log.warning("reward 'ocr': the installed onnxruntime has no CUDA provider (that is the onnxruntime-gpu "
                        "build); OCR runs on the CPU")
    for option, section in MODEL_OPTIONS.items():
        path = paths[option]
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"reward 'ocr': {option} {path} does not exist (an ONNX model file expected)")
            params[f"{section}.model_path"] = path
    return params


@register_reward("ocr")
def build_ocr(
    device: torch.device | str = "cpu",
    model_dir: str = DEFAULT_MODEL_DIR,
    use_cls: bool = False,
    text_score: float = 0.5,
    num_threads: int = 0,
    det_model_path: LocalPath | None = None,
    rec_model_path: LocalPath | None = None,
    cls_model_path: LocalPath | None = None,
) -> OcrReward:
    """The OCR reward (module docstring). `use_cls`: run the text-orientation classifier; `text_score`: drop lines
    recognised with lower confidence; `num_threads`: onnxruntime's intra-op threads (0: its default);
    `*_model_path`: local ONNX files instead of the ones rapidocr ships. `model_dir` is not read (nothing to load
    from it)."""
    del model_dir  # the models ship in the rapidocr wheel
    if not 0.0 <= float(text_score) < 1.0:
        raise ValueError(f"reward 'ocr': text_score must be in [0, 1), got {text_score}")
    if int(num_threads) < 0:
        raise ValueError(f"reward 'ocr': num_threads must be >= 0 (0: onnxruntime's default), got {num_threads}")
    try:
        from rapidocr import RapidOCR
    except ImportError as err:
        raise ImportError(f"reward 'ocr' needs the rapidocr and onnxruntime packages (pip install -r "
                          f"requirements-rewards.txt): {err}") from None
    params = _engine_params(torch.device(device), bool(use_cls), text_score, int(num_threads),
                            {"det_model_path": det_model_path, "rec_model_path": rec_model_path,
                             "cls_model_path": cls_model_path})
    engine = RapidOCR(params=params)
    # RapidOCR loads each model on first use: load them now, so that a bad model file fails at start-up
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    try:
        engine(blank, use_det=True, use_cls=False, use_rec=False)
        engine(blank, use_det=False, use_cls=bool(use_cls), use_rec=True)
    except Exception as err:
        raise ValueError(f"reward 'ocr': cannot load the OCR models ({type(err).__name__}: {err})") from None
    return OcrReward(engine, bool(use_cls))
