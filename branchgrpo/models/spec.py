"""A backbone spec: what training, preprocessing and evaluation ask of a backbone (toy, FLUX, Wan, ...).

Trainer, preprocessing and evaluation look a backbone up by its `--model` name (`branchgrpo.models.get_backbone`)
and ask its spec; nothing else compares backbone names. A spec says

- its config section (`Config`): a dataclass of `flag(...)` fields - generation size, guidance, ... - with one-line
  docs, the backbone's own values for flags left unset (`DEFAULTS`), checks (`validate`) and conditions; the flags
  join the command line under their flat names (branchgrpo.config.train). A flag several backbones take (--h, --w,
  --guidance_scale) is one identical field: take it from `SizeFlags` / `GuidanceFlags` below;
- how to load it for training (`load`) and for evaluation from a base folder plus a training checkpoint's weights
  (`load_for_eval`: full weights, LoRA, EMA; `eval_layouts`), how to encode prompts for preprocessing and evaluation
  (`prompt_encoder`, reading `encoder_flags`) and in which format its prompt files come (`prompt_format`);
- its media kind (`media`: what `decode` returns, and how samples are written), how `--parallel auto` wraps it,
  whether it has a resolution-dependent schedule shift, which rewards `--rewards default` means for it.
The adapter it loads (models/base.py) answers the per-call questions: velocity, decode, blocks, export, LoRA.
What only the memory planner, the benchmarks or the test fixtures need is in optional protocols a spec may also
implement (models/support.py: `PlannerSupport`, `BenchSupport` and `StandInSupport`, `FixtureSupport`).

Evaluation loading stays here rather than in a protocol: every backbone that trains is evaluated, and the diffusers
backbones share one implementation (models/diffusers_backbone.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch

from branchgrpo.core.flags import flag

REPO_ASSETS = Path(__file__).resolve().parents[2] / "assets"
SOURCE_SIZES = ("preferred", "generation")  # --source_size of the editing backbones (SourceSizeFlags)
SOURCE_IMAGE_KEY = "source_image"  # an edit's resized source, uint8 [3, h, w], stored per prompt (rewards/edit.py)
#: what a backbone's `decode` returns: images [B, C, H, W] or videos [B, C, F, H, W]
MEDIA_KINDS = ("image", "video")


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


@dataclass
class BackboneConfig:
    """A backbone's config section: subclasses add `flag(...)` fields (the empty section is the toy's). A size or
    guidance flag defaults to None, meaning the backbone's own value (`DEFAULTS`): a run records None, so runs and
    checkpoints do not depend on where the default is written."""

    #: the values flags left at None take for this backbone
    DEFAULTS: ClassVar[dict] = {}

    def resolved(self, name: str):
        """A flag's value: as given, else this backbone's default."""
        value = getattr(self, name)
        return self.DEFAULTS.get(name) if value is None else value

    def validate(self) -> None:
        """Checks of the section's values (ValueError naming the flag); nothing is loaded."""

    def conditions(self) -> dict[str, tuple[bool, str]]:
        """Flags of this section that act only under a condition: name -> (condition holds, the condition in
        words). A flag set to a non-default value whose condition fails is reported as having no effect."""
        return {}


@dataclass
class SizeFlags(BackboneConfig):
    """The generation size, shared by every backbone that takes one (one field each, one flag on the command line)."""

    h: int | None = flag(None, "height of the generated images or videos in pixels")
    w: int | None = flag(None, "width of the generated images or videos in pixels")


@dataclass
class GuidanceFlags(BackboneConfig):
    """The guidance scale, shared by every backbone with guidance of either kind."""

    guidance_scale: float | None = flag(None, "guidance scale: the embedded guidance of a guidance-distilled "
                                        "backbone, or classifier-free guidance")


@dataclass
class SourceSizeFlags(BackboneConfig):
    """The size edit source images are resized to, shared by the editing backbones (their DEFAULTS say which)."""

    source_size: str | None = flag(None, "the size edit source images are resized to: 'preferred' (the size the "
                                   "backbone's pipeline picks for an image of the run's aspect ratio, about 1 "
                                   "megapixel) or 'generation' (--h x --w)", choices=SOURCE_SIZES)


class BackboneSpec:
    """What training, preprocessing and evaluation ask of a backbone (see the module docstring)."""

    #: the `--model` value
    name: ClassVar[str]
    #: one of MEDIA_KINDS: what `decode` returns and how samples are written (runtime/outputs.py `save_media`)
    media: ClassVar[str] = "image"
    #: its config section (a BackboneConfig dataclass); its fields are flags
    Config: ClassVar[type[BackboneConfig]] = BackboneConfig
    #: --pretrained_model_name_or_path is required (the toy ships its checkpoint in the package)
    needs_pretrained: ClassVar[bool] = True
    #: how `--parallel auto` wraps it with more than one process: "fsdp" (shard per block) or "ddp" (replicate)
    default_parallel: ClassVar[str] = "fsdp"
    #: billions of weights: a second (frozen) copy of them is worth a warning
    is_large: ClassVar[bool] = True
    #: has a resolution-dependent schedule shift (`--time_shift dynamic`; its adapter implements `mu()`)
    dynamic_shift: ClassVar[bool] = False
    #: prompt-encoder flags (preprocessing, evaluation) its `prompt_encoder` reads: "max_sequence_length",
    #: "negative_prompt", and flags of its section when the stored conditioning depends on the generation size
    encoder_flags: ClassVar[tuple[str, ...]] = ()
    #: its prompt files (branchgrpo.data.preprocess.PROMPT_FORMATS): "text" (one prompt per line; the encoder takes
    #: strings) or "jsonl" (lines {"prompt": ..., "image": ...}; the encoder takes `PromptRecord`s)
    prompt_format: ClassVar[str] = "text"
    #: conditioning images a "jsonl" prompt line may give (`"image"`, or `"images": [...]` up to this many)
    max_images: ClassVar[int] = 1
    #: a per-prompt image of its conditioning (a key its prompt encoder stores, uint8 [3, h, w]) that the evaluation
    #: grid shows before each prompt's samples, e.g. an edit's source; None: the grid shows the samples alone
    grid_condition: ClassVar[str | None] = None
    #: what the evaluation CLI's `--rewards default` / `all` mean for this backbone
    eval_rewards: ClassVar[tuple[str, ...]] = ()
    #: the weight layouts of a training checkpoint `load_for_eval` reads (names as branchgrpo.eval.checkpoints
    #: detects them: "toy_full", "diffusers_full", "peft_lora", "diffusers_lora")
    eval_layouts: ClassVar[tuple[str, ...]] = ()

    # ----- training ------------------------------------------------------------------------------------------------

    def load(self, model_cfg, device: torch.device, dtype: torch.dtype = torch.float32):
        """The FlowAdapter for training: trained weights in `dtype` (fp32 master weights by default). `model_cfg`:
        the run's ModelConfig (checkpoint folder; `model_cfg.backbone` is this spec's section)."""
        raise NotImplementedError

    def check_files(self, model_cfg, transformer_root: str | Path | None = None) -> None:
        """Checks of the flags against the checkpoint's own configs (small JSON files), run by config validation
        when the folder is known (the loader runs the same checks again before any weight is read): e.g. sizes the
        transformer cannot take. `transformer_root`: the folder whose transformer is loaded (default: the base
        folder). A folder or config that is absent is left to the loader, which names it. Nothing by default."""

    # ----- prompts: preprocessing and evaluation -------------------------------------------------------------------

    def prompt_encoder(self, model_path, device: torch.device, settings):
        """encode(items) -> {key: tensor [n, ...]} with the keys the adapter reads (preprocessing and evaluation);
        items are prompt strings, or `PromptRecord`s for a "jsonl" `prompt_format`. `settings` has
        max_sequence_length, dtype and negative_prompt (and the sizes of `encoder_sizes` where it reads them).
        `encode.extras()`, where present, gives the dataset-wide tensors (e.g. Wan's negative-prompt embedding)."""
        raise NotImplementedError

    def encoder_sizes(self, values) -> dict:
        """The flags of its section its prompt encoder reads (`encoder_flags`), resolved (given, else default): the
        sizes its stored conditioning is built for (e.g. first-frame latents of the video size). `values`: the
        section, or any object with those attributes (the preprocessing CLI's arguments)."""
        names = [f.name for f in dataclasses.fields(self.Config) if f.name in self.encoder_flags]
        section = self.Config(**{n: getattr(values, n) for n in names if getattr(values, n, None) is not None})
        return {name: section.resolved(name) for name in names}

    def image_size(self, values) -> tuple[int, int] | None:
        """(h, w) its conditioning images are resized to (the aspect ratios of JSONL prompt files' images are checked
        against it), or None when its encoder reads no size. Default: the size flags its encoder reads."""
        sizes = self.encoder_sizes(values)
        return (sizes["h"], sizes["w"]) if {"h", "w"} <= set(sizes) else None

    def default_prompts(self) -> Path:
        """The prompt file evaluation uses when none is given."""
        return REPO_ASSETS / "prompts.txt"

    def builtin_prompts(self) -> tuple[Path, Path] | None:
        """(training, held-out) prompt files shipped with the backbone, so that a run needs no data of the user's
        (the toy's); None: the user provides prompts."""
        return None

    # ----- evaluation ----------------------------------------------------------------------------------------------

    def load_for_eval(self, model_cfg, weights: Path | None, layout: str | None, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> "EvalModel":
        """The model to evaluate: the base (`weights` None) or the base with a training checkpoint's weights, the
        folder `weights` in `layout` (one of `eval_layouts`). The transformer's weights are in `dtype`."""
        raise NotImplementedError(f"--model {self.name}: evaluation is not supported")


def check_sizes(section, multiple: int, why: str, names=("h", "w")) -> None:
    """Image sides given must be positive multiples of `multiple` (VAE factor x patch size)."""
    for name in names:
        size = getattr(section, name, None)
        if size is not None and (size <= 0 or size % multiple):
            raise ValueError(f"--{name}: {size} is not a positive multiple of {multiple} ({why})")


class EditSpec:
    """What the instruction-based editing backbones share (mixed in before their base spec; their section has
    SourceSizeFlags and their encoder stores SOURCE_IMAGE_KEY): JSONL prompts with source images resized to
    `source_resolution`, source | results evaluation grids, the edit rewards."""

    prompt_format: ClassVar[str] = "jsonl"
    eval_rewards: ClassVar[tuple[str, ...]] = ("source_consistency", "clip_directional")
    grid_condition: ClassVar[str | None] = SOURCE_IMAGE_KEY  # evaluation grids read source | results
    comparison_flags: ClassVar[tuple[str, ...]] = ()  # the method comparison trains text-to-image prompts

    def source_resolution(self, height: int, width: int, source_size: str) -> tuple[int, int]:
        """(h, w) the sources of a run at `height` x `width` are resized to, for a --source_size value."""
        raise NotImplementedError

    def source_size(self, values) -> tuple[int, int]:
        """(h, w) of the stored sources for the size flags in `values` (as `encoder_sizes` reads them)."""
        sizes = self.encoder_sizes(values)
        return self.source_resolution(sizes["h"], sizes["w"], sizes["source_size"])

    def image_size(self, values) -> tuple[int, int]:
        return self.source_size(values)

    def default_prompts(self) -> Path:
        return REPO_ASSETS / "edit_prompts.jsonl"
