"""One signature for every reward model, a registry of factories, and multi-reward specs.

A reward model maps a batch of media (images `[B, C, H, W]` or videos `[B, C, F, H, W]`, float in [0, 1]) and their
prompts to a float32 tensor `[B]` on the CPU. Factories are registered by name and import their heavy dependencies
(open_clip, transformers) inside the factory, so importing this package stays cheap.

Multi-reward runs give a weight per reward, e.g. `--reward hps=1.0,clip=0.5`. Two ways to combine (DESIGN section 7):
- "sum": the weighted sum of raw rewards is the reward, normalised once (Flow-GRPO);
- "advantage": each reward gets its own advantages, and the advantages are summed with the weights
  (DanceGRPO / MixGRPO / G2RPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

COMBINE_MODES = ("sum", "advantage")


class RewardModel(Protocol):
    name: str

    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores `[B]` (float32, CPU), computed under no_grad."""


RewardFactory = Callable[..., RewardModel]
_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make `factory(device=..., **options)` buildable as `--reward name=weight`."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward '{name}' registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def build_reward(name: str, device: torch.device | str = "cpu", **options) -> RewardModel:
    _import_builtin_rewards()
    if name not in _REGISTRY:
        raise ValueError(f"--reward: unknown reward '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](device=device, **options)


def _import_builtin_rewards() -> None:
    """Import every built-in reward module (each registers its own factories); modules not shipped are skipped."""
    import importlib
    import importlib.util

    from branchgrpo.rewards import BUILTIN_REWARD_MODULES

    for module in BUILTIN_REWARD_MODULES:
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # its parent package is not part of this install
            spec = None
        if spec is not None:
            importlib.import_module(module)


def parse_reward_options(text: str) -> dict[str, dict]:
    """`--reward_options` JSON -> {reward: {option: value}} ('' -> {}), or a ValueError saying what was expected."""
    import json

    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--reward_options: not valid JSON ({err})") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError('--reward_options: expected {"reward": {"option": value}}')
    return options


def parse_reward_spec(spec: str) -> dict[str, float]:
    """'hps=1.0,clip=0.5' -> {'hps': 1.0, 'clip': 0.5}; a bare name gets weight 1."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"--reward: weight of '{name}' must be a number, got '{value}'") from None
        if not name or name in weights:
            raise ValueError(f"--reward: empty or repeated reward name in '{spec}'")
        if weight == 0.0:
            raise ValueError(f"--reward: weight of '{name}' is 0; drop the reward instead")
        weights[name] = weight
    if not weights:
        raise ValueError(f"--reward: no reward in '{spec}' (expected e.g. 'hps=1.0,clip=0.5')")
    return weights


@dataclass
class RewardSet:
    """Several weighted reward models scored together."""

    models: dict[str, RewardModel]
    weights: dict[str, float]
    mode: str = "sum"

    def __post_init__(self) -> None:
        if self.mode not in COMBINE_MODES:
            raise ValueError(f"--reward_combine: expected one of {COMBINE_MODES}, got '{self.mode}'")
        if set(self.models) != set(self.weights):
            raise ValueError("RewardSet: models and weights name different rewards")

    @torch.no_grad()
    def score(self, media: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Raw scores per reward, each `[B]` float32 on the CPU."""
        out = {}
        for name, model in self.models.items():
            values = model(media, prompts)
            out[name] = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
            if out[name].numel() != media.shape[0]:
                raise RuntimeError(f"reward '{name}' returned {out[name].numel()} scores for {media.shape[0]} inputs")
        return out

    def weighted_sum(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * scores[name] for name in self.weights)


def build_reward_set(spec: str, mode: str, device: torch.device | str, options: dict[str, dict] | None = None) -> RewardSet:
    weights = parse_reward_spec(spec)
    options = options or {}
    models = {name: build_reward(name, device=device, **options.get(name, {})) for name in weights}
    return RewardSet(models=models, weights=weights, mode=mode)
