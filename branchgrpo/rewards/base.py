"""One signature for every reward model, a registry of factories, multi-reward sets, and the one scoring helper.

A reward model maps a batch of media (images `[B, C, H, W]` or videos `[B, C, F, H, W]`, float in [0, 1]) and their
prompts to a float32 tensor `[B]` on the CPU. Factories are registered by name and called as
`factory(device=..., model_dir=..., **options)`: `model_dir` is the folder `--reward_model_dir` names (default
`hps_ckpt`), under which each factory finds its own files by their released names (hps_ckpt/README.md); an explicit
option (`checkpoint=...`, `model_path=...`) overrides that location. A factory that needs no files ignores
`model_dir`; a missing file is a `FileNotFoundError` naming it, a file that exists but cannot be read another error.
Factories import their heavy dependencies (open_clip, transformers) inside, so importing this package stays cheap.

`build_reward_set` builds the weighted set a run scores with (training and evaluation alike); `decode_and_score`
decodes latents in chunks and scores every chunk with it.

Per-prompt conditioning (e.g. image-to-video's first frame): a reward model that needs more than the prompt text
names the per-prompt tensors it reads in a `conditioning` attribute (keys of the embedding store, e.g.
`("first_frame",)`) and is then called as `model(media, prompts, conditions={key: tensor [B, ...]})`, one row per
medium; every other reward keeps the plain `(media, prompts)` call. The caller hands `decode_and_score` the
per-prompt tensors it has (the store's rows: `RewardSet.conditions` picks the keys the set reads and gathers a row
per sample), so nothing is loaded or copied for sets that read none, and a reward whose key is missing (a
text-to-video dataset) fails with a message naming the key.

Multi-reward runs give a weight per reward, e.g. `--reward hps=1.0,clip=0.5`. Two ways to combine (DESIGN section 7):
- "sum": the weighted sum of raw rewards is the reward, normalised once (Flow-GRPO);
- "advantage": each reward gets its own advantages, and the advantages are summed with the weights
  (DanceGRPO / MixGRPO / G2RPO).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, NewType, Protocol, Sequence

import torch

COMBINE_MODES = ("sum", "advantage")
DEFAULT_MODEL_DIR = "hps_ckpt"  # --reward_model_dir's default
#: the annotation of a factory option that names a local file or folder (checked to exist before anything loads)
LocalPath = NewType("LocalPath", str)

# Modules that register built-in rewards, imported on first use (the registry: one line per reward module).
BUILTIN_REWARD_MODULES = (
    "branchgrpo.rewards.toy",
    "branchgrpo.rewards.toy_edit",
    "branchgrpo.rewards.hps",
    "branchgrpo.rewards.pickscore",
    "branchgrpo.rewards.clipscore",
    "branchgrpo.rewards.imagereward",
    "branchgrpo.rewards.video",
    "branchgrpo.rewards.videoalign",
    "branchgrpo.rewards.first_frame",
    "branchgrpo.rewards.edit",
    "branchgrpo.rewards.ocr",
    "branchgrpo.rewards.vlm_judge",
    "branchgrpo.rewards.geneval",
    "branchgrpo.rewards.remote",
)


class RewardUnavailable(RuntimeError):
    """A reward that cannot score now for a reason outside the run (its server is gone or keeps failing): the
    trainer stops with a checkpoint of the last iteration boundary instead of a traceback."""


class RewardModel(Protocol):
    name: str

    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores `[B]` (float32, CPU), computed under no_grad. A model with a `conditioning` attribute (the
        per-prompt tensors it reads) is called with `conditions={key: [B, ...]}` as well."""


RewardFactory = Callable[..., RewardModel]
_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make `factory(device=..., model_dir=..., **options)` buildable as `--reward name=weight`."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward '{name}' registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def build_reward(name: str, device: torch.device | str = "cpu", model_dir: str = DEFAULT_MODEL_DIR,
                 reward_flag: str = "--reward", **options) -> RewardModel:
    """The reward `name`, its files looked up under `model_dir` unless `options` point elsewhere. `reward_flag`:
    the flag that named it (for messages). A missing file that an option named is reported with the option."""
    factory = _factory(name, reward_flag)
    check_reward_options(name, factory, options)
    try:
        return factory(device=device, model_dir=model_dir, **options)
    except FileNotFoundError as err:  # from an option's path: name the flag, the reward and the option
        text = str(err)
        named = [key for key, value in options.items() if isinstance(value, str) and value and value in text]
        if not named:
            raise
        context = [f"reward '{name}'" if f"'{name}'" not in text else "",
                   f"option '{named[0]}'" if named[0] not in text else ""]
        where = ", ".join(filter(None, context))
        raise FileNotFoundError(f"--reward_options: {where + ': ' if where else ''}{text}") from None


def _factory(name: str, reward_flag: str) -> RewardFactory:
    _import_builtin_rewards()
    if name not in _REGISTRY:
        raise ValueError(f"{reward_flag}: unknown reward '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def check_reward_flags(names, options: dict[str, dict], reward_flag: str = "--reward") -> None:
    """Config validation, before any model is loaded: every reward of `names` is registered; `--reward_options` names
    only rewards of `names` (another one's options would be ignored: a typo would silently disable them); and each
    reward's options pass `check_reward_options`, with the files their path options name present."""
    for name in names:
        _factory(name, reward_flag)
    _check_option_targets(names, options, reward_flag)
    for name in names:
        if options.get(name):
            check_reward_options(name, _REGISTRY[name], options[name], check_files=True)


def _check_option_targets(names, options: dict[str, dict], reward_flag: str) -> None:
    extra = sorted(set(options) - set(names))
    if extra:
        raise ValueError(f"--reward_options: {extra[0]!r} is not a reward of {reward_flag} ({', '.join(names)}); its "
                         "options would be ignored")


def check_reward_options(name: str, factory: RewardFactory, options: dict, check_files: bool = False) -> None:
    """Options the factory does not take are refused naming those it does, and a value of the wrong type naming its
    option and the type the factory's signature declares (instead of a TypeError from inside the call); with
    `check_files`, an option declared as a `LocalPath` must name a file or folder that exists. A factory with
    `**options` checks the names it does not declare itself."""
    import inspect

    params = inspect.signature(factory).parameters
    taken = [p for p, param in params.items() if p != "device" and param.kind is not inspect.Parameter.VAR_POSITIONAL
             and param.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(options) - set(taken))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"--reward_options: reward '{name}' takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(taken) or 'none'}")
    hints = _annotations(factory)
    for key, value in options.items():
        problem = _type_problem(value, hints[key]) if key in hints else None
        if problem:
            raise ValueError(f"--reward_options: reward '{name}', option '{key}': {problem}")
        if check_files and LocalPath in _alternatives(hints.get(key)) and value is not None \
                and not os.path.exists(value):
            raise FileNotFoundError(f"--reward_options: reward '{name}', option '{key}': {value} does not exist")


def _annotations(factory: RewardFactory) -> dict:
    """The factory's parameter annotations, resolved ({} when they cannot be: then nothing is type-checked)."""
    import typing

    try:
        return typing.get_type_hints(factory)
    except Exception:  # a name the annotations use is not importable here: leave the checks to the factory
        return {}


def _alternatives(tp) -> tuple:
    import types
    import typing

    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


# the annotations whose values are checked: what JSON gives for each (bool is not a number here)
_JSON_TYPES = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    LocalPath: ("a path (a string)", lambda v: isinstance(v, str) and bool(v.strip())),
}


def _type_problem(value, tp) -> str | None:
    """What is wrong with the JSON `value` for the annotation `tp`; None when it fits or `tp` is not checked (an
    alternative such as torch.device, or no annotation)."""
    options = [t for t in _alternatives(tp) if t is not type(None)]
    if value is None:
        return None if len(options) < len(_alternatives(tp)) else "need a value, got null"
    if any(t not in _JSON_TYPES for t in options):
        return None
    if any(_JSON_TYPES[t][1](value) for t in options):
        return None
    return f"need {' or '.join(_JSON_TYPES[t][0] for t in options)}, got {json.dumps(value)}"


def _import_builtin_rewards() -> None:
    """Import every built-in reward module (each registers its own factories); modules not shipped are skipped."""
    import importlib
    import importlib.util

    for module in BUILTIN_REWARD_MODULES:
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # its parent package is not part of this install
            spec = None
        if spec is not None:
            importlib.import_module(module)


def parse_reward_options(text: str) -> dict[str, dict]:
    """`--reward_options` JSON -> {reward: {option: value}} ('' -> {}), or a ValueError saying what was expected."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--reward_options: not valid JSON ({err})") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError('--reward_options: expected {"reward": {"option": value}}')
    return options


def parse_reward_spec(spec: str, flag: str = "--reward") -> dict[str, float]:
    """'hps=1.0,clip=0.5' -> {'hps': 1.0, 'clip': 0.5}; a bare name gets weight 1. `flag`: the flag that gave it."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"{flag}: weight of '{name}' must be a number, got '{value}'") from None
        if not name or name in weights:
            raise ValueError(f"{flag}: empty or repeated reward name in '{spec}'")
        if not math.isfinite(weight):
            raise ValueError(f"{flag}: weight of '{name}' must be a finite number, got '{value}'")
        if weight == 0.0:
            raise ValueError(f"{flag}: weight of '{name}' is 0; drop the reward instead")
        weights[name] = weight
    if not weights:
        raise ValueError(f"{flag}: no reward in '{spec}' (expected e.g. 'hps=1.0,clip=0.5')")
    return weights


def _check_mode(mode: str) -> None:
    if mode not in COMBINE_MODES:
        raise ValueError(f"--reward_combine: expected one of {COMBINE_MODES}, got '{mode}'")


@dataclass
class RewardSet:
    """Several weighted reward models scored together. `skipped`: rewards left out because their files are missing
    (name -> one-line reason); only such a set may hold no model at all (then it scores nothing)."""

    models: dict[str, RewardModel]
    weights: dict[str, float]
    mode: str = "sum"
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        if set(self.models) != set(self.weights):
            raise ValueError("RewardSet: models and weights name different rewards")
        if set(self.models) & set(self.skipped):
            raise ValueError("RewardSet: a reward is both built and skipped")
        if not self.models and not self.skipped:
            raise ValueError("RewardSet: no reward models")

    @property
    def reward_max(self) -> float | None:
        """The largest possible weighted sum, if every model states its maximum (`reward_max`), else None."""
        maxima = {name: getattr(model, "reward_max", None) for name, model in self.models.items()}
        if not maxima or any(value is None for value in maxima.values()):
            return None
        return sum(self.weights[name] * value for name, value in maxima.items())

    @property
    def out_of_process(self) -> bool:
        """Whether a reward of the set is scored by another process (an `out_of_process` attribute: a server), so
        that its scoring can overlap the rollout (branchgrpo.runtime.overlap)."""
        return any(getattr(model, "out_of_process", False) for model in self.models.values())

    @property
    def condition_keys(self) -> tuple[str, ...]:
        """The per-prompt tensors the set's rewards read (their `conditioning`), in order, without repeats."""
        keys = [key for model in self.models.values() for key in getattr(model, "conditioning", ())]
        return tuple(dict.fromkeys(keys))

    def conditions(self, per_prompt: dict[str, torch.Tensor] | None, prompt_index: torch.Tensor | None = None,
                   also: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """The tensors the set's rewards read (and the keys `also` names: those the backbone's decoder reads), one
        row per sample: row `prompt_index[i]` of `per_prompt[key]` (all rows in order when `prompt_index` is None),
        on the CPU. Empty when nothing reads any; a missing key is left out here and reported by `score`, naming
        the reward (or by the decoder)."""
        keys = tuple(dict.fromkeys((*self.condition_keys, *also)))
        if not keys or per_prompt is None:
            return {}
        out = {}
        for key in keys:
            if key in per_prompt:
                value = per_prompt[key]
                rows = value if prompt_index is None else value.index_select(0, prompt_index.to(value.device))
                out[key] = rows.cpu()
        return out

    @torch.no_grad()
    def score(self, media: torch.Tensor, prompts: Sequence[str],
              conditions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Raw scores per reward, each `[B]` float32 on the CPU; `conditions` ({key: [B, ...]}) go to the rewards
        that read them."""
        out = {}
        for name, model in self.models.items():
            keys = tuple(getattr(model, "conditioning", ()))
            if keys:
                missing = [key for key in keys if key not in (conditions or {})]
                if missing:
                    raise ValueError(f"reward '{name}' needs the per-prompt {', '.join(map(repr, missing))} of each "
                                     f"sample, which the prompt embeddings do not hold (it has "
                                     f"{sorted(conditions or {})}); use it with a backbone whose preprocessing writes "
                                     "them (e.g. --model wan_i2v: its first frame)")
                values = model(media, prompts, conditions={key: conditions[key] for key in keys})
            else:
                values = model(media, prompts)
            out[name] = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
            if out[name].numel() != media.shape[0]:
                raise RuntimeError(f"reward '{name}' returned {out[name].numel()} scores for {media.shape[0]} inputs")
        return out

    def check_prompts(self, prompts: Sequence[str], source: str | None = None) -> None:
        """Start-up check of the prompts a run will score: a reward that constrains its prompts exposes
        `check_prompts(prompts, source)` (OCR: a double-quoted target) and refuses the first bad one with a ValueError
        naming `source`:N, N the prompt's 1-based position in `source`."""
        for model in self.models.values():
            check = getattr(model, "check_prompts", None)
            if check is not None:
                check(prompts, source)

    def weighted_sum(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * scores[name] for name in self.weights)


def build_reward_set(spec: str, mode: str, device: torch.device | str, options: dict[str, dict] | None = None,
                     model_dir: str = DEFAULT_MODEL_DIR, skip_missing: bool = False,
                     reward_flag: str = "--reward") -> RewardSet:
    """The rewards of `spec` ('hps=1.0,clip=0.5'; a bare name weighs 1), each built with `model_dir` and its entry of
    `options` (which wins, `model_dir` included). `skip_missing`: a reward whose files are missing is left out and
    recorded in `RewardSet.skipped` instead of raising (the evaluation CLI); a file that exists but cannot be read
    still raises. `reward_flag`: the flag that gave `spec` (for messages)."""
    weights = parse_reward_spec(spec, reward_flag)
    _check_mode(mode)  # before loading any model
    options = options or {}
    _check_option_targets(weights, options, reward_flag)
    models, skipped = {}, {}
    for name in weights:
        try:
            models[name] = build_reward(name, device=device, reward_flag=reward_flag,
                                        **{"model_dir": model_dir, **options.get(name, {})})
        except FileNotFoundError as err:
            if not skip_missing:
                raise
            skipped[name] = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return RewardSet(models=models, weights={name: weights[name] for name in models}, mode=mode, skipped=skipped)


@torch.no_grad()
def decode_and_score(decode: Callable[[torch.Tensor, dict], torch.Tensor], latents: torch.Tensor,
                     prompts: Sequence[str], rewards: RewardSet, batch_size: int,
                     conditions: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Decode `latents` [N, ...] in chunks of `batch_size` and score each chunk with `rewards` (one prompt per latent;
    `conditions`: per-sample tensors [N, ...] for the rewards that read some, see `RewardSet.conditions`, and for
    the decoder: `decode(latents chunk, that chunk's conditions)`, e.g. `partial(models.base.decode_media, adapter)`).

    Returns ({reward: float32 [N] on the CPU}, media [N, ...] float32 where `decode` put it). Chunk by chunk, so the
    reward models see the same batches as when all media are decoded first and then scored in chunks of the same
    size: identical numbers for per-sample decoders and rewards. With no reward model: ({}, media)."""
    num = latents.shape[0]
    if len(prompts) != num:
        raise ValueError(f"decode_and_score: {num} latents but {len(prompts)} prompts")
    if num == 0 or batch_size < 1:
        raise ValueError(f"decode_and_score: needs at least one latent and batch_size >= 1 "
                         f"(got {num} latents, batch_size {batch_size})")
    prompts = list(prompts)
    media_parts, score_parts = [], {name: [] for name in rewards.models}
    for start in range(0, num, batch_size):
        chunk = {key: value[start : start + batch_size] for key, value in (conditions or {}).items()}
        media = decode(latents[start : start + batch_size], chunk).float()
        for name, values in rewards.score(media, prompts[start : start + batch_size], chunk).items():
            score_parts[name].append(values)
        media_parts.append(media)
    return {name: torch.cat(parts) for name, parts in score_parts.items()}, torch.cat(media_parts)


def score_latents(decode: Callable[[torch.Tensor, dict], torch.Tensor], rewards: RewardSet, texts: Sequence[str],
                  batch_size: int, per_prompt: dict | None, latents: torch.Tensor, prompt_index: torch.Tensor,
                  decode_keys: Sequence[str] = ()) -> torch.Tensor:
    """The weighted total reward of decoded `latents` [N, ...] whose prompts are rows `prompt_index` [N] of `texts`
    (guided expansion scores x0-predictions with it): float32 [N] on the CPU. `decode` as for `decode_and_score`,
    reading the per-prompt `decode_keys`."""
    conditions = rewards.conditions(per_prompt, prompt_index.cpu(), also=decode_keys)
    scores, _ = decode_and_score(decode, latents, [texts[int(p)] for p in prompt_index], rewards, batch_size, conditions)
    return rewards.weighted_sum(scores)
