"""FLUX.1-dev as a `FlowAdapter`: packed latents, guidance embedding, per-sample sigmas, decode, export, prompt encoder.

Conventions verified against diffusers (FluxPipeline + FlowMatchEulerDiscreteScheduler, 0.42; tests/test_flux.py):
- Velocity sign: the scheduler noises as x = sigma * noise + (1 - sigma) * x0 and steps x' = x + (sigma' - sigma) * out,
  so FLUX's output is d x / d sigma = noise - x0: already our v = eps - x0, no sign flip.
- Timestep: FluxPipeline passes `t / 1000` with t = 1000 * sigma, i.e. sigma itself, and the transformer multiplies by
  1000 inside. We pass the exact sigma of each sample (the official BranchGRPO code floors it to 1e-3; we do not).
- Guidance: FLUX.1-dev is guidance-distilled; it takes `guidance = full(B, 3.5)` (also scaled by 1000 inside), no CFG.
- Latents: the VAE latent [B, 16, H/8, W/8] is cut into 2x2 patches -> tokens [B, (H/16)(W/16), 64]; `img_ids` are
  (0, row, col) per token and `txt_ids` zeros (L_txt, 3), both without a batch dim.
- Latent normalisation: the transformer sees (z - shift_factor) * scaling_factor; decode inverts it (VAE config).
- Schedules: the static SD3 shift (DanceGRPO/BranchGRPO default, shift 3) and FluxPipeline's resolution-dependent
  shift, `FluxAdapter.mu()` -> `sde.make_sigmas(T, mu=...)`.

dtypes: master weights fp32 (`load_flux(dtype=...)`); the caller sets bf16 autocast around `velocity`. Inputs are cast
to the transformer's parameter dtype (embeddings may be stored in bf16), the output is returned in fp32. The VAE runs
in `vae_dtype` (bf16 on CUDA by default) under no_grad: GRPO never back-propagates through the decoder or the reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from branchgrpo.core import sde
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
from branchgrpo.models.spec import GuidanceFlags, SizeFlags, check_sizes, hub_id_hint
from branchgrpo.models.support import (
    FixtureSupport,
    PlannerModel,
    PlannerSupport,
    StandInSupport,
    read_shipped_config,
)
from branchgrpo.core.state_dicts import count_blocks

FLUX_LAYOUT = ("model_index.json", "transformer/", "vae/", "text_encoder/", "text_encoder_2/", "tokenizer/",
               "tokenizer_2/")
# Attention projections of the image stream (double and single blocks) and, in double blocks, of the text stream.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_flux_folder(model_path: str | Path | None, parts: tuple[str, ...]) -> Path:
    """Fail before loading anything heavy when the checkpoint folder or one of the needed subfolders is missing."""
    layout = ", ".join(FLUX_LAYOUT)
    if model_path is None:
        raise ValueError(f"--pretrained_model_name_or_path / --model_path: no FLUX folder given (diffusers layout: {layout})")
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"FLUX checkpoint folder {root} does not exist{hub_id_hint(root, 'data/flux')}; "
                                "expected a diffusers-layout FLUX.1-dev "
                                f"folder holding {layout} (see docs/flux.md)")
    missing = [p for p in parts if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"FLUX checkpoint folder {root} lacks {', '.join(missing)}; expected a diffusers-layout "
                                f"FLUX.1-dev folder holding {layout} (see docs/flux.md)")
    return root


def check_image_size(height: int, width: int, multiple: int = 16) -> None:
    """FLUX packs 2x2 patches of the 8x-downsampled latent, so image sides must be multiples of 16."""
    for flag, value in (("--h", height), ("--w", width)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{flag} must be a positive multiple of {multiple} (VAE factor x 2x2 packing), got {value}")


def check_flux_config(height: int, width: int, transformer: dict, vae: dict, config_path: Path) -> None:
    """--h/--w and the channel counts against the checkpoint's configs (read as JSON), before any weight is read:
    sides must be multiples of 2 x the VAE's downsampling (FLUX packs 2x2 latent patches), and the transformer
    takes 4 x the VAE's latent channels."""
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)  # absent VAE config: FLUX.1's 8
    for flag, value in (("--h", height), ("--w", width)):
        if value % (2 * factor):
            raise ValueError(f"{flag}: {value} is not a multiple of {2 * factor}: the VAE (vae/config.json next to "
                             f"{config_path.parent.name}/) downsamples {factor}x and FLUX packs 2x2 latent patches")
    if int(transformer.get("patch_size", 1)) != 1:
        raise ValueError(f"{config_path}: patch_size {transformer['patch_size']}; branchgrpo packs 2x2 latent "
                         "patches itself and expects FLUX.1's patch_size 1")
    latent, packed = vae.get("latent_channels"), int(transformer.get("in_channels", 64))
    if latent is not None and packed != 4 * int(latent):
        raise ValueError(f"{config_path}: the FLUX transformer takes {packed} packed channels, but the VAE has "
                         f"{latent} latent channels (expected 4 x that): mismatched transformer/ and vae/ folders")


def describe_flux(shapes) -> str:
    """Blocks and width of a FLUX transformer, read from its tensor shapes."""
    embed = shapes.get("x_embedder.weight")
    return (f"{count_blocks(shapes, 'transformer_blocks.')} double-stream + "
            f"{count_blocks(shapes, 'single_transformer_blocks.')} single-stream blocks x width "
            f"{embed[0] if embed else '?'}")


def token_ids(rows: int, cols: int, device, first: float = 0.0) -> torch.Tensor:
    """(first, row, col) of each token of a rows x cols grid of packed tokens, [rows * cols, 3] float32: FLUX's
    rotary position ids (`first` 0 for the generated image; FLUX.1-Kontext gives its source image 1)."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: each 2x2 patch becomes one token, channels-major within the token."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of h x w (both even)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class FluxAdapter(DiffusersExportMixin, FlowAdapter):
    """FluxTransformer2DModel + its VAE at a fixed image size (see the module docstring for the conventions)."""

    name = "flux"
    transformer_class_name = "FluxTransformer2DModel"
    pipeline_class_name = "FluxPipeline"
    embedding_keys = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, transformer: nn.Module, vae: nn.Module, height: int, width: int, guidance_scale: float = 3.5,
                 scheduler_config: dict | None = None):
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        check_image_size(height, width, 2 * self.vae_scale_factor)
        self.transformer, self.vae = transformer, vae.eval().requires_grad_(False)
        self.height, self.width, self.guidance_scale = height, width, float(guidance_scale)
        config = transformer.config  # read once: the attribute may later be replaced by a DDP wrapper
        self.has_guidance = bool(config.guidance_embeds)
        self.latent_h, self.latent_w = height // self.vae_scale_factor, width // self.vae_scale_factor
        self.latent_shape = ((self.latent_h // 2) * (self.latent_w // 2), int(config.in_channels))
        if int(config.in_channels) != 4 * int(vae.config.latent_channels):  # 2x2 packing of the VAE's channels
            raise ValueError(f"FLUX transformer takes {config.in_channels} packed channels, but the VAE has "
                             f"{vae.config.latent_channels} latent channels (expected 4 x that): mismatched "
                             "transformer/ and vae/ folders")
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.scheduler_config = dict(scheduler_config or {})
        module_names = [n for n, _ in transformer.named_modules()]
        self.default_lora_targets = tuple(t for t in LORA_TARGETS if any(n.endswith("." + t) for n in module_names))

    # ----- sampling ------------------------------------------------------------------------------------------------

    def image_ids(self, device: torch.device) -> torch.Tensor:
        """(0, row, col) of each packed token, [L, 3] float32, as FluxPipeline builds them."""
        return token_ids(self.latent_h // 2, self.latent_w // 2, device)

    def mu(self) -> float:
        """FluxPipeline's resolution-dependent shift for this image size (use with `sde.make_sigmas(T, mu=...)`)."""
        return scheduler_mu(self.scheduler_config, self.latent_shape[0])

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 for packed latents [B, L, 64] at per-sample sigmas [B]; fp32 out."""
        assert tuple(latents.shape[1:]) == self.latent_shape, (tuple(latents.shape), self.latent_shape)
        assert sigmas.shape == (latents.shape[0],), sigmas.shape
        return self.transformer_output(latents, self.image_ids(latents.device), sigmas, cond)

    def transformer_output(self, tokens: torch.Tensor, ids: torch.Tensor, sigmas: torch.Tensor,
                           cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's output for image tokens [B, L', 64] with their ids [L', 3] (the generated image's
        tokens, and those of any image appended after them), at sigmas [B], with the prompt of `cond`; fp32."""
        batch, device = tokens.shape[0], tokens.device
        dtype = next(self.transformer.parameters()).dtype
        prompt_embeds = cond["prompt_embeds"].to(device=device, dtype=dtype)
        guidance = torch.full((batch,), self.guidance_scale, device=device) if self.has_guidance else None
        out = self.transformer(
            hidden_states=tokens.to(dtype),
            timestep=sigmas.to(device=device, dtype=dtype),  # sigma in [0, 1]; the model scales by 1000
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device),
            img_ids=ids,
            return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> images [B, 3, H, W] in [0, 1], float32 (FluxPipeline's decode path)."""
        param = next(self.vae.parameters())
        z = unpack_latents(latents.to(device=param.device, dtype=torch.float32), self.latent_h, self.latent_w)
        z = z / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z.to(param.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    # ----- training support ----------------------------------------------------------------------------------------

    def blocks(self) -> list[nn.Module]:
        """The 19 double-stream and 38 single-stream blocks of FLUX.1-dev (FSDP2 / checkpointing units)."""
        model = _unwrap(self.transformer)
        return [*model.transformer_blocks, *model.single_transformer_blocks]


def scheduler_mu(scheduler_config: dict, image_seq_len: int) -> float:
    """The resolution-dependent shift mu the diffusers pipelines with packed latents (FLUX, Qwen-Image) compute for
    `image_seq_len` tokens from their scheduler config's values (FLUX.1's defaults where absent, as they do)."""
    keys = {"base_image_seq_len": "base_seq_len", "max_image_seq_len": "max_seq_len", "base_shift": "base_shift",
            "max_shift": "max_shift"}
    kwargs = {ours: scheduler_config[theirs] for theirs, ours in keys.items() if theirs in scheduler_config}
    return sde.flux_mu(image_seq_len, **kwargs)


def read_scheduler_config(root: Path) -> dict:
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def load_flux(model_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              vae_dtype: torch.dtype | None = None, height: int = 720, width: int = 720,
              guidance_scale: float = 3.5, transformer_path: str | Path | None = None,
              adapter_class: type[FluxAdapter] | None = None, **adapter_kwargs) -> FluxAdapter:
    """Load transformer (in `dtype`: fp32 master weights by default) and VAE (`vae_dtype`; default bf16 on CUDA,
    fp32 on CPU) from a local diffusers-layout folder; nothing is downloaded. `transformer_path`: a folder whose
    `transformer/` is loaded instead of the base's (a full export of a training run; the rest from `model_path`).
    `adapter_class` (default FluxAdapter) is built with `adapter_kwargs` besides the parts and sizes."""
    check_image_size(height, width)
    root = check_flux_folder(model_path, ("vae",) if transformer_path is not None else ("transformer", "vae"))
    transformer_root = root if transformer_path is None else Path(transformer_path)
    folder = transformer_root / "transformer"
    transformer_config = read_config(folder, "FLUX transformer")
    check_flux_config(height, width, transformer_config, read_config(root / "vae", "FLUX VAE"), folder / CONFIG_FILE)
    scheduler_config = read_scheduler_config(root)
    from diffusers import AutoencoderKL, FluxTransformer2DModel  # after the checks: importing takes seconds

    check_weights_match(FluxTransformer2DModel, folder, transformer_config, "FLUX transformer", describe_flux,
                        "config.json and the weights of transformer/ must come from the same checkpoint or export")
    device = torch.device(device)
    if vae_dtype is None:
        vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load_part(FluxTransformer2DModel, transformer_root, "transformer", "FLUX transformer",
                            torch_dtype=dtype)
    vae = load_part(AutoencoderKL, root, "vae", "FLUX VAE", torch_dtype=vae_dtype)
    adapter = (adapter_class or FluxAdapter)(transformer, vae, height, width, guidance_scale, scheduler_config,
                                             **adapter_kwargs)
    return adapter.to(device)


def build_prompt_encoder(model_path: str | Path | None, device: torch.device | str, args):
    """`encode(texts) -> {"prompt_embeds": [n, max_sequence_length, D_t5], "pooled_prompt_embeds": [n, D_clip]}`,
    equal to `FluxPipeline.encode_prompt(prompt=texts, prompt_2=texts, max_sequence_length=...)`: CLIP's pooled output
    (77 tokens) and T5's last hidden state (padded to `max_sequence_length`), in the encoders' dtype."""
    root = check_flux_folder(model_path, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    max_len = int(getattr(args, "max_sequence_length", 512))
    if not 1 <= max_len <= 512:
        raise ValueError(f"--max_sequence_length must be in [1, 512] for FLUX (T5 context), got {max_len}")
    device = torch.device(device)
    name = getattr(args, "dtype", "auto")
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in ENCODER_DTYPES:  # fp16 T5 overflows to inf: not offered
        raise ValueError(f"--dtype must be auto, fp32 or bf16 for FLUX text encoders, got '{name}'")
    dtype = ENCODER_DTYPES[name]
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel  # after the checks: importing takes seconds

    def load(cls, part: str, what: str, **kwargs):
        return load_pretrained(lambda: cls.from_pretrained(str(root / part), local_files_only=True, **kwargs),
                               root / part, what, f"FLUX.1-dev's {part}/ in transformers layout")

    clip_tokenizer = load(AutoTokenizer, "tokenizer", "CLIP tokenizer")
    t5_tokenizer = load(AutoTokenizer, "tokenizer_2", "T5 tokenizer")
    # Load in the target dtype (T5-XXL is 19 GB in fp32, per rank); `.to` below covers transformers < 4.56.
    clip = load(CLIPTextModel, "text_encoder", "CLIP text encoder", dtype=dtype)
    t5 = load(T5EncoderModel, "text_encoder_2", "T5 text encoder", dtype=dtype)
    clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)
    t5 = t5.to(device=device, dtype=dtype).eval().requires_grad_(False)
    clip_len = int(clip_tokenizer.model_max_length)

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        texts = list(texts)
        clip_ids = clip_tokenizer(texts, padding="max_length", max_length=clip_len, truncation=True,
                                  return_tensors="pt").input_ids
        t5_ids = t5_tokenizer(texts, padding="max_length", max_length=max_len, truncation=True,
                              return_tensors="pt").input_ids
        pooled = clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        embeds = t5(t5_ids.to(device), output_hidden_states=False)[0]
        return {"prompt_embeds": embeds.to(dtype), "pooled_prompt_embeds": pooled.to(dtype)}

    return encode


@dataclass
class FluxConfig(GuidanceFlags, SizeFlags):
    """FLUX's flags: the image size and the guidance value it embeds (FLUX.1-dev is guidance-distilled: no CFG)."""

    DEFAULTS = {"h": 720, "w": 720, "guidance_scale": 3.5}

    def validate(self) -> None:
        check_sizes(self, 16, "FLUX latents are 2x2-packed 8x-downsampled images")


# diffusers' test-sized FluxTransformer2DModel (notes/ecosystem.md): in_channels is the PACKED channel count. The tiny
# checkpoint's transformer (branchgrpo/testing/flux_tiny.py) and the benchmarks' `--random_shape tiny`.
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True,
)
T5_XXL_DIM = 4096  # FLUX.1-dev's text width (joint_attention_dim), whose T5 context is 512 tokens


def random_flux_transformer(shape: str, device, dtype: torch.dtype, seed: int = 0, **overrides) -> nn.Module:
    """A FluxTransformer2DModel of FLUX.1-dev's shape ('full', the shipped config: 19 double + 38 single blocks,
    width 3072, about 11.9B parameters) or the tiny one ('tiny'), random weights drawn from `seed` directly on
    `device` in `dtype` (never materialised in fp32 on the host); `overrides` replace config values (e.g. fewer
    blocks: num_layers, num_single_layers)."""
    from diffusers import FluxTransformer2DModel

    assert shape in FluxSpec.random_shapes, shape
    config = TINY_TRANSFORMER_CONFIG if shape == "tiny" else read_shipped_config("flux1-dev", ("flux1-dev",))
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"{unknown}: not values of the FLUX transformer config (it has {', '.join(config)})")
    torch.manual_seed(seed)
    return build_transformer(FluxTransformer2DModel, {**config, **overrides}, device, dtype)


def vae_stand_in():
    """A 4-level, 8-channel AutoencoderKL: the adapter reads its scale factor (8) and latent constants; the
    benchmarks never decode, so the VAE's size is irrelevant."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         scaling_factor=0.3611, shift_factor=0.1159)


def random_flux_cond(adapter: FluxAdapter, num_prompts: int, text_tokens: int | None, device, dtype,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Random T5 and CLIP embeddings of the transformer's widths; `text_tokens` None: the real T5-XXL context (512)
    for real-width models, the tiny tests' 16 otherwise."""
    config = adapter.transformer.config
    if text_tokens is None:
        text_tokens = 512 if config.joint_attention_dim == T5_XXL_DIM else 16
    gen = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(num_prompts, text_tokens, config.joint_attention_dim, generator=gen),
            "pooled_prompt_embeds": torch.randn(num_prompts, config.pooled_projection_dim, generator=gen)}
    return {k: v.to(device=device, dtype=dtype) for k, v in cond.items()}


@register_backbone
class FluxSpec(DiffusersSpec, PlannerSupport, StandInSupport, FixtureSupport):
    """FLUX.1-dev (text-to-image), diffusers layout; tiny stand-in: `python -m branchgrpo.make_tiny flux DIR`."""

    name = "flux"
    Config = FluxConfig
    dynamic_shift = True
    eval_rewards = ("hps", "pickscore", "clip", "imagereward")
    encoder_flags = ("max_sequence_length",)
    tiny = "branchgrpo.testing.flux_tiny:make_tiny_flux"
    tiny_run = {"h": 32, "w": 32, "max_sequence_length": 16}
    planner_configs = ("flux1-dev",)
    random_shapes = {"tiny": {"h": 64, "w": 64}, "full": {}}
    # the settings of scripts/lib/flux.sh
    comparison_flags = ("--sampling_steps", "20", "--shift", "3", "--reward", "hps=1.0", "--h", "720", "--w", "720",
                        "--train_batch_size", "2", "--learning_rate", "1e-5", "--max_grad_norm", "0.01",
                        "--clip_range", "1e-3", "--adv_clip_max", "5", "--rollout_batch_size", "8",
                        "--train_micro_batch_size", "4", "--gradient_accumulation_steps", "3", "--reward_batch_size",
                        "4", "--gradient_checkpointing", "--mixed_precision", "bf16", "--parallel", "fsdp",
                        "--num_eval_prompts", "16", "--eval_samples_per_prompt", "4", "--seed", "42")

    def check_config_sizes(self, model_cfg, transformer, vae, config_path) -> None:
        size = model_cfg.backbone.resolved
        check_flux_config(size("h"), size("w"), transformer, vae, config_path)

    def load(self, model_cfg, device, dtype=torch.float32, transformer_path=None) -> FluxAdapter:
        size = model_cfg.backbone.resolved
        return load_flux(model_cfg.pretrained_model_name_or_path, device, dtype=dtype, height=size("h"),
                         width=size("w"), guidance_scale=size("guidance_scale"), transformer_path=transformer_path)

    def prompt_encoder(self, model_path, device, settings):
        return build_prompt_encoder(model_path, device, settings)  # the module-level name, looked up at call time

    def tokens_per_sample(self, adapter: FluxAdapter, cond) -> int:
        return adapter.latent_shape[0] + cond["prompt_embeds"].shape[1]

    def random_adapter(self, shape, model_cfg, device, dtype, seed=0, **config_overrides) -> FluxAdapter:
        size = model_cfg.backbone.resolved
        transformer = random_flux_transformer(shape, device, dtype, seed, **config_overrides)
        return FluxAdapter(transformer, vae_stand_in(), size("h"), size("w"), size("guidance_scale")).to(device)

    def random_cond(self, adapter, num_prompts, text_tokens, device, dtype, seed=0) -> dict[str, torch.Tensor]:
        return random_flux_cond(adapter, num_prompts, text_tokens, device, dtype, seed)


    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=512) -> PlannerModel:
        from diffusers import FluxTransformer2DModel

        transformer = build_transformer(FluxTransformer2DModel, config, device, dtype)
        h, w = model_cfg.backbone.resolved("h"), model_cfg.backbone.resolved("w")
        image_tokens = (h // 16) * (w // 16)  # 8x VAE, 2x2 packing

        def inputs(batch: int) -> dict:
            with torch.device(device):
                return dict(hidden_states=torch.randn(batch, image_tokens, config["in_channels"], dtype=dtype),
                            encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"],
                                                              dtype=dtype),
                            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], dtype=dtype),
                            timestep=torch.ones(batch), guidance=torch.ones(batch),
                            img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3),
                            return_dict=False)

        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        return PlannerModel(transformer, blocks, inputs, LORA_TARGETS, image_tokens * config["in_channels"],
                            f"{h}x{w}: {image_tokens} image + {text_tokens} text tokens")
