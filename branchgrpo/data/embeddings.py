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
requested rows are copied.
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
SHARD_DIR = "shards"
EXTRAS_FILE = "extras.safetensors"


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
    with safe_open(str(path), framework="pt") as handle:
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
        with safe_open(str(path), framework="pt") as handle:
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
    """Lazy, read-only access to an embedding folder through its index.json."""

    def __init__(self, index_path: str | Path):
        self.index_path = Path(index_path)
        if self.index_path.is_dir():
            self.index_path = self.index_path / "index.json"
        if not self.index_path.exists():
            raise FileNotFoundError(
                f"--data_json_path: {self.index_path} does not exist; run the preprocess script first "
                "(scripts/preprocess/*.sh) to write the prompt embeddings"
            )
        try:
            index = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--data_json_path: {self.index_path} is not valid JSON ({err})") from None
        if index.get("format") != FORMAT:
            raise ValueError(
                f"--data_json_path: {self.index_path} has format {index.get('format')!r}, expected '{FORMAT}' "
                "(written by branchgrpo's preprocess scripts)"
            )
        self.model = index["model"]
        self.keys = {k: (tuple(v["shape"]), v["dtype"]) for k, v in index["keys"].items()}
        self.prompts = index["prompts"]
        self.skipped = index.get("skipped", {})
        self.folder = self.index_path.parent
        self._shard_files = [self.folder / s["file"] for s in index["shards"]]
        for path in self._shard_files:
            if not path.exists():
                raise FileNotFoundError(f"{self.index_path}: embedding shard {path} is missing")
        self._handles: dict[int, object] = {}
        extras_path = self.folder / EXTRAS_FILE
        self.extras: dict[str, torch.Tensor] = {}
        if extras_path.exists():
            with safe_open(str(extras_path), framework="pt") as handle:
                self.extras = {key: handle.get_tensor(key) for key in handle.keys()}

    def __len__(self) -> int:
        return len(self.prompts)

    def text(self, i: int) -> str:
        return self.prompts[i]["text"]

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._shard_files[shard]), framework="pt")
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
