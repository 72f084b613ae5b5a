"""Save and restore everything with state, atomically.

A checkpoint is a folder `<output_dir>/checkpoints/checkpoint-<step>/`:

    model/               what users load: diffusers `transformer/` (or the toy's files) or the LoRA weights
    ema/                 the EMA weights in the same layout (with --use_ema)
    state/               torch.distributed.checkpoint (DCP) of the trained parameters and the optimizer
                         (sharded with FSDP2, reshardable), plus rank<r>.pt: RNG states and the EMA shard
    trainer_state.json   step, world size, the run's flags, and the state of every object handed over in
                         `states` (LR schedule, algorithm schedules, data position, evaluations, wall clock)

The trainer hands the manager its objects with state as two dicts of objects with `state_dict()` /
`load_state_dict()`: `states` (the same on every rank, in trainer_state.json) and `rank_states` (per rank, in
state/rank<r>.pt, loaded with weights_only=True: RNG, EMA shard); adding state to a run is one more entry.

Everything is written into a hidden temporary folder first; only when every rank has finished does rank 0 rename
it into place and then point `latest` at it (both renames are atomic). A kill at any moment leaves the previous
checkpoint intact and loadable; leftovers of an interrupted save are removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from branchgrpo import distributed

# DCP says so on every single-process save/load; single-process is intended here
warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")

LATEST = "latest"
PREFIX = "checkpoint-"
REPLACED = ".replaced-"  # an older checkpoint of the same step, while a new one takes its name


def rng_state() -> dict:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GlobalRNG:
    """The process-global RNGs (torch, Python, NumPy, CUDA) as a checkpointable object."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, output_dir: str | Path, rank: int, world_size: int, keep_last: int = 3,
                 trainable_only: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        # LoRA: the frozen base weights are not state (they come from --pretrained_model_name_or_path), so the
        # state dict loaded back holds the trainable tensors only and must not be loaded strictly (every one of them
        # is required by dcp.load itself)
        self.options = StateDictOptions(ignore_frozen_params=trainable_only)
        self.load_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    # ------------------------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: dict,
             rank_states: dict, config: dict, export: Callable[[Path], None]) -> Path:
        """Collective: every rank calls it. `states` / `rank_states`: name -> object with state_dict() (None
        entries are saved as None); `config`: the run's flags. `export(folder)` writes the user-facing weights
        (collective as well: gathering a sharded model needs every rank; only rank 0 writes)."""
        final = self.root / f"{PREFIX}{step}"
        tmp = self.root / f".tmp-{PREFIX}{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f".tmp-{PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            for aside in self.root.glob(f"{REPLACED}{PREFIX}*"):  # a kill while replacing: keep the complete one
                original = self.root / aside.name[len(REPLACED):]
                if original.exists():
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    os.replace(aside, original)
            tmp.mkdir()
        distributed.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"),
                 no_dist=not distributed.is_distributed())
        torch.save(_state_dicts(rank_states), tmp / "state" / f"rank{self.rank}.pt")
        export(tmp)
        distributed.barrier()
        if self.rank == 0:
            state = dict(_state_dicts(states), config=config, step=step, world_size=self.world_size)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            _fsync_tree(tmp)
            replaced = self.root / f"{REPLACED}{final.name}"
            if final.exists():  # a checkpoint of this step from an earlier attempt: swap it out, then delete it
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)  # `resolve` falls back to it if a kill lands between the two renames
            os.replace(tmp, final)
            shutil.rmtree(replaced, ignore_errors=True)
            pointer = self.root / f".{LATEST}.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / LATEST)
            self._prune()
        distributed.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        done = sorted(self.root.glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX):]))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------
    def resolve(self, spec: str) -> Path:
        """'latest' or a folder -> the checkpoint folder, validated before anything is loaded."""
        if spec == LATEST:
            pointer = self.root / LATEST
            if not pointer.exists():
                raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint under {self.root}")
            path = self.root / pointer.read_text().strip()
            if not path.exists() and (self.root / f"{REPLACED}{path.name}").is_dir():
                path = self.root / f"{REPLACED}{path.name}"  # killed while replacing a checkpoint of the same step
        else:
            path = Path(spec)
        for needed in ("trainer_state.json", "state/.metadata", f"state/rank{self.rank}.pt"):
            if not (path / needed).exists():
                raise FileNotFoundError(
                    f"--resume_from_checkpoint: {path} is not a complete checkpoint ({needed} is missing)"
                )
        return path

    @staticmethod
    def read_trainer_state(path: Path) -> dict:
        try:
            return json.loads((path / "trainer_state.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--resume_from_checkpoint: {path}/trainer_state.json is corrupt ({err})") from None

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: dict,
             rank_states: dict) -> int:
        """Restore model, optimizer and every object of `states` / `rank_states` in place; returns the step."""
        trainer_state = self.read_trainer_state(path)
        if trainer_state["world_size"] != self.world_size:
            raise ValueError(
                f"--resume_from_checkpoint: {path} was written by {trainer_state['world_size']} processes; resume "
                f"with the same number (now {self.world_size}): the EMA and data position are per rank"
            )
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(path / "state"), no_dist=not distributed.is_distributed())
        except (Exception, CheckpointException) as err:  # DCP's own exception is a BaseException
            raise ValueError(f"--resume_from_checkpoint: cannot load {path}/state ({type(err).__name__}: {err})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.load_options)
        rank_state = torch.load(path / "state" / f"rank{self.rank}.pt", weights_only=True)
        _load_state_dicts(states, trainer_state, path)
        _load_state_dicts(rank_states, rank_state, path)
        return trainer_state["step"]


def _state_dicts(objects: dict) -> dict:
    return {name: None if obj is None else obj.state_dict() for name, obj in objects.items()}


def _load_state_dicts(objects: dict, saved: dict, path: Path) -> None:
    for name, obj in objects.items():
        if obj is None:
            continue
        if saved.get(name) is None:
            raise ValueError(f"--resume_from_checkpoint: {path} has no {name} state, which this run needs "
                             "(was it written with other flags?)")
        obj.load_state_dict(saved[name])
