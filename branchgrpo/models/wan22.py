"""Wan2.2 A14B text-to-video as a `FlowAdapter`: two experts of Wan2.1-14B's architecture, one per noise range, as
one trainable module.

Conventions verified against diffusers 0.42 (WanPipeline with `transformer_2` and `boundary_ratio`;
tests/test_wan22.py); everything else is Wan2.1's (models/wan.py: velocity sign, raw timesteps, batched CFG,
latent normalisation, prompt encoding):
- The high-noise expert (`transformer/`) predicts where the timestep t = 1000 sigma is >= the boundary
  (`boundary_ratio` of model_index.json x 1000: 875 for T2V-A14B), the low-noise expert (`transformer_2/`) below it,
  each with its own classifier-free guidance scale (`--guidance_scale` for the high-noise expert, `--guidance_scale_2`
  for the low-noise one: the pipeline's `guidance_scale` / `guidance_scale_2`; the official recipe: 4.0 / 3.0).
- A tree spans both experts: every node of a depth shares one sigma, so each batched rollout call runs one expert;
  a training micro-batch mixing depths runs each expert on its rows. Under FSDP2 every rank must run the same
  experts in the same order (their all-gathers are collectives): the experts a call needs are agreed across ranks
  (one all-reduce of two flags), and a rank with no row for an agreed expert runs it on one stand-in row whose
  output enters with weight 0 (so its backward, and the gradient reduce-scatter, happen on every rank too).
- The trained module is `WanExperts` (`.high`, `.low`): LoRA, FSDP2 (both experts' blocks are units; the root unit
  holds both experts' embeddings and heads), EMA, checkpoints and the KL reference act on it as on one transformer.
  `--train_experts high|low` freezes the other expert (its edges still roll out and are re-scored, but carry no
  gradient: pair it with the algorithm's depth or window flags to train only the expert's depths).
- Exports: `transformer/` (high) and `transformer_2/` (low), and per expert a LoRA file, `pytorch_lora_weights
  .safetensors` (high; `WanPipeline.load_lora_weights`) and `pytorch_lora_weights_transformer_2.safetensors` (low;
  `load_lora_weights(..., weight_name=..., load_into_transformer_2=True)`).
- Schedule: the official recipe samples 40 UniPC steps at shift 12.0; the checkpoint's scheduler shift is read into
  `native_shift` as for Wan2.1 (the trainer warns when --shift differs).

Image-to-video (`wan22_i2v`, Wan2.2-I2V-A14B, boundary 0.9): Wan2.1-I2V's channel conditioning (models/wan_i2v.py:
[x ; first-frame mask ; first-frame latents], 16 + 4 + 16 = 36 input channels, built once per prompt by the
preprocessing) through both experts, without CLIP image tokens (the checkpoint has no image encoder; diffusers'
WanImageToVideoPipeline computes none when `boundary_ratio` is set).

Supported: Wan2.2-T2V-A14B and I2V-A14B in diffusers layout; TI2V-5B is the `wan22_ti2v` backbone (models/wan22_ti2v.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from branchgrpo.core import distributed
from branchgrpo.core.flags import flag
from branchgrpo.models import register_backbone
from branchgrpo.models.diffusers_backbone import (
    CONFIG_FILE,
    _unwrap,
    check_weights_match,
    load_part,
    read_config,
)
from branchgrpo.models.guidance import guidance_on
from branchgrpo.models.support import PlannerModel
from branchgrpo.models.wan_i2v import WanI2VAdapter, WanI2VSpec, build_i2v_encoder
from branchgrpo.models.wan import (
    WAN_LAYOUT,
    WanAdapter,
    WanConfig,
    WanSpec,
    _check_supported,
    _read_json,
    check_video_size,
    check_wan_config,
    check_wan_folder,
    describe_wan,
    read_flow_shift,
)

#: the experts, in the order every call runs them, and the pipeline's folder of each
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}
TRAIN_EXPERTS = {"both": ("high", "low"), "high": ("high",), "low": ("low",)}
WAN22_LAYOUT = WAN_LAYOUT + ("transformer_2/",)
NUM_TRAIN_TIMESTEPS = 1000  # Wan's t = 1000 sigma (models/wan.py)


class WanExperts(nn.Module):
    """The two experts as one module: `forward(expert, **inputs)` runs `high` or `low`. Calls go through this
    module (not the expert) so that FSDP2's root unit gathers its parameters first."""

    def __init__(self, high: nn.Module, low: nn.Module):
        super().__init__()
        self.high, self.low = high, low

    @property
    def config(self):
        """The experts' shared architecture (the loader checks that the two configs are equal)."""
        return self.high.config

    def forward(self, expert: str, **inputs):
        return getattr(self, expert)(**inputs)


class Wan22Adapter(WanAdapter):
    """WanExperts + the Wan2.1 VAE at a fixed video size (module docstring)."""

    name = "wan22"
    two_experts = True
    checkpoint_kind, checkpoint_layout = "Wan2.2-T2V-A14B", WAN22_LAYOUT

    def __init__(self, transformer: WanExperts, vae: nn.Module, num_frames: int, height: int, width: int,
                 guidance_scale: float = 4.0, guidance_scale_2: float = 3.0, boundary_ratio: float = 0.875,
                 shift: float = 12.0, train_experts: str = "both"):
        super().__init__(transformer, vae, num_frames, height, width, guidance_scale, shift)
        self.guidance_scale_2 = float(guidance_scale_2)
        self.boundary_timestep = float(boundary_ratio) * NUM_TRAIN_TIMESTEPS
        self.trained_experts = TRAIN_EXPERTS[train_experts]
        self._freeze_untrained()

    def _freeze_untrained(self) -> None:
        for expert in EXPERT_FOLDERS:
            if expert not in self.trained_experts:
                getattr(_unwrap(self.transformer), expert).requires_grad_(False)

    @property
    def uses_cfg(self) -> bool:
        return guidance_on(self.guidance_scale) or guidance_on(self.guidance_scale_2)

    def diffusers_parts(self) -> dict[str, tuple[str, nn.Module]]:
        experts = _unwrap(self.transformer)
        return {folder: (f"{expert}.", getattr(experts, expert)) for expert, folder in EXPERT_FOLDERS.items()}

    def add_lora(self, rank: int, alpha: float | None = None, target_modules=None, dropout: float = 0.0):
        """LoRA on both experts (a frozen expert's stays at B = 0, so both LoRA files always exist)."""
        config = super().add_lora(rank, alpha, target_modules, dropout)
        self._freeze_untrained()
        return config

    def blocks(self) -> list[nn.Module]:
        """Both experts' WanTransformerBlocks (40 + 40 in A14B), the high-noise expert's first."""
        experts = _unwrap(self.transformer)
        return list(experts.high.blocks) + list(experts.low.blocks)

    def _experts_to_run(self, high_B: torch.Tensor) -> list[bool]:
        """[high, low]: whether each expert runs in this call - where this rank has rows for it, or, under FSDP2,
        where any rank has (the ranks' collectives must match)."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(self.transformer, DistributedDataParallel):
            raise ValueError("--parallel ddp: the Wan2.2 experts run in separate forwards, which DDP does not take; "
                             "use --parallel fsdp")
        needed = torch.stack([high_B.any(), (~high_B).any()]).to(torch.int32)
        if isinstance(self.transformer, FSDPModule):
            distributed.all_reduce_max(needed)
        return [bool(n) for n in needed.tolist()]

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 for latents [B, C, F, h, w] at per-sample sigmas [B], each row from the expert owning its
        timestep with that expert's guidance scale; fp32."""
        inputs = self.transformer_inputs(latents, sigmas, cond)
        negative = self.negative_inputs(cond, inputs) if self.uses_cfg else {}
        high_B = inputs["timestep"] >= self.boundary_timestep
        velocity = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device)
        runs = zip(EXPERT_FOLDERS, (high_B, ~high_B), (self.guidance_scale, self.guidance_scale_2),
                   self._experts_to_run(high_B))
        for expert, rows_B, scale, run in runs:
            if not run:
                continue
            index = rows_B.nonzero().squeeze(1)
            stand_in = index.numel() == 0
            every_row = index.numel() == latents.shape[0]  # a rollout depth: no gather, no scatter
            rows = index.new_zeros(1) if stand_in else index

            def pick(tensors: dict) -> dict:
                return tensors if every_row else {key: value.index_select(0, rows) for key, value in tensors.items()}

            prediction = self._expert_velocity(expert, pick(inputs), pick(negative), scale)
            if stand_in:  # in the graph with weight 0: this rank's backward reaches the expert like the others'
                velocity = velocity + torch.where(torch.zeros((), dtype=torch.bool, device=velocity.device),
                                                  prediction.sum(), 0.0)
            elif every_row:  # added, not assigned: a stand-in term of the other expert stays in the graph
                velocity = velocity + prediction
            else:
                velocity = velocity.index_copy(0, index, prediction)
        return velocity

    def _expert_velocity(self, expert: str, inputs: dict, negative: dict, scale: float) -> torch.Tensor:
        def forward(**rows) -> torch.Tensor:
            return self.transformer(expert, **rows, return_dict=False)[0].float()

        return self.guided(forward, inputs, negative, scale)


def _architecture(config: dict) -> dict:
    """A transformer config without its bookkeeping keys (`_class_name`, `_diffusers_version`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def load_wan22(model_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               vae_dtype: torch.dtype = torch.float32, height: int = 480, width: int = 832, num_frames: int = 81,
               guidance_scale: float = 4.0, guidance_scale_2: float = 3.0, train_experts: str = "both",
               transformer_path: str | Path | None = None,
               adapter_class: type[Wan22Adapter] = Wan22Adapter) -> Wan22Adapter:
    """Both experts (in `dtype`) and the VAE (`vae_dtype`) from a local diffusers-layout Wan2.2 A14B folder;
    `transformer_path`: a folder whose `transformer/` and `transformer_2/` are loaded instead of the base's (a full
    export of a training run). Every check runs before any weight is read."""
    check_video_size(num_frames, height, width)
    parts = ("vae",) if transformer_path is not None else (*EXPERT_FOLDERS.values(), "vae")
    root = check_wan_folder(model_path, parts, adapter_class.checkpoint_layout, adapter_class.checkpoint_kind)
    transformer_root = root if transformer_path is None else Path(transformer_path)
    configs = {folder: read_config(transformer_root / folder, f"Wan2.2 {expert}-noise expert")
               for expert, folder in EXPERT_FOLDERS.items()}
    high, low = (configs[folder] for folder in EXPERT_FOLDERS.values())
    _check_supported(root, high, adapter_class)
    if _architecture(high) != _architecture(low):
        raise ValueError(f"{transformer_root}: transformer/{CONFIG_FILE} and transformer_2/{CONFIG_FILE} differ; the "
                         "two Wan2.2 experts share one architecture")
    check_wan_config(num_frames, height, width, high, read_config(root / "vae", "Wan VAE"),
                     transformer_root / "transformer" / CONFIG_FILE, adapter_class.image_to_video)
    boundary = _read_json(root / "model_index.json").get("boundary_ratio")
    if boundary is None or not 0.0 < float(boundary) < 1.0:
        raise ValueError(f"{root / 'model_index.json'}: boundary_ratio {boundary!r}; a Wan2.2 A14B pipeline switches "
                         "experts at a boundary_ratio in (0, 1) (0.875 for T2V-A14B)")
    shift = read_flow_shift(root)
    from diffusers import AutoencoderKLWan, WanTransformer3DModel  # after the checks: importing takes seconds

    experts = []
    for expert, folder in EXPERT_FOLDERS.items():
        what = f"Wan2.2 {expert}-noise expert"
        check_weights_match(WanTransformer3DModel, transformer_root / folder, configs[folder], what, describe_wan,
                            f"config.json and the weights of {folder}/ must come from the same checkpoint or export")
        experts.append(load_part(WanTransformer3DModel, transformer_root, folder, what, torch_dtype=dtype))
    vae = load_part(AutoencoderKLWan, root, "vae", "Wan VAE", torch_dtype=vae_dtype)
    adapter = adapter_class(WanExperts(*experts), vae, num_frames, height, width, guidance_scale, guidance_scale_2,
                            float(boundary), shift, train_experts)
    return adapter.to(device)


@dataclass
class Wan22Config(WanConfig):
    """Wan2.2 A14B's flags: Wan's, plus the low-noise expert's guidance scale and which experts train."""

    guidance_scale_2: float | None = flag(None, "classifier-free guidance scale of the low-noise expert of a "
                                          "two-expert Wan2.2 model (--guidance_scale is the high-noise expert's)")
    train_experts: str = flag("both", "which experts of a two-expert Wan2.2 model train: both, high (t >= the "
                              "boundary) or low; the other is frozen", choices=tuple(TRAIN_EXPERTS))

    # the official A14B recipe: 4.0 / 3.0 (Wan2.2's t2v_A14B config); 480p, 33 frames as for Wan2.1
    DEFAULTS = {**WanConfig.DEFAULTS, "guidance_scale": 4.0, "guidance_scale_2": 3.0}

    def validate(self) -> None:
        super().validate()
        if self.train_experts not in TRAIN_EXPERTS:
            raise ValueError(f"--train_experts: '{self.train_experts}' is not one of {', '.join(TRAIN_EXPERTS)}")


@dataclass
class Wan22I2VConfig(Wan22Config):
    """Wan2.2 I2V-A14B's flags (Wan2.2 A14B's): the official recipe's guidance 3.5 for both experts."""

    DEFAULTS = {**Wan22Config.DEFAULTS, "guidance_scale": 3.5, "guidance_scale_2": 3.5}


@register_backbone
class Wan22Spec(WanSpec):
    """Wan2.2 T2V-A14B (two experts), diffusers layout; tiny stand-in: `python -m branchgrpo.make_tiny wan22 DIR`."""

    name = "wan22"
    Config = Wan22Config
    adapter_class = Wan22Adapter
    tiny = "branchgrpo.testing.wan22_tiny:make_tiny_wan22"
    planner_configs = ("wan2.2-t2v-a14b",)

    def load(self, model_cfg, device, dtype=torch.float32, transformer_path=None) -> Wan22Adapter:
        size = model_cfg.backbone.resolved
        return load_wan22(model_cfg.pretrained_model_name_or_path, device, dtype=dtype, height=size("h"),
                          width=size("w"), num_frames=size("num_frames"), guidance_scale=size("guidance_scale"),
                          guidance_scale_2=size("guidance_scale_2"), train_experts=model_cfg.backbone.train_experts,
                          transformer_path=transformer_path, adapter_class=self.adapter_class)

    def planner_model(self, model_cfg, config, dtype, device="meta", text_tokens=512) -> PlannerModel:
        """Both experts (all their parameters are held and sharded; those of an expert `--train_experts` leaves
        out are frozen); one training forward runs one of them (traced: a trained one)."""
        planned = {expert: super(Wan22Spec, self).planner_model(model_cfg, config, dtype, device, text_tokens)
                   for expert in EXPERT_FOLDERS}
        experts = WanExperts(planned["high"].transformer, planned["low"].transformer)
        trained = TRAIN_EXPERTS[model_cfg.backbone.train_experts]
        for expert in EXPERT_FOLDERS:
            getattr(experts, expert).requires_grad_(expert in trained)
        # the traced expert's blocks first: the trace records the first block called and replays it for the others
        order = list(trained) + [e for e in EXPERT_FOLDERS if e not in trained]
        first = planned[order[0]]
        return first._replace(transformer=experts, blocks=[b for e in order for b in planned[e].blocks],
                              inputs=lambda batch: {"expert": order[0], **first.inputs(batch)},
                              description=f"{first.description}; one of the two experts per forward")


# ----- image-to-video: Wan2.2 I2V-A14B --------------------------------------------------------------------------------


class Wan22I2VAdapter(Wan22Adapter, WanI2VAdapter):
    """The two experts of Wan2.2 I2V-A14B: Wan2.1-I2V's channel conditioning ([x ; mask ; first-frame latents],
    16 + 4 + 16 = 36 channels, `WanI2VAdapter.model_input`) without CLIP image tokens, which this checkpoint lacks."""

    name = "wan22_i2v"
    pipeline_class_name = "WanImageToVideoPipeline"
    embedding_keys = WanAdapter.embedding_keys + ("image_latents",)
    image_to_video, image_tokens = True, False
    checkpoint_kind, checkpoint_layout = "Wan2.2-I2V-A14B", WAN22_LAYOUT

    def image_inputs(self, cond: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
        return {}  # no CLIP image tokens: the condition is all in the channels


@register_backbone
class Wan22I2VSpec(Wan22Spec):
    """Wan2.2 I2V-A14B (two experts, boundary 0.9), diffusers layout; prompts are JSONL lines with a first frame;
    tiny stand-in: `python -m branchgrpo.make_tiny wan22_i2v DIR`."""

    name = "wan22_i2v"
    Config = Wan22I2VConfig
    adapter_class = Wan22I2VAdapter
    eval_rewards = WanI2VSpec.eval_rewards
    encoder_flags = WanI2VSpec.encoder_flags
    prompt_format = "jsonl"
    tiny = "branchgrpo.testing.wan22_tiny:make_tiny_wan22_i2v"
    tiny_run = WanI2VSpec.tiny_run
    planner_configs = ("wan2.2-i2v-a14b",)

    def prompt_encoder(self, model_path, device, settings):
        return build_i2v_encoder(model_path, device, settings, **self.encoder_sizes(settings), image_tokens=False,
                                 layout=WAN22_LAYOUT, kind=Wan22I2VAdapter.checkpoint_kind)

    def default_prompts(self) -> Path:
        return WanI2VSpec.default_prompts(self)
