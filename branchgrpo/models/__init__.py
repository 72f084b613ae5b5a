"""Backbones: the adapter contract (base.py), one spec per backbone (spec.py, with the optional protocols of
support.py; toy.py, flux.py, flux_kontext.py, wan.py, wan_i2v.py), classifier-free guidance (guidance.py) and the
registry through which the config parser, trainer, preprocessing, evaluation, benchmark and make_tiny find them.

Adding a backbone: a module with a FlowAdapter subclass and a BackboneSpec subclass (its config section in `Config`)
registered with `@register_backbone`, listed in BUILTIN_BACKBONES (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import importlib

from branchgrpo.models.base import FlowAdapter, check_embedding_keys, gather_cond  # noqa: F401
from branchgrpo.models.spec import MEDIA_KINDS, BackboneConfig, BackboneSpec

BUILTIN_BACKBONES = (
    "branchgrpo.models.toy",
    "branchgrpo.models.toy_edit",
    "branchgrpo.models.flux",
    "branchgrpo.models.flux_kontext",
    "branchgrpo.models.wan",
    "branchgrpo.models.wan_i2v",
    "branchgrpo.models.sd3",
    "branchgrpo.models.qwen_image",
    "branchgrpo.models.wan22",
    "branchgrpo.models.qwen_image_edit",  # Qwen-Image-Edit and Edit-2509
    "branchgrpo.models.wan22_ti2v",  # Wan2.2 TI2V-5B, text- and image-to-video
)
_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(cls: type[BackboneSpec]) -> type[BackboneSpec]:
    """Class decorator: make the spec selectable as `--model <cls.name>` (one instance is registered), the fields of
    its `Config` becoming flags."""
    config = cls.Config
    if not (dataclasses.is_dataclass(config) and issubclass(config, BackboneConfig)):
        raise TypeError(f"backbone '{cls.name}': Config must be a BackboneConfig dataclass, got {config!r}")
    if cls.media not in MEDIA_KINDS:
        raise ValueError(f"backbone '{cls.name}': media '{cls.media}' is not one of {MEDIA_KINDS}")
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
