"""A backbone spec: the one place that answers every question about a backbone (toy, FLUX, Wan, ...).

Trainer, preprocessing, evaluation, benchmark and `make_tiny` look a backbone up by its `--model` name
(`branchgrpo.models.get_backbone`) and ask its spec; nothing else compares backbone names. A spec says

- which model flags apply to it (`flags`: --h, --w, --num_frames, --guidance_scale) and their defaults, and checks
  their values before anything is loaded (`check_flags`);
- how to load it for training (`load`) and for evaluation from a base folder plus a training checkpoint's weights
  (`load_for_eval`: full weights, LoRA, EMA; `eval_layouts`), how to encode prompts for preprocessing and evaluation
  (`prompt_encoder`, reading `encoder_flags`) and in which format its prompt files come (`prompt_format`: one prompt
  per line, or JSONL lines with a conditioning image), how many tokens a sample costs (`tokens_per_sample`, for MFU);
- its media type, how `--parallel auto` wraps it, whether it has a resolution-dependent schedule shift, which
  rewards `--rewards default` means for it, and how to write its tiny checkpoint (`tiny`).
The adapter it loads (models/base.py) answers the per-call questions: velocity, decode, blocks, export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import torch

from branchgrpo.core.files import read_json

REPO_ASSETS = Path(__file__).resolve().parents[2] / "assets"
#: transformer configs of the released checkpoints (their `transformer/config.json`), shipped with the package for the
#: memory planner, which builds the transformer from them on the meta device (no weights, no download)
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


#: the generation-size flags a backbone may take (`flags` says which it does)
MODEL_FLAGS = ("h", "w", "num_frames", "guidance_scale")


def hub_id_hint(path: str | Path, local_dir: str) -> str:
    """For a missing folder whose name looks like a Hugging Face Hub id (`owner/name`): how to fetch it, since every
    loader here reads local folders only (offline machines). Empty for anything else, and for a relative path whose
    first folder exists here (then it is a local path)."""
    text = str(path)
    parts = text.split("/")
    looks_like_id = (len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and text != local_dir
                     and all(c.isalnum() or c in "-_." for c in text.replace("/", "")) and not Path(parts[0]).exists())
    if not looks_like_id:
        return ""
    return (f"; '{text}' looks like a Hugging Face Hub id, but folders are read locally only: fetch it on a machine "
            f"with internet access with `huggingface-cli download {text} --local-dir {local_dir}` (copy the folder "
            f"over if needed) and pass {local_dir}")


class EvalModel(NamedTuple):
    """What `BackboneSpec.load_for_eval` returns."""

    adapter: object  # the FlowAdapter to sample with
    description: str  # "base", "full weights from DIR", "LoRA from DIR"
    prompt_source: str | Path | None  # the folder whose text encoders encode the prompts (`prompt_encoder`'s path)


class PlannerModel(NamedTuple):
    """What the memory planner (branchgrpo/cli/plan.py) needs of a backbone: its transformer built without weights."""

    transformer: torch.nn.Module  # on the meta device (or `device`), in the given dtype
    blocks: list  # the FSDP2 / activation-checkpointing units, in call order
    inputs: Callable[[int], dict]  # batch -> the keyword inputs of one training forward of `batch` samples
    lora_targets: tuple[str, ...]  # module-name suffixes LoRA adapts by default
    latent_numel: int  # elements of one sample's latent (the rollout stores one per tree node, fp32)
    description: str


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


class BackboneSpec:
    #: the `--model` value
    name: ClassVar[str]
    #: "image" (decode -> [B, C, H, W]) or "video" (decode -> [B, C, F, H, W])
    media: ClassVar[str] = "image"
    #: model flags that act on this backbone, and the values used when they are not given
    flags: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict] = {}
    #: --pretrained_model_name_or_path is required (the toy ships its checkpoint in the package)
    needs_pretrained: ClassVar[bool] = True
    #: how `--parallel auto` wraps it with more than one process: "fsdp" (shard per block) or "ddp" (replicate)
    default_parallel: ClassVar[str] = "fsdp"
    #: billions of weights: a second (frozen) copy of them is worth a warning
    is_large: ClassVar[bool] = True
    #: has a resolution-dependent schedule shift (`--time_shift dynamic`; its adapter implements `mu()`)
    dynamic_shift: ClassVar[bool] = False
    #: what the evaluation CLI's `--rewards default` / `all` mean for this backbone
    eval_rewards: ClassVar[tuple[str, ...]] = ()
    #: the weight layouts of a training checkpoint `load_for_eval` reads (names as branchgrpo.eval.checkpoints
    #: detects them: "toy_full", "diffusers_full", "peft_lora", "diffusers_lora")
    eval_layouts: ClassVar[tuple[str, ...]] = ()
    #: prompt-encoder flags (preprocessing, evaluation) its `prompt_encoder` reads: "max_sequence_length",
    #: "negative_prompt", and model flags (MODEL_FLAGS) when the stored conditioning depends on the generation size
    encoder_flags: ClassVar[tuple[str, ...]] = ()
    #: its prompt files (branchgrpo.data.preprocess.PROMPT_FORMATS): "text" (one prompt per line; the encoder takes
    #: strings) or "jsonl" (lines {"prompt": ..., "image": ...}; the encoder takes `PromptRecord`s)
    prompt_format: ClassVar[str] = "text"
    #: "module:function(out_dir, seed)" that writes a tiny random checkpoint in the real layout (None: none)
    tiny: ClassVar[str | None] = None
    #: transformer configs shipped under models/configs/ for the memory planner; the first is the default
    planner_configs: ClassVar[tuple[str, ...]] = ()

    def planner_config(self, model_cfg, name: str | None = None) -> tuple[dict, str]:
        """(transformer config, where it came from) for the memory planner: `name` (a shipped config or a path),
        else the checkpoint's transformer/config.json when --pretrained_model_name_or_path holds one, else the
        first shipped config."""
        root = getattr(model_cfg, "pretrained_model_name_or_path", None)
        if name is None and root is not None and (Path(root) / "transformer" / "config.json").is_file():
            name = str(Path(root) / "transformer" / "config.json")
        if name is None:
            if not self.planner_configs:
                raise ValueError(f"--model {self.name}: no shipped transformer config; give --transformer_config")
            name = self.planner_configs[0]
        return read_shipped_config(name, self.planner_configs), name

    def planner_model(self, model_cfg, config: dict, dtype: torch.dtype, device="meta",
                      text_tokens: int = 512) -> PlannerModel:
        """The transformer of `config` built on `device` (meta: no memory) with the size flags of `model_cfg`."""
        raise NotImplementedError(f"--model {self.name}: the memory planner does not know this backbone")

    def size(self, model_cfg, name: str):
        """A model flag's value: as given, else this backbone's default."""
        value = getattr(model_cfg, name, None)
        return self.defaults.get(name) if value is None else value

    def encoder_sizes(self, model_cfg) -> dict:
        """The model flags its prompt encoder reads (`encoder_flags`), resolved (given, else default): the sizes its
        stored conditioning is built for (e.g. first-frame latents of the video size)."""
        return {name: self.size(model_cfg, name) for name in self.encoder_flags if name in MODEL_FLAGS}

    def image_size(self, model_cfg) -> tuple[int, int] | None:
        """(h, w) of the frames its conditioning images are resized to (JSONL prompt files are checked against it),
        or None when its encoder reads no size."""
        sizes = self.encoder_sizes(model_cfg)
        return (sizes["h"], sizes["w"]) if {"h", "w"} <= set(sizes) else None

    def check_flags(self, model_cfg) -> None:
        """Value checks of the flags in `flags` (ValueError naming the flag); nothing is loaded."""

    def check_files(self, model_cfg, transformer_root: str | Path | None = None) -> None:
        """Checks of the flags against the checkpoint's own configs (small JSON files), run by config validation
        when the folder is known (the loader runs the same checks again before any weight is read): e.g. sizes the
        transformer cannot take. `transformer_root`: the folder whose transformer is loaded (default: the base
        folder). A folder or config that is absent is left to the loader, which names it. Nothing by default."""

    def inapplicable_flags(self, model_cfg) -> list[str]:
        """Model flags given (not None) that do not act on this backbone, e.g. `num_frames` for an image model.
        Training warns about them; evaluation and the benchmark refuse them."""
        return [name for name in MODEL_FLAGS if getattr(model_cfg, name, None) is not None and name not in self.flags]

    def load(self, model_cfg, device: torch.device, dtype: torch.dtype = torch.float32):
        """The FlowAdapter for training: trained weights in `dtype` (fp32 master weights by default)."""
        raise NotImplementedError

    def load_for_eval(self, model_cfg, weights: Path | None, layout: str | None, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> "EvalModel":
        """The model to evaluate: the base (`weights` None) or the base with a training checkpoint's weights, the
        folder `weights` in `layout` (one of `eval_layouts`). The transformer's weights are in `dtype`."""
        raise NotImplementedError(f"--model {self.name}: evaluation is not supported")

    def tokens_per_sample(self, adapter, cond: dict[str, torch.Tensor]) -> int:
        """Tokens the transformer processes per sample (latent + text tokens; twice with classifier-free guidance),
        the `tokens` of the benchmark's MFU."""
        raise NotImplementedError(f"--model {self.name}: no token count for the benchmark")

    def prompt_encoder(self, model_path, device: torch.device, settings):
        """encode(items) -> {key: tensor [n, ...]} with the keys the adapter reads (preprocessing and evaluation);
        items are prompt strings, or `PromptRecord`s for a "jsonl" `prompt_format`. `settings` has
        max_sequence_length, dtype and negative_prompt (and the sizes of `encoder_sizes` where it reads them).
        `encode.extras()`, where present, gives the dataset-wide tensors (e.g. Wan's negative-prompt embedding)."""
        raise NotImplementedError

    def default_prompts(self) -> Path:
        """The prompt file evaluation uses when none is given."""
        return REPO_ASSETS / "prompts.txt"

    def builtin_prompts(self) -> tuple[Path, Path] | None:
        """(training, held-out) prompt files shipped with the backbone, so that a run needs no data of the user's
        (the toy's); None: the user provides prompts."""
        return None


def check_sizes(model_cfg, multiple: int, why: str, names=("h", "w")) -> None:
    """Image sides given must be positive multiples of `multiple` (VAE factor x patch size)."""
    for name in names:
        size = getattr(model_cfg, name, None)
        if size is not None and (size <= 0 or size % multiple):
            raise ValueError(f"--{name}: {size} is not a positive multiple of {multiple} ({why})")
