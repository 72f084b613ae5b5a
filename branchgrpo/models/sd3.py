"""Stable Diffusion 3.5 (Medium and Large) as a `FlowAdapter`: batched classifier-free guidance, per-sample sigmas,
VAE latent normalisation, decode, export, and the three-encoder prompt encoder.

Conventions verified against diffusers 0.42 (StableDiffusion3Pipeline, SD3Transformer2DModel,
FlowMatchEulerDiscreteScheduler; tests/test_sd3.py):
- Velocity sign: the scheduler noises as x = sigma * noise + (1 - sigma) * x0 and steps x' = x + (sigma' - sigma) * out,
  so the transformer's output is d x / d sigma = noise - x0: already our v = eps - x0, no sign flip.
- Timestep: the pipeline passes the scheduler's t = 1000 * sigma as is (the transformer embeds raw timesteps). We pass
  1000 * sigma of each sample, in fp32.
- Classifier-free guidance (SD3.5 is not guidance-distilled): v = v_neg + s (v_cond - v_neg), s = 4.5 (the peers'
  recipes), the negative prompt "" by default; the pipeline runs [neg; cond] rows in one forward, we run [cond; neg]
  (models/guidance.py). s <= 1: the conditional rows alone.
- Latents: [B, 16, H / 8, W / 8], unpacked (the transformer cuts 2x2 patches itself), normalised as
  (z - shift_factor) * scaling_factor (the VAE config's 0.0609 and 1.5305); decode undoes it.
- Text: CLIP-L's and OpenCLIP bigG's penultimate hidden states (77 tokens each) concatenated on the channels (768 +
  1280 = 2048), zero-padded to T5-XXL's 4096, followed along the sequence by T5-XXL's last hidden state
  (`--t5_sequence_length` tokens: 128 as the peers train, diffusers' default is 256); pooled projections are the two
  CLIP towers' projected outputs, 768 + 1280 = 2048.
- Schedule: the checkpoint's FlowMatchEulerDiscreteScheduler with the static shift 3.0 (read into `native_shift`);
  branchgrpo samples its own Euler/SDE steps on `--shift` (3 by default), so the two agree.
- Sizes: the side in latent patches must fit the positional table (`pos_embed_max_size`: 384 patches for Medium, 192
  for Large), or diffusers fails deep inside.

Both sizes are one backbone: which one runs is whatever `transformer/config.json` of the checkpoint says (Medium: 24
layers, dual attention in layers 0-12; Large: 38 layers). The memory planner takes the shipped configs
`--transformer_config sd3.5-medium` (default) or `sd3.5-large`.

Skip-layer guidance (the pipeline's `skip_guidance_layers`, an inference option) is offered to evaluation only
(`--skip_layer_guidance 7,8,9`; `SkipLayerGuidance`): training and the held-out evaluation sample with plain CFG.
Not supported: running without T5 (the pipeline's `text_encoder_3=None`, zeros instead), IP-Adapters, ControlNets.

dtypes: master weights fp32 (`load_sd3(dtype=...)`), the caller sets bf16 autocast around `velocity`; embeddings are
cast to the transformer's dtype, the velocity is returned in fp32. The VAE runs in `vae_dtype` (fp32 by default:
GRPO never back-propagates through it) under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from branchgrpo.core.files import read_json
from branchgrpo.core.flags import flag, parse_int_list
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
from branchgrpo.models.guidance import guidance_on, guided_prediction
from branchgrpo.models.spec import EvalModel, GuidanceFlags, SizeFlags, check_sizes, hub_id_hint
from branchgrpo.models.support import FixtureSupport, PlannerModel, PlannerSupport

PIPELINE_CLASS = "StableDiffusion3Pipeline"
SD3_LAYOUT = ("model_index.json", "transformer/", "vae/", "scheduler/", "text_encoder/", "text_encoder_2/",
              "text_encoder_3/", "tokenizer/", "tokenizer_2/", "tokenizer_3/")
ENCODER_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
# Joint-attention projections of the image stream (and, in Medium's dual-attention layers, of its second attention)
# and of the text stream: the targets of the peers' SD3.5 LoRA recipes.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHIFT = 3.0
CLIP_TOKENS = 77  # CLIP's context, padded to it for both CLIP towers
MAX_T5_TOKENS = 512  # the pipeline refuses longer T5 contexts


def check_sd3_folder(model_path: str | Path | None, parts: tuple[str, ...]) -> Path:
    """The checkpoint folder exists, holds `parts`, and its model_index.json (when present) names
    StableDiffusion3Pipeline: another backbone's folder is refused here, before anything is loaded."""
    layout = ", ".join(SD3_LAYOUT)
    if model_path is None:
        raise ValueError(f"--pretrained_model_name_or_path / --model_path: no SD3.5 folder given (diffusers layout: "
                         f"{layout})")
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"SD3.5 checkpoint folder {root} does not exist{hub_id_hint(root, 'data/sd3')}; "
                                f"expected a diffusers-layout Stable Diffusion 3.5 folder holding {layout} "
                                "(see docs/sd3.md)")
    index_path = root / "model_index.json"
    if index_path.is_file():
        index = read_json(index_path)
        pipeline = index.get("_class_name") if isinstance(index, dict) else None
        if pipeline != PIPELINE_CLASS:
            raise ValueError(f"{root}: model_index.json names {pipeline}, not {PIPELINE_CLASS}; --model sd3 takes a "
                             "Stable Diffusion 3.5 checkpoint (see docs/sd3.md)")
    missing = [p for p in parts if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"SD3.5 checkpoint folder {root} lacks {', '.join(missing)}; expected a diffusers-"
                                f"layout Stable Diffusion 3.5 folder holding {layout} (see docs/sd3.md)")
    return root


def vae_factor(vae: dict) -> int:
    """The VAE's spatial downsampling (8 for SD3.5's 4-level AutoencoderKL)."""
    return 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)


def check_sd3_config(height: int, width: int, transformer: dict, vae: dict, config_path: Path) -> None:
    """--h/--w and the channels against the checkpoint's configs (read as JSON), before any weight is read: sides are
    multiples of (VAE factor x patch), the patches per side fit the positional table, and the transformer takes the
    VAE's latent channels."""
    factor, patch = vae_factor(vae), int(transformer.get("patch_size", 2))
    positions = transformer.get("pos_embed_max_size")
    for name, value in (("--h", height), ("--w", width)):
        unit = factor * patch
        if value <= 0 or value % unit:
            raise ValueError(f"{name}: {value} is not a positive multiple of {unit} (VAE {factor}x x patch {patch}, "
                             f"{config_path})")
        if positions is not None and value // unit > int(positions):
            raise ValueError(f"{name}: {value} px are {value // unit} patches per side, more than the "
                             f"{positions} positions of pos_embed_max_size in {config_path}; this checkpoint takes "
                             f"{name} up to {int(positions) * unit}")
    latent, channels = vae.get("latent_channels"), transformer.get("in_channels", 16)
    if latent is not None and int(channels) != int(latent):
        raise ValueError(f"{config_path}: the transformer takes {channels} channels but the VAE has {latent} latent "
                         "channels: mismatched transformer/ and vae/ folders")


def describe_sd3(shapes) -> str:
    """Blocks, dual-attention blocks and width of an SD3 transformer, read from its tensor shapes."""
    embed = shapes.get("pos_embed.proj.weight")
    dual = len({key.split(".")[1] for key in shapes if key.startswith("transformer_blocks.") and ".attn2." in key})
    return (f"{count_blocks(shapes, 'transformer_blocks.')} blocks ({dual} with dual attention) x width "
            f"{embed[0] if embed else '?'}")


def read_shift(root: Path) -> float:
    """The static shift of the checkpoint's scheduler config (3.0 for SD3.5; also when the config is absent)."""
    path = root / "scheduler" / "scheduler_config.json"
    config = read_json(path, "the scheduler config") if path.is_file() else {}
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: dynamic shifting; SD3.5's scheduler has a static shift (expected "
                         "use_dynamic_shifting false)")
    return float(config.get("shift", DEFAULT_SHIFT))


@dataclass(frozen=True)
class SkipLayerGuidance:
    """The pipeline's skip-layer guidance: on the steps i of T with start < i / T < stop, the guided velocity gains
    scale x (v_cond - v_cond with `layers` skipped). The rollout hands each sample its sigma, not its step: on the
    static-shift grid (the checkpoint's shift, the evaluation's default) i / T = 1 - t with sigma = s t / (1 + (s - 1)
    t), which locates the window; a margin far below 1 / T absorbs float32 rounding at its edges."""

    layers: tuple[int, ...]
    scale: float
    shift: float
    start: float = 0.01  # the pipeline's skip_layer_guidance_start
    stop: float = 0.2  # and _stop, fractions of the steps

    def active(self, sigmas: torch.Tensor) -> torch.Tensor:
        """[B] bool: the samples whose step lies inside the window."""
        sigma = sigmas.double()
        progress = 1.0 - sigma / (self.shift - (self.shift - 1.0) * sigma)
        margin = 1e-5
        return (progress > self.start + margin) & (progress < self.stop - margin)


class SD3Adapter(DiffusersExportMixin, FlowAdapter):
    """SD3Transformer2DModel + its VAE at a fixed image size (see the module docstring for the conventions)."""

    name = "sd3"
    transformer_class_name = "SD3Transformer2DModel"
    pipeline_class_name = PIPELINE_CLASS
    embedding_keys = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                      "negative_pooled_prompt_embeds")

    def __init__(self, transformer: nn.Module, vae: nn.Module, height: int, width: int, guidance_scale: float = 4.5,
                 shift: float = DEFAULT_SHIFT):
        config, vae_config = transformer.config, vae.config  # read once: the attribute may later be wrapped (DDP)
        check_sd3_config(height, width, dict(config), dict(vae_config), Path("transformer") / CONFIG_FILE)
        self.transformer, self.vae = transformer, vae.eval().requires_grad_(False)
        self.height, self.width = height, width
        self.guidance_scale, self.native_shift = float(guidance_scale), float(shift)
        factor = vae_factor(dict(vae_config))
        self.latent_shape = (int(vae_config.latent_channels), height // factor, width // factor)
        self.scaling_factor = float(vae_config.scaling_factor)
        self.shift_factor = float(vae_config.shift_factor or 0.0)
        module_names = [n for n, _ in transformer.named_modules()]
        self.default_lora_targets = tuple(t for t in LORA_TARGETS if any(n.endswith("." + t) for n in module_names))
        #: evaluation only (`SD3Spec.load_for_eval`); None: plain classifier-free guidance
        self.skip_layer_guidance: SkipLayerGuidance | None = None

    @property
    def uses_cfg(self) -> bool:
        """The pipeline's rule: guidance only when the scale exceeds 1."""
        return guidance_on(self.guidance_scale)

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 (guided when guidance_scale > 1) for latents [B, 16, h, w] at per-sample sigmas [B]; fp32."""
        batch = latents.shape[0]
        assert tuple(latents.shape[1:]) == self.latent_shape, (tuple(latents.shape), self.latent_shape)
        assert sigmas.shape == (batch,), sigmas.shape
        device = latents.device
        dtype = next(self.transformer.parameters()).dtype

        def embedding(key: str) -> torch.Tensor:
            if key not in cond:
                raise KeyError(f"SD3.5 needs cond['{key}'] (written by the sd3 preprocess script; the negative "
                               "prompt's as a dataset-wide extra); without guidance (guidance_scale <= 1) only the "
                               "prompt's own")
            return cond[key].to(device=device, dtype=dtype)

        # The timestep stays fp32 even for a bf16 transformer: bf16 would round 1000 * sigma to 3 significant digits.
        inputs = dict(hidden_states=latents.to(dtype), timestep=sigmas.to(device=device, dtype=torch.float32) * 1000.0,
                      encoder_hidden_states=embedding("prompt_embeds"),
                      pooled_projections=embedding("pooled_prompt_embeds"))

        def forward(**batched) -> torch.Tensor:
            return self.transformer(**batched, return_dict=False)[0].float()

        if not self.uses_cfg:
            return forward(**inputs)
        negative = {"encoder_hidden_states": embedding("negative_prompt_embeds"),
                    "pooled_projections": embedding("negative_pooled_prompt_embeds")}
        if negative["encoder_hidden_states"].shape != inputs["encoder_hidden_states"].shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative['encoder_hidden_states'].shape)} and "
                             f"prompt_embeds {tuple(inputs['encoder_hidden_states'].shape)} differ; encode both with "
                             "the same --t5_sequence_length")
        guided = guided_prediction(forward, inputs, negative, self.guidance_scale)
        slg = self.skip_layer_guidance
        in_window = slg.active(sigmas).nonzero().flatten() if slg is not None else []
        if len(in_window):  # one more conditional forward with the layers skipped, for the samples inside the window
            rows = {key: value[in_window] for key, value in inputs.items()}
            guided[in_window] += slg.scale * (forward(**rows) - forward(**rows, skip_layers=list(slg.layers)))
        return guided

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images [B, 3, H, W] in [0, 1], float32 (the pipeline's decode path)."""
        param = next(self.vae.parameters())
        z = latents.to(device=param.device, dtype=torch.float32) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z.to(param.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def blocks(self) -> list[nn.Module]:
        """The JointTransformerBlocks (24 for Medium, 38 for Large): FSDP2 / activation-checkpointing units."""
        return list(_unwrap(self.transformer).transformer_blocks)


def load_sd3(model_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             vae_dtype: torch.dtype = torch.float32, height: int = 512, width: int = 512, guidance_scale: float = 4.5,
             transformer_path: str | Path | None = None) -> SD3Adapter:
    """Load transformer (in `dtype`: fp32 master weights by default) and VAE (`vae_dtype`) from a local
    diffusers-layout SD3.5 folder; nothing is downloaded. `transformer_path`: a folder whose `transformer/` is loaded
    instead of the base's (a full export of a training run; the rest from `model_path`)."""
    root = check_sd3_folder(model_path, ("vae",) if transformer_path is not None else ("transformer", "vae"))
    transformer_root = root if transformer_path is None else Path(transformer_path)
    folder = transformer_root / "transformer"
    transformer_config = read_config(folder, "SD3 transformer")
    check_sd3_config(height, width, transformer_config, read_config(root / "vae", "SD3 VAE"), folder / CONFIG_FILE)
    shift = read_shift(root)
    from diffusers import AutoencoderKL, SD3Transformer2DModel  # after the checks: importing takes seconds

    check_weights_match(SD3Transformer2DModel, folder, transformer_config, "SD3 transformer", describe_sd3,
                        "config.json and the weights of transformer/ must come from the same checkpoint or export")
    transformer = load_part(SD3Transformer2DModel, transformer_root, "transformer", "SD3 transformer",
                            torch_dtype=dtype)
    vae = load_part(AutoencoderKL, root, "vae", "SD3 VAE", torch_dtype=vae_dtype)
    return SD3Adapter(transformer, vae, height, width, guidance_scale, shift).to(device)


# ----- prompt encoding ---------------------------------------------------------------------------------------------


def load_text_encoders(root: Path, device: torch.device, dtype: torch.dtype):
    """(CLIP-L, OpenCLIP bigG, T5-XXL) encoders and their tokenizers, in `dtype` on `device`, eval and frozen; their
    widths checked against each other (the CLIP widths fit T5's, as the pipeline pads them to it)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    def load(cls, part: str, what: str, **kwargs):
        return load_pretrained(lambda: cls.from_pretrained(str(root / part), local_files_only=True, **kwargs),
                               root / part, what, f"SD3.5's {part}/ in transformers layout")

    tokenizers = [load(AutoTokenizer, f"tokenizer{s}", f"tokenizer{s}") for s in ("", "_2", "_3")]
    encoders = [load(CLIPTextModelWithProjection, "text_encoder", "CLIP-L text encoder", dtype=dtype),
                load(CLIPTextModelWithProjection, "text_encoder_2", "OpenCLIP bigG text encoder", dtype=dtype),
                load(T5EncoderModel, "text_encoder_3", "T5 text encoder", dtype=dtype)]
    encoders = [e.to(device=device, dtype=dtype).eval().requires_grad_(False) for e in encoders]
    clip_width, t5_width = encoders[0].config.hidden_size + encoders[1].config.hidden_size, encoders[2].config.d_model
    if clip_width > t5_width:
        raise ValueError(f"{root}: the CLIP towers' widths add up to {clip_width}, more than T5's {t5_width} "
                         "(text_encoder_3/); expected SD3.5's text encoders (768 + 1280 <= 4096)")
    return tokenizers, encoders


def build_prompt_encoder(model_path: str | Path | None, device: torch.device | str, args):
    """`encode(texts) -> {"prompt_embeds": [n, 77 + L, D_t5], "pooled_prompt_embeds": [n, D_pooled]}`, equal to
    `StableDiffusion3Pipeline.encode_prompt(prompt, prompt, prompt, max_sequence_length=L)` with L =
    `args.t5_sequence_length`. `encode.extras()` gives the dataset-wide negative prompt's pair
    (`negative_prompt_embeds` [77 + L, D_t5], `negative_pooled_prompt_embeds` [D_pooled]; `args.negative_prompt`,
    default "" as in the pipeline)."""
    root = check_sd3_folder(model_path, ENCODER_PARTS)
    t5_len = int(getattr(args, "t5_sequence_length", None) or SD3Config.DEFAULTS["t5_sequence_length"])
    if not 1 <= t5_len <= MAX_T5_TOKENS:
        raise ValueError(f"--t5_sequence_length must be in [1, {MAX_T5_TOKENS}] for SD3.5, got {t5_len}")
    device = torch.device(device)
    name = getattr(args, "dtype", "auto")
    name = ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name
    if name not in ENCODER_DTYPES:  # fp16 T5 overflows to inf: not offered
        raise ValueError(f"--dtype must be auto, fp32 or bf16 for SD3.5's text encoders, got '{name}'")
    dtype = ENCODER_DTYPES[name]
    (clip_l_tok, clip_g_tok, t5_tok), (clip_l, clip_g, t5) = load_text_encoders(root, device, dtype)
    negative = getattr(args, "negative_prompt", None) or ""

    def clip_states(tokenizer, encoder, texts):
        ids = tokenizer(texts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # penultimate layer (clip_skip None), projected pooled output

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        texts = list(texts)
        (hidden_l, pooled_l), (hidden_g, pooled_g) = (clip_states(clip_l_tok, clip_l, texts),
                                                      clip_states(clip_g_tok, clip_g, texts))
        ids = t5_tok(texts, padding="max_length", max_length=t5_len, truncation=True, add_special_tokens=True,
                     return_tensors="pt").input_ids
        t5_states = t5(ids.to(device))[0]
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        clip = nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))  # zeros up to T5's width
        return {"prompt_embeds": torch.cat([clip, t5_states], dim=-2).to(dtype),
                "pooled_prompt_embeds": torch.cat([pooled_l, pooled_g], dim=-1).to(dtype)}

    def extras() -> dict[str, torch.Tensor]:
        out = encode([negative])
        return {"negative_prompt_embeds": out["prompt_embeds"][0],
                "negative_pooled_prompt_embeds": out["pooled_prompt_embeds"][0]}

    encode.extras = extras
    return encode


# ----- the spec ----------------------------------------------------------------------------------------------------


@dataclass
class SD3Config(GuidanceFlags, SizeFlags):
    """SD3.5's flags: the image size, the classifier-free guidance scale (<= 1: no guidance) and the T5 context."""

    t5_sequence_length: int | None = flag(None, "SD3.5: T5-XXL tokens per prompt after CLIP's 77 (the peers' recipes "
                                          "train with 128, diffusers' default is 256; read when prompts are encoded: "
                                          "preprocessing and evaluation)")
    skip_layer_guidance: str = flag("", "SD3.5, evaluation only: transformer layers skipped by skip-layer guidance, "
                                    "e.g. 7,8,9 (Stability's choice for Medium); empty: off")
    skip_layer_guidance_scale: float = flag(2.8, "SD3.5, evaluation only: the skip-layer guidance scale (the "
                                            "pipeline's default), on the steps i of T with 0.01 T < i < 0.2 T")

    DEFAULTS = {"h": 512, "w": 512, "guidance_scale": 4.5, "t5_sequence_length": 128}

    def validate(self) -> None:
        check_sizes(self, 16, "SD3.5 latents are 8x-downsampled and cut into 2x2 patches")
        length = self.t5_sequence_length
        if length is not None and not 1 <= length <= MAX_T5_TOKENS:
            raise ValueError(f"--t5_sequence_length: {length} is not in [1, {MAX_T5_TOKENS}] (the T5 context the "
                             "SD3 pipeline takes)")
        self.skip_layers()
        if self.skip_layer_guidance_scale <= 0:
            raise ValueError(f"--skip_layer_guidance_scale: need > 0, got {self.skip_layer_guidance_scale}")

    def conditions(self) -> dict[str, tuple[bool, str]]:
        # training reads the embeddings preprocessing stored; the flag acts where prompts are encoded
        evaluation = (False, "python -m branchgrpo.cli.eval (training samples with plain guidance)")
        return {"t5_sequence_length": (False, "preprocessing and evaluation (training reads the stored embeddings)"),
                "skip_layer_guidance": evaluation, "skip_layer_guidance_scale": evaluation}

    def skip_layers(self) -> tuple[int, ...]:
        """--skip_layer_guidance as layer indices (ValueError naming it)."""
        text = self.skip_layer_guidance.strip()
        layers = tuple(parse_int_list(text, "--skip_layer_guidance")) if text else ()
        if any(layer < 0 for layer in layers):
            raise ValueError(f"--skip_layer_guidance: layer indices are >= 0, got '{text}'")
        return layers


@register_backbone
class SD3Spec(DiffusersSpec, PlannerSupport, FixtureSupport):
    """Stable Diffusion 3.5 Medium and Large (text-to-image), diffusers layout; the size is the checkpoint's; tiny
    stand-in: `python -m branchgrpo.make_tiny sd3 DIR`."""

    name = "sd3"
    Config = SD3Config
    eval_rewards = ("hps", "pickscore", "clip", "imagereward")
    encoder_flags = ("negative_prompt", "t5_sequence_length")
    tiny = "branchgrpo.testing.sd3_tiny:make_tiny_sd3"
    tiny_run = {"h": 32, "w": 32, "t5_sequence_length": 8}
    planner_configs = ("sd3.5-medium", "sd3.5-large")

    def check_config_sizes(self, model_cfg, transformer, vae, config_path) -> None:
        check_sd3_folder(model_cfg.pretrained_model_name_or_path, ())
        size = model_cfg.backbone.resolved
        check_sd3_config(size("h"), size("w"), transformer, vae, config_path)

    def load(self, model_cfg, device, dtype=torch.float32, transformer_path=None) -> SD3Adapter:
        size = model_cfg.backbone.resolved
        return load_sd3(model_cfg.pretrained_model_name_or_path, device, dtype=dtype, height=size("h"),
                        width=size("w"), guidance_scale=size("guidance_scale"), transformer_path=transformer_path)

    def load_for_eval(self, model_cfg, weights, layout, device, dtype=torch.float32) -> EvalModel:
        """The diffusers backbones' evaluation loading, plus skip-layer guidance when --skip_layer_guidance is set."""
        loaded = super().load_for_eval(model_cfg, weights, layout, device, dtype)
        section, adapter = model_cfg.backbone, loaded.adapter
        layers = section.skip_layers()
        if layers:
            num_layers = len(adapter.blocks())
            if max(layers) >= num_layers:
                raise ValueError(f"--skip_layer_guidance: layer {max(layers)} does not exist; the transformer of "
                                 f"{model_cfg.pretrained_model_name_or_path} has layers 0-{num_layers - 1}")
            adapter.skip_layer_guidance = SkipLayerGuidance(layers, section.skip_layer_guidance_scale,
                                                            adapter.native_shift)
        return loaded

    def prompt_encoder(self, model_path, device, settings):
        return build_prompt_encoder(model_path, device, settings)

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=None) -> PlannerModel:
        from diffusers import SD3Transformer2DModel

        transformer = build_transformer(SD3Transformer2DModel, config, device, dtype)
        size = model_cfg.backbone.resolved
        h, w = size("h"), size("w")
        latent = (config.get("in_channels", 16), h // 8, w // 8)  # SD3.5's VAE: 16 channels, 8x
        if text_tokens is None:
            text_tokens = CLIP_TOKENS + size("t5_sequence_length")
        rows = 2 if guidance_on(size("guidance_scale")) else 1  # classifier-free guidance: [cond; negative] rows

        def inputs(batch: int) -> dict:
            n = rows * batch
            with torch.device(device):
                return dict(hidden_states=torch.randn(n, *latent, dtype=dtype), timestep=torch.ones(n),
                            encoder_hidden_states=torch.randn(n, text_tokens, config["joint_attention_dim"],
                                                              dtype=dtype),
                            pooled_projections=torch.randn(n, config["pooled_projection_dim"], dtype=dtype),
                            return_dict=False)

        patch = config.get("patch_size", 2)
        tokens = (latent[1] // patch) * (latent[2] // patch)
        return PlannerModel(transformer, list(transformer.transformer_blocks), inputs, LORA_TARGETS,
                            latent[0] * latent[1] * latent[2],
                            f"{h}x{w}: {tokens} image + {text_tokens} text tokens, x{rows} rows (CFG)")
