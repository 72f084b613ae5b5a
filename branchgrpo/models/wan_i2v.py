"""Wan2.1 image-to-video as a `FlowAdapter`: the text-to-video adapter (models/wan.py) plus the first-frame
conditioning, built once per prompt by the prompt encoder (preprocessing, evaluation) and entered at every step as
diffusers' WanImageToVideoPipeline enters it.

Conventions verified against diffusers 0.42 (WanImageToVideoPipeline; tests/test_wan_i2v.py):
- Per prompt, the encoder stores (besides `prompt_embeds`, and the negative prompt's as a dataset-wide extra):
  - `image_embeds` [257, 1280]: the CLIP vision tower's (ViT-H/14, `image_encoder/`) penultimate hidden states of the
    image as given, after `image_processor/` (CLIPImageProcessor: shorter side 224, centre crop, CLIP normalisation);
  - `first_frame` [3, H, W] uint8: the image resized to the video size (PIL Lanczos, no crop: the pipeline's
    VideoProcessor), i.e. exactly the pixels the VAE sees; read by rewards that compare videos with it;
  - `image_latents` [16, (F - 1) / 4 + 1, H / 8, W / 8] fp32: the VAE's mode of the F-frame video [first frame, F - 1
    frames of zeros] in [-1, 1], normalised per channel like the latents. It depends on --h/--w/--num_frames, so the
    preprocessing takes them (the run must use the same; the adapter checks).
- At every step the transformer's input is [x ; mask ; image_latents] along the channels (16 + 4 + 16 = 36): the
  mask has the VAE's temporal factor (4) channels, 1 on the first latent frame (the given frame) and 0 elsewhere -
  the pipeline's mask over frames, folded 4 frames per latent frame. The CLIP image tokens go in as
  `encoder_hidden_states_image`. Classifier-free guidance stays one batched forward (models/guidance.py, through models/wan.py), the image
  condition on the cond and the uncond rows alike, as the pipeline does.
- Text is exactly 512 tokens: the transformer's attention takes the last 512 context tokens as text and the rest as
  image tokens (diffusers hard-codes Wan's text length), so other --max_sequence_length values are refused.
- LoRA targets, besides the T2V ones, the image cross-attention's `add_k_proj` / `add_v_proj` (a LoRA with them is
  what `WanImageToVideoPipeline.load_lora_weights` reads as an I2V LoRA, as is).

Supported: Wan2.1-I2V-14B-480P and -720P in diffusers layout (their 720P scheduler's shift is read as for T2V: pass
--shift to match it); Wan2.2 I2V-A14B (two experts, no CLIP tokens) is the `wan22_i2v` backbone (models/wan22.py),
whose adapter reuses `model_input` and whose encoder is `build_i2v_encoder(image_tokens=False)`. Not supported (a
clear error at load; Wan2.2 TI2V-5B is models/wan22_ti2v.py): the first-last-frame model (two conditioning images),
last-image conditioning, and Wan's own choice of the video size from the image's aspect ratio (sizes are fixed per
run; the preprocessing refuses images whose aspect ratio is off the video's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from branchgrpo.models import register_backbone
from branchgrpo.models.diffusers_backbone import load_part, load_pretrained
from branchgrpo.models.spec import REPO_ASSETS
from branchgrpo.models.wan import (
    LORA_TARGETS,
    WAN_LAYOUT,
    WanAdapter,
    WanSpec,
    build_prompt_encoder,
    check_video_size,
    check_wan_folder,
)

I2V_LAYOUT = WAN_LAYOUT + ("image_encoder/", "image_processor/")
TEXT_CONTEXT = 512  # the text tokens diffusers' Wan attention expects after the image tokens
IMAGE_KEYS = ("image_embeds", "image_latents")  # per-prompt tensors the transformer reads, besides the text


class WanI2VAdapter(WanAdapter):
    """WanTransformer3DModel (I2V: 36 input channels, CLIP image tokens) + its VAE at a fixed video size."""

    name = "wan_i2v"
    pipeline_class_name = "WanImageToVideoPipeline"
    embedding_keys = WanAdapter.embedding_keys + IMAGE_KEYS
    image_to_video, image_tokens = True, True
    checkpoint_kind, checkpoint_layout = "Wan2.1-I2V", I2V_LAYOUT
    lora_targets = LORA_TARGETS + ("add_k_proj", "add_v_proj")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _, frames, height, width = self.latent_shape
        mask = torch.zeros(1, self.temporal_factor, frames, height, width)
        mask[:, :, 0] = 1.0  # the given first frame; everything after it is generated
        self.first_frame_mask = mask

    def model_input(self, latents: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """[x ; mask ; image_latents] along channels, in fp32 (cast with x by the caller, as the pipeline does)."""
        if "image_latents" not in cond:
            raise KeyError("Wan image-to-video needs cond['image_latents'] (written per prompt by its preprocess "
                           "script)")
        image_latents = cond["image_latents"]
        if tuple(image_latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"image_latents of shape {list(image_latents.shape[1:])} were encoded for another video "
                             f"size than this run's {list(self.latent_shape)} (--num_frames {self.num_frames}, --h "
                             f"{self.height}, --w {self.width}); preprocess with the run's H, W and FRAMES")
        mask = self.first_frame_mask.to(latents.device).expand(latents.shape[0], -1, -1, -1, -1)
        return torch.cat([latents, mask, image_latents.to(device=latents.device, dtype=latents.dtype)], dim=1)

    def image_inputs(self, cond: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
        if "image_embeds" not in cond:
            raise KeyError("Wan2.1 image-to-video needs cond['image_embeds'] (CLIP image tokens, written per prompt by "
                           "the wan_i2v preprocess script)")
        text_tokens = cond["prompt_embeds"].shape[1]
        if text_tokens != TEXT_CONTEXT:
            raise ValueError(f"prompt_embeds hold {text_tokens} tokens; Wan image-to-video needs exactly "
                             f"{TEXT_CONTEXT} (--max_sequence_length {TEXT_CONTEXT}): its attention splits the context "
                             f"at the last {TEXT_CONTEXT} tokens")
        return {"encoder_hidden_states_image": cond["image_embeds"].to(device=device, dtype=dtype)}


# ----- conditioning encoder ----------------------------------------------------------------------------------------


def load_image(path: str | Path):
    """An image file as RGB, turned upright by its EXIF orientation (what diffusers' `load_image` gives)."""
    from PIL import Image, ImageOps

    with Image.open(path) as handle:
        return ImageOps.exif_transpose(handle).convert("RGB")


def resize_frame(image, height: int, width: int) -> torch.Tensor:
    """uint8 [3, height, width]: the image resized to the video size as the pipeline's VideoProcessor does (PIL
    Lanczos straight to (width, height), no crop)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image.resize((width, height), resample=Image.LANCZOS), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@torch.no_grad()
def first_frame_latents(vae, frame_uint8: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[1, z, (F - 1) / 4 + 1, H / 8, W / 8] fp32: the VAE's mode of [first frame, F - 1 zero frames] (pixels in
    [-1, 1]), normalised with the VAE's per-channel latent statistics."""
    param = next(vae.parameters())
    pixels = frame_uint8.to(param.device, torch.float32) / 255.0 * 2.0 - 1.0
    video = pixels.new_zeros(1, 3, num_frames, *pixels.shape[1:])
    video[:, :, 0] = pixels
    latents = vae.encode(video.to(param.dtype)).latent_dist.mode().float()
    view = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=latents.device).view(view)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=latents.device).view(view)
    return (latents - mean) / std


def clip_image_tokens(root: Path, device: torch.device):
    """images -> [n, 257, 1280] fp32: the CLIP vision tower's penultimate hidden states after its image processor
    (`image_encoder/`, `image_processor/` of Wan2.1-I2V), as WanImageToVideoPipeline's `encode_image`."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    processor = load_pretrained(
        lambda: CLIPImageProcessor.from_pretrained(str(root / "image_processor"), local_files_only=True),
        root / "image_processor", "CLIP image processor", "Wan2.1-I2V's image_processor/ (CLIPImageProcessor)")
    clip = load_pretrained(
        lambda: CLIPVisionModel.from_pretrained(str(root / "image_encoder"), local_files_only=True),
        root / "image_encoder", "CLIP image encoder", "Wan2.1-I2V's image_encoder/ (CLIPVisionModel)")
    clip = clip.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

    def embed(images) -> torch.Tensor:
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device, torch.float32)
        return clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].float()

    return embed


def build_i2v_encoder(model_path: str | Path | None, device: torch.device | str, args, h: int, w: int,
                      num_frames: int, image_tokens: bool = True, layout: tuple[str, ...] = I2V_LAYOUT,
                      kind: str = "Wan2.1-I2V"):
    """`encode(records) -> {prompt_embeds, image_embeds, first_frame, image_latents}` for `PromptRecord`s (prompt +
    image path), each equal to what WanImageToVideoPipeline builds from the same prompt and image (module
    docstring); `encode.extras()` gives the negative-prompt embedding, as for text-to-video. The text encoder runs
    in `args.dtype`; CLIP and the VAE run in fp32 (as Wan's own example loads them), and their outputs are stored
    in fp32. `image_tokens` False (Wan2.2 I2V-A14B, `layout` / `kind` its folder): no CLIP, no `image_embeds`, and
    any text length (nothing splits the context)."""
    from diffusers import AutoencoderKLWan

    clip_parts = ("image_encoder", "image_processor") if image_tokens else ()
    root = check_wan_folder(model_path, ("text_encoder", "tokenizer", *clip_parts, "vae"), layout, kind)
    max_len = getattr(args, "max_sequence_length", None)
    if image_tokens and max_len is not None and max_len != TEXT_CONTEXT:
        raise ValueError(f"--max_sequence_length: Wan image-to-video needs exactly {TEXT_CONTEXT} text tokens (its "
                         f"attention splits the context at the last {TEXT_CONTEXT}), got {max_len}")
    check_video_size(num_frames, h, w)
    text_encode = build_prompt_encoder(root, device, args)
    device = torch.device(device)
    embed_images = clip_image_tokens(root, device) if image_tokens else None
    vae = load_part(AutoencoderKLWan, root, "vae", "Wan VAE", torch_dtype=torch.float32)
    vae = vae.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(records) -> dict[str, torch.Tensor]:
        out = text_encode([record.text for record in records])
        images = [load_image(record.image) for record in records]
        if embed_images is not None:
            out["image_embeds"] = embed_images(images)
        frames = torch.stack([resize_frame(image, h, w) for image in images])
        out["first_frame"] = frames
        # one video at a time: an 81-frame 480p VAE encode is the memory peak of preprocessing
        out["image_latents"] = torch.cat([first_frame_latents(vae, frame, num_frames) for frame in frames])
        return out

    encode.extras = text_encode.extras
    return encode


@register_backbone
class WanI2VSpec(WanSpec):
    """Wan2.1 image-to-video (14B, 480P and 720P), diffusers layout; prompts are JSONL lines with a first frame;
    tiny stand-in: `python -m branchgrpo.make_tiny wan_i2v DIR`."""

    name = "wan_i2v"
    adapter_class = WanI2VAdapter
    eval_rewards = WanSpec.eval_rewards + ("first_frame_consistency",)
    # the stored first-frame latents depend on the video size: the encoder takes the run's size flags
    encoder_flags = WanSpec.encoder_flags + ("h", "w", "num_frames")
    prompt_format = "jsonl"
    tiny = "branchgrpo.testing.wan_i2v_tiny:make_tiny_wan_i2v"
    # 5:3 as the assets' first frames; the I2V attention splits the context at exactly 512 text tokens
    tiny_run = {"h": 48, "w": 80, "num_frames": 9, "max_sequence_length": 512}
    planner_configs = ("wan2.1-i2v-14b",)

    def prompt_encoder(self, model_path, device, settings):
        return build_i2v_encoder(model_path, device, settings, **self.encoder_sizes(settings))

    def default_prompts(self) -> Path:
        return REPO_ASSETS / "i2v_prompts.jsonl"

    def tokens_per_sample(self, adapter: WanI2VAdapter, cond) -> int:
        image_tokens = cond["image_embeds"].shape[1] * (2 if adapter.uses_cfg else 1)
        return super().tokens_per_sample(adapter, cond) + image_tokens
