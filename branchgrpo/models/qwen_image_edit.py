"""Qwen-Image-Edit (instruction-based image editing) as a `FlowAdapter`: Qwen-Image's adapter (models/qwen_image.py)
with the source image's latents appended to the image tokens, built once per prompt by the prompt encoder
(preprocessing, evaluation) and entered at every step, in rollout and training alike, as diffusers'
QwenImageEditPipeline enters them.

Conventions verified against diffusers 0.42 (QwenImageEditPipeline; tests/test_qwen_image_edit.py):
- Prompts are JSONL lines `{"prompt": <edit instruction>, "image": <source image>}` (data/preprocess.py). The source
  is resized (PIL Lanczos, no crop: the pipeline's VaeImageProcessor) to the source size, and that image is both
  - seen by Qwen2.5-VL: the instruction in the pipeline's edit template, the source's vision tokens in its user turn
    (the Qwen2VLProcessor of the checkpoint's `processor/` resizes it again to multiples of 28 pixels), the last
    hidden state with the template's first 64 tokens dropped. The negative prompt (`--negative_prompt`, default " ")
    is encoded the same way WITH the source image, so it is stored per prompt, not once per dataset;
  - encoded by the VAE: its mode, normalised per channel ((z - latents_mean) / latents_std) and 2x2-packed, stored as
    `image_latents` [(h_s / 16)(w_s / 16), 64] fp32; its pixels as `source_image` uint8 and the line's mask as
    `edit_mask` (the edit rewards' inputs, as FLUX.1-Kontext stores them: models/flux_kontext.py).
  Embeddings are zero-padded to the source's vision tokens + --max_sequence_length (the instruction's tokens) with
  their mask; an instruction longer than that is refused (the pipeline never truncates).
- The source size is fixed per run (the stored latents have one shape): `--source_size preferred` (default) is the
  pipeline's choice for an image of the run's aspect ratio (about 1024 x 1024 pixels in area, sides multiples of
  32); `generation` is --h/--w. Source images whose aspect ratio is more than 10% off the source size are refused (or
  skipped) by line number.
- At every step the transformer sees [x ; source tokens] along the sequence with `img_shapes` = [(1, h/16, w/16),
  (1, h_s/16, w_s/16)] (the source's rotary grid follows the generated one's), and its prediction is sliced back to
  the generated tokens. The source latents enter unchanged (no noise) at every sigma.
- Edit-2509 (`qwen_image_edit_plus`, QwenImageEditPlusPipeline) takes 1 to PLUS_MAX_SOURCES source images per edit
  (`"images": [...]`; the release's model card gives its best results with 1 to 3): the same system turn, the user
  turn names each picture ("Picture 1: " + its vision tokens, "Picture 2: " + ..., then the instruction), the vision
  tower sees a copy of each of about 384 x 384 pixels resized from the original, and the VAE a copy of each at the
  source size (resized from the original too). `image_latents` holds the sources' packed latents one after another
  [n (h_s / 16)(w_s / 16), 64], and the transformer sees [x ; source 1 ; source 2 ...] with one grid per source in
  `img_shapes`. Every line of a prompt file gives the same number of sources (data/preprocess.py): the stored
  conditioning has one shape per run. `source_image` and `edit_mask` are the FIRST source's ("Picture 1"): the
  edit rewards compare the result to it, so put the image being edited first and the references after it.
- True CFG with the per-token norm rescale, the schedule (mu from the generated tokens only, shift_terminal), the
  velocity sign, decode, LoRA targets and exports are Qwen-Image's: the transformer is a QwenImageTransformer2DModel
  of Qwen-Image's shape. Exports load with `QwenImageTransformer2DModel.from_pretrained` and
  `QwenImageEditPipeline.load_lora_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from branchgrpo.core.flags import flag
from branchgrpo.models import register_backbone
from branchgrpo.models.diffusers_backbone import load_part, load_pretrained
from branchgrpo.models.flux import pack_latents
from branchgrpo.models.flux_kontext import MASK_KEY, edit_mask
from branchgrpo.models.qwen_image import (
    QWEN_LAYOUT,
    QwenImageAdapter,
    QwenImageConfig,
    QwenImageSpec,
    QwenRelease,
    check_qwen_config,
    check_qwen_folder,
    load_qwen_image,
    load_text_encoder,
    negative_prompt,
    text_length,
)
from branchgrpo.models.spec import SOURCE_IMAGE_KEY, EditSpec, SizeFlags, SourceSizeFlags, check_sizes
from branchgrpo.models.support import PlannerModel

PIPELINE = "QwenImageEditPipeline"
QWEN_IMAGE_EDIT = QwenRelease("qwen_image_edit", PIPELINE, "Qwen/Qwen-Image-Edit, instruction-based editing",
                              "docs/editing.md", (*QWEN_LAYOUT, "processor/"), "data/qwen_image_edit")
# QwenImageEditPipeline's template; the embedding keeps what follows its first TEMPLATE_TOKENS tokens.
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                 "objects, background), then explain how the user's text instruction should alter or modify the "
                 "image. Generate a new image that meets the user's requirements while maintaining consistency with "
                 "the original input where appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                 "<|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_TOKENS = 64
SOURCE_AREA = 1024 * 1024  # the pipeline's source area in pixels
# Edit-2509 (QwenImageEditPlusPipeline): the same system turn, each image named in the user turn, and Qwen2.5-VL sees
# a smaller copy of the source (about 384 x 384 pixels) than the VAE.
PLUS_PIPELINE = "QwenImageEditPlusPipeline"
QWEN_IMAGE_EDIT_PLUS = QwenRelease("qwen_image_edit_plus", PLUS_PIPELINE, "Qwen/Qwen-Image-Edit-2509, instruction-based "
                                   "editing", "docs/editing.md", (*QWEN_LAYOUT, "processor/"),
                                   "data/qwen_image_edit_plus")
PLUS_TEMPLATE = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
PLUS_VISION_AREA = 384 * 384
PLUS_MAX_SOURCES = 3  # Qwen-Image-Edit-2509's model card: multi-image editing works best with 1 to 3 inputs


class EditEncoding(NamedTuple):
    """How a release puts the source before Qwen2.5-VL: its template, whether the user turn names the picture
    (PICTURE), and the area of the copy the vision tower sees (None: the VAE's copy)."""

    template: str
    picture: bool
    vision_area: int | None


EDIT_ENCODING = EditEncoding(EDIT_TEMPLATE, False, None)
PLUS_ENCODING = EditEncoding(PLUS_TEMPLATE, True, PLUS_VISION_AREA)
SOURCE_KEYS = ("image_latents",)  # per-prompt tensors the transformer reads, besides the text


def source_resolution(height: int, width: int, source_size: str) -> tuple[int, int]:
    """(h, w) the source images of a run at --h/--w are resized to: the run's size, or the size the pipeline picks
    for an image of the run's aspect ratio."""
    return (height, width) if source_size == "generation" else area_size(SOURCE_AREA, width / height)


def area_size(area: int, ratio: float) -> tuple[int, int]:
    """(h, w) of about `area` pixels at aspect ratio `ratio` (w / h), sides multiples of 32: the pipelines' rule."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(area, ratio)
    return int(height), int(width)


class QwenImageEditAdapter(QwenImageAdapter):
    """QwenImageTransformer2DModel (Qwen-Image-Edit) + its VAE: Qwen-Image with the source tokens after the
    generated ones."""

    name = "qwen_image_edit"
    pipeline_class_name = PIPELINE
    max_sources = 1  # source images per edit its pipeline takes

    def __init__(self, transformer, vae, height: int, width: int, guidance_scale: float = 4.0,
                 scheduler_config: dict | None = None, source_size: tuple[int, int] | None = None,
                 num_sources: int | None = None):
        super().__init__(transformer, vae, height, width, guidance_scale, scheduler_config)
        self.source_h, self.source_w = source_size or (height, width)
        self.num_sources = num_sources  # None: any number up to max_sources (Edit-2509's --num_sources)
        factor = 2 * self.vae_scale_factor
        check_sizes(SizeFlags(self.source_h, self.source_w), factor, "the source size (--source_size): 2x2 packing")
        self.source_grid = (1, self.source_h // factor, self.source_w // factor)

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        return super().embedding_keys + SOURCE_KEYS

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 of the generated tokens [B, L, 64]: the transformer runs on [x ; source tokens], one grid
        per source."""
        assert tuple(latents.shape[1:]) == self.latent_shape, (tuple(latents.shape), self.latent_shape)
        source = self.source_tokens(cond).to(device=latents.device, dtype=latents.dtype)
        num_sources = source.shape[1] // (self.source_grid[1] * self.source_grid[2])
        return self.guided_velocity(torch.cat([latents, source], dim=1), sigmas, cond,
                                    [self.grid] + [self.source_grid] * num_sources)

    def source_tokens(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sources' packed latents [B, n x source tokens, 64], checked against the run's source size."""
        if "image_latents" not in cond:
            raise KeyError("Qwen-Image-Edit needs cond['image_latents'] (the source images' packed latents, written "
                           "per prompt by the qwen_image_edit preprocess script)")
        source = cond["image_latents"]
        per_source, channels = self.source_grid[1] * self.source_grid[2], self.latent_shape[1]
        tokens = source.shape[1]
        if source.shape[2] != channels or not tokens or tokens % per_source:
            raise ValueError(f"image_latents of shape {list(source.shape[1:])} were encoded for another source size "
                             f"than this run's {self.source_w} x {self.source_h} ([n x {per_source}, {channels}] for "
                             "n sources; --h, --w, --source_size); preprocess with the run's H, W and SOURCE_SIZE")
        if tokens // per_source > self.max_sources:
            raise ValueError(f"image_latents hold {tokens // per_source} source images, but --model {self.name} "
                             f"takes at most {self.max_sources} per edit")
        if self.num_sources is not None and tokens // per_source != self.num_sources:
            raise ValueError(f"image_latents hold {tokens // per_source} source image(s) per edit, but --num_sources "
                             f"is {self.num_sources}: preprocess prompt lines with that many images, or change it")
        return source


def build_edit_encoder(model_path, device, args, h: int, w: int, source_size: str,
                       kind: QwenRelease = QWEN_IMAGE_EDIT, encoding: EditEncoding = EDIT_ENCODING):
    """`encode(records) -> {prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask,
    image_latents, source_image, edit_mask}` for `PromptRecord`s, each equal to what the release's pipeline builds
    from the same instruction, negative prompt and source images at the source size (module docstring). One record
    at a time, as the pipelines take one edit per call. The VAE runs in fp32; the latents are stored in fp32."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image

    root = check_qwen_folder(model_path, ("text_encoder", "processor", "vae"), kind)
    max_len, negative = text_length(args), negative_prompt(args)
    source_h, source_w = source_resolution(h, w, source_size)
    device = torch.device(device)
    from transformers import Qwen2VLProcessor  # after the checks: slow import

    processor = load_pretrained(
        lambda: Qwen2VLProcessor.from_pretrained(str(root / "processor"), local_files_only=True),
        root / "processor", "Qwen2VL processor", "the pipeline's processor/ folder")
    text_encoder, dtype = load_text_encoder(root, device, args)
    vae = load_part(AutoencoderKLQwenImage, root, "vae", "Qwen-Image VAE", torch_dtype=torch.float32)
    vae = vae.to(device).eval().requires_grad_(False)
    view = (1, int(vae.config.z_dim), 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(view)
    std = torch.tensor(vae.config.latents_std, device=device).view(view)
    pixels = VaeImageProcessor(vae_scale_factor=2 ** len(vae.config.temperal_downsample) * 2)

    def embed(text: str, images: list, record) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, L, D] and [1, L] for the text and the source images, L = their vision tokens + max_len."""
        named = "".join(PICTURE.format(i + 1) for i in range(len(images))) if encoding.picture else ""
        inputs = processor(text=[encoding.template.format(named + text)], images=images, padding=True,
                           return_tensors="pt")
        inputs = inputs.to(device)
        hidden = text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                              output_hidden_states=True).hidden_states[-1]
        kept = hidden[0][inputs["attention_mask"][0].bool()][TEMPLATE_TOKENS:]
        vision = int(inputs["image_grid_thw"].prod(-1).sum()) // processor.image_processor.merge_size ** 2
        if len(kept) > vision + max_len:
            raise ValueError(f"line {record.line}: {len(kept) - vision} tokens besides the sources' {vision} vision "
                             f"tokens, more than --max_sequence_length {max_len}; raise it (at most 1024)")
        embeds, mask = hidden.new_zeros(1, vision + max_len, hidden.shape[-1]), torch.zeros(
            1, vision + max_len, dtype=torch.long, device=device)
        embeds[0, : len(kept)], mask[0, : len(kept)] = kept, 1
        return embeds.to(dtype), mask

    def latents(source: torch.Tensor) -> torch.Tensor:
        """[1, tokens, 64] fp32: a source's VAE mode, normalised per channel and packed."""
        z = vae.encode(source.unsqueeze(2).to(device)).latent_dist.mode()
        return pack_latents(((z - mean) / std)[:, :, 0]).float()

    @torch.no_grad()
    def encode_one(record) -> dict[str, torch.Tensor]:
        originals = [load_image(str(path)) for path in record.images]
        if encoding.vision_area is None:  # the vision tower sees the VAE's copy
            seen = [pixels.resize(original, source_h, source_w) for original in originals]
            sources = [pixels.preprocess(image, source_h, source_w) for image in seen]  # [1, 3, h, w] in [-1, 1]
        else:  # a smaller copy for the vision tower, the VAE's resized from the original
            vision_size = area_size(encoding.vision_area, source_w / source_h)
            seen = [pixels.resize(original, *vision_size) for original in originals]
            sources = [pixels.preprocess(original, source_h, source_w) for original in originals]
        out = dict(zip(("prompt_embeds", "prompt_embeds_mask"), embed(record.text, seen, record)))
        out.update(zip(("negative_prompt_embeds", "negative_prompt_embeds_mask"), embed(negative, seen, record)))
        out["image_latents"] = torch.cat([latents(source) for source in sources], dim=1)  # one after another
        out[SOURCE_IMAGE_KEY] = ((sources[0] + 1.0) * 127.5).round().to(torch.uint8)  # the first, as the VAE saw it
        out[MASK_KEY] = edit_mask(record.mask, source_h, source_w)[None]
        return out

    def encode(records) -> dict[str, torch.Tensor]:
        rows = [encode_one(record) for record in records]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    return encode


@dataclass
class QwenImageEditConfig(SourceSizeFlags, QwenImageConfig):
    """Qwen-Image-Edit's flags: Qwen-Image's, and the size the source images are resized to ('preferred': the
    pipeline's choice for the run's aspect ratio, about 1024 x 1024 in area)."""

    DEFAULTS = {**QwenImageConfig.DEFAULTS, "source_size": "preferred"}


@register_backbone
class QwenImageEditSpec(EditSpec, QwenImageSpec):
    """Qwen-Image-Edit (instruction-based image editing), diffusers layout; prompts are JSONL lines with a source
    image; tiny stand-in: `python -m branchgrpo.make_tiny qwen_image_edit DIR`."""

    name = "qwen_image_edit"
    Config = QwenImageEditConfig
    # the stored source latents and vision tokens depend on the source size: the encoder takes the run's size flags
    encoder_flags = QwenImageSpec.encoder_flags + ("h", "w", "source_size")
    tiny = "branchgrpo.testing.qwen_image_edit_tiny:make_tiny_qwen_image_edit"
    tiny_run = {"h": 32, "w": 32, "source_size": "generation", "max_sequence_length": 48}
    planner_configs = ("qwen-image-edit",)
    kind, encoding = QWEN_IMAGE_EDIT, EDIT_ENCODING  # the release's folder checks and how it encodes the source
    adapter_class: type = QwenImageEditAdapter

    def source_resolution(self, height: int, width: int, source_size: str) -> tuple[int, int]:
        return source_resolution(height, width, source_size)

    def check_files(self, model_cfg, transformer_root=None) -> None:
        root = model_cfg.pretrained_model_name_or_path
        if root is not None and Path(root).is_dir():
            check_qwen_folder(root, (), self.kind)
        super().check_files(model_cfg, transformer_root)

    def check_config_sizes(self, model_cfg, transformer, vae, config_path) -> None:
        size = model_cfg.backbone.resolved
        check_qwen_config(size("h"), size("w"), transformer, vae, config_path, self.kind)

    def load(self, model_cfg, device, dtype=torch.float32, transformer_path=None) -> QwenImageEditAdapter:
        size = model_cfg.backbone.resolved
        return load_qwen_image(model_cfg.pretrained_model_name_or_path, device, dtype=dtype, height=size("h"),
                               width=size("w"), guidance_scale=size("guidance_scale"),
                               transformer_path=transformer_path, kind=self.kind,
                               adapter_class=self.adapter_class, source_size=self.source_size(model_cfg.backbone),
                               num_sources=self.declared_sources(model_cfg.backbone))

    def declared_sources(self, section) -> int | None:
        """Source images per edit the run declares (Edit-2509's --num_sources); None: not declared (any number)."""
        return None

    def prompt_encoder(self, model_path, device, settings):
        return build_edit_encoder(model_path, device, settings, **self.encoder_sizes(settings), kind=self.kind,
                                  encoding=self.encoding)

    def tokens_per_sample(self, adapter: QwenImageEditAdapter, cond) -> int:
        source = cond["image_latents"].shape[1]  # every source's tokens
        return super().tokens_per_sample(adapter, cond) + (2 if adapter.uses_cfg else 1) * source

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=512) -> PlannerModel:
        """Qwen-Image's, with each source's tokens in every forward ([generated ; source 1 ; ...] image tokens, one
        grid each in `img_shapes`) and each source's vision tokens in the text (Edit-2509: --num_sources of them)."""
        num = self.declared_sources(model_cfg.backbone) or 1
        source_h, source_w = self.source_size(model_cfg.backbone)
        source = (1, source_h // 16, source_w // 16)
        seen_h, seen_w = (source_h, source_w) if self.encoding.vision_area is None else area_size(
            self.encoding.vision_area, source_w / source_h)
        vision = num * round(seen_h / 28) * round(seen_w / 28)  # Qwen2.5-VL: 14-pixel patches merged 2x2
        model = super().planner_model(model_cfg, config, dtype, device, text_tokens + vision)

        def inputs(batch: int) -> dict:
            kwargs = model.inputs(batch)
            image = kwargs["hidden_states"]
            with torch.device(device):
                tokens = torch.randn(image.shape[0], num * source[1] * source[2], image.shape[2], dtype=dtype)
            return {**kwargs, "hidden_states": torch.cat([image, tokens], dim=1),
                    "img_shapes": [[shapes[0]] + [source] * num for shapes in kwargs["img_shapes"]]}

        sources = f"{num} x {source[1] * source[2]}" if num > 1 else f"{source[1] * source[2]}"
        return model._replace(inputs=inputs, description=f"{model.description} + {sources} source tokens "
                                                         f"({source_w}x{source_h}; {vision} vision tokens)")


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509: Qwen-Image-Edit's adapter with up to PLUS_MAX_SOURCES sources per edit, exported for
    QwenImageEditPlusPipeline."""

    name = "qwen_image_edit_plus"
    pipeline_class_name = PLUS_PIPELINE
    max_sources = PLUS_MAX_SOURCES


@dataclass
class QwenImageEditPlusConfig(QwenImageEditConfig):
    """Edit-2509's flags: Qwen-Image-Edit's, and how many source images each edit gives."""

    num_sources: int | None = flag(None, f"source images per edit (1 to {PLUS_MAX_SOURCES}): the memory planner "
                                   "counts this many (default 1), and training refuses prompt embeddings stored with "
                                   "another number (default: any)")

    def validate(self) -> None:
        super().validate()
        if self.num_sources is not None and not 1 <= self.num_sources <= PLUS_MAX_SOURCES:
            raise ValueError(f"--num_sources: need 1 to {PLUS_MAX_SOURCES} source images per edit, got "
                             f"{self.num_sources}")


@register_backbone
class QwenImageEditPlusSpec(QwenImageEditSpec):
    """Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline) with 1 to 3 source images per edit (the same number on every
    line of a prompt file); tiny stand-in: `python -m branchgrpo.make_tiny qwen_image_edit_plus DIR`."""

    name = "qwen_image_edit_plus"
    Config = QwenImageEditPlusConfig
    tiny = "branchgrpo.testing.qwen_image_edit_tiny:make_tiny_qwen_image_edit_plus"
    planner_configs = ("qwen-image-edit-2509",)
    kind, encoding = QWEN_IMAGE_EDIT_PLUS, PLUS_ENCODING
    adapter_class = QwenImageEditPlusAdapter
    max_images = PLUS_MAX_SOURCES

    def declared_sources(self, section) -> int | None:
        return section.num_sources
