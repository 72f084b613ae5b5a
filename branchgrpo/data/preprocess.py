"""The backbone-independent half of preprocessing: read prompts, split them in shards, encode, write, resume.

Each rank encodes the shards `s` with `s % world_size == rank`; finished shards are skipped, so a killed run resumes
where it stopped. A manifest records the prompt file's content hash and the shard size: resuming with a different
prompt list, shard size or encoder settings is refused instead of silently mixing two datasets. Rank 0 writes `index.json` once every
shard exists. The backbone-specific half is an `encode(texts) -> {key: tensor [n, ...]}` function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from branchgrpo.data.embeddings import shard_name, write_extras, write_index, write_shard

log = logging.getLogger(__name__)

Encoder = Callable[[list[str]], dict[str, torch.Tensor]]


def read_prompt_file(path: str | Path) -> tuple[list[str], dict[str, int]]:
    """Non-empty, decodable prompt lines (stripped), and how many lines were skipped for each reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: prompt file {path} does not exist (one prompt per line expected)")
    texts, skipped = [], {"empty": 0, "undecodable": 0}
    for raw in path.read_bytes().splitlines():
        try:
            # utf-8-sig: a byte-order mark (editors on Windows write one) is not part of the first prompt
            line = raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            skipped["undecodable"] += 1
            continue
        if not line:
            skipped["empty"] += 1
            continue
        texts.append(line)
    if not texts:
        raise ValueError(f"--prompts: {path} holds no usable prompt (skipped: {skipped})")
    return texts, skipped


def _manifest(texts: Sequence[str], shard_size: int, model: str, encoder_settings: dict | None) -> dict:
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return {"prompts_sha256": digest, "num_prompts": len(texts), "shard_size": shard_size, "model": model,
            "encoder": dict(encoder_settings or {})}


def run_preprocess(
    prompts_path: str | Path,
    output_dir: str | Path,
    model: str,
    encode: Encoder,
    shard_size: int = 1024,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    encoder_settings: dict | None = None,
) -> Path | None:
    """Encode every prompt of `prompts_path` into `output_dir`; returns the index path on rank 0.

    `encoder_settings` (e.g. max_sequence_length, dtype) go into the manifest, so that resuming with other settings
    is refused at once instead of after re-encoding, when shards of two shapes or dtypes would not index together."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError("--shard_size and --batch_size must be >= 1")
    output_dir = Path(output_dir)
    texts, skipped = read_prompt_file(prompts_path)
    manifest = _manifest(texts, shard_size, model, encoder_settings)
    manifest_path = output_dir / "manifest.json"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            if old != manifest:
                raise ValueError(
                    f"{output_dir}: holds shards of another prompt list, shard size or encoder settings ({old}, "
                    f"now {manifest}); "
                    "use a new OUTPUT_DIR or delete the old one"
                )
        else:
            manifest_path.write_text(json.dumps(manifest, indent=1))
    barrier()
    if json.loads(manifest_path.read_text()) != manifest:  # another rank read a different file
        raise ValueError(f"rank {rank}: prompt file differs from rank 0's")

    num_shards = (len(texts) + shard_size - 1) // shard_size
    done = encoded = 0
    start = time.time()
    for shard_id in range(rank, num_shards, world_size):
        if (output_dir / shard_name(shard_id)).exists():
            done += 1
            continue
        shard_texts = texts[shard_id * shard_size : (shard_id + 1) * shard_size]
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(shard_texts), batch_size):
            with torch.no_grad():
                out = encode(shard_texts[i : i + batch_size])
            for key, value in out.items():
                parts.setdefault(key, []).append(value.detach().cpu())
        write_shard(output_dir, shard_id, {k: torch.cat(v) for k, v in parts.items()}, shard_texts)
        encoded += len(shard_texts)
        log.info("rank %d: shard %d/%d written (%d prompts)", rank, shard_id + 1, num_shards, len(shard_texts))
    log.info(
        "rank %d: encoded %d prompts in %.1f s; %d shards were already done", rank, encoded, time.time() - start, done
    )
    barrier()
    if rank != 0:
        return None
    extras = getattr(encode, "extras", None)  # dataset-wide tensors, written before the index that marks completion
    if extras is not None:
        with torch.no_grad():
            write_extras(output_dir, extras())
    index = write_index(output_dir, model, num_shards, skipped)
    log.info("index %s: %d prompts in %d shards; skipped lines %s", index, len(texts), num_shards, skipped)
    return index
