"""The adapter contract: everything the rollout and the trainer know about a backbone.

A backbone (the toy, FLUX, Wan) is wrapped in a `FlowAdapter`. Rollout, advantages, losses and the trainer talk
only to this interface; timestep scaling, latent packing, guidance vs classifier-free guidance, video dimensions and
text-embedding layouts stay inside the adapter.

Conventions shared by every adapter:
- Latents are stored and handed over in fp32, shape `[B, *latent_shape]` (FLUX: packed tokens `[B, L, 64]`, the toy:
  `[B, 1, H, W]`, Wan: `[B, C, F, H, W]`).
- `sigmas_B` is a float32 tensor `[B]`: one noise level per sample (sigma = 1 is noise, 0 is data), so one forward can
  mix nodes of different steps (training micro-batches do).
- The model predicts the flow-matching velocity v = eps - x0 (x_sigma = (1 - sigma) x0 + sigma eps). Adapters whose
  backbone predicts something else convert it here.
- `cond` is a dict of tensors whose leading dim equals B (already gathered per sample by the caller), with the keys
  of `embedding_keys` as written by the preprocessing step (see `branchgrpo.data.embeddings`).
- `velocity` returns fp32. Autocast (bf16 on GPU) is set by the caller around the call, not inside the adapter.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Sequence

import torch
from torch import nn


class FlowAdapter(abc.ABC):
    """A flow-matching backbone as seen by branchgrpo."""

    #: short name used in logs and checkpoints ("toy", "flux", "wan")
    name: str = "base"
    #: per-sample latent shape; initial noise is drawn with this shape in fp32
    latent_shape: tuple[int, ...] = ()
    #: the keys of the prompt-embedding dict this adapter consumes (the preprocess step writes them)
    embedding_keys: tuple[str, ...] = ()
    #: per-prompt embedding keys `decode` also reads, as `decode(latents, cond)` with one row per latent: a part of the
    #: media that is given, not sampled, and so not in the latents (Wan2.2 TI2V image-to-video's first frame); ()
    #: for most backbones, whose `decode(latents)` reads the latents alone (`decode_media` calls either)
    decode_keys: tuple[str, ...] = ()
    #: module names that LoRA targets by default
    default_lora_targets: tuple[str, ...] = ()
    #: the static time shift of the checkpoint's own scheduler, when it ships one (None: no opinion). Training uses
    #: --shift; the trainer warns when the two differ.
    native_shift: float | None = None
    #: frames per second of the clips a video backbone generates (how rollout/eval samples are written)
    video_fps: int = 16
    #: the checkpoint scheduler's `shift_terminal` (diffusers): with `--time_shift dynamic` the schedule is stretched
    #: so that its last nonzero sigma is this value (`sde.make_sigmas`); None: not stretched
    shift_terminal: float | None = None

    #: the trained network. Parallelism is applied to it in place (FSDP2) or by replacing the attribute (DDP).
    transformer: nn.Module

    @abc.abstractmethod
    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity v(x, sigma | prompt) in fp32, same shape as `latents`; `sigmas` is `[B]` (per sample)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> media in [0, 1], float32: images `[B, C, H, W]` or videos `[B, C, F, H, W]`."""

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks of `transformer`: one FSDP2 unit and one activation-checkpoint unit each."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def mu(self) -> float | None:
        """The resolution-dependent schedule shift (`--time_shift dynamic`), for specs with `dynamic_shift`."""
        return None

    def to(self, device: torch.device | str) -> "FlowAdapter":
        """Move the modules the adapter samples with (its transformer and, where it has one, its VAE) to `device`."""
        self.transformer.to(device)
        if getattr(self, "vae", None) is not None:
            self.vae.to(device)
        return self

    def export(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trained weights where users can load them (diffusers layout for FLUX/Wan).

        `state_dict` is a full (gathered), plain state dict of `transformer` (LoRA merged); None: from the module.
        """
        raise NotImplementedError(f"{type(self).__name__} does not export weights")

    def add_lora(self, rank: int, alpha: float | None = None, target_modules=None):
        """Inject LoRA layers into `transformer` (peft; B = 0 so nothing changes yet) and freeze the rest.
        Returns the peft LoraConfig. Backbones with a diffusers LoRA format override this and `export_lora`."""
        from branchgrpo.models.lora import inject_lora

        self.lora_config = inject_lora(self.transformer, rank, alpha if alpha is not None else rank,
                                       list(target_modules or self.default_lora_targets))
        return self.lora_config

    def export_lora(self, out_dir: str, lora_state_dict: dict[str, torch.Tensor] | None = None):
        """Write the adapter weights alone (default: peft's adapter_model.safetensors + adapter_config.json).
        `lora_state_dict`: a full state dict of the LoRA'd transformer (None: from the module)."""
        from branchgrpo.models.lora import adapter_weights, save_adapter

        state = lora_state_dict if lora_state_dict is not None else self.transformer.state_dict()
        return save_adapter(out_dir, adapter_weights(state), self.lora_config)


def velocity_fn(adapter: "FlowAdapter", embeddings: dict[str, torch.Tensor], autocast=contextlib.nullcontext,
                prompt_of: torch.Tensor | None = None):
    """The rollout's velocity function (latents [B], sigmas [B], prompt index [B]) -> fp32 velocity, under
    `autocast`; the prompt index selects rows of `embeddings` (through `prompt_of` when rollout prompts are
    samples of fewer embedded prompts, as in evaluation)."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        rows = prompt if prompt_of is None else prompt_of[prompt]
        with autocast():
            return adapter.velocity(x, sigma, gather_cond(embeddings, rows)).float()

    return velocity


def decode_media(adapter: "FlowAdapter", latents: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
    """`adapter.decode` of latents [N, ...] whose per-sample conditioning rows are `conditions` ({key: [N, ...]}, as
    `decode_and_score` hands a chunk's): the keys of `decode_keys` go to the decoders that read some."""
    if not adapter.decode_keys:
        return adapter.decode(latents)
    missing = [key for key in adapter.decode_keys if key not in conditions]
    if missing:
        raise KeyError(f"the '{adapter.name}' backbone decodes with {missing} of the prompt embeddings, which the "
                       "caller did not pass")
    return adapter.decode(latents, {key: conditions[key] for key in adapter.decode_keys})


def gather_cond(embeddings: dict[str, torch.Tensor], prompt_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample conditioning: row `prompt_index[b]` of every per-prompt embedding tensor."""
    return {key: value.index_select(0, prompt_index.to(value.device)) for key, value in embeddings.items()}


def check_embedding_keys(adapter: FlowAdapter, keys: Sequence[str], source: str) -> None:
    """Fail early, naming the file, when the embeddings lack a key the backbone needs."""
    missing = [k for k in adapter.embedding_keys if k not in keys]
    if missing:
        raise ValueError(
            f"{source}: prompt embeddings lack {missing} needed by the '{adapter.name}' backbone "
            f"(it has {sorted(keys)}); re-run the {adapter.name} preprocess script"
        )
