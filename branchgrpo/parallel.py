"""Parallelism and memory savers, applied by free functions to an already built backbone, in one fixed order
(as torchtitan does): activation checkpointing on blocks -> FSDP2 (one `fully_shard` per block, then the root) or
DDP. Full state dicts for export are gathered here too.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module, blocks: list[nn.Module], fraction: float = 1.0) -> int:
    """Wrap the first `fraction` of `blocks` in non-reentrant checkpoint wrappers (in their parent modules)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing as _apply,
        checkpoint_wrapper,
    )

    chosen = {id(b) for b in blocks[: round(fraction * len(blocks))]}
    if not chosen:
        return 0
    _apply(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in chosen,
    )
    return len(chosen)


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype = torch.float32, cpu_offload: bool = False) -> nn.Module:
    """FSDP2: each block is its own unit (all-gathered just before use, resharded after), then the root.

    `blocks` are looked up again after activation checkpointing, which may have wrapped them."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # diffusers blocks return views of their inputs; FSDP2 warns once per block and call. Harmless here: nothing
    # modifies a block's output in place (the warning's only risk), so keep the logs readable.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # inputs stay as given (cast_forward_inputs=False): sigmas and timesteps must not be rounded to bf16; autocast
    # decides the compute dtype of each op
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    kwargs = {"mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def checkpointed_blocks(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The sharding units after checkpointing: a wrapped block's wrapper, else the block itself."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    wrapped = {id(m._checkpoint_wrapped_module): m for m in model.modules() if isinstance(m, CheckpointWrapper)}
    return [wrapped.get(id(b), b) for b in blocks]


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # no buffer broadcast: the rollout calls the bare module, and nothing here has running buffers
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (FSDP2 shards in place, so it needs no unwrapping)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on the micro-batches of an accumulation window that are not its last."""
    if enabled or not dist.is_initialized():
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict gathered to CPU on rank 0 (other ranks get {}); plain keys, whatever the wrapper."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    prefix = "_checkpoint_wrapped_module."
    return {k.replace(prefix, ""): v for k, v in state.items()}


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (identical on every rank: DDP grads are all-reduced, FSDP2 norms are reduced over
    shards), clipping to `max_norm` when > 0. A non-finite norm is returned as is: the caller skips the step."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach().float().cpu()
