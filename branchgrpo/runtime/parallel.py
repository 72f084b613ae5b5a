"""Parallelism and memory savers, applied by free functions to an already built backbone, in one fixed order
(as torchtitan does): LoRA -> frozen reference copy (KL) -> activation checkpointing on blocks -> torch.compile of
each block (`--compile`) -> FSDP2 (one `fully_shard` per block, then the root) or DDP (`prepare_model`). Full state
dicts for export are gathered here too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from branchgrpo.core.distributed import DistInfo
from branchgrpo.models.base import FlowAdapter
from branchgrpo.models.lora import lora_disabled

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: nn.Module  # what the optimizer and backward see (DDP-wrapped, FSDP2-sharded or plain)
    bare: nn.Module  # the module the rollout calls (no DDP wrapper: no collectives during sampling)
    mode: str  # none | ddp | fsdp
    autocast: Callable[[], contextlib.AbstractContextManager]
    reference: Callable[[], contextlib.AbstractContextManager] | None  # adapter.velocity = reference policy inside
    compiled: bool = False  # --compile: the blocks are compiled

    def log_compiles(self) -> None:
        """Log how many graphs torch.compile has built when that number changed (a new batch size class, or a
        recompile): a count that keeps growing over iterations means a recompile per step."""
        if self.compiled:
            from branchgrpo.runtime.compile_stats import log_new_graphs

            log_new_graphs(log)


@contextlib.contextmanager
def using_module(adapter: FlowAdapter, module: nn.Module):
    """Temporarily point the adapter at another module (the bare one for rollouts, a frozen copy for KL)."""
    previous = adapter.transformer
    adapter.transformer = module
    try:
        yield
    finally:
        adapter.transformer = previous


def prepare_model(adapter: FlowAdapter, model_cfg, parallel_cfg, default_parallel: str, with_reference: bool,
                  info: DistInfo) -> Prepared:
    """LoRA (`model_cfg`) -> frozen reference copy (`with_reference`: the KL term; LoRA needs no copy, the
    reference is the adapters switched off) -> activation checkpointing -> FSDP2 | DDP (`parallel_cfg`; `auto`
    means the backbone's `default_parallel` with more than one process)."""
    if model_cfg.use_lora:
        adapter.add_lora(model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_targets)
    module = adapter.transformer
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("nothing to train: every parameter of the backbone is frozen")

    reference = None
    frozen_copy = None
    if with_reference:
        if model_cfg.use_lora:
            reference = lambda: lora_disabled(module)  # noqa: E731 - the base model is the adapters switched off
        else:
            frozen_copy = copy.deepcopy(module).requires_grad_(False).eval()

    mode = parallel_cfg.parallel
    if mode == "auto":
        mode = "none" if info.world_size == 1 else default_parallel
    if mode != "none" and info.world_size == 1:
        log.info("--parallel %s with a single process: running without a wrapper", mode)
        mode = "none"
    blocks = adapter.blocks()
    for flag, wanted in (("gradient_checkpointing", parallel_cfg.gradient_checkpointing),
                         ("compile", parallel_cfg.compile)):
        if wanted and not blocks:
            raise ValueError(f"--{flag}: the {adapter.name} backbone declares no blocks")
    units = checkpoint_and_compile(module, blocks, parallel_cfg.selective_checkpointing
                                   if parallel_cfg.gradient_checkpointing else None, parallel_cfg.compile)
    if parallel_cfg.compile and frozen_copy is not None:  # the KL reference runs the same blocks: compiled alike
        apply_compile([u for u in frozen_copy.modules() if type(u) in {type(b) for b in blocks}])
    precision = parallel_cfg.compute_dtype(info.device)
    model = module
    if mode == "fsdp":
        apply_fsdp(module, units, param_dtype=precision,
                   reduce_dtype=parallel_cfg.gradient_reduce_dtype, cpu_offload=parallel_cfg.use_cpu_offload)
        if frozen_copy is not None:
            apply_fsdp(frozen_copy, [u for u in frozen_copy.modules() if type(u) in {type(b) for b in blocks}],
                       param_dtype=precision)
    elif mode == "ddp":
        model = apply_ddp(module, info.device)
        adapter.transformer = model
    if frozen_copy is not None:
        reference = lambda: using_module(adapter, frozen_copy)  # noqa: E731

    if precision is not None:
        autocast = lambda: torch.autocast(info.device.type, dtype=precision)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    return Prepared(model=model, bare=module, mode=mode, autocast=autocast, reference=reference,
                    compiled=parallel_cfg.compile)


def apply_activation_checkpointing(model: nn.Module, blocks: list[nn.Module], fraction: float = 1.0) -> int:
    """Wrap the first `fraction` of `blocks` in non-reentrant checkpoint wrappers (in their parent modules)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as _apply,
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


def checkpoint_and_compile(model: nn.Module, blocks: list[nn.Module], checkpoint_fraction: float | None,
                           compile: bool) -> list[nn.Module]:
    """The fixed order before sharding: activation checkpointing of the first `checkpoint_fraction` of `blocks`
    (None: none), then torch.compile of each unit (so a wrapper's recomputation is compiled with its block). Returns
    the units FSDP2 shards next: a checkpointed block's wrapper, else the block."""
    if checkpoint_fraction is not None:
        n = apply_activation_checkpointing(model, blocks, checkpoint_fraction)
        log.info("activation checkpointing on %d of %d blocks", n, len(blocks))
    units = checkpointed_blocks(model, blocks)
    if compile:
        apply_compile(units)
        log.info("torch.compile on %d blocks (dynamic batch dimension)", len(units))
    return units


def apply_compile(units: list[nn.Module], dynamic: bool | None = True) -> int:
    """torch.compile each unit in place (`nn.Module.compile`: the module, its parameters and its state-dict keys stay
    as they are; only its call goes through the compiled code). The units are the blocks after activation
    checkpointing (so a wrapper's recomputation is compiled with its block) and before FSDP2 (torchtitan's order).

    dynamic=True marks the batch dimension symbolic from the first call, so a tree's depths (1, 2, 4, ... nodes per
    prompt) share one graph instead of compiling one per batch size; identical blocks share their graphs (dynamo
    inlines module calls and passes the parameters as inputs). See branchgrpo/runtime/compile_stats.py for the counts."""
    for unit in units:
        unit.compile(dynamic=dynamic)
    return len(units)


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype = torch.float32, cpu_offload: bool = False) -> nn.Module:
    """FSDP2: each block is its own unit (all-gathered just before use, resharded after), then the root.

    `blocks` are looked up again after activation checkpointing, which may have wrapped them."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )

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
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
    )

    wrapped = {id(m._checkpoint_wrapped_module): m for m in model.modules() if isinstance(m, CheckpointWrapper)}
    return [wrapped.get(id(b), b) for b in blocks]


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # no buffer broadcast: the rollout calls the bare module, and nothing here has running buffers
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


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
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

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


def configure_torch(parallel_cfg, device: torch.device) -> None:
    """Threads, determinism and TF32 as the parallel flags ask, before any model is built."""
    if parallel_cfg.num_threads > 0:
        torch.set_num_threads(parallel_cfg.num_threads)
    if parallel_cfg.deterministic_on(device):
        # e.g. the backward of an index gather accumulates in thread order on CPU unless asked not to
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = parallel_cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = parallel_cfg.allow_tf32
