"""Wan2.2 TI2V-5B as a `FlowAdapter`: one 5B transformer of Wan's architecture with one timestep per token and the
48-channel Wan2.2 VAE; text-to-video (`wan22_ti2v`) and image-to-video (`wan22_ti2v_i2v`) from the same checkpoint.

Conventions verified against diffusers 0.42 (WanPipeline / WanImageToVideoPipeline with `expand_timesteps: true` in
model_index.json, AutoencoderKLWan with the Wan2.2 config; tests/test_wan22_ti2v.py); everything else is Wan2.1's
(models/wan.py: velocity sign, raw timesteps t = 1000 sigma, batched CFG, latent normalisation, prompt encoding):
- Latents: [B, 48, (F - 1) / 4 + 1, H / 16, W / 16] (the Wan2.2 VAE compresses 16x in space, 4x in time; with the
  transformer's 2x2 patches the sides are multiples of 32), normalised with the VAE's own 48 latents_mean / std.
- `expand_timesteps`: the transformer takes a timestep per token, `[B, tokens]` (tokens = latent frames x h/2 x w/2).
  Text-to-video: every token of a sample gets its t (the pipeline's mask of ones times t).
- Image-to-video (the same checkpoint through WanImageToVideoPipeline): the first latent frame is the given image's
  latents (the VAE's mode of the one resized frame), its tokens get t = 0, and after every step the pipeline
  overwrites that frame with the condition again, so it is never sampled. Here the adapter's latents are the
  GENERATED frames only, [B, 48, (F - 1) / 4, H / 16, W / 16]: the condition is put in front of them for every
  forward (rollout and training alike) and the first frame's prediction is dropped. So the rollout draws no noise
  for the given frame, the per-element log-prob averages only the generated elements (a frame that carries no
  log-prob cannot dilute the ratio, and the PPO clip range keeps its meaning), and the ratio at theta_old is exactly
  1 as for every backbone. `decode` puts the condition back in front (`decode_keys`), which is what the pipeline's
  final overwrite does. The condition (`image_latents`, and `first_frame` for the rewards) is built once per prompt
  by the preprocessing (scripts/preprocess/preprocess_wan22_ti2v_rl_embeddings.sh with a JSONL prompt file).
- The user picks the mode with `--model`: `wan22_ti2v` (text prompt files) or `wan22_ti2v_i2v` (JSONL prompt files
  with a first frame); embeddings record the backbone they were written for and the trainer refuses the other one.
- No CLIP image tokens and no extra input channels: 48 in, 48 out.
- Schedule: the release samples 50 UniPC steps at shift 5.0 with guidance 5.0, 121 frames at 704 x 1280 (or 1280 x
  704), 24 fps; the checkpoint's scheduler shift is read into `native_shift` as for Wan2.1.

Supported: Wan2.2-TI2V-5B-Diffusers. Not supported: the TI2V pipeline's `last_image` (diffusers ignores it for this
model too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from branchgrpo.models import register_backbone
from branchgrpo.models.diffusers_backbone import build_transformer
from branchgrpo.models.guidance import guidance_on
from branchgrpo.models.spec import check_sizes
from branchgrpo.models.support import PlannerModel
from branchgrpo.models.wan import WAN_LAYOUT, WanAdapter, WanConfig, WanSpec
from branchgrpo.models.wan_i2v import WanI2VSpec, build_i2v_encoder

TI2V_KIND = "Wan2.2-TI2V-5B"
SIDE_MULTIPLE = 32  # the Wan2.2 VAE's 16x times the 2x2 patches
CONDITION_KEY = "image_latents"  # [48, 1, H / 16, W / 16]: the given first frame's normalised latents


class Wan22TI2VAdapter(WanAdapter):
    """WanTransformer3DModel (TI2V-5B: per-token timesteps, 48 channels) + the Wan2.2 VAE, text-to-video."""

    name = "wan22_ti2v"
    per_token_timesteps = True
    checkpoint_kind, checkpoint_layout = TI2V_KIND, WAN_LAYOUT
    #: latent frames in front of the adapter's latents that are given, not generated (image-to-video: the first)
    given_frames = 0

    def __init__(self, transformer: nn.Module, vae: nn.Module, num_frames: int, height: int, width: int,
                 guidance_scale: float = 5.0, shift: float = 5.0):
        super().__init__(transformer, vae, num_frames, height, width, guidance_scale, shift)
        channels, frames, h, w = self.latent_shape
        if frames <= self.given_frames:
            raise ValueError(f"--num_frames: {num_frames} frames are {frames} latent frame(s), none left to generate "
                             f"after the given first frame; use at least {self.temporal_factor + 1}")
        self.latent_shape = (channels, frames - self.given_frames, h, w)
        patch = transformer.config.patch_size
        # 1 on the tokens of generated frames, 0 on the given ones: the pipeline's mask, one value per token
        frame_mask = torch.ones(frames)
        frame_mask[:self.given_frames] = 0.0
        self.token_mask = frame_mask.repeat_interleave((h // patch[1]) * (w // patch[2]))

    def transformer_inputs(self, latents: torch.Tensor, sigmas: torch.Tensor,
                           cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Wan's inputs with the timestep per token, [B, tokens]: t = 1000 sigma of the sample, 0 on given frames
        (mask x t, as the pipeline computes it)."""
        inputs = super().transformer_inputs(latents, sigmas, cond)
        timestep_B = inputs["timestep"]
        inputs["timestep"] = self.token_mask.to(timestep_B.device)[None, :] * timestep_B[:, None]
        return inputs


class Wan22TI2VImageAdapter(Wan22TI2VAdapter):
    """TI2V-5B image-to-video: latents are the generated frames; the given first frame's latents (`image_latents`,
    per prompt) go in front of them at every forward with t = 0 and in front of them at decode (module docstring)."""

    name = "wan22_ti2v_i2v"
    pipeline_class_name = "WanImageToVideoPipeline"
    embedding_keys = WanAdapter.embedding_keys + (CONDITION_KEY,)
    decode_keys = (CONDITION_KEY,)
    given_frames = 1

    def _with_condition(self, latents: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, 48, 1 + generated frames, h, w]: the given frame's latents, then `latents`."""
        if CONDITION_KEY not in cond:
            raise KeyError(f"Wan2.2 TI2V image-to-video needs cond['{CONDITION_KEY}'] (written per prompt by "
                           "scripts/preprocess/preprocess_wan22_ti2v_rl_embeddings.sh from a JSONL prompt file)")
        given = cond[CONDITION_KEY]
        expected = (self.latent_shape[0], self.given_frames, *self.latent_shape[2:])
        if tuple(given.shape[1:]) != expected:
            raise ValueError(f"{CONDITION_KEY} of shape {list(given.shape[1:])} were encoded for another video size "
                             f"than this run's {list(expected)} (--h {self.height}, --w {self.width}); preprocess "
                             "with the run's H and W")
        return torch.cat([given.to(device=latents.device, dtype=latents.dtype), latents], dim=2)

    def model_input(self, latents: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._with_condition(latents, cond)

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 of the generated frames (the given frame's prediction is dropped, as the pipeline's overwrite
        drops it)."""
        return super().velocity(latents, sigmas, cond)[:, :, self.given_frames:]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Generated latents + the given frame's (`cond`, one row per latent) -> videos [B, 3, F, H, W] in [0, 1]."""
        if cond is None:
            raise ValueError("Wan2.2 TI2V image-to-video decodes the generated frames after the given first frame: "
                             f"pass cond with '{CONDITION_KEY}'")
        return super().decode(self._with_condition(latents.float(), cond))


@dataclass
class Wan22TI2VConfig(WanConfig):
    """Wan2.2 TI2V-5B's flags (Wan's): the release's 704 x 1280, 121 frames and guidance 5.0 by default."""

    DEFAULTS = {**WanConfig.DEFAULTS, "h": 704, "w": 1280, "num_frames": 121, "guidance_scale": 5.0}

    def validate(self) -> None:
        check_sizes(self, SIDE_MULTIPLE, "Wan2.2 TI2V latents are 16x-downsampled and cut into 2x2 patches")
        super().validate()


@register_backbone
class Wan22TI2VSpec(WanSpec):
    """Wan2.2 TI2V-5B text-to-video, diffusers layout; tiny stand-in: `python -m branchgrpo.make_tiny wan22_ti2v
    DIR`."""

    name = "wan22_ti2v"
    Config = Wan22TI2VConfig
    adapter_class = Wan22TI2VAdapter
    tiny = "branchgrpo.testing.wan22_ti2v_tiny:make_tiny_wan22_ti2v"
    planner_configs = ("wan2.2-ti2v-5b",)
    tiny_run = {"h": 32, "w": 64, "num_frames": 9, "max_sequence_length": 16}  # sides: multiples of 32

    def tokens_per_sample(self, adapter: Wan22TI2VAdapter, cond) -> int:
        tokens = adapter.token_mask.numel() + cond["prompt_embeds"].shape[1]  # the given frame's tokens included
        return 2 * tokens if adapter.uses_cfg else tokens

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=512) -> PlannerModel:
        from diffusers import WanTransformer3DModel

        transformer = build_transformer(WanTransformer3DModel, config, device, dtype)
        frames, h, w = (model_cfg.backbone.resolved(n) for n in ("num_frames", "h", "w"))
        # the Wan2.2 VAE: 48 channels, 4x time, 16x space; the transformer's 2x2 patches
        latent = (config["in_channels"], (frames - 1) // 4 + 1, h // 16, w // 16)
        tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
        rows = 2 if guidance_on(model_cfg.backbone.resolved("guidance_scale")) else 1  # CFG: [cond; negative] rows

        def inputs(batch: int) -> dict:
            n = rows * batch
            with torch.device(device):
                return dict(hidden_states=torch.randn(n, *latent, dtype=dtype), timestep=torch.ones(n, tokens),
                            encoder_hidden_states=torch.randn(n, text_tokens, config["text_dim"], dtype=dtype),
                            return_dict=False)

        generated = (latent[1] - self.adapter_class.given_frames) * latent[2] * latent[3]
        return PlannerModel(transformer, list(transformer.blocks), inputs, self.adapter_class.lora_targets,
                            latent[0] * generated,
                            f"{frames}x{h}x{w}: {tokens} video + {text_tokens} text tokens, x{rows} rows (CFG)")


@register_backbone
class Wan22TI2VImageSpec(Wan22TI2VSpec):
    """Wan2.2 TI2V-5B image-to-video (the same checkpoint), diffusers layout; prompts are JSONL lines with a first
    frame; tiny stand-in: `python -m branchgrpo.make_tiny wan22_ti2v_i2v DIR` (the same folder as wan22_ti2v's)."""

    name = "wan22_ti2v_i2v"
    adapter_class = Wan22TI2VImageAdapter
    eval_rewards = WanI2VSpec.eval_rewards
    # the stored first-frame latents depend on the video's sides (not on its length: the frame is encoded alone)
    encoder_flags = WanSpec.encoder_flags + ("h", "w")
    prompt_format = "jsonl"
    tiny_run = {"h": 96, "w": 160, "num_frames": 9, "max_sequence_length": 16}  # 5:3, the assets' first frames

    def prompt_encoder(self, model_path, device, settings):
        sizes = self.encoder_sizes(settings)
        for flag, value in (("--h", sizes["h"]), ("--w", sizes["w"])):
            if value % SIDE_MULTIPLE:
                raise ValueError(f"{flag}: {value} is not a multiple of {SIDE_MULTIPLE} (Wan2.2 VAE 16x x patch 2)")
        return build_i2v_encoder(model_path, device, settings, sizes["h"], sizes["w"], num_frames=1,
                                 image_tokens=False, layout=WAN_LAYOUT, kind=TI2V_KIND)

    def default_prompts(self) -> Path:
        return WanI2VSpec.default_prompts(self)
