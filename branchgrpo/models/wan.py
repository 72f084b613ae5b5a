"""Wan2.1 text-to-video as a `FlowAdapter`: raw-timestep conditioning, batched CFG, per-sample sigmas, video decode,
export, prompt encoder and the negative-prompt embedding.

Conventions verified against diffusers 0.42 (WanPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler;
tests/test_wan.py):
- Velocity sign: Wan's schedulers noise as x = sigma * noise + (1 - sigma) * x0 and their Euler step is
  x' = x + (sigma' - sigma) * out, so the transformer's output is d x / d sigma = noise - x0: already our
  v = eps - x0, no sign flip.
- Timestep: WanPipeline passes the raw scheduler timestep t = 1000 * sigma (a float, not an integer) and the
  transformer embeds it as is. We pass 1000 * sigma of each sample (per-sample `[B]` timesteps are supported).
- Classifier-free guidance (Wan is not guidance-distilled): v = v_uncond + s (v_cond - v_uncond) with s = 5 by
  default; WanPipeline runs two forwards, we run ONE forward on 2B rows (cond rows first). s <= 1: cond only.
- Latents: [B, 16, (F - 1) / 4 + 1, H / 8, W / 8], normalised per channel, x = (z - latents_mean) / latents_std
  (VAE config); decode undoes it and maps the VAE's [-1, 1] output to [0, 1].
- Schedule: the real checkpoint ships UniPCMultistepScheduler(flow_shift=3.0), a multistep solver; branchgrpo samples
  with its own Euler/SDE steps on the static shift `--shift` (3, as the launchers pass). The checkpoint's own shift
  (`flow_shift` of UniPC or `shift` of FlowMatchEuler; 3.0 if absent) is read into `native_shift`, and the trainer
  warns when `--shift` differs from it (e.g. a 720p checkpoint shipping flow_shift 5).

Supported: Wan2.1 text-to-video (1.3B and 14B) in diffusers layout; image-to-video is the `wan_i2v` backbone
(models/wan_i2v.py), which subclasses this adapter (its transformer takes CLIP image tokens and 20 extra condition
channels per step: the two hooks `model_input` / `image_inputs` below); Wan2.2 T2V-A14B (two experts) is the
`wan22` backbone (models/wan22.py), which subclasses it too (`transformer_inputs` / `negative_inputs` / `guided`
below), as is I2V-A14B (`wan22_i2v`); Wan2.2 TI2V-5B (per-token timesteps, the 48-channel Wan2.2 VAE) is the
`wan22_ti2v` / `wan22_ti2v_i2v` backbones (models/wan22_ti2v.py: `transformer_inputs` / `model_input`). Not
supported (clear error at load): the first-last-frame model.

dtypes: master weights fp32 (`load_wan(dtype=...)`), the caller sets bf16 autocast around `velocity`; embeddings are
cast to the transformer's dtype, the velocity is returned in fp32. The VAE runs in `vae_dtype` (fp32 by default:
Wan's authors recommend an fp32 VAE) under no_grad.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from branchgrpo.core.flags import flag
from branchgrpo.models import register_backbone
from branchgrpo.models.base import FlowAdapter
from branchgrpo.models.guidance import guidance_on, guided_prediction
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
from branchgrpo.models.spec import REPO_ASSETS, GuidanceFlags, SizeFlags, check_sizes, hub_id_hint
from branchgrpo.models.support import BenchSupport, FixtureSupport, PlannerModel, PlannerSupport
from branchgrpo.core.state_dicts import count_blocks

WAN_LAYOUT = ("model_index.json", "transformer/", "vae/", "text_encoder/", "tokenizer/", "scheduler/")
# Self- (attn1) and cross-attention (attn2) projections of every block.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHIFT = 3.0
MAX_TEXT_LEN = 512  # Wan2.1's text_len
# Wan2.1's own default negative prompt (`sample_neg_prompt` of its shared config); diffusers' docs use an English
# translation of it. Chinese is what the model was tuned with.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)


def check_wan_folder(model_path: str | Path | None, parts: tuple[str, ...], layout: tuple[str, ...] = WAN_LAYOUT,
                     kind: str = "Wan2.1-T2V") -> Path:
    """Fail before loading anything heavy when the checkpoint folder or one of the needed subfolders is missing."""
    listed = ", ".join(layout)
    if model_path is None:
        raise ValueError("--pretrained_model_name_or_path / --model_path: no Wan folder given "
                         f"(diffusers layout: {listed})")
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"Wan checkpoint folder {root} does not exist{hub_id_hint(root, 'data/wan')}; "
                                f"expected a diffusers-layout {kind} folder holding {listed} (see docs/wan.md)")
    missing = [p for p in parts if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"Wan checkpoint folder {root} lacks {', '.join(missing)}; expected a diffusers-layout "
                                f"{kind} folder holding {listed} (see docs/wan.md)")
    return root


def check_video_size(num_frames: int, height: int, width: int, temporal: int = 4, spatial: int = 16) -> None:
    """The VAE compresses 1 + 4k frames to 1 + k latent frames, and 8x spatially before 2x2 patches: sides % 16 == 0."""
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"--num_frames must be {temporal}k + 1 (1, 5, 9, ..., 81) for Wan's VAE, got {num_frames}")
    for flag, value in (("--h", height), ("--w", width)):
        if not isinstance(value, int) or value <= 0 or value % spatial:
            raise ValueError(f"{flag} must be a positive multiple of {spatial} (VAE factor 8 x patch 2), got {value}")


def check_wan_config(num_frames: int, height: int, width: int, transformer: dict, vae: dict,
                     config_path: Path, image_to_video: bool = False) -> None:
    """--num_frames/--h/--w against the checkpoint's configs (read as JSON), before any weight is read: frames are
    (VAE temporal factor) k + 1, sides multiples of (VAE spatial factor x patch), and the patches along each axis
    fit the rotary embedding's `rope_max_seq_len` positions (else diffusers fails deep inside with a reshape error)."""
    temporal, spatial = int(vae.get("scale_factor_temporal", 4)), int(vae.get("scale_factor_spatial", 8))
    patch = [int(p) for p in transformer.get("patch_size", (1, 2, 2))]
    positions = int(transformer.get("rope_max_seq_len", 1024))
    where = f"rope_max_seq_len of {config_path}"
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"--num_frames: {num_frames} is not of the form {temporal}k + 1 (the VAE compresses time "
                         f"{temporal}x)")
    latent_frames = (num_frames - 1) // temporal + 1
    if latent_frames % patch[0]:
        raise ValueError(f"--num_frames: {num_frames} frames are {latent_frames} latent frames, not a multiple of the "
                         f"transformer's temporal patch {patch[0]} ({config_path})")
    if latent_frames // patch[0] > positions:
        most = (positions * patch[0] - 1) * temporal + 1
        raise ValueError(f"--num_frames: {num_frames} frames are {latent_frames // patch[0]} temporal patches, more "
                         f"than the {positions} rotary positions ({where}); this checkpoint takes at most {most}")
    for flag, value, step in (("--h", height, patch[1]), ("--w", width, patch[2])):
        unit = spatial * step
        if value % unit:
            raise ValueError(f"{flag}: {value} is not a multiple of {unit} (VAE {spatial}x x patch {step}, "
                             f"{config_path})")
        if value // unit > positions:
            raise ValueError(f"{flag}: {value} px are {value // unit} patches of {unit} px, more than the "
                             f"{positions} rotary positions ({where}); this checkpoint takes {flag} up to "
                             f"{positions * unit}")
    if vae.get("z_dim") is not None:
        expected = int(vae["z_dim"]) + condition_channels(vae, image_to_video)
        if int(transformer.get("in_channels", expected)) != expected:
            raise ValueError(f"{config_path}: the transformer takes {transformer['in_channels']} channels but the "
                             f"VAE's {vae['z_dim']} latent channels make {expected}"
                             + (" (latents + mask + first-frame latents)" if image_to_video else "")
                             + ": mismatched transformer/ and vae/ folders")


def describe_wan(shapes) -> str:
    """Blocks and width of a Wan transformer, read from its tensor shapes."""
    embed = shapes.get("patch_embedding.weight")
    return f"{count_blocks(shapes, 'blocks.')} blocks x width {embed[0] if embed else '?'}"


def _read_json(path: Path) -> dict:
    """A small JSON file of the checkpoint ({} when absent), or a ValueError naming it."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_flow_shift(root: Path) -> float:
    """The static shift of the checkpoint's scheduler config (UniPC: `flow_shift`; FlowMatchEuler: `shift`)."""
    path = root / "scheduler" / "scheduler_config.json"
    config = _read_json(path)
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: dynamic shifting is not used by Wan2.1; expected a static flow_shift")
    return float(config.get("flow_shift", config.get("shift", DEFAULT_SHIFT)))


def _check_supported(root: Path, transformer_config: dict, adapter_class: type["WanAdapter"]) -> None:
    """The checkpoint is the kind `adapter_class` takes - single transformer (Wan2.1) or two experts (Wan2.2 A14B:
    `two_experts`), text- or image-to-video (`image_to_video`), with or without CLIP image tokens (`image_tokens`) -
    read from model_index.json and the transformer's config (before weights load); else one line naming the folder
    and the backbone that takes it."""
    index = _read_json(root / "model_index.json")
    per_token = bool(index.get("expand_timesteps"))
    if per_token != adapter_class.per_token_timesteps:
        if per_token:
            raise ValueError(f"{root}: a Wan2.2 TI2V-5B checkpoint (expand_timesteps in model_index.json: one timestep "
                             f"per token); the {adapter_class.name} backbone does not take it: use --model wan22_ti2v "
                             "(text-to-video) or wan22_ti2v_i2v (image-to-video) (docs/wan22.md)")
        raise ValueError(f"{root}: not a Wan2.2 TI2V-5B checkpoint (model_index.json lacks expand_timesteps: true); "
                         f"the {adapter_class.name} backbone takes Wan2.2-TI2V-5B-Diffusers (docs/wan22.md)")
    two_experts = index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None
    image_dim, in_channels = transformer_config.get("image_dim"), transformer_config.get("in_channels", 16)
    is_i2v = image_dim is not None or in_channels != transformer_config.get("out_channels", 16)
    wanted = adapter_class.two_experts, adapter_class.image_to_video
    kind = WAN_KINDS[two_experts, is_i2v]
    if (two_experts, is_i2v) != wanted:
        raise ValueError(f"{root}: holds a {kind[0]} (transformer_2 / boundary_ratio in model_index.json: "
                         f"{two_experts}; image_dim={image_dim}, in_channels={in_channels}); the {adapter_class.name} "
                         f"backbone takes a {WAN_KINDS[wanted][0]}: use --model {kind[1]} (docs/wan.md)")
    if adapter_class.image_tokens and image_dim is None:
        raise ValueError(f"{root}: a Wan transformer without image_dim (it takes no CLIP image tokens); the "
                         f"{adapter_class.name} backbone needs Wan2.1-I2V's CLIP image tokens (docs/wan.md)")
    if is_i2v and transformer_config.get("pos_embed_seq_len") is not None:
        raise ValueError(f"{root}: a first-last-frame-to-video Wan transformer (pos_embed_seq_len set: two "
                         "conditioning images); only first-frame image-to-video is supported (docs/wan.md)")


#: (two experts, image-to-video) -> (what the checkpoint is, the backbone that takes it)
WAN_KINDS = {(False, False): ("text-to-video Wan transformer (Wan2.1)", "wan"),
             (False, True): ("image-to-video Wan transformer (Wan2.1)", "wan_i2v"),
             (True, False): ("two-expert text-to-video Wan transformer pair (Wan2.2 T2V-A14B)", "wan22"),
             (True, True): ("two-expert image-to-video Wan transformer pair (Wan2.2 I2V-A14B)", "wan22_i2v")}


def condition_channels(vae_config, image_to_video: bool) -> int:
    """Channels concatenated to the latents at every step: none (text-to-video), or image-to-video's mask (one per
    frame of the VAE's temporal factor) plus the encoded first-frame video (the latent channels)."""
    if not image_to_video:
        return 0
    return int(vae_config.get("scale_factor_temporal", 4)) + int(vae_config.get("z_dim", 16))


class WanAdapter(DiffusersExportMixin, FlowAdapter):
    """WanTransformer3DModel + its VAE at a fixed video size (see the module docstring for the conventions)."""

    name = "wan"
    transformer_class_name = "WanTransformer3DModel"
    pipeline_class_name = "WanPipeline"
    embedding_keys = ("prompt_embeds", "negative_prompt_embeds")
    #: the transformer takes the image conditioning (models/wan_i2v.py), CLIP image tokens among it; two experts
    #: (Wan2.2 A14B, models/wan22.py); read by the loader's checks
    image_to_video, image_tokens, two_experts = False, False, False
    #: one timestep per token (`expand_timesteps` of Wan2.2 TI2V-5B, models/wan22_ti2v.py); read by the loader's checks
    per_token_timesteps = False
    #: what the loader's messages call the checkpoint, and the folder layout they list
    checkpoint_kind, checkpoint_layout = "Wan2.1-T2V", WAN_LAYOUT
    #: LoRA targets looked for in the transformer (those found become `default_lora_targets`)
    lora_targets = LORA_TARGETS

    def __init__(self, transformer: nn.Module, vae: nn.Module, num_frames: int, height: int, width: int,
                 guidance_scale: float = 5.0, shift: float = DEFAULT_SHIFT):
        vae_config, config = vae.config, transformer.config  # read once: the attribute may later be wrapped (DDP)
        self.temporal_factor = int(vae_config.scale_factor_temporal)
        self.spatial_factor = int(vae_config.scale_factor_spatial)
        check_video_size(num_frames, height, width, self.temporal_factor, self.spatial_factor * config.patch_size[1])
        self.transformer, self.vae = transformer, vae.eval().requires_grad_(False)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.guidance_scale, self.native_shift = float(guidance_scale), float(shift)
        self.latent_shape = (int(vae_config.z_dim), (num_frames - 1) // self.temporal_factor + 1,
                             height // self.spatial_factor, width // self.spatial_factor)
        expected = self.latent_shape[0] + condition_channels(dict(vae_config), self.image_to_video)
        if expected != config.in_channels:
            raise ValueError(f"Wan VAE has {self.latent_shape[0]} latent channels, which make {expected} transformer "
                             f"inputs, but the transformer takes {config.in_channels}")
        view = (1, self.latent_shape[0], 1, 1, 1)
        self.latents_mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(view)
        self.latents_std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(view)
        module_names = [n for n, _ in transformer.named_modules()]
        self.default_lora_targets = tuple(t for t in self.lora_targets
                                          if any(n.endswith("." + t) for n in module_names))

    @property
    def uses_cfg(self) -> bool:
        """WanPipeline's rule: guidance only when the scale exceeds 1."""
        return guidance_on(self.guidance_scale)

    # ----- sampling ------------------------------------------------------------------------------------------------

    def _negative(self, cond: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The uncond embedding per sample: [B, L, D] as the trainer passes it, or one [L, D] / [1, L, D] expanded."""
        if "negative_prompt_embeds" not in cond:
            raise KeyError("Wan with guidance_scale > 1 needs cond['negative_prompt_embeds'] (the embedding store's "
                           "extras, written by the wan preprocess script); or set guidance_scale <= 1")
        neg = cond["negative_prompt_embeds"]
        neg = neg.unsqueeze(0) if neg.dim() == 2 else neg
        if neg.shape[1:] != like.shape[1:]:
            raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} and prompt_embeds {tuple(like.shape)} differ "
                             "in length or width; encode both with the same --max_sequence_length")
        return neg.expand(like.shape[0], -1, -1).to(device=like.device, dtype=like.dtype)

    def model_input(self, latents: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's `hidden_states` for latents [B, C, F, h, w]: the latents themselves (text-to-video)."""
        return latents

    def image_inputs(self, cond: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
        """Extra per-row keyword inputs of the transformer, the same for the cond and uncond rows: none here."""
        return {}

    def transformer_inputs(self, latents: torch.Tensor, sigmas: torch.Tensor,
                           cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The transformer's keyword inputs [B, ...] for latents [B, C, F, h, w] at per-sample sigmas [B] (the
        conditional rows; `guided` adds the negative ones)."""
        batch = latents.shape[0]
        assert tuple(latents.shape[1:]) == self.latent_shape, (tuple(latents.shape), self.latent_shape)
        assert sigmas.shape == (batch,), sigmas.shape
        device = latents.device
        dtype = next(self.transformer.parameters()).dtype
        x = self.model_input(latents, cond).to(dtype)
        text = cond["prompt_embeds"].to(device=device, dtype=dtype)
        # The timestep stays fp32 even for a bf16 transformer (as in WanPipeline): bf16 would round 1000 * sigma
        # to 3 significant digits. Wan embeds raw timesteps in [0, 1000].
        return dict(hidden_states=x, timestep=sigmas.to(device=device, dtype=torch.float32) * 1000.0,
                    encoder_hidden_states=text, **self.image_inputs(cond, device, dtype))

    def negative_inputs(self, cond: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict:
        """What the negative rows of classifier-free guidance replace: the negative prompt's embedding [B, L, D]."""
        return {"encoder_hidden_states": self._negative(cond, inputs["encoder_hidden_states"])}

    def guided(self, forward, inputs: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None,
               scale: float) -> torch.Tensor:
        """`forward(**inputs)`, guided with `scale` over the `negative` rows when the scale asks for guidance."""
        if not guidance_on(scale):
            return forward(**inputs)
        # the image conditioning (wan_i2v) is the same on the conditional and the negative rows, as in the pipeline
        return guided_prediction(forward, inputs, negative, scale)

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 (guided when guidance_scale > 1) for latents [B, C, F, h, w] at per-sample sigmas [B]; fp32."""
        inputs = self.transformer_inputs(latents, sigmas, cond)

        def forward(**rows) -> torch.Tensor:
            return self.transformer(**rows, return_dict=False)[0].float()

        negative = self.negative_inputs(cond, inputs) if self.uses_cfg else None
        return self.guided(forward, inputs, negative, self.guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> videos [B, 3, F, H, W] in [0, 1], float32 (WanPipeline's decode path)."""
        param = next(self.vae.parameters())
        z = latents.to(device=param.device, dtype=torch.float32)
        z = z * self.latents_std.to(z.device) + self.latents_mean.to(z.device)
        video = self.vae.decode(z.to(param.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0.0, 1.0)

    # ----- training support ----------------------------------------------------------------------------------------

    def blocks(self) -> list[nn.Module]:
        """The WanTransformerBlocks (30 for 1.3B, 40 for 14B): FSDP2 / activation-checkpointing units."""
        return list(_unwrap(self.transformer).blocks)


def load_wan(model_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             vae_dtype: torch.dtype = torch.float32, height: int = 480, width: int = 832, num_frames: int = 81,
             guidance_scale: float = 5.0, transformer_path: str | Path | None = None,
             adapter_class: type[WanAdapter] = WanAdapter) -> WanAdapter:
    """Load transformer (in `dtype`: fp32 master weights by default) and VAE (`vae_dtype`) from a local
    diffusers-layout Wan2.1 folder (text-to-video, or image-to-video for `adapter_class.image_to_video`); nothing is
    downloaded. `transformer_path`: a folder whose `transformer/` is loaded instead of the base's (a full export of a
    training run; the rest from `model_path`)."""
    check_video_size(num_frames, height, width)
    root = check_wan_folder(model_path, ("vae",) if transformer_path is not None else ("transformer", "vae"),
                            adapter_class.checkpoint_layout, adapter_class.checkpoint_kind)
    transformer_root = root if transformer_path is None else Path(transformer_path)
    folder = transformer_root / "transformer"
    transformer_config = read_config(folder, "Wan transformer")
    _check_supported(root, transformer_config, adapter_class)
    check_wan_config(num_frames, height, width, transformer_config, read_config(root / "vae", "Wan VAE"),
                     folder / CONFIG_FILE, adapter_class.image_to_video)
    shift = read_flow_shift(root)
    from diffusers import AutoencoderKLWan, WanTransformer3DModel  # after the checks: importing takes seconds

    check_weights_match(WanTransformer3DModel, folder, transformer_config, "Wan transformer", describe_wan,
                        "config.json and the weights of transformer/ must come from the same checkpoint or export")
    transformer = load_part(WanTransformer3DModel, transformer_root, "transformer", "Wan transformer",
                            torch_dtype=dtype)
    vae = load_part(AutoencoderKLWan, root, "vae", "Wan VAE", torch_dtype=vae_dtype)
    adapter = adapter_class(transformer, vae, num_frames, height, width, guidance_scale, shift)
    return adapter.to(device)


# ----- prompt encoding ---------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The text clean-up WanPipeline applies before tokenising: ftfy (when installed), HTML unescaping (twice, for
    doubly escaped scraped captions), whitespace collapsed. Embeddings only equal the pipeline's with it."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def build_prompt_encoder(model_path: str | Path | None, device: torch.device | str, args):
    """`encode(texts) -> {"prompt_embeds": [n, max_sequence_length, D]}`, equal to `WanPipeline.encode_prompt`:
    UMT5's last hidden state, zeroed after each prompt's last token (Wan attends to the padded rows, so zeros - not the
    encoder's outputs at padding - are part of the conditioning). `encode.extras()` gives the dataset-wide
    negative-prompt embedding (`args.negative_prompt`, default Wan's own), written once by the preprocess driver."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = check_wan_folder(model_path, ("text_encoder", "tokenizer"))
    max_len = int(getattr(args, "max_sequence_length", MAX_TEXT_LEN))
    if not 1 <= max_len <= MAX_TEXT_LEN:
        raise ValueError(f"--max_sequence_length must be in [1, {MAX_TEXT_LEN}] for Wan (its text_len), got {max_len}")
    device = torch.device(device)
    name = getattr(args, "dtype", "auto")
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in ENCODER_DTYPES:  # fp16 T5 overflows to inf: not offered
        raise ValueError(f"--dtype must be auto, fp32 or bf16 for Wan's UMT5 encoder, got '{name}'")
    dtype = ENCODER_DTYPES[name]
    tokenizer = load_pretrained(lambda: AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
                                root / "tokenizer", "UMT5 tokenizer", "Wan2.1's tokenizer/ in transformers layout")
    encoder = load_pretrained(
        lambda: UMT5EncoderModel.from_pretrained(str(root / "text_encoder"), local_files_only=True),
        root / "text_encoder", "UMT5 text encoder", "Wan2.1's text_encoder/ in transformers layout")
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    negative = getattr(args, "negative_prompt", None)
    negative = DEFAULT_NEGATIVE_PROMPT if negative is None else negative

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer([clean_prompt(t) for t in texts], padding="max_length", max_length=max_len,
                           truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return {"prompt_embeds": (hidden * mask[..., None].to(hidden.dtype)).to(dtype)}

    def extras() -> dict[str, torch.Tensor]:
        return negative_prompt_extras(encode, negative)

    encode.extras = extras
    return encode


def negative_prompt_extras(encode, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> dict[str, torch.Tensor]:
    """{"negative_prompt_embeds": [L, D]}: the one uncond embedding shared by every prompt of a dataset (stored with
    `write_extras`; the trainer expands it per sample). An empty string is a valid negative prompt."""
    return {"negative_prompt_embeds": encode([negative_prompt])["prompt_embeds"][0]}


@dataclass
class WanConfig(GuidanceFlags, SizeFlags):
    """Wan's flags: the video size and the classifier-free guidance scale (<= 1: no guidance)."""

    num_frames: int | None = flag(None, "video frames, 4k + 1")

    DEFAULTS = {"h": 480, "w": 832, "num_frames": 33, "guidance_scale": 5.0}

    def validate(self) -> None:
        check_sizes(self, 16, "Wan latents are 8x-downsampled and cut into 2x2 patches")
        frames = self.num_frames
        if frames is not None and (frames < 1 or (frames - 1) % 4):
            raise ValueError(f"--num_frames: {frames} is not of the form 4k + 1 (Wan's VAE compresses time 4x)")


@register_backbone
class WanSpec(DiffusersSpec, PlannerSupport, BenchSupport, FixtureSupport):
    """Wan2.1 text-to-video (1.3B, 14B), diffusers layout; tiny stand-in: `python -m branchgrpo.make_tiny wan DIR`."""

    name = "wan"
    media = "video"
    Config = WanConfig
    eval_rewards = ("frame_reward", "temporal_consistency", "videoalign")
    encoder_flags = ("max_sequence_length", "negative_prompt")
    tiny = "branchgrpo.testing.wan_tiny:make_tiny_wan"
    tiny_run = {"h": 32, "w": 48, "num_frames": 9, "max_sequence_length": 16}
    planner_configs = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
    #: the adapter `load` builds (and whose `image_to_video` the checkpoint checks follow)
    adapter_class: type[WanAdapter] = WanAdapter

    def check_config_sizes(self, model_cfg, transformer, vae, config_path) -> None:
        size = model_cfg.backbone.resolved
        _check_supported(Path(model_cfg.pretrained_model_name_or_path), transformer, self.adapter_class)
        check_wan_config(size("num_frames"), size("h"), size("w"), transformer, vae, config_path,
                         self.adapter_class.image_to_video)

    def load(self, model_cfg, device, dtype=torch.float32, transformer_path=None) -> WanAdapter:
        size = model_cfg.backbone.resolved
        return load_wan(model_cfg.pretrained_model_name_or_path, device, dtype=dtype, height=size("h"),
                        width=size("w"), num_frames=size("num_frames"), guidance_scale=size("guidance_scale"),
                        transformer_path=transformer_path, adapter_class=self.adapter_class)

    def prompt_encoder(self, model_path, device, settings):
        return build_prompt_encoder(model_path, device, settings)

    def default_prompts(self) -> Path:
        return REPO_ASSETS / "video_prompts.txt"

    def tokens_per_sample(self, adapter: WanAdapter, cond) -> int:
        patch = _unwrap(adapter.transformer).config.patch_size
        _, frames, height, width = adapter.latent_shape
        tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2]) + cond["prompt_embeds"].shape[1]
        return 2 * tokens if adapter.uses_cfg else tokens

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=512) -> PlannerModel:
        from diffusers import WanTransformer3DModel

        transformer = build_transformer(WanTransformer3DModel, config, device, dtype)
        frames, h, w = (model_cfg.backbone.resolved(n) for n in ("num_frames", "h", "w"))
        latent = (16, (frames - 1) // 4 + 1, h // 8, w // 8)  # Wan2.1's VAE: 16 channels, 4x time, 8x space
        # classifier-free guidance: [cond; negative] rows in one forward
        rows = 2 if guidance_on(model_cfg.backbone.resolved("guidance_scale")) else 1

        def inputs(batch: int) -> dict:
            n = rows * batch
            with torch.device(device):
                out = dict(hidden_states=torch.randn(n, config["in_channels"], *latent[1:], dtype=dtype),
                           timestep=torch.ones(n), return_dict=False,
                           encoder_hidden_states=torch.randn(n, text_tokens, config["text_dim"], dtype=dtype))
                if config.get("image_dim"):  # image-to-video: the CLIP image tokens (257 for ViT-H/14)
                    out["encoder_hidden_states_image"] = torch.randn(n, 257, config["image_dim"], dtype=dtype)
            return out

        tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
        return PlannerModel(transformer, list(transformer.blocks), inputs, LORA_TARGETS,
                            latent[0] * latent[1] * latent[2] * latent[3],
                            f"{frames}x{h}x{w}: {tokens} video + {text_tokens} text tokens, x{rows} rows (CFG)")
