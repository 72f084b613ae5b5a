"""Prompt embeddings on disk: a few sharded safetensors files plus one JSON index (DESIGN section 8).

Layout of an embedding folder (what `--data_json_path` points at is `index.json`):

    index.json                       {"format", "model", "keys": {name: {"shape", "dtype"}},
                                      "num_prompts", "shards": [{"file", "num_prompts"}],
                                      "prompts": [{"text", "shard", "row"}], "skipped": {...}}
    shards/shard-00000.safetensors   one tensor per key, stacked over the shard's prompts: [n, *shape];
                                     its metadata holds the shard's prompt texts (so the index can be rebuilt)
    extras.safetensors               optional dataset-wide tensors shared by every prompt (e.g. Wan's
                                     negative-prompt embedding), without a prompt dim

Shards are written atomically (temporary name, then rename), so a finished shard is exactly one that exists; a
preprocessing run that was killed resumes by skipping them. Reading is lazy: a shard is memory-mapped and only the
requested rows are copied. The shard files an index names must lie inside its folder (relative, no '..'): an index
from elsewhere cannot make the trainer read other files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "branchgrpo-embeddings/1"
INDEX_KEYS = ("format", "model", "keys", "shards", "prompts")  # what `EmbeddingStore` reads from index.json
SHARD_DIR = "shards"
EXTRAS_FILE = "extras.safetensors"


def _open_safetensors(path: Path, what: str):
    """`safe_open(path)`, or a ValueError naming the file when its header cannot be read (truncated or not a
    safetensors file)."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for a bad header
        raise ValueError(f"{what} {path} cannot be read ({err}): truncated or not a safetensors file; delete it and "
                         "re-run preprocessing (finished shards are kept)") from None


def shard_name(shard_id: int) -> str:
    return f"{SHARD_DIR}/shard-{shard_id:05d}.safetensors"


def write_shard(folder: str | Path, shard_id: int, tensors: dict[str, torch.Tensor], texts: Sequence[str]) -> Path:
    """Write one shard atomically; every tensor's first dim is the shard's prompt count."""
    folder = Path(folder)
    counts = {k: v.shape[0] for k, v in tensors.items()}
    if any(n != len(texts) for n in counts.values()):
        raise ValueError(f"shard {shard_id}: tensor rows {counts} do not match {len(texts)} prompts")
    path = folder / shard_name(shard_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={"format": FORMAT, "texts": json.dumps(list(texts))})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def write_extras(folder: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Dataset-wide tensors (no prompt dim), written atomically next to the shards."""
    path = Path(folder) / EXTRAS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    return path


def read_shard_texts(path: str | Path) -> list[str]:
    with _open_safetensors(Path(path), "embedding shard") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a branchgrpo embedding shard (format {meta.get('format')!r})")
    return json.loads(meta["texts"])


def write_index(folder: str | Path, model: str, num_shards: int, skipped: dict[str, int]) -> Path:
    """Build index.json from the shards that exist (all of 0..num_shards-1 must)."""
    folder = Path(folder)
    shards, prompts, keys = [], [], None
    for shard_id in range(num_shards):
        path = folder / shard_name(shard_id)
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard missing; re-run preprocessing to finish it")
        texts = read_shard_texts(path)
        with _open_safetensors(path, "embedding shard") as handle:
            shard_keys = {}
            for key in handle.keys():
                sl = handle.get_slice(key)
                shard_keys[key] = {"shape": list(sl.get_shape()[1:]), "dtype": str(sl.get_dtype())}
        if keys is None:
            keys = shard_keys
        elif keys != shard_keys:
            raise ValueError(f"{path}: keys/shapes {shard_keys} differ from the first shard's {keys}")
        shards.append({"file": shard_name(shard_id), "num_prompts": len(texts)})
        prompts.extend({"text": t, "shard": shard_id, "row": r} for r, t in enumerate(texts))
    index = {
        "format": FORMAT,
        "model": model,
        "keys": keys or {},
        "num_prompts": len(prompts),
        "shards": shards,
        "prompts": prompts,
        "skipped": skipped,
    }
    path = folder / "index.json"
    tmp = path.with_name("index.json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return path


class EmbeddingStore:
    """Lazy, read-only access to an embedding folder through its index.json. Opening checks the index against the
    shards' headers (keys, shapes, row counts; a few bytes per shard), so that a truncated shard or an index that
    does not fit them fails here, naming the file, not in the middle of training."""

    def __init__(self, index_path: str | Path, flag: str = "--data_json_path"):
        self.flag = flag  # the flag that named the index, for messages (--data_json_path, --eval_data_json_path)
        self.index_path = Path(index_path)
        if self.index_path.is_dir():
            self.index_path = self.index_path / "index.json"
        if not self.index_path.exists():
            raise FileNotFoundError(
                f"{self.flag}: {self.index_path} does not exist; run the preprocess script first "
                "(scripts/preprocess/*.sh) to write the prompt embeddings"
            )
        index = self._read_index()
        self.model = index["model"]
        self.prompts = index["prompts"]
        self.skipped = index.get("skipped", {})
        self.folder = self.index_path.parent
        try:
            self.keys = {k: (tuple(v["shape"]), v["dtype"]) for k, v in index["keys"].items()}
            self._shard_files = [self.folder / s["file"] for s in index["shards"]]
            rows_per_shard = [int(s["num_prompts"]) for s in index["shards"]]
            if not isinstance(self.prompts, list):
                raise TypeError(f"'prompts' is a {type(self.prompts).__name__}, not a list")
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"{self.flag}: {self.index_path}: malformed 'keys', 'shards' or 'prompts' ({err!r}); "
                             "re-run preprocessing to rewrite it") from None
        for entry in index["shards"]:
            name = entry["file"]
            parts = Path(name).parts if isinstance(name, str) else ()
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise ValueError(f"{self.flag}: {self.index_path} names the shard {str(name)[:80]!r}, a path "
                                 f"outside {self.folder}; shards must lie in the index's folder (re-run preprocessing)")
        for path in self._shard_files:
            if not path.exists():
                raise FileNotFoundError(f"{self.flag}: {self.index_path}: embedding shard {path} is missing")
        self._check_shards(rows_per_shard, index.get("num_prompts"))
        self._handles: dict[int, object] = {}
        extras_path = self.folder / EXTRAS_FILE
        self.extras: dict[str, torch.Tensor] = {}
        if extras_path.exists():
            with _open_safetensors(extras_path, "dataset-wide embeddings (extras)") as handle:
                self.extras = {key: handle.get_tensor(key) for key in handle.keys()}

    def _read_index(self) -> dict:
        try:
            index = json.loads(self.index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.flag}: {self.index_path} is not valid JSON ({err})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise ValueError(
                f"{self.flag}: {self.index_path} has format {found!r}, expected '{FORMAT}' "
                "(written by branchgrpo's preprocess scripts)"
            )
        missing = [key for key in INDEX_KEYS if key not in index]
        if missing:
            raise ValueError(f"{self.flag}: {self.index_path} lacks {', '.join(map(repr, missing))} (an index "
                             f"written by branchgrpo's preprocess scripts has {', '.join(INDEX_KEYS)}); re-run "
                             "preprocessing to rewrite it")
        return index

    def _check_shards(self, rows_per_shard: list[int], num_prompts) -> None:
        """Every shard's header holds the index's keys with its row count, shapes and dtypes; the index's prompt
        count is its prompts' and its shards' rows; every prompt has a text and points at a row that exists."""
        for path, rows in zip(self._shard_files, rows_per_shard):
            with _open_safetensors(path, "embedding shard") as handle:
                for key, (shape, dtype) in self.keys.items():
                    if key not in handle.keys():
                        raise ValueError(f"{self.flag}: {self.index_path}: embedding shard {path} has no tensor '{key}' "
                                         f"(it holds {sorted(handle.keys())}); re-run preprocessing")
                    found = tuple(handle.get_slice(key).get_shape())
                    if found != (rows, *shape):
                        raise ValueError(f"{self.flag}: {self.index_path}: embedding shard {path} holds '{key}' of shape "
                                         f"{list(found)}, the index says {[rows, *shape]}; re-run preprocessing")
                    stored = str(handle.get_slice(key).get_dtype())
                    if stored != dtype:
                        raise ValueError(f"{self.flag}: {self.index_path}: embedding shard {path} holds '{key}' as dtype {stored}, "
                                         f"the index says {dtype}; re-run preprocessing")
        counts = {"prompts": len(self.prompts), "shard rows": sum(rows_per_shard)}
        if num_prompts is not None:
            counts["num_prompts"] = num_prompts
        if len(set(counts.values())) > 1:
            raise ValueError(f"{self.flag}: {self.index_path}: the prompt counts disagree "
                             f"({', '.join(f'{k} {v}' for k, v in counts.items())}); re-run preprocessing")
        for i, entry in enumerate(self.prompts):
            text = entry.get("text") if isinstance(entry, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{self.flag}: {self.index_path}: prompt {i} has no \"text\" (a non-empty "
                                 "string); re-run preprocessing")
            shard, row = entry.get("shard"), entry.get("row")
            ok = isinstance(shard, int) and 0 <= shard < len(rows_per_shard)
            if not (ok and isinstance(row, int) and 0 <= row < rows_per_shard[shard]):
                where = f"shard {shard}" + (f" of {rows_per_shard[shard]} rows" if ok else
                                            f" (the index lists {len(rows_per_shard)} shards)")
                raise ValueError(f"{self.flag}: {self.index_path}: prompt {i} points at row {row} of {where}; "
                                 "the index does not fit its shards - re-run preprocessing")

    def __len__(self) -> int:
        return len(self.prompts)

    def text(self, i: int) -> str:
        return self.prompts[i]["text"]

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = _open_safetensors(self._shard_files[shard], "embedding shard")
        return self._handles[shard]

    def get(self, i: int) -> dict[str, torch.Tensor]:
        entry = self.prompts[i]
        handle = self._handle(entry["shard"])
        row = entry["row"]
        return {key: handle.get_slice(key)[row : row + 1][0] for key in self.keys}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.get(int(i)) for i in indices]
        return {key: torch.stack([r[key] for r in rows]) for key in self.keys}

    def __getstate__(self):  # safetensors handles cannot be pickled (dataloader workers reopen them)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def with_extras(per_prompt: dict[str, torch.Tensor], extras: dict[str, torch.Tensor],
                device: torch.device | str) -> dict[str, torch.Tensor]:
    """Per-prompt embeddings [n, ...] on `device`, plus every dataset-wide extra expanded to [n, ...] (a view)."""
    n = next(iter(per_prompt.values())).shape[0]
    out = {k: v.to(device) for k, v in per_prompt.items()}
    out.update({k: v.to(device).unsqueeze(0).expand(n, *v.shape) for k, v in extras.items()})
    return out
