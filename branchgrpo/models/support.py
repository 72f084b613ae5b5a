"""What a backbone spec may offer beyond training, preprocessing and evaluation: optional protocols (mixins) that the
tools check for. A spec without one is simply not offered by that tool, and asking for it is a one-line error
(`require_support`):

- `PlannerSupport`: its transformer built on the meta device for the memory planner (`python -m branchgrpo.plan
  --gpus N`; branchgrpo/planner/gpu_memory.py), from configs shipped under models/configs/;
- `BenchSupport`: the token count of the benchmarks' MFU and the trainer flags of the method comparison
  (branchgrpo/bench/, branchgrpo/cli/compare.py); `StandInSupport` adds transformers of named shapes with random
  weights and random conditioning (`--random_shape`: no files needed; the GPU check);
- `FixtureSupport`: the writer of its tiny random checkpoint (`python -m branchgrpo.make_tiny`, tests) and the sizes
  of a smoke run on it (`python -m branchgrpo.bench.matrix`).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import torch

from branchgrpo.core.files import read_json

#: transformer configs of the released checkpoints (their `transformer/config.json`), shipped with the package for the
#: memory planner and the benchmarks, which build the transformer from them (meta device or random weights)
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def read_shipped_config(name: str, offered: tuple[str, ...]) -> dict:
    """A shipped transformer config by name, or a config.json path (ValueError naming --transformer_config)."""
    path = Path(name)
    if name in offered:
        path = SHIPPED_CONFIGS / f"{name}.json"
    elif not path.is_file():
        raise ValueError(f"--transformer_config {name}: neither a shipped config ({', '.join(offered) or 'none'}) nor "
                         "a config.json file")
    config = read_json(path, "--transformer_config")
    if not isinstance(config, dict):
        raise ValueError(f"--transformer_config: {path} holds a JSON {type(config).__name__}, not a config object")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def require_support(spec, protocol: type, tool: str, given: str | None = None):
    """`spec` when it implements `protocol`, else a one-line ValueError: `tool` (e.g. "the memory planner") does not
    know the backbone `given` names (default: "--model <name>")."""
    if not isinstance(spec, protocol):
        raise ValueError(f"{given or '--model ' + spec.name}: {tool} does not know this backbone (its spec implements "
                         f"no {protocol.__name__}, models/support.py)")
    return spec


class PlannerModel(NamedTuple):
    """What the memory planner needs of a backbone: its transformer built without weights."""

    transformer: torch.nn.Module  # on the meta device (or `device`), in the given dtype
    blocks: list  # the FSDP2 / activation-checkpointing units, in call order
    inputs: Callable[[int], dict]  # batch -> the keyword inputs of one training forward of `batch` samples
    lora_targets: tuple[str, ...]  # module-name suffixes LoRA adapts by default
    latent_numel: int  # elements of one sample's latent (the rollout stores one per tree node, fp32)
    description: str


class PlannerSupport(abc.ABC):
    """A backbone the memory planner can size."""

    #: transformer configs shipped under models/configs/; the first is the default
    planner_configs: ClassVar[tuple[str, ...]] = ()

    def planner_config(self, model_cfg, name: str | None = None) -> tuple[dict, str]:
        """(transformer config, where it came from): `name` (a shipped config or a path), else the checkpoint's
        transformer/config.json when --pretrained_model_name_or_path holds one, else the first shipped config."""
        root = getattr(model_cfg, "pretrained_model_name_or_path", None)
        if name is None and root is not None and (Path(root) / "transformer" / "config.json").is_file():
            name = str(Path(root) / "transformer" / "config.json")
        if name is None:
            if not self.planner_configs:
                raise ValueError(f"--model {self.name}: no shipped transformer config; give --transformer_config")
            name = self.planner_configs[0]
        return read_shipped_config(name, self.planner_configs), name

    @abc.abstractmethod
    def planner_model(self, model_cfg, config: dict, dtype: torch.dtype, device="meta",
                      text_tokens: int = 512) -> PlannerModel:
        """The transformer of `config` built on `device` (meta: no memory) at the sizes of `model_cfg.backbone`."""


class BenchSupport(abc.ABC):
    """A backbone the benchmarks can time and the method comparison can train."""

    #: trainer flags every row of the method comparison shares (besides --model); (): not offered there
    comparison_flags: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def tokens_per_sample(self, adapter, cond: dict[str, torch.Tensor]) -> int:
        """Tokens the transformer processes per sample (latent + text tokens; twice with classifier-free guidance),
        the `tokens` of the benchmark's MFU."""


class StandInSupport(BenchSupport):
    """A backbone the benchmarks can build without its files: transformers of named shapes with random weights (the
    cost of a forward does not depend on the values) and random conditioning (its real text encoders would take
    memory the benchmark is not about)."""

    #: `--random_shape` values -> the flags of its section that shape runs at unless given (e.g. small images for a
    #: tiny shape)
    random_shapes: ClassVar[dict[str, dict]]

    @abc.abstractmethod
    def random_adapter(self, shape: str, model_cfg, device: torch.device, dtype: torch.dtype, seed: int = 0,
                       **config_overrides):
        """The adapter with a transformer of `shape` (one of `random_shapes`) and random weights drawn from `seed`,
        at the sizes of `model_cfg.backbone`; `config_overrides` replace values of the transformer config (e.g.
        fewer blocks)."""

    @abc.abstractmethod
    def random_cond(self, adapter, num_prompts: int, text_tokens: int | None, device: torch.device,
                    dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random per-prompt conditioning [num_prompts, ...] of the widths `adapter` reads; `text_tokens` None: the
        backbone's usual text context."""


class FixtureSupport:
    """A backbone with a tiny random checkpoint in its real folder layout (tests, CPU smoke runs)."""

    #: "module:function(out_dir, seed)" of branchgrpo.testing that writes it (imported on use: fixtures sit above
    #: the units)
    tiny: ClassVar[str]
    #: the sizes of a CPU smoke run on it (the backbone matrix, branchgrpo.bench.matrix): values of its section's
    #: flags and, under "max_sequence_length", the text length its prompts are encoded with; {}: none given (the
    #: matrix then reports the backbone as failing instead of running it at full size)
    tiny_run: ClassVar[dict] = {}
