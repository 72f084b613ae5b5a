"""Save and restore everything with state, atomically.

A checkpoint is a folder `<output_dir>/checkpoints/checkpoint-<step>/`:

    model/               what users load: diffusers `transformer/` (or the toy's files) or the LoRA weights
    ema/                 the EMA weights in the same layout (with --use_ema)
    state/               torch.distributed.checkpoint (DCP) of the trained parameters and the optimizer
                         (sharded with FSDP2, reshardable), plus rank<r>.pt: RNG states and the EMA shard
    trainer_state.json   step, world size, the run's flags, and the state of every object handed over in
                         `states` (LR schedule, algorithm schedules, data position, evaluations, wall clock,
                         the count of iterations with non-finite rewards)
    complete.json        written last: every file of the checkpoint with its size; resuming checks it

The trainer hands the manager its objects with state as two dicts of objects with `state_dict()` /
`load_state_dict()`: `states` (the same on every rank, in trainer_state.json) and `rank_states` (per rank, in
state/rank<r>.pt, loaded with weights_only=True: RNG, EMA shard); adding state to a run is one more entry (with
`STATE_OPTIONAL = True` on its class, checkpoints written before it existed still resume, leaving it as built).

Everything is written into a hidden temporary folder first; only when every rank has finished does rank 0 rename
it into place and then point `latest` at it (both renames are atomic). A write that fails (a full disk) removes the
temporary folder and is one line naming the folder, its free space and about what a checkpoint needs
(`EnvironmentFailure`, exit code 4). Old checkpoints are deleted the same way round: renamed to a hidden trash name
first, then removed, so that no folder named like a checkpoint is ever half written or half deleted. A kill at any
moment leaves the previous checkpoint intact and loadable; leftovers of an interrupted save or deletion are removed
by the next save.

Resuming verifies a checkpoint before loading it (`resolve`): every file of complete.json present with its size,
every exported safetensors file as long as its own header says, and every file the DCP metadata points into long
enough. Checkpoints written before complete.json existed ("legacy") are accepted when trainer_state.json (written
last by that code), the DCP metadata, this rank's state file and the exported weights are present. Anything
unreadable is refused with one line naming the file.

A checkpoint is untrusted input (it may come from someone else): nothing in it runs code. The JSON files are JSON;
rank<r>.pt is read with weights_only=True; DCP's `.metadata` - a pickle - is read by an unpickler that knows only
the checkpoint metadata types (`_MetadataUnpickler`), and the non-tensor values of the DCP data files with
weights_only=True (`_SafeLoadPlanner`; DCP itself would unpickle both without restriction). Every path read from a
checkpoint (the `latest` pointer, the names in complete.json, the data files of the DCP metadata) must stay inside
its folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from branchgrpo.core import distributed
from branchgrpo.runtime.entry import EnvironmentFailure
from branchgrpo.core.files import check_safetensors
from branchgrpo.runtime.storage import disk_errno, fsync_tree, size_text, tensor_bytes

# DCP says so on every single-process save/load; single-process is intended here
warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")

LATEST = "latest"
PREFIX = "checkpoint-"
REPLACED = ".replaced-"  # an older checkpoint of the same step, while a new one takes its name
TRASH = ".trash-"  # a checkpoint being deleted
COMPLETE = "complete.json"  # the completeness marker, written last
CHECKPOINT_NAME = re.compile(rf"^{PREFIX}[0-9]+$")  # what `latest` may point at


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


class CheckpointManager:
    def __init__(self, output_dir: str | Path, rank: int, world_size: int, keep_last: int = 3,
                 trainable_only: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.saved_step = 0  # the step of the last checkpoint this run saved or resumed from
        self._estimated_bytes = 0  # of a checkpoint of this run, from its state (set when one is written)
        # LoRA: the frozen base weights are not state (they come from --pretrained_model_name_or_path), so the
        # state dict loaded back holds the trainable tensors only and must not be loaded strictly (every one of them
        # is required by dcp.load itself)
        self.options = StateDictOptions(ignore_frozen_params=trainable_only)
        self.load_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    # ------------------------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: dict,
             rank_states: dict, config: dict, export: Callable[[Path], None], prune: bool = True) -> Path:
        """Collective: every rank calls it. `states` / `rank_states`: name -> object with state_dict() (None
        entries are saved as None); `config`: the run's flags. `export(folder)` writes the user-facing weights
        (collective as well: gathering a sharded model needs every rank; only rank 0 writes). `prune` False: keep
        every older checkpoint (a run stopping because it failed keeps the ones from before the failure)."""
        final = self.root / f"{PREFIX}{step}"
        tmp = self.root / f".tmp-{PREFIX}{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in [*self.root.glob(f".tmp-{PREFIX}*"), *self.root.glob(f"{TRASH}*")]:
                shutil.rmtree(stale, ignore_errors=True)
            for aside in self.root.glob(f"{REPLACED}{PREFIX}*"):  # a kill while replacing: keep the complete one
                original = self.root / aside.name[len(REPLACED):]
                if original.exists():
                    _discard(aside)
                else:
                    os.replace(aside, original)
            tmp.mkdir()
        distributed.barrier()
        try:
            self._write(tmp, step, model, optimizer, states, rank_states, config, export)
        except (Exception, CheckpointException) as err:  # DCP's own exception is a BaseException
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint must not keep the disk full
            failure = self._disk_failure(err, final)
            if failure is None:
                raise
            raise failure from err
        if self.rank == 0:
            replaced = self.root / f"{REPLACED}{final.name}"
            if final.exists():  # a checkpoint of this step from an earlier attempt: swap it out, then delete it
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)  # `resolve` falls back to it if a kill lands between the two renames
            os.replace(tmp, final)
            if replaced.exists():
                _discard(replaced)
            pointer = self.root / f".{LATEST}.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / LATEST)
            if prune:
                self._prune()
        distributed.barrier()
        self.saved_step = step
        return final

    def _write(self, tmp: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: dict,
               rank_states: dict, config: dict, export: Callable[[Path], None]) -> None:
        """Every file of the checkpoint into `tmp`, complete.json last (see `save`)."""
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        # what the checkpoint holds at least: the state in DCP plus the exported weights, from every rank
        self._estimated_bytes = self.world_size * (2 * tensor_bytes(model_sd) + tensor_bytes(optim_sd))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"),
                 no_dist=not distributed.is_distributed())
        torch.save(_state_dicts(rank_states), tmp / "state" / f"rank{self.rank}.pt")
        export(tmp)
        distributed.barrier()
        if self.rank == 0:
            state = dict(_state_dicts(states), config=config, step=step, world_size=self.world_size)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            fsync_tree(tmp)
            _write_marker(tmp, step)

    def _disk_failure(self, err: BaseException, final: Path) -> EnvironmentFailure | None:
        """A failed write as one line - what the file system said, the folder, its free space and about how much a
        checkpoint of this run takes - when the file system is the cause: an OSError of the disk somewhere in the
        chain (writers wrap it: DCP in CheckpointException, safetensors in its own error), or less free space than
        the checkpoint needs (torch.save's error on a full disk says neither). None: not the disk (a bug)."""
        code = disk_errno(err)
        free = shutil.disk_usage(self.root).free
        done = self._listed_bytes()
        needed = done if done is not None else self._estimated_bytes
        if code is None and free >= needed:
            return None
        code = code or errno.ENOSPC
        basis = "the size of the last checkpoint" if done is not None else "model and optimizer state"
        return EnvironmentFailure(code, (
            f"cannot write checkpoint {final}: {os.strerror(code)}; {self.root} has {size_text(free)} free, a checkpoint "
            f"of this run needs about {size_text(needed)} ({basis}); the partial write was removed. Free space there (or "
            "lower --checkpoints_total_limit) and run the same command with --resume_from_checkpoint latest"))

    def _listed_bytes(self) -> int | None:
        """The size of the newest checkpoint as its complete.json lists it (None: no complete checkpoint)."""
        done = [p for p in self.root.glob(f"{PREFIX}*") if CHECKPOINT_NAME.match(p.name) and (p / COMPLETE).is_file()]
        for path in sorted(done, key=lambda p: int(p.name[len(PREFIX):]), reverse=True):
            try:
                return sum(int(size) for size in json.loads((path / COMPLETE).read_text())["files"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return None

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        done = sorted(self.root.glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX):]))
        for old in done[: -self.keep_last]:
            _discard(old)

    # ------------------------------------------------------------------------------------------------------
    def resolve(self, spec: str) -> Path | None:
        """'latest' or a folder -> the checkpoint folder, validated before anything is loaded. 'latest' on a run
        without any checkpoint yet (a requeued job killed before its first save) -> None."""
        if spec == LATEST:
            path = self.latest()
            if path is None:
                return None
        else:
            path = Path(spec)
        self.verify(path)
        return path

    def latest(self) -> Path | None:
        """The checkpoint `latest` points at (the newest complete one if the pointer is missing), or None. The
        pointer must name a checkpoint of this folder (`checkpoint-<step>`), nothing else."""
        pointer = self.root / LATEST
        if not pointer.exists():
            done = [p for p in self.root.glob(f"{PREFIX}*") if CHECKPOINT_NAME.match(p.name) and (p / COMPLETE).is_file()]
            return max(done, key=lambda p: int(p.name[len(PREFIX):]), default=None)
        name = _read_text(pointer, "--resume_from_checkpoint latest").strip()
        if not CHECKPOINT_NAME.match(name):
            raise ValueError(f"--resume_from_checkpoint latest: {pointer} names {name[:80]!r}, not a checkpoint of "
                             f"{self.root} (expected {PREFIX}<step>)")
        path = self.root / name
        if not path.exists() and (self.root / f"{REPLACED}{name}").is_dir():
            path = self.root / f"{REPLACED}{name}"  # killed while replacing a checkpoint of the same step
        return path

    def verify(self, path: Path) -> None:
        """Refuse an incomplete or damaged checkpoint with one line naming the file (FileNotFoundError for a missing
        file, ValueError for a damaged one): the files of its complete.json with their sizes, or for a legacy
        checkpoint (no complete.json) the files that code wrote last; then every exported safetensors file as long as
        its header says, and every DCP data file as long as the metadata says."""
        marker = path / COMPLETE
        if marker.is_file():
            text = _read_text(marker, "--resume_from_checkpoint")
            try:
                files = {str(name): int(size) for name, size in json.loads(text)["files"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"--resume_from_checkpoint: {marker} is corrupt ({type(err).__name__})") from None
            try:
                for name in files:
                    _confined(path, name, marker)
            except ValueError as err:
                raise ValueError(f"--resume_from_checkpoint: {err}") from None
        else:  # legacy: trainer_state.json was written last, but a kill while deleting could leave it behind
            files = {name: None for name in ("trainer_state.json", "state/.metadata", f"state/rank{self.rank}.pt")}
            if path.is_dir() and not any((path / "model").rglob("*.safetensors")):
                files["model/*.safetensors"] = None
        for name, size in files.items():
            file = path / name
            if not file.exists():
                raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a complete checkpoint ({name} is "
                                        f"missing{'' if marker.is_file() else f'; it has no {COMPLETE} either'})")
            if size is not None and file.stat().st_size != size:
                raise ValueError(f"--resume_from_checkpoint: {file} is truncated or damaged "
                                 f"({file.stat().st_size} bytes; {size} were written)")
        for weights in sorted(path.rglob("*.safetensors")):  # exported weights, against their own headers
            check_safetensors(weights, "--resume_from_checkpoint")
        _check_dcp_files(path / "state")

    @staticmethod
    def read_trainer_state(path: Path) -> dict:
        file = path / "trainer_state.json"
        try:
            state = json.loads(_read_text(file, "--resume_from_checkpoint"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--resume_from_checkpoint: {file} is corrupt ({err})") from None
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict)
                and isinstance(state.get("step"), int) and isinstance(state.get("world_size"), int)):
            raise ValueError(f"--resume_from_checkpoint: {file} is corrupt (no step, world_size and config)")
        return state

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: dict,
             rank_states: dict) -> int:
        """Restore model, optimizer and every object of `states` / `rank_states` in place; returns the step."""
        trainer_state = self.read_trainer_state(path)
        if trainer_state["world_size"] != self.world_size:
            raise ValueError(
                f"--resume_from_checkpoint: {path} was written by {trainer_state['world_size']} processes; resume "
                f"with the same number (now {self.world_size}): the EMA and data position are per rank"
            )
        rank_file = path / "state" / f"rank{self.rank}.pt"
        try:  # read before anything is changed in place
            rank_state = torch.load(rank_file, weights_only=True)
        except Exception as err:  # garbage, truncated, or pickled objects that weights_only refuses
            detail = _one_line(err)
            if isinstance(err, pickle.UnpicklingError):  # torch's own text is a paragraph about weights_only
                detail = ("UnpicklingError: damaged, or it holds Python objects other than tensors and plain values, "
                          "which are not loaded")
            raise ValueError(f"--resume_from_checkpoint: cannot read {rank_file} ({detail})") from None
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, storage_reader=_SafeReader(str(path / "state")), planner=_SafeLoadPlanner(),
                     no_dist=not distributed.is_distributed())
        except (Exception, CheckpointException) as err:  # DCP's own exception is a BaseException
            raise ValueError(f"--resume_from_checkpoint: cannot load {path}/state ({_one_line(err)})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.load_options)
        _load_state_dicts(states, trainer_state, path)
        _load_state_dicts(rank_states, rank_state, path)
        self.saved_step = trainer_state["step"]
        return trainer_state["step"]


def _state_dicts(objects: dict) -> dict:
    return {name: None if obj is None else obj.state_dict() for name, obj in objects.items()}


def _load_state_dicts(objects: dict, saved: dict, path: Path) -> None:
    for name, obj in objects.items():
        if obj is None:
            continue
        if saved.get(name) is None and getattr(obj, "STATE_OPTIONAL", False):
            continue  # a checkpoint written before this object had state: it keeps its initial state
        if saved.get(name) is None:
            raise ValueError(f"--resume_from_checkpoint: {path} has no {name} state, which this run needs "
                             "(was it written with other flags?)")
        obj.load_state_dict(saved[name])


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill never leaves a half-deleted folder under a checkpoint's name: rename
    it to a hidden trash name (atomic), then remove it; the next save sweeps trash a kill left behind."""
    trash = folder.with_name(f"{TRASH}{folder.name.lstrip('.')}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_marker(folder: Path, step: int) -> None:
    """The completeness marker, after every other file is on disk: their relative paths and sizes."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    tmp = folder / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, folder / COMPLETE)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_dcp_files(state_dir: Path) -> None:
    """The DCP metadata is readable and every data file it points into is long enough (a truncated .distcp would
    otherwise surface as an EOFError deep inside dcp.load)."""
    file = state_dir / ".metadata"
    try:
        metadata = read_dcp_metadata(file)
    except Exception as err:
        raise ValueError(f"--resume_from_checkpoint: cannot read {file} ({_one_line(err)})") from None
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = state_dir / name
        if not file.is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint: {file} is missing")
        if file.stat().st_size < size:
            raise ValueError(f"--resume_from_checkpoint: {file} is truncated ({file.stat().st_size} bytes, the "
                             f"metadata needs {size})")


# ---------------------------------------------------------------------------------------------------------------
# No code from a checkpoint: DCP's metadata through an allow-list, its non-tensor values with weights_only
# ---------------------------------------------------------------------------------------------------------------
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by name (torch.strided)
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: the metadata dataclasses, sizes, dtypes, layouts and paths; anything else - a function
    that a crafted pickle would call - is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                          torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which checkpoint metadata never holds; not "
                                     "loaded (a damaged or crafted file)")


def read_dcp_metadata(file: Path):
    """DCP's `.metadata` through `_MetadataUnpickler`, with every data file it names inside its folder."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(file, "rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        try:
            _confined(file.parent, info.relative_path, file)
        except ValueError:
            raise pickle.UnpicklingError(f"it names the data file {str(info.relative_path)[:80]!r}, outside its "
                                         "folder") from None
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by `read_dcp_metadata` (FileSystemReader uses plain pickle.load)."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        metadata = read_dcp_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but the non-tensor values (optimizer hyper-parameters) are unpickled with
    weights_only=True: they are plain numbers, strings and containers. The default planner reads them with
    weights_only=False; it is handed the already-checked value, re-serialised."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            checked = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:  # torch's own text is a paragraph suggesting weights_only=False
            raise pickle.UnpicklingError(f"the value of {read_item.dest_index.fqn} holds Python objects other than "
                                         "numbers, strings and containers (damaged or crafted); not loaded") from None
        buffer = io.BytesIO()
        torch.save(checked, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


def _confined(folder: Path, name, source: Path) -> str:
    """`name`, a relative path read from `source`, if it stays inside `folder` (no absolute path, no '..')."""
    parts = Path(str(name)).parts
    if not isinstance(name, str) or not parts or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"{source} names {str(name)[:80]!r}, a path outside {folder}")
    return name


def _read_text(file: Path, flag: str) -> str:
    try:
        return file.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {file} is not text (damaged, or not written by branchgrpo)") from None


def _one_line(err: BaseException) -> str:
    """An exception as `Type: first line of its message`; DCP's CheckpointException (whose text holds every rank's
    traceback) as the first rank's underlying exception."""
    if isinstance(err, CheckpointException) and err.failures:
        inner = next(iter(err.failures.values()))
        err = inner[0] if isinstance(inner, tuple) else inner
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
