"""Qwen-Image (text-to-image) as a `FlowAdapter`: packed latents, masked text, true CFG with per-token rescaling, the
exponential dynamic shift with `shift_terminal`, decode, export, prompt encoder and the negative-prompt embedding.

Conventions verified against diffusers 0.42 (QwenImagePipeline, QwenImageTransformer2DModel, AutoencoderKLQwenImage;
tests/test_qwen_image.py):
- Velocity sign and timestep as FLUX: x = sigma * noise + (1 - sigma) * x0, Euler x' = x + (sigma' - sigma) * out, so
  the output is already v = eps - x0; the pipeline passes t / 1000 = sigma and the model scales by 1000 inside.
- Latents: the VAE latent [B, 16, 1, H/8, W/8] (one frame) is cut into 2x2 patches -> [B, (H/16)(W/16), 64] exactly
  as FLUX packs them; `img_shapes` = (1, H/16, W/16) per sample (the rotary grid), normalisation
  (z - latents_mean) / latents_std per channel (VAE config), undone by `decode`.
- Text: Qwen2.5-VL-7B's last hidden state of the prompt in the pipeline's system template, the template's first 34
  tokens dropped; each prompt keeps its own length: embeddings are zero-padded to --max_sequence_length and stored
  with their mask (`prompt_embeds_mask`, 1 = token), which the transformer applies as a key mask. Text rotary
  positions start after the image grid whatever the mask, so padding never changes a prediction: `velocity` cuts
  the padding every row of a forward shares (rows of different prompts keep the mask).
- Guidance: no guidance embedding. True CFG (`--guidance_scale` = the pipeline's `true_cfg_scale`, 4.0) runs when the
  scale exceeds 1: neg + s (cond - neg), then each token rescaled to the norm of the conditional prediction's token;
  the pipeline runs two forwards, we run one over [cond; negative] rows. The negative prompt is the dataset-wide
  embedding preprocessing writes (`--negative_prompt`, default " " as in Qwen-Image's own example).
- Schedule: the checkpoint's FlowMatchEulerDiscreteScheduler shifts exponentially with mu linear in the image tokens
  (base_shift 0.5 at 256 tokens, max_shift 0.9 at 8192) and stretches the result to end at shift_terminal 0.02:
  `--time_shift dynamic` gives exactly that (`mu()`, `shift_terminal`).

dtypes: master weights fp32 (`load_qwen_image(dtype=...)`), the caller sets bf16 autocast around `velocity`; inputs
are cast to the transformer's parameter dtype, the output is returned in fp32. The VAE runs in `vae_dtype` (bf16 on
CUDA by default) under no_grad.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from branchgrpo.core.state_dicts import count_blocks
from branchgrpo.models import register_backbone
from branchgrpo.models.base import FlowAdapter
from branchgrpo.models.diffusers_backbone import (
    CONFIG_FILE,
    DiffusersExportMixin,
    DiffusersSpec,
    _unwrap,
    build_transformer,
    check_weights_match,
    load_part,
    load_pretrained,
    read_config,
)
from branchgrpo.models.flux import pack_latents, read_scheduler_config, scheduler_mu, unpack_latents
from branchgrpo.models.guidance import guidance_on, guided_prediction
from branchgrpo.models.spec import GuidanceFlags, SizeFlags, check_sizes, hub_id_hint
from branchgrpo.models.support import BenchSupport, FixtureSupport, PlannerModel, PlannerSupport

QWEN_LAYOUT = ("model_index.json", "transformer/", "vae/", "text_encoder/", "tokenizer/", "scheduler/")
TRANSFORMER_CLASS, PIPELINE_CLASS = "QwenImageTransformer2DModel", "QwenImagePipeline"
# Attention projections of the image and the text stream of every (dual-stream) block.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# QwenImagePipeline's text template; the embedding keeps what follows its first TEMPLATE_TOKENS tokens (the system
# turn and the user turn's header).
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_TOKENS = 34
MAX_TEXT_LEN = 1024  # the pipeline's tokenizer_max_length and the largest max_sequence_length it takes
DEFAULT_NEGATIVE_PROMPT = " "  # Qwen-Image's own example passes negative_prompt=" " with true_cfg_scale 4.0
# Transformer options of later releases (Qwen-Image-Edit-2511, Qwen-Image-Layered): conditioning this backbone lacks.
UNSUPPORTED_OPTIONS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")

# A test-sized QwenImageTransformer2DModel: in_channels is the PACKED channel count (4 x 16), the rotary axes sum to
# the head width. The tiny checkpoint's transformer (branchgrpo/testing/qwen_image_tiny.py).
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)


class QwenRelease(NamedTuple):
    """What the checks of a Qwen-Image-family backbone name: its --model, the pipeline its folders hold, the release,
    its docs page, its folder layout and its default folder."""

    model: str
    pipeline: str
    release: str
    docs: str
    layout: tuple[str, ...]
    default_folder: str


QWEN_IMAGE = QwenRelease("qwen_image", PIPELINE_CLASS, "Qwen/Qwen-Image, text-to-image", "docs/qwen_image.md",
                         QWEN_LAYOUT, "data/qwen_image")


def check_qwen_folder(model_path: str | Path | None, parts: tuple[str, ...], kind: QwenRelease = QWEN_IMAGE) -> Path:
    """Fail before loading anything heavy when the folder, one of the needed subfolders, or the pipeline is wrong."""
    layout, name = ", ".join(kind.layout), kind.release.split(",")[0].split("/")[-1]
    if model_path is None:
        raise ValueError(f"--pretrained_model_name_or_path / --model_path: no {name} folder given (diffusers "
                         f"layout: {layout})")
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} checkpoint folder {root} does not exist"
                                f"{hub_id_hint(root, kind.default_folder)}; expected a diffusers-layout {name} "
                                f"folder holding {layout} (see {kind.docs})")
    missing = [p for p in parts if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"{name} checkpoint folder {root} lacks {', '.join(missing)}; expected a "
                                f"diffusers-layout {name} folder holding {layout} (see {kind.docs})")
    index = root / "model_index.json"
    pipeline = _read_json(index).get("_class_name", kind.pipeline)
    if pipeline != kind.pipeline:
        raise ValueError(f"{index}: a {pipeline} checkpoint; --model {kind.model} takes a {kind.pipeline} folder "
                         f"({kind.release}; see {kind.docs})")
    return root


def _read_json(path: Path) -> dict:
    """A small JSON object of the checkpoint ({} when absent), or a ValueError naming it."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def check_qwen_config(height: int, width: int, transformer: dict, vae: dict, config_path: Path,
                      kind: QwenRelease = QWEN_IMAGE) -> None:
    """--h/--w and the transformer's options against the checkpoint's configs (read as JSON), before any weight is
    read: the class, options of later releases, sides multiples of 2 x the VAE's factor (2x2 packing), and a
    transformer that takes 4 x the VAE's latent channels."""
    name = transformer.get("_class_name", TRANSFORMER_CLASS)
    if name != TRANSFORMER_CLASS:
        raise ValueError(f"{config_path}: a {name}; --model {kind.model} expects a {TRANSFORMER_CLASS} "
                         f"({kind.release.split(',')[0]}'s transformer/ folder)")
    options = [o for o in UNSUPPORTED_OPTIONS if transformer.get(o)]
    if options or transformer.get("guidance_embeds"):
        raise ValueError(f"{config_path}: sets {', '.join(options or ['guidance_embeds'])}: a later Qwen-Image "
                         f"variant (layered / distilled / 2511); --model {kind.model} takes {kind.release}")
    factor = 2 ** len(vae.get("temperal_downsample", (False, True, True)))  # absent VAE config: Qwen-Image's 8
    for flag, value in (("--h", height), ("--w", width)):
        if value % (2 * factor):
            raise ValueError(f"{flag}: {value} is not a multiple of {2 * factor}: the VAE (vae/config.json next to "
                             f"{config_path.parent.name}/) downsamples {factor}x and Qwen-Image packs 2x2 patches")
    latent, packed = vae.get("z_dim"), int(transformer.get("in_channels", 64))
    if latent is not None and packed != 4 * int(latent):
        raise ValueError(f"{config_path}: the transformer takes {packed} packed channels, but the VAE has {latent} "
                         "latent channels (expected 4 x that): mismatched transformer/ and vae/ folders")


def describe_qwen(shapes) -> str:
    """Blocks and width of a Qwen-Image transformer, read from its tensor shapes."""
    embed = shapes.get("img_in.weight")
    return f"{count_blocks(shapes, 'transformer_blocks.')} blocks x width {embed[0] if embed else '?'}"


class QwenImageAdapter(DiffusersExportMixin, FlowAdapter):
    """QwenImageTransformer2DModel + its VAE at a fixed image size (see the module docstring for the conventions)."""

    name = "qwen_image"
    transformer_class_name = TRANSFORMER_CLASS
    pipeline_class_name = PIPELINE_CLASS

    def __init__(self, transformer: nn.Module, vae: nn.Module, height: int, width: int, guidance_scale: float = 4.0,
                 scheduler_config: dict | None = None):
        vae_config, config = vae.config, transformer.config  # read once: the attribute may later be wrapped (DDP)
        self.vae_scale_factor = 2 ** len(vae_config.temperal_downsample)
        check_sizes(SizeFlags(height, width), 2 * self.vae_scale_factor, "2x2 packing of the VAE's latent")
        if int(config.in_channels) != 4 * int(vae_config.z_dim):
            raise ValueError(f"Qwen-Image transformer takes {config.in_channels} packed channels, but the VAE has "
                             f"{vae_config.z_dim} latent channels (expected 4 x that): mismatched transformer/ and "
                             "vae/ folders")
        self.transformer, self.vae = transformer, vae.eval().requires_grad_(False)
        self.height, self.width, self.guidance_scale = height, width, float(guidance_scale)
        self.latent_h, self.latent_w = height // self.vae_scale_factor, width // self.vae_scale_factor
        self.latent_shape = ((self.latent_h // 2) * (self.latent_w // 2), int(config.in_channels))
        view = (1, int(vae_config.z_dim), 1, 1, 1)
        self.latents_mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(view)
        self.latents_std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(view)
        self.scheduler_config = dict(scheduler_config or {})
        self.shift_terminal = self.scheduler_config.get("shift_terminal") or None
        module_names = [n for n, _ in transformer.named_modules()]
        self.default_lora_targets = tuple(t for t in LORA_TARGETS if any(n.endswith("." + t) for n in module_names))

    @property
    def uses_cfg(self) -> bool:
        """QwenImagePipeline's rule: true CFG only when the scale exceeds 1 (and a negative prompt is given)."""
        return guidance_on(self.guidance_scale)

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """What the embedding store must hold (checked before training): the negative prompt's only with CFG."""
        negative = ("negative_prompt_embeds", "negative_prompt_embeds_mask") if self.uses_cfg else ()
        return ("prompt_embeds", "prompt_embeds_mask", *negative)

    # ----- sampling ------------------------------------------------------------------------------------------------

    def mu(self) -> float:
        """QwenImagePipeline's resolution-dependent shift for this image size (with `shift_terminal`)."""
        return scheduler_mu(self.scheduler_config, self.latent_shape[0])

    def _negative(self, cond: dict[str, torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt's embedding and mask per sample: [B, L, D] and [B, L] as the trainer passes them (the
        store's extras expanded), or one [L, D] / [L] expanded here."""
        if "negative_prompt_embeds" not in cond or "negative_prompt_embeds_mask" not in cond:
            raise KeyError("Qwen-Image with guidance_scale > 1 needs cond['negative_prompt_embeds'] and "
                           "['negative_prompt_embeds_mask'] (the embedding store's extras, written by the qwen_image "
                           "preprocess script); or set guidance_scale <= 1")
        neg, mask = cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"]
        neg, mask = (neg.unsqueeze(0), mask.unsqueeze(0)) if neg.dim() == 2 else (neg, mask)
        if neg.shape[1:] != like.shape[1:]:
            raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} and prompt_embeds {tuple(like.shape)} differ "
                             "in length or width; encode both with the same --max_sequence_length")
        batch = like.shape[0]
        return (neg.expand(batch, -1, -1).to(device=like.device, dtype=like.dtype),
                mask.expand(batch, -1).to(like.device))

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 (true CFG when guidance_scale > 1) for packed latents [B, L, 64] at per-sample sigmas [B]."""
        assert tuple(latents.shape[1:]) == self.latent_shape, (tuple(latents.shape), self.latent_shape)
        return self.guided_velocity(latents, sigmas, cond, [self.grid])

    @property
    def grid(self) -> tuple[int, int, int]:
        """The generated image's rotary grid (frames, rows, columns of packed tokens)."""
        return (1, self.latent_h // 2, self.latent_w // 2)

    def guided_velocity(self, tokens: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor],
                        shapes: list[tuple[int, int, int]]) -> torch.Tensor:
        """The (true-CFG) prediction for the generated tokens, the first `latent_shape[0]` of `tokens` [B, N, 64]
        whose image grids are `shapes` (the generated image's first; tokens after it condition, e.g. an edit's
        source latents)."""
        batch, generated = tokens.shape[0], self.latent_shape[0]
        assert sigmas.shape == (batch,), sigmas.shape
        device = tokens.device
        dtype = next(self.transformer.parameters()).dtype
        texts = [cond["prompt_embeds"].to(device=device, dtype=dtype)]
        masks = [cond["prompt_embeds_mask"].to(device)]
        if self.uses_cfg:
            negative = self._negative(cond, texts[0])
            texts, masks = texts + [negative[0]], masks + [negative[1]]
        # the padding every row shares carries no information (masked keys, positions independent of the mask)
        used = int(torch.nonzero(torch.stack([m.bool().any(0) for m in masks]).any(0)).max()) + 1
        texts, masks = [t[:, :used] for t in texts], [m[:, :used].bool() for m in masks]
        inputs = dict(hidden_states=tokens.to(dtype), timestep=sigmas.to(device=device, dtype=dtype),
                      encoder_hidden_states=texts[0], encoder_hidden_states_mask=masks[0])

        def forward(**rows) -> torch.Tensor:
            out = self.transformer(**rows, img_shapes=[shapes] * rows["hidden_states"].shape[0], return_dict=False)[0]
            return out[:, :generated].float()

        if not self.uses_cfg:
            return forward(**inputs)
        return guided_prediction(forward, inputs, {"encoder_hidden_states": texts[1],
                                                   "encoder_hidden_states_mask": masks[1]},
                                 self.guidance_scale, rescale_dim=-1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> images [B, 3, H, W] in [0, 1], float32 (QwenImagePipeline's decode path)."""
        param = next(self.vae.parameters())
        z = unpack_latents(latents.to(device=param.device, dtype=torch.float32), self.latent_h, self.latent_w)
        z = z.unsqueeze(2) * self.latents_std.to(z.device) + self.latents_mean.to(z.device)
        images = self.vae.decode(z.to(param.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    # ----- training support ----------------------------------------------------------------------------------------

    def blocks(self) -> list[nn.Module]:
        """The 60 dual-stream blocks of Qwen-Image (FSDP2 / activation-checkpointing units)."""
        return list(_unwrap(self.transformer).transformer_blocks)


def load_qwen_image(model_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype | None = None, height: int = 1024, width: int = 1024,
                    guidance_scale: float = 4.0, transformer_path: str | Path | None = None,
                    kind: QwenRelease = QWEN_IMAGE, adapter_class: type = QwenImageAdapter,
                    **adapter_options) -> QwenImageAdapter:
    """Load transformer (in `dtype`: fp32 master weights by default) and VAE (`vae_dtype`; default bf16 on CUDA,
    fp32 on CPU) from a local diffusers-layout Qwen-Image folder; nothing is downloaded. `transformer_path`: a folder
    whose `transformer/` is loaded instead of the base's (a full export of a training run; the rest from
    `model_path`). `kind`, `adapter_class`, `adapter_options`: a Qwen-Image-family release's checks and adapter."""
    root = check_qwen_folder(model_path, ("vae",) if transformer_path is not None else ("transformer", "vae"), kind)
    transformer_root = root if transformer_path is None else Path(transformer_path)
    folder = transformer_root / "transformer"
    transformer_config = read_config(folder, "Qwen-Image transformer")
    check_qwen_config(height, width, transformer_config, read_config(root / "vae", "Qwen-Image VAE"),
                      folder / CONFIG_FILE, kind)
    scheduler_config = read_scheduler_config(root)
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel  # after the checks: slow imports

    check_weights_match(QwenImageTransformer2DModel, folder, transformer_config, "Qwen-Image transformer",
                        describe_qwen, "config.json and the weights of transformer/ must come from the same checkpoint "
                        "or export")
    device = torch.device(device)
    if vae_dtype is None:
        vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load_part(QwenImageTransformer2DModel, transformer_root, "transformer", "Qwen-Image transformer",
                            torch_dtype=dtype)
    vae = load_part(AutoencoderKLQwenImage, root, "vae", "Qwen-Image VAE", torch_dtype=vae_dtype)
    return adapter_class(transformer, vae, height, width, guidance_scale, scheduler_config,
                         **adapter_options).to(device)


# ----- prompt encoding ---------------------------------------------------------------------------------------------


def text_length(args) -> int:
    """--max_sequence_length, checked against the pipeline's limit."""
    max_len = int(getattr(args, "max_sequence_length", 512))
    if not 1 <= max_len <= MAX_TEXT_LEN:
        raise ValueError(f"--max_sequence_length must be in [1, {MAX_TEXT_LEN}] for Qwen-Image, got {max_len}")
    return max_len


def negative_prompt(args) -> str:
    """--negative_prompt, or Qwen-Image's default (an empty string is a valid one)."""
    negative = getattr(args, "negative_prompt", None)
    return DEFAULT_NEGATIVE_PROMPT if negative is None else negative


def load_text_encoder(root: Path, device: torch.device, args):
    """(Qwen2.5-VL in --dtype, frozen, on `device`; its dtype) from the checked folder's text_encoder/."""
    name = getattr(args, "dtype", "auto")
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in ENCODER_DTYPES:
        raise ValueError(f"--dtype must be auto, fp32 or bf16 for Qwen-Image's text encoder, got '{name}'")
    dtype = ENCODER_DTYPES[name]
    from transformers import Qwen2_5_VLForConditionalGeneration  # slow import

    encoder = load_pretrained(
        lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(str(root / "text_encoder"), local_files_only=True,
                                                                    dtype=dtype),
        root / "text_encoder", "Qwen2.5-VL text encoder", "the text_encoder/ folder in transformers layout")
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False), dtype


def build_prompt_encoder(model_path: str | Path | None, device: torch.device | str, args):
    """`encode(texts) -> {"prompt_embeds": [n, L, D], "prompt_embeds_mask": [n, L]}` (L = max_sequence_length), per
    prompt equal to `QwenImagePipeline.encode_prompt(prompt=texts, max_sequence_length=L)` (the pipeline pads to the
    longest prompt of its batch; we pad every prompt to L, mask 0 on the padding). `encode.extras()` gives the
    dataset-wide negative-prompt embedding and mask (`args.negative_prompt`, default " ")."""
    root = check_qwen_folder(model_path, ("text_encoder", "tokenizer"))
    max_len = text_length(args)
    device = torch.device(device)
    from transformers import AutoTokenizer  # after the checks: slow imports

    tokenizer = load_pretrained(lambda: AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
                                root / "tokenizer", "Qwen2 tokenizer", "Qwen-Image's tokenizer/ in transformers layout")
    encoder, dtype = load_text_encoder(root, device, args)
    negative = negative_prompt(args)

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer([PROMPT_TEMPLATE.format(t) for t in texts], max_length=MAX_TEXT_LEN + TEMPLATE_TOKENS,
                           padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-1]
        embeds = hidden.new_zeros(len(texts), max_len, hidden.shape[-1])
        mask = torch.zeros(len(texts), max_len, dtype=torch.long, device=device)
        for row, keep in enumerate(tokens.attention_mask.bool()):
            prompt = hidden[row][keep][TEMPLATE_TOKENS:TEMPLATE_TOKENS + max_len]  # its own tokens, template dropped
            embeds[row, : len(prompt)], mask[row, : len(prompt)] = prompt, 1
        return {"prompt_embeds": embeds.to(dtype), "prompt_embeds_mask": mask}

    def extras() -> dict[str, torch.Tensor]:
        """The one negative prompt every prompt of a dataset shares (an empty string is a valid one)."""
        out = encode([negative])
        return {"negative_prompt_embeds": out["prompt_embeds"][0], "negative_prompt_embeds_mask":
                out["prompt_embeds_mask"][0]}

    encode.extras = extras
    return encode


@dataclass
class QwenImageConfig(GuidanceFlags, SizeFlags):
    """Qwen-Image's flags: the image size and the true-CFG scale (<= 1: no guidance, no negative prompt needed)."""

    DEFAULTS = {"h": 1024, "w": 1024, "guidance_scale": 4.0}

    def validate(self) -> None:
        check_sizes(self, 16, "Qwen-Image latents are 2x2-packed 8x-downsampled images")


def planner_inputs(config: dict, image_tokens: int, grid: tuple[int, int, int], text_tokens: int, rows: int,
                   device, dtype):
    """batch -> the keyword inputs of one training forward of `batch` samples (x `rows` with CFG)."""

    def inputs(batch: int) -> dict:
        n = rows * batch
        with torch.device(device):
            return dict(hidden_states=torch.randn(n, image_tokens, config["in_channels"], dtype=dtype),
                        encoder_hidden_states=torch.randn(n, text_tokens, config["joint_attention_dim"], dtype=dtype),
                        encoder_hidden_states_mask=torch.ones(n, text_tokens, dtype=torch.bool),
                        timestep=torch.ones(n, dtype=dtype), img_shapes=[[grid]] * n, return_dict=False)

    return inputs


@register_backbone
class QwenImageSpec(DiffusersSpec, PlannerSupport, BenchSupport, FixtureSupport):
    """Qwen-Image (text-to-image), diffusers layout; tiny stand-in: `python -m branchgrpo.make_tiny qwen_image DIR`."""

    name = "qwen_image"
    Config = QwenImageConfig
    dynamic_shift = True
    eval_rewards = ("hps", "pickscore", "clip", "imagereward")
    encoder_flags = ("max_sequence_length", "negative_prompt")
    tiny = "branchgrpo.testing.qwen_image_tiny:make_tiny_qwen_image"
    tiny_run = {"h": 32, "w": 32, "max_sequence_length": 48}
    planner_configs = ("qwen-image",)

    def check_config_sizes(self, model_cfg, transformer, vae, config_path) -> None:
        size = model_cfg.backbone.resolved
        check_qwen_config(size("h"), size("w"), transformer, vae, config_path)

    def load(self, model_cfg, device, dtype=torch.float32, transformer_path=None) -> QwenImageAdapter:
        size = model_cfg.backbone.resolved
        return load_qwen_image(model_cfg.pretrained_model_name_or_path, device, dtype=dtype, height=size("h"),
                               width=size("w"), guidance_scale=size("guidance_scale"),
                               transformer_path=transformer_path)

    def prompt_encoder(self, model_path, device, settings):
        return build_prompt_encoder(model_path, device, settings)

    def tokens_per_sample(self, adapter: QwenImageAdapter, cond) -> int:
        tokens = adapter.latent_shape[0] + cond["prompt_embeds"].shape[1]
        return 2 * tokens if adapter.uses_cfg else tokens

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=512) -> PlannerModel:
        from diffusers import QwenImageTransformer2DModel

        # the release's config.json also holds keys the class does not take (pooled_projection_dim)
        accepted = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
        config = {k: v for k, v in config.items() if k in accepted}
        transformer = build_transformer(QwenImageTransformer2DModel, config, device, dtype)
        h, w = model_cfg.backbone.resolved("h"), model_cfg.backbone.resolved("w")
        grid = (1, h // 16, w // 16)  # 8x VAE, 2x2 packing
        image_tokens = grid[1] * grid[2]
        rows = 2 if guidance_on(model_cfg.backbone.resolved("guidance_scale")) else 1  # true CFG: [cond; negative]
        inputs = planner_inputs(config, image_tokens, grid, text_tokens, rows, device, dtype)
        return PlannerModel(transformer, list(transformer.transformer_blocks), inputs, LORA_TARGETS,
                            image_tokens * config["in_channels"],
                            f"{h}x{w}: {image_tokens} image + {text_tokens} text tokens, x{rows} rows (CFG)")
