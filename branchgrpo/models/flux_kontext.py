"""FLUX.1-Kontext-dev (instruction-based image editing) as a `FlowAdapter`: FLUX.1-dev's adapter (models/flux.py) with
the source image's latents appended to the image tokens, built once per prompt by the prompt encoder (preprocessing,
evaluation) and entered at every step, in rollout and training alike, as diffusers' FluxKontextPipeline enters them.

Conventions verified against diffusers 0.42 (FluxKontextPipeline; tests/test_flux_kontext.py):
- Prompts are JSONL lines `{"prompt": <edit instruction>, "image": <source image>}` (data/preprocess.py). The
  instruction is encoded exactly as FLUX.1-dev encodes a prompt (CLIP pooled + T5, models/flux.py). Per prompt the
  encoder also stores
  - `source_image` [3, h_s, w_s] uint8: the source resized (PIL Lanczos, no crop: the pipeline's VaeImageProcessor)
    to the source size, i.e. exactly the pixels the VAE sees; read by the edit rewards (rewards/edit.py);
  - `image_latents` [(h_s / 16)(w_s / 16), 64] fp32: the VAE's mode of those pixels in [-1, 1], shifted and scaled
    like the latents ((z - shift_factor) * scaling_factor) and 2x2-packed;
  - `edit_mask` [1, h_s, w_s] uint8: 1 inside the region the instruction may change, from the line's "mask" image
    (white pixels, resized nearest), all 0 when the line gives none; read by `source_consistency` with `masked`.
- The source size is fixed per run (the stored latents have one shape): `--source_size preferred` (default) is the
  pipeline's choice for an image of the run's aspect ratio, the closest of Kontext's preferred resolutions (about
  1 megapixel: 1024 x 1024 for a square run); `generation` is the run's --h/--w (smaller, cheaper runs). Source
  images whose aspect ratio is more than 10% off the source size are refused (or skipped) by line number: the
  pipeline would pick another resolution for them, and resizing them to this one would stretch them.
- At every step the transformer sees [x ; source tokens] along the sequence, with the source tokens' position ids
  (1, row, col) - FLUX's (0, row, col) with the first coordinate set to 1 - and its prediction is sliced back to the
  generated tokens. The source latents enter unchanged (no noise) at every sigma.
- Guidance: embedded (guidance-distilled, no CFG), 2.5 by default as in the pipeline. The resolution-dependent
  shift `mu` is computed from the generated image's tokens only (the pipeline's `image_seq_len`).
- Everything else (timestep = sigma, velocity sign, VAE normalisation, LoRA targets and layout, exports) is FLUX's:
  the transformer is a FluxTransformer2DModel of FLUX.1-dev's shape. Exports load with
  `FluxTransformer2DModel.from_pretrained` and `FluxKontextPipeline.load_lora_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.core.files import read_json
from branchgrpo.models import register_backbone
from branchgrpo.models.diffusers_backbone import load_part
from branchgrpo.models.flux import (
    FluxAdapter,
    FluxConfig,
    FluxSpec,
    build_prompt_encoder,
    check_flux_folder,
    load_flux,
    pack_latents,
    random_flux_cond,
    random_flux_transformer,
    token_ids,
    vae_stand_in,
)
from branchgrpo.models.spec import SOURCE_IMAGE_KEY, EditSpec, SourceSizeFlags
from branchgrpo.models.support import PlannerModel

PIPELINE = "FluxKontextPipeline"
SOURCE_KEYS = ("image_latents",)  # per-prompt tensors the transformer reads, besides FLUX's text
MASK_KEY = "edit_mask"  # the edit region, uint8, for the same


def source_resolution(height: int, width: int, source_size: str) -> tuple[int, int]:
    """(h, w) the source images of a run at --h/--w are resized to: the run's size, or the preferred Kontext
    resolution the pipeline picks for an image of the run's aspect ratio (its closest in width / height)."""
    if source_size == "generation":
        return height, width
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    _, best_w, best_h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return best_h, best_w


def check_kontext_folder(root: Path) -> None:
    """A checkpoint folder whose model_index.json names another pipeline (e.g. FLUX.1-dev's FluxPipeline, whose
    transformer has the same shape and would load) is refused before anything loads."""
    index = Path(root) / "model_index.json"
    if not index.is_file():
        return  # check_flux_folder names what is missing
    found = read_json(index, "model_index.json")
    name = found.get("_class_name") if isinstance(found, dict) else None
    if name != PIPELINE:
        raise ValueError(f"{root}: its model_index.json names {name!r}, not {PIPELINE}: --model flux_kontext expects "
                         "a diffusers-layout FLUX.1-Kontext-dev folder (FLUX.1-dev is --model flux; docs/editing.md)")


def edit_mask(path: Path | None, height: int, width: int) -> torch.Tensor:
    """uint8 [1, height, width]: 1 where the mask image at `path` is bright (the edit region), resized nearest; all
    0 without one."""
    if path is None:
        return torch.zeros(1, height, width, dtype=torch.uint8)
    import numpy as np
    from PIL import Image

    with Image.open(path) as handle:
        gray = handle.convert("L").resize((width, height), resample=Image.NEAREST)
    return torch.from_numpy((np.asarray(gray) > 127).astype(np.uint8))[None]


class FluxKontextAdapter(FluxAdapter):
    """FluxTransformer2DModel (FLUX.1-Kontext-dev) + its VAE: FLUX with the source tokens after the generated ones."""

    name = "flux_kontext"
    pipeline_class_name = PIPELINE
    embedding_keys = FluxAdapter.embedding_keys + SOURCE_KEYS

    def __init__(self, transformer, vae, height: int, width: int, guidance_scale: float = 2.5,
                 scheduler_config: dict | None = None, source_size: tuple[int, int] | None = None):
        super().__init__(transformer, vae, height, width, guidance_scale, scheduler_config)
        self.source_h, self.source_w = source_size or (height, width)
        factor = 2 * self.vae_scale_factor
        if self.source_h % factor or self.source_w % factor:
            raise ValueError(f"source size {self.source_w} x {self.source_h}: not multiples of {factor}")
        self.source_rows, self.source_cols = self.source_h // factor, self.source_w // factor

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 of the generated tokens [B, L, 64]: the transformer runs on [x ; source tokens] and its output
        is cut back to the first L tokens."""
        assert tuple(latents.shape[1:]) == self.latent_shape, (tuple(latents.shape), self.latent_shape)
        assert sigmas.shape == (latents.shape[0],), sigmas.shape
        source = self.source_tokens(cond).to(device=latents.device, dtype=latents.dtype)
        ids = torch.cat([self.image_ids(latents.device),
                         token_ids(self.source_rows, self.source_cols, latents.device, first=1.0)])
        out = self.transformer_output(torch.cat([latents, source], dim=1), ids, sigmas, cond)
        return out[:, : latents.shape[1]]

    def source_tokens(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if "image_latents" not in cond:
            raise KeyError("FLUX.1-Kontext needs cond['image_latents'] (the source image's packed latents, written "
                           "per prompt by the flux_kontext preprocess script)")
        source = cond["image_latents"]
        expected = (self.source_rows * self.source_cols, self.latent_shape[1])
        if tuple(source.shape[1:]) != expected:
            raise ValueError(f"image_latents of shape {list(source.shape[1:])} were encoded for another source size "
                             f"than this run's {self.source_w} x {self.source_h} ({list(expected)}; --h, --w, "
                             "--source_size); preprocess with the run's H, W and SOURCE_SIZE")
        return source


def build_kontext_encoder(model_path, device, args, h: int, w: int, source_size: str):
    """`encode(records) -> {prompt_embeds, pooled_prompt_embeds, source_image, image_latents}` for `PromptRecord`s
    (instruction + source image path), each equal to what FluxKontextPipeline builds from the same instruction and
    image at the source size (module docstring). The VAE runs in fp32; the latents are stored in fp32."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image

    root = check_flux_folder(model_path, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"))
    check_kontext_folder(root)
    source_h, source_w = source_resolution(h, w, source_size)
    text_encode = build_prompt_encoder(root, device, args)
    device = torch.device(device)
    vae = load_part(AutoencoderKL, root, "vae", "FLUX VAE", torch_dtype=torch.float32)
    vae = vae.to(device).eval().requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = VaeImageProcessor(vae_scale_factor=2 * factor)  # the pipeline's (resample Lanczos, [-1, 1])
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)

    @torch.no_grad()
    def encode(records) -> dict[str, torch.Tensor]:
        out = text_encode([record.text for record in records])
        # one image at a time, each [1, 3, h, w] as the pipeline's image processor returns it (its memory layout
        # included: CPU convolutions round differently on another one): a 1-megapixel VAE encode is the memory peak
        pixels = [processor.preprocess(processor.resize(load_image(str(record.image)), source_h, source_w),
                                       source_h, source_w) for record in records]
        latents = [vae.encode(image.to(device)).latent_dist.mode().float() for image in pixels]
        out["image_latents"] = torch.cat([pack_latents((z - shift) * scale) for z in latents])
        # exactly the pixels the VAE saw (they are x / 255 in [-1, 1])
        out[SOURCE_IMAGE_KEY] = torch.cat([((image + 1.0) * 127.5).round().to(torch.uint8) for image in pixels])
        out[MASK_KEY] = torch.stack([edit_mask(record.mask, source_h, source_w) for record in records])
        return out

    return encode


@dataclass
class FluxKontextConfig(SourceSizeFlags, FluxConfig):
    """FLUX.1-Kontext's flags: FLUX's, guidance 2.5, and the size the source images are resized to ('preferred':
    the closest of Kontext's preferred resolutions)."""

    DEFAULTS = {"h": 1024, "w": 1024, "guidance_scale": 2.5, "source_size": "preferred"}


@register_backbone
class FluxKontextSpec(EditSpec, FluxSpec):
    """FLUX.1-Kontext-dev (instruction-based image editing), diffusers layout; prompts are JSONL lines with a source
    image; tiny stand-in: `python -m branchgrpo.make_tiny flux_kontext DIR`."""

    name = "flux_kontext"
    Config = FluxKontextConfig
    # the stored source latents depend on the source size: the encoder takes the run's size flags
    encoder_flags = FluxSpec.encoder_flags + ("h", "w", "source_size")
    tiny = "branchgrpo.testing.flux_kontext_tiny:make_tiny_flux_kontext"
    tiny_run = {"h": 32, "w": 32, "source_size": "generation", "max_sequence_length": 16}
    planner_configs = ("flux1-kontext-dev",)

    def source_resolution(self, height: int, width: int, source_size: str) -> tuple[int, int]:
        return source_resolution(height, width, source_size)

    def check_files(self, model_cfg, transformer_root=None) -> None:
        root = model_cfg.pretrained_model_name_or_path
        if root is not None and Path(root).is_dir():
            check_kontext_folder(Path(root))
        super().check_files(model_cfg, transformer_root)

    def load(self, model_cfg, device, dtype=torch.float32, transformer_path=None) -> FluxKontextAdapter:
        size = model_cfg.backbone.resolved
        root = model_cfg.pretrained_model_name_or_path
        if root is not None and Path(root).is_dir():
            check_kontext_folder(Path(root))
        return load_flux(root, device, dtype=dtype, height=size("h"), width=size("w"),
                         guidance_scale=size("guidance_scale"), transformer_path=transformer_path,
                         adapter_class=FluxKontextAdapter, source_size=self.source_size(model_cfg.backbone))

    def prompt_encoder(self, model_path, device, settings):
        return build_kontext_encoder(model_path, device, settings, **self.encoder_sizes(settings))

    def tokens_per_sample(self, adapter: FluxKontextAdapter, cond) -> int:
        return super().tokens_per_sample(adapter, cond) + adapter.source_rows * adapter.source_cols

    def random_adapter(self, shape, model_cfg, device, dtype, seed=0, **config_overrides) -> FluxKontextAdapter:
        size = model_cfg.backbone.resolved
        transformer = random_flux_transformer(shape, device, dtype, seed, **config_overrides)
        return FluxKontextAdapter(transformer, vae_stand_in(), size("h"), size("w"), size("guidance_scale"),
                                  source_size=self.source_size(model_cfg.backbone)).to(device)

    def random_cond(self, adapter, num_prompts, text_tokens, device, dtype, seed=0) -> dict[str, torch.Tensor]:
        cond = random_flux_cond(adapter, num_prompts, text_tokens, device, dtype, seed)
        shape = (num_prompts, adapter.source_rows * adapter.source_cols, adapter.latent_shape[1])
        source = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
        return {**cond, "image_latents": source.to(device=device, dtype=dtype)}

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=512) -> PlannerModel:
        """FLUX's, with the source tokens in every forward: [generated ; source] image tokens."""
        model = super().planner_model(model_cfg, config, dtype, device, text_tokens)
        source_h, source_w = self.source_size(model_cfg.backbone)
        source_tokens = (source_h // 16) * (source_w // 16)

        def inputs(batch: int) -> dict:
            kwargs = model.inputs(batch)
            image = kwargs["hidden_states"]
            with torch.device(device):
                source = torch.randn(batch, source_tokens, image.shape[2], dtype=dtype)
                ids = torch.zeros(image.shape[1] + source_tokens, 3)
            return {**kwargs, "hidden_states": torch.cat([image, source], dim=1), "img_ids": ids}

        return model._replace(inputs=inputs, description=f"{model.description} + {source_tokens} source tokens "
                                                         f"({source_w}x{source_h})")
