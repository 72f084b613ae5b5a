"""The algorithms, each a registered unit (one module each) that owns its config section:

    branchgrpo  tree plan (+ Mix window)      fusion + depth-wise normalisation   width / depth pruning
    dancegrpo   G independent SDE chains       group z-score, broadcast            random timestep fraction
    mixgrpo     G chains, SDE only in window   group z-score, broadcast            the window's SDE edges
    g2rpo       ODE anchor + singular combs    per-(k, granularity) z, summed      the single SDE edges
    flow_grpo   G chains (flow kernel)         group mean / iteration std          the first floor(f (T-1)) steps
    flow_grpo_fast  ODE prefix, one split      group mean / iteration std          the window's SDE edges
                    into G, w SDE steps
    diffusion_nft  G ODE chains (or a tree)    group mean / global std -> r        the final samples (its own loss)

The trainer, `plan`, the comparison harness and the config parser find algorithms only here. Adding one: write a
module with an `Algorithm` subclass decorated with `@register_algorithm` (see docs/architecture.md), and add the
module to BUILTIN_ALGORITHMS (or import it before parsing flags, as a test or plugin can).
"""

from __future__ import annotations

import importlib

from branchgrpo.algorithms.base import Algorithm, AlgorithmConfig, GroupFlags, WindowFlags  # noqa: F401

# Modules that register the built-in algorithms, in the order of the paper's Table 1 (the comparison harness lists
# their presets in this order).
BUILTIN_ALGORITHMS = (
    "branchgrpo.algorithms.dancegrpo",
    "branchgrpo.algorithms.mixgrpo",
    "branchgrpo.algorithms.branchgrpo",
    "branchgrpo.algorithms.g2rpo",
    "branchgrpo.algorithms.flow_grpo",
    "branchgrpo.algorithms.flow_grpo_fast",
    "branchgrpo.algorithms.diffusion_nft",
)
_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make `cls` selectable as `--algo <cls.name>`, its Config fields becoming flags."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"register_algorithm: {cls!r} is not an Algorithm subclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm '{cls.name}' registered twice ({_REGISTRY[cls.name].__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    for module in BUILTIN_ALGORITHMS:
        importlib.import_module(module)


def algorithms() -> dict[str, type[Algorithm]]:
    """name -> unit class: the built-in ones in BUILTIN_ALGORITHMS order, then the others as registered."""
    _load_builtin()
    rank = {module: i for i, module in enumerate(BUILTIN_ALGORITHMS)}
    order = sorted(_REGISTRY.items(), key=lambda item: rank.get(item[1].__module__, len(rank)))  # stable
    return dict(order)


def get_algorithm(name: str) -> type[Algorithm]:
    units = algorithms()
    if name not in units:
        raise ValueError(f"--algo: '{name}' is not one of {tuple(units)}")
    return units[name]
