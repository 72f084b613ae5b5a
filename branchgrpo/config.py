"""Typed configuration: one field per flag, a sentence of help each, validated once before anything is loaded.

Flags keep the official BranchGRPO / DanceGRPO names where they still mean something (`--tree_split_points`,
`--eta`, `--clip_range`, ...). YAML files in `configs/` set defaults; command-line flags override them.
Bad values raise ValueError naming the flag, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

ALGOS = ("branchgrpo", "dancegrpo", "mixgrpo", "g2rpo")


def _f(default, help: str, choices=None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class AlgoConfig:
    """What a rollout graph looks like, how advantages are formed and which edges are trained."""

    algo: str = _f("branchgrpo", "algorithm", ALGOS)
    sampling_steps: int = _f(20, "denoising steps T of every rollout (the tree depth)")
    shift: float = _f(3.0, "static SD3 time shift of the sigma schedule (1 = none)")
    time_shift: str = _f("static", "sigma schedule warp: static (--shift) or dynamic (FLUX's resolution-dependent mu)",
                         ("static", "dynamic"))
    sde_kernel: str = _f("auto", "diffusion coefficient: dance (g = eta) or flow (g = eta sqrt(sigma/(1-sigma))); "
                         "auto = dance for branchgrpo/dancegrpo, flow for mixgrpo/g2rpo", ("auto", "dance", "flow"))
    eta: float | None = _f(None, "SDE noise level; default 0.3 for the dance kernel, 0.7 for the flow kernel")
    # --- BranchGRPO tree
    tree_split_points: str = _f("0,3,6,9", "comma-separated step indices where every node branches")
    tree_split_rounds: int = _f(4, "official fallback when --tree_split_points is empty: splits at k*(T // rounds)")
    branch_factor: int = _f(2, "children per split (K); leaves per prompt = K ** (number of split points)")
    branch_innovation: float = _f(1.0, "paper Eq. 2 r in (0, 1]: siblings share sqrt(1-r^2) of their split noise "
                                  "(r = 1: independent siblings)")
    tree_split_noise_scale: float = _f(1.0, "lambda: split edges' kernel std is lambda * std, in sampling and in "
                                       "every log-prob of the edge (the official code scaled only the sampling)")
    init_same_noise: bool = _f(False, "every rollout root of a rank starts from the same initial noise")
    fusion_alpha: float | None = _f(None, "reward fusion temperature (Eq. 3): 0 = mean of the leaves below, "
                                    "1 = behaviour-policy path weighting")
    tree_prob_weighted: bool = _f(False, "official name for --fusion_alpha 1")
    width_pruning_mode: int = _f(0, "0 none, 1 Parent-Top1, 2 Extreme (best and worst leaves)", (0, 1, 2))
    width_pruning_ratio: float = _f(0.5, "Extreme mode: fraction of leaves whose post-split chains are trained")
    depth_pruning: str = _f("", "comma-separated child depths whose edges are not trained, e.g. 15,16,17,18")
    depth_pruning_slide: bool = _f(False, "slide the pruned depths one step every --depth_pruning_slide_interval "
                                   "iterations towards --depth_pruning_stop_depth")
    depth_pruning_slide_interval: int = _f(1, "iterations between two moves of the depth-pruning window")
    depth_pruning_stop_depth: int | None = _f(None, "where the sliding window stops (default: the last split point)")
    pruning_step_ratio: float = _f(1.0, "prune only during the first fraction of --max_train_steps")
    mix_ode_sde_tree: bool = _f(False, "BranchGRPO-Mix: only split steps and a sliding window of SDE steps are "
                                "stochastic (and trained); the rest are ODE steps")
    # --- windows (BranchGRPO-Mix and MixGRPO)
    mix_sde_window_size: int = _f(4, "SDE window size W (MixGRPO, BranchGRPO-Mix)")
    mix_window_interval: int = _f(25, "training iterations between two moves of the SDE window (tau)")
    mix_window_stride: int = _f(1, "steps the SDE window moves each time")
    mix_window_start: int = _f(0, "first position of the SDE window")
    mix_window_max_start: int | None = _f(None, "last window position before rolling back (default T - 1 - W)")
    # --- group methods
    num_generations: int = _f(12, "G: trajectories per prompt (dancegrpo, mixgrpo) or members per step (g2rpo)")
    timestep_fraction: float = _f(1.0, "dancegrpo: fraction of each trajectory's SDE steps trained (random subset)")
    g2rpo_steps: str = _f("", "g2rpo: steps k that get a singular SDE branch (default: the first half, 0..T/2-1)")
    g2rpo_granularities: str = _f("1,2,3", "g2rpo: ODE strides used to finish each member (Lambda)")
    # --- loss
    clip_range: float = _f(1e-3, "PPO clip epsilon of the ratio")
    adv_clip_max: float = _f(5.0, "advantages are clipped to +-this")
    kl_coef: float = _f(0.0, "beta of the closed-form KL to the reference (frozen base; LoRA: adapter disabled)")
    reward: str = _f("toy", "reward models and weights, e.g. hps=1.0,clip=0.5")
    reward_combine: str = _f("sum", "multi-reward: sum = weighted raw rewards, advantage = weighted advantages",
                             ("sum", "advantage"))
    max_leaves: int = _f(4096, "refuse graphs with more leaves per prompt than this (raise it knowingly)")
    ignore_last: bool = _f(True, "official flag; always true here: the last step is deterministic, never trained")
    max_train_steps: int = _f(300, "training iterations (rollout + update rounds)")

    # ---------------------------------------------------------------------------------------------------------
    @property
    def kernel_kind(self) -> str:
        if self.sde_kernel != "auto":
            return self.sde_kernel
        return "dance" if self.algo in ("branchgrpo", "dancegrpo") else "flow"

    @property
    def eta_value(self) -> float:
        if self.eta is not None:
            return self.eta
        return 0.3 if self.kernel_kind == "dance" else 0.7

    @property
    def alpha(self) -> float:
        if self.fusion_alpha is not None:
            return self.fusion_alpha
        return 1.0 if self.tree_prob_weighted else 0.0

    @property
    def split_points(self) -> list[int]:
        if self.tree_split_points.strip():
            return parse_int_list(self.tree_split_points, "--tree_split_points")
        stride = max(1, self.sampling_steps // max(1, self.tree_split_rounds))
        return [k * stride for k in range(self.tree_split_rounds)]

    @property
    def pruned_depths(self) -> list[int]:
        return parse_int_list(self.depth_pruning, "--depth_pruning") if self.depth_pruning.strip() else []

    @property
    def window_max_start(self) -> int:
        if self.mix_window_max_start is not None:
            return self.mix_window_max_start
        # MixGRPO never trains the last two steps (its max_timesteps = N - 2); here the very last one is also
        # deterministic, so the window ends at step T - 3 at the latest
        return max(self.mix_window_start, self.sampling_steps - 2 - self.mix_sde_window_size)

    @property
    def g2rpo_step_list(self) -> list[int]:
        if self.g2rpo_steps.strip():
            return parse_int_list(self.g2rpo_steps, "--g2rpo_steps")
        return list(range(max(1, self.sampling_steps // 2)))

    @property
    def granularities(self) -> list[int]:
        return parse_int_list(self.g2rpo_granularities, "--g2rpo_granularities")


def parse_int_list(text: str, flag: str) -> list[int]:
    values = []
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            raise ValueError(f"{flag}: empty entry in '{text}' (expected comma-separated integers)")
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"{flag}: '{item}' is not an integer (in '{text}')") from None
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}: duplicate entries in '{text}'")
    return values


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_field_types(cfg) -> None:
    """YAML values reach the dataclass unconverted: `branch_factor: 2.5` or `eta: .inf` must fail here, naming the
    flag, not later in a traceback. Integer fields need integers; float fields finite numbers."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), _arg_type(hints[f.name])
        if value is None:
            continue
        if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"--{f.name}: need an integer, got {value!r}")
        if tp is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"--{f.name}: need a finite number, got {value!r}")
        if tp is bool and not isinstance(value, bool):
            raise ValueError(f"--{f.name}: need true or false, got {value!r}")
        if tp is str and not isinstance(value, str):
            raise ValueError(f"--{f.name}: need a string, got {value!r}")


def validate_algo(cfg: AlgoConfig) -> None:
    """Every check on the algorithm flags, before any model is loaded."""
    check_field_types(cfg)
    T = cfg.sampling_steps
    _require(cfg.algo in ALGOS, f"--algo: '{cfg.algo}' is not one of {ALGOS}")
    _require(isinstance(T, int) and T >= 2, f"--sampling_steps: need an integer >= 2, got {T}")
    _require(cfg.shift > 0 and math.isfinite(cfg.shift), f"--shift: need a positive number, got {cfg.shift}")
    _require(cfg.eta_value >= 0 and math.isfinite(cfg.eta_value), f"--eta: need a number >= 0, got {cfg.eta_value}")
    _require(cfg.max_train_steps >= 1, f"--max_train_steps: need >= 1, got {cfg.max_train_steps}")
    _require(cfg.clip_range > 0, f"--clip_range: need > 0, got {cfg.clip_range}")
    _require(cfg.adv_clip_max > 0, f"--adv_clip_max: need > 0, got {cfg.adv_clip_max}")
    _require(cfg.kl_coef >= 0, f"--kl_coef: need >= 0, got {cfg.kl_coef}")
    _require(cfg.ignore_last, "--no-ignore_last: the last step (to sigma = 0) is deterministic here (x0 prediction), "
             "so there is no last-step transition to train")
    _require(cfg.eta_value > 0, f"--eta 0 makes every step deterministic: nothing to explore or train (algo {cfg.algo})")
    if cfg.algo == "branchgrpo":
        _validate_tree(cfg)
    elif cfg.algo in ("dancegrpo", "mixgrpo", "g2rpo"):
        _require(cfg.num_generations >= 2, f"--num_generations: group methods need >= 2, got {cfg.num_generations}")
        leaves = cfg.num_generations
        if cfg.algo == "dancegrpo":
            f = cfg.timestep_fraction
            _require(0 < f <= 1, f"--timestep_fraction: need a value in (0, 1], got {f}")
            _require(int(f * (T - 1) + 1e-9) >= 1, f"--timestep_fraction {f} trains no step of {T - 1}")
        if cfg.algo == "mixgrpo":
            _validate_window(cfg)
        if cfg.algo == "g2rpo":
            steps, grans = cfg.g2rpo_step_list, cfg.granularities
            for k in steps:
                _require(0 <= k <= T - 2, f"--g2rpo_steps: {k} is outside 0..{T - 2} (the last step is deterministic)")
            for g in grans:
                _require(g >= 1, f"--g2rpo_granularities: strides must be >= 1, got {g}")
            leaves = cfg.num_generations * len(steps) * len(grans) + 1
        _require(leaves <= cfg.max_leaves, f"{leaves} leaves per prompt exceed --max_leaves {cfg.max_leaves}")


def _validate_tree(cfg: AlgoConfig) -> None:
    T = cfg.sampling_steps
    points = cfg.split_points
    _require(bool(points), "--tree_split_points: BranchGRPO needs at least one split point")
    for p in points:
        _require(0 <= p <= T - 2, f"--tree_split_points: {p} is outside 0..{T - 2} "
                 f"(steps of a {T}-step schedule; the last step is deterministic)")
    _require(cfg.branch_factor >= 2, f"--branch_factor: need >= 2, got {cfg.branch_factor}")
    leaves = cfg.branch_factor ** len(points)
    _require(leaves <= cfg.max_leaves, f"--tree_split_points/--branch_factor: {leaves} leaves per prompt exceed "
             f"--max_leaves {cfg.max_leaves} (raise --max_leaves if you mean it)")
    r = cfg.branch_innovation
    _require(0 < r <= 1, f"--branch_innovation: need r in (0, 1], got {r}")
    _require(cfg.tree_split_noise_scale > 0, f"--tree_split_noise_scale: need > 0, got {cfg.tree_split_noise_scale}")
    if cfg.tree_prob_weighted and cfg.fusion_alpha is not None and cfg.fusion_alpha != 1.0:
        raise ValueError(f"--tree_prob_weighted means --fusion_alpha 1, but --fusion_alpha {cfg.fusion_alpha} is set")
    _require(math.isfinite(cfg.alpha), f"--fusion_alpha: need a finite number, got {cfg.alpha}")
    ratio = cfg.width_pruning_ratio
    _require(cfg.width_pruning_mode in (0, 1, 2), f"--width_pruning_mode: 0, 1 or 2, got {cfg.width_pruning_mode}")
    _require(0 < ratio <= 1, f"--width_pruning_ratio: need a value in (0, 1], got {ratio}")
    for d in cfg.pruned_depths:
        _require(1 <= d <= T - 1, f"--depth_pruning: depth {d} is outside 1..{T - 1} (child depths of trainable edges)")
    if cfg.depth_pruning_slide:
        _require(cfg.depth_pruning_slide_interval >= 1,
                 f"--depth_pruning_slide_interval: need >= 1, got {cfg.depth_pruning_slide_interval}")
        stop = cfg.depth_pruning_stop_depth
        if stop is not None:
            _require(1 <= stop <= T - 1, f"--depth_pruning_stop_depth: {stop} is outside 1..{T - 1}")
    _require(0 < cfg.pruning_step_ratio <= 1, f"--pruning_step_ratio: need (0, 1], got {cfg.pruning_step_ratio}")
    if cfg.mix_ode_sde_tree:
        _validate_window(cfg)


def _validate_window(cfg: AlgoConfig) -> None:
    T, W = cfg.sampling_steps, cfg.mix_sde_window_size
    _require(1 <= W <= T - 1, f"--mix_sde_window_size: need 1..{T - 1}, got {W}")
    _require(cfg.mix_window_interval >= 1, f"--mix_window_interval: need >= 1, got {cfg.mix_window_interval}")
    _require(cfg.mix_window_stride >= 0, f"--mix_window_stride: need >= 0, got {cfg.mix_window_stride}")
    start, last = cfg.mix_window_start, cfg.window_max_start
    _require(0 <= start <= last, f"--mix_window_start {start} / --mix_window_max_start {last}: need 0 <= start <= max")
    _require(last + W - 1 <= T - 2, f"--mix_window_max_start {last} + --mix_sde_window_size {W} runs past step {T - 2} "
             "(the last step is deterministic)")


# ---------------------------------------------------------------------------------------------------------------
# Command line and YAML
# ---------------------------------------------------------------------------------------------------------------


def _arg_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str | None = None) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _arg_type(hints[f.name])
        kwargs = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if tp is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(f"--{f.name}", type=tp, **kwargs)


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    return data


def build_config(cls, values: dict, source: str = "arguments"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for key, value in values.items():  # YAML spellings of comma-list flags: [0, 3, 6, 9] or a single 15
        if _arg_type(hints[key]) is str and isinstance(value, (list, int)) and not isinstance(value, bool):
            values[key] = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return cls(**values)


def parse_config(cls, argv=None, description: str = "", extra_args=None):
    """`--config file.yaml` defaults, then CLI overrides -> (config, namespace of extra args)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML file of flag values (CLI flags override it)")
    if extra_args:
        extra_args(parser)
    add_dataclass_args(parser, cls)
    ns = parser.parse_args(argv)
    values = load_yaml(ns.config) if ns.config else {}
    field_names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(ns).items() if k in field_names})
    extras = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in field_names})
    return build_config(cls, values, source=ns.config or "arguments"), extras
