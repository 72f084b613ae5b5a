"""Backbones: the adapter contract (base.py), one spec per backbone (spec.py; toy.py, flux.py, wan.py, wan_i2v.py) and
the registry through which the trainer, preprocessing, evaluation, benchmark and make_tiny find them.

Adding a backbone: a module with a FlowAdapter subclass and a BackboneSpec subclass registered with
`@register_backbone`, listed in BUILTIN_BACKBONES (see docs/architecture.md).
"""

from __future__ import annotations

import importlib

from branchgrpo.models.base import FlowAdapter, check_embedding_keys, gather_cond  # noqa: F401
from branchgrpo.models.spec import BackboneSpec  # noqa: F401

BUILTIN_BACKBONES = (
    "branchgrpo.models.toy",
    "branchgrpo.models.flux",
    "branchgrpo.models.wan",
    "branchgrpo.models.wan_i2v",
)
_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(cls: type[BackboneSpec]) -> type[BackboneSpec]:
    """Class decorator: make the spec selectable as `--model <cls.name>` (one instance is registered)."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"backbone '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def backbones() -> dict[str, BackboneSpec]:
    """name -> spec: the built-in ones in BUILTIN_BACKBONES order (whichever module a caller imported first), then
    the others as registered."""
    for module in BUILTIN_BACKBONES:
        importlib.import_module(module)
    rank = {module: i for i, module in enumerate(BUILTIN_BACKBONES)}
    return dict(sorted(_REGISTRY.items(), key=lambda item: rank.get(type(item[1]).__module__, len(rank))))  # stable


def get_backbone(name: str) -> BackboneSpec:
    specs = backbones()
    if name not in specs:
        raise ValueError(f"--model: unknown backbone '{name}'; expected one of {', '.join(specs)}")
    return specs[name]
