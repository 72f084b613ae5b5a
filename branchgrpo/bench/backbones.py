"""The backbones the throughput benchmark runs, plus the conditioning and the counts MFU needs.

Any registered backbone whose spec implements `BenchSupport` (models/support.py: the token count of MFU) loads
through its spec (`spec.load` from --pretrained_model_name_or_path, or the toy's shipped checkpoint) and is conditioned
on prompts of its default prompt file, encoded by its own text encoders (`spec.prompt_encoder`). A spec that also
implements `StandInSupport` instead gets random conditioning of the right widths (its real text encoders - FLUX's
T5-XXL - would take memory the benchmark is not about), and can be built as a transformer of a named shape with
random weights (`--random_shape`), no files needed: FLUX.1-dev's geometry is public, its weights are not needed to
time it (the cost of a forward does not depend on the values).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from branchgrpo.models.support import BenchSupport, StandInSupport, require_support


@dataclass
class BenchBackbone:
    adapter: object  # FlowAdapter
    cond: dict[str, torch.Tensor]  # per-prompt conditioning, [P, ...] on the device
    num_params: int  # transformer parameters (all, trained or not): the N of MFU's 2 N tokens
    tokens_per_sample: int  # tokens one sample puts through the transformer (image + text)
    description: str


def random_shapes() -> dict[str, tuple[str, ...]]:
    """backbone -> its `--random_shape` values, for the backbones that offer some."""
    from branchgrpo.models import backbones

    return {name: tuple(spec.random_shapes) for name, spec in backbones().items() if isinstance(spec, StandInSupport)}


def encoded_prompts(spec, model_path, num_prompts: int, text_tokens: int | None, device,
                    section=None) -> dict[str, torch.Tensor]:
    """The first `num_prompts` prompts of the backbone's default prompt file (cycled), encoded by its own encoders
    (`text_tokens`: their --max_sequence_length, where they take one; the sizes of its `section`, where they read
    some), extras expanded per prompt."""
    from branchgrpo.data.embeddings import with_extras
    from branchgrpo.data.preprocess import read_prompts

    items = read_prompts(spec.default_prompts(), spec.prompt_format).items
    items = [items[i % len(items)] for i in range(num_prompts)]
    settings = SimpleNamespace(dtype="auto", **({} if text_tokens is None else {"max_sequence_length": text_tokens}),
                               **(spec.encoder_sizes(section) if section is not None else {}))
    encode = spec.prompt_encoder(model_path, device, settings)
    cond = encode(items)
    return with_extras(cond, encode.extras() if hasattr(encode, "extras") else {}, device)


def load_backbone(model_cfg, device: torch.device, *, random_shape: str | None = None, num_prompts: int = 1,
                  text_tokens: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> BenchBackbone:
    """The backbone `model_cfg` names (a ModelConfig: sizes not given take the spec's defaults), loaded through its
    spec or, with `random_shape`, its stand-in with random weights."""
    spec = require_support(model_cfg.spec, BenchSupport, "the benchmark")
    pretrained, stand_in = model_cfg.pretrained_model_name_or_path, isinstance(spec, StandInSupport)
    if random_shape is not None:
        if not stand_in or random_shape not in spec.random_shapes:
            offered = "; ".join(f"--model {name}: {', '.join(shapes)}" for name, shapes in random_shapes().items())
            raise ValueError(f"--random_shape {random_shape}: not offered for --model {spec.name} ({offered})")
        if pretrained is not None:
            raise ValueError("--random_shape: give either it or --pretrained_model_name_or_path, not both")
        adapter = spec.random_adapter(random_shape, model_cfg, device, dtype, seed)
        description = f"{spec.name} transformer of the {random_shape} shape, random weights"
    else:
        if spec.needs_pretrained and pretrained is None:
            raise ValueError(f"--model {spec.name}: give --pretrained_model_name_or_path" +
                             (" or --random_shape" if stand_in else ""))
        adapter = spec.load(model_cfg, device, dtype)
        description = f"{spec.name} ({pretrained or 'shipped checkpoint'})"
    if stand_in:
        cond = spec.random_cond(adapter, num_prompts, text_tokens, device, dtype, seed)
    else:
        cond = encoded_prompts(spec, pretrained, num_prompts, text_tokens, device, model_cfg.backbone)
    sizes = media_size(adapter)
    return BenchBackbone(adapter, cond, _count(adapter.transformer), spec.tokens_per_sample(adapter, cond),
                         f"{description}{', ' + sizes if sizes else ''}")


def media_size(adapter) -> str:
    """"[frames x ]height x width" of what the adapter generates ('' when it has no such attributes: the toy)."""
    return "x".join(str(getattr(adapter, a)) for a in ("num_frames", "height", "width") if hasattr(adapter, a))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_config(args, random_shape: str | None = None):
    """The model section of a benchmark's flags (sizes not given: those of the `random_shape` stand-in, else the
    backbone's defaults; the GPU check has no base folder); flags that do not apply are refused, values checked."""
    from branchgrpo.config.sections import ModelConfig
    from branchgrpo.config.train import given_backbone_flags
    from branchgrpo.models import get_backbone

    spec = get_backbone(args.model)
    shape_flags = spec.random_shapes.get(random_shape, {}) if isinstance(spec, StandInSupport) else {}
    model_cfg = ModelConfig.for_backbone(args.model, getattr(args, "pretrained_model_name_or_path", None),
                                         **{**shape_flags, **given_backbone_flags(args)})
    model_cfg.backbone.validate()
    return model_cfg


def add_model_flags(parser) -> None:
    """--model, --pretrained_model_name_or_path and every backbone's flags (sizes, guidance, ...)."""
    from branchgrpo.config.train import add_backbone_flags
    from branchgrpo.models import backbones

    specs = [name for name, spec in backbones().items() if isinstance(spec, BenchSupport)]
    parser.add_argument("--model", choices=specs, default=specs[0], help="backbone (a registered spec)")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="base model folder (backbones without one shipped in the package need it or "
                        "--random_shape)")
    offered = random_shapes()
    parser.add_argument("--random_shape", "--random_flux_shape", dest="random_shape", default=None,
                        choices=sorted({shape for shapes in offered.values() for shape in shapes}),
                        help="a transformer of this shape with random weights instead of a folder (" +
                        "; ".join(f"{name}: {', '.join(shapes)}" for name, shapes in offered.items()) +
                        "; full = the released geometry; sizes not given: the shape's own, e.g. small images for a "
                        "tiny one)")
    add_backbone_flags(parser)
