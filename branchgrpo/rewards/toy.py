"""Real, offline rewards for the toy digits: is it the prompted digit, and does it have the prompted style?

    toy_digit  p(prompted digit | image) from a logistic-regression classifier trained on real digits
    toy_style  mean, over the attribute axes the prompt mentions, of a ramp score in [0, 1] of the measured
               attribute against the prompted digit's real distribution (1 when the prompt mentions none)
    toy        toy_digit * toy_style, in [0, 1] (reward_max = 1.0)

A ramp is continuous, not a threshold, so that samples of one prompt get different rewards (GRPO learns from those
differences): for a high-pole word (bold, wide, slanted) the score rises linearly from 0 at the class's median to 1
at its 95th percentile; for a low-pole word (thin, narrow, upright) from 0 at the median to 1 at the 5th
percentile (the percentiles are set at pretraining and stored in `reward.json`). A pretrained model that follows the
prompt produces typical members of the prompted tertile and scores around half the maximum; the rest is headroom
that alignment can win by producing clearer, more pronounced digits. The product keeps style from being bought
with illegible blobs: a bold smear that the classifier does not read as the digit scores near zero.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from branchgrpo.core.files import read_json
from branchgrpo.rewards.base import LocalPath, register_reward
from branchgrpo.toy.data import ASSETS_DIR, ATTRIBUTE_AXES, IMAGE_SIZE, PromptSpec, measure_attributes, parse_prompt

REWARD_CONFIG = "reward.json"
CLASSIFIER_WEIGHTS = "reward_classifier.safetensors"


def to_digit_images(media: torch.Tensor) -> torch.Tensor:
    """Images `[B, C, H, W]` in [0, 1] -> `[B, 1, 8, 8]` (channel mean, area resize), what the scorers read."""
    if media.dim() != 4:
        raise ValueError(f"toy reward: expected images [B, C, H, W], got shape {tuple(media.shape)}")
    images = media.float().mean(dim=1, keepdim=True)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.adaptive_avg_pool2d(images, IMAGE_SIZE)
    return images.clamp(0.0, 1.0)


@lru_cache(maxsize=4096)
def _parse(prompt: str) -> PromptSpec:
    return parse_prompt(prompt)


class DigitClassifier:
    """Multinomial logistic regression on the 64 pixels in [0, 1]: logits = x W^T + b."""

    def __init__(self, weight_KP: torch.Tensor, bias_K: torch.Tensor):
        self.weight_KP = weight_KP.float()
        self.bias_K = bias_K.float()

    @classmethod
    def from_folder(cls, folder: str | Path = ASSETS_DIR) -> "DigitClassifier":
        tensors = load_file(str(Path(folder) / CLASSIFIER_WEIGHTS))
        return cls(tensors["weight"], tensors["bias"])

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 10]` class probabilities."""
        x_BP = to_digit_images(images).flatten(1)
        return torch.softmax(x_BP @ self.weight_KP.T + self.bias_K, dim=1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.probs(images).argmax(dim=1)


class AttributeRamps:
    """Ramp scores of the measured attributes, per digit class (see the module docstring)."""

    def __init__(self, ramps: dict[str, dict[str, list[float]]]):
        # axis -> [10] tensors: where the ramp starts (score 0) and where each pole's ramp reaches 1
        self.start = {axis: torch.tensor(ramps[axis]["start"]) for axis in ATTRIBUTE_AXES}
        self.low_end = {axis: torch.tensor(ramps[axis]["low_end"]) for axis in ATTRIBUTE_AXES}
        self.high_end = {axis: torch.tensor(ramps[axis]["high_end"]) for axis in ATTRIBUTE_AXES}

    def axis_scores(self, images: torch.Tensor, specs: Sequence[PromptSpec]) -> dict[str, torch.Tensor]:
        """{axis: `[B]` score of the pole the prompt asks for, NaN where the prompt does not mention the axis}."""
        measured = measure_attributes(to_digit_images(images))
        digit_B = torch.tensor([s.digit for s in specs])
        out = {}
        for axis, values_B in measured.items():
            sign_B = torch.tensor([float(s.pole(axis)) for s in specs])
            start_B = self.start[axis][digit_B]
            end_B = torch.where(sign_B > 0, self.high_end[axis][digit_B], self.low_end[axis][digit_B])
            score_B = ((values_B - start_B) / (end_B - start_B)).clamp(0.0, 1.0)
            out[axis] = torch.where(sign_B != 0, score_B, torch.full_like(score_B, float("nan")))
        return out

    def style(self, images: torch.Tensor, specs: Sequence[PromptSpec]) -> torch.Tensor:
        """`[B]` mean ramp score over the mentioned axes; 1 for prompts that mention none."""
        scores_BA = torch.stack(list(self.axis_scores(images, specs).values()), dim=1)
        asked_BA = ~scores_BA.isnan()
        total_B = torch.where(asked_BA, scores_BA, torch.zeros_like(scores_BA)).sum(dim=1)
        count_B = asked_BA.sum(dim=1)
        return torch.where(count_B > 0, total_B / count_B.clamp_min(1), torch.ones_like(total_B))


class ToyReward:
    """One of the toy rewards ("toy", "toy_digit", "toy_style"): images `[B, C, H, W]` in [0, 1] + prompts ->
    float32 `[B]` in [0, reward_max] on the CPU."""

    reward_max = 1.0
    COMPONENTS = ("toy", "toy_digit", "toy_style")

    def __init__(self, name: str = "toy", folder: str | Path | None = None):
        if name not in self.COMPONENTS:
            raise ValueError(f"toy reward: unknown component '{name}'; expected one of {self.COMPONENTS}")
        folder = Path(folder) if folder is not None else ASSETS_DIR
        config = read_json(folder / REWARD_CONFIG)
        self.name = name
        self.classifier = DigitClassifier.from_folder(folder)
        self.ramps = AttributeRamps(config["ramps"])
        self.info = config  # classifier accuracy, ramp percentiles: for logs

    @torch.no_grad()
    def components(self, media: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every score `[B]`: toy, toy_digit, toy_style, and one per axis (NaN where not asked)."""
        if media.shape[0] != len(prompts):
            raise ValueError(f"toy reward: {media.shape[0]} images but {len(prompts)} prompts")
        media = media.detach().cpu()
        specs = [_parse(p) for p in prompts]
        digit_B = self.classifier.probs(media)[torch.arange(len(specs)), torch.tensor([s.digit for s in specs])]
        axes = self.ramps.axis_scores(media, specs)
        style_B = self.ramps.style(media, specs)
        return {"toy": digit_B * style_B, "toy_digit": digit_B, "toy_style": style_B, **axes}

    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.components(media, prompts)[self.name].float()


@register_reward("toy")
def build_toy_reward(device="cpu", model_dir: str = "hps_ckpt", path: LocalPath | None = None) -> ToyReward:
    """Digit probability x style score (runs on the CPU; `device` is ignored, and so is `model_dir`: the classifier
    ships with the package, or comes from `path`)."""
    return ToyReward("toy", path)


@register_reward("toy_digit")
def build_toy_digit_reward(device="cpu", model_dir: str = "hps_ckpt", path: LocalPath | None = None) -> ToyReward:
    return ToyReward("toy_digit", path)


@register_reward("toy_style")
def build_toy_style_reward(device="cpu", model_dir: str = "hps_ckpt", path: LocalPath | None = None) -> ToyReward:
    return ToyReward("toy_style", path)
