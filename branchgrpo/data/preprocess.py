"""The backbone-independent half of preprocessing: read prompts, split them in shards, encode, write, resume.

Prompt files come in the format the backbone's spec declares (`BackboneSpec.prompt_format`, one of PROMPT_FORMATS):
"text", one prompt per line (the encoder takes strings); or "jsonl", one JSON object per line with a prompt and its
conditioning image(s): `{"prompt": "...", "image": "path/to/first_frame.png"}` (image-to-video's first frame, an edit's
source image with the edit instruction as the prompt) or, for backbones that take several, `"images": [...]`, and for
an edit optionally `"mask"`, an image whose white pixels mark the region the instruction may change (relative paths
are resolved against the file's folder; the encoder takes `PromptRecord`s). A JSONL line that cannot be used -
not a JSON object with a non-empty "prompt" and an "image" or "images" (at most as many as the backbone takes, and
as many on every line as on the first usable one: the stored conditioning has one shape per run), an image that is
missing, cannot be decoded, or whose aspect ratio is off the size the backbone resizes it to by more than
ASPECT_TOLERANCE (the pipeline would stretch it) - is reported with its line number, and the whole file refused
(`bad_lines="refuse"`, the default) or the line left out (`"skip"`, counted in the index).

Each rank encodes the shards `s` with `s % world_size == rank`; finished shards are skipped, so a killed run resumes
where it stopped. A manifest records the prompt file's content hash and the shard size: resuming with a different
prompt list, shard size or encoder settings is refused instead of silently mixing two datasets. Rank 0 writes `index.json` once every
shard exists. The backbone-specific half is an `encode(items) -> {key: tensor [n, ...]}` function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from branchgrpo.core.files import read_json
from branchgrpo.core.flags import require_file
from branchgrpo.data.embeddings import shard_name, write_extras, write_index, write_shard

log = logging.getLogger(__name__)

Encoder = Callable[[list], dict[str, torch.Tensor]]
PROMPT_FORMATS = ("text", "jsonl")
BAD_LINES = ("refuse", "skip")  # what a bad JSONL line does: stop with the list of bad lines, or leave it out
# Largest relative difference between an image's aspect ratio (width / height) and the video's: the pipeline resizes
# the first frame to (h, w) without cropping, so beyond it the conditioning frame is visibly stretched (a 4:3 image in
# a 480 x 832 video is 23% off; 16:9 footage is 2.5% off).
ASPECT_TOLERANCE = 0.1


@dataclass(frozen=True)
class PromptRecord:
    """One usable line of a JSONL prompt file."""

    text: str  # the prompt (an edit's instruction)
    images: tuple[Path, ...]  # the conditioning images (resolved against the prompt file's folder), at least one
    sources: tuple[str, ...]  # the image paths as written in the file (what the manifest hashes: moving the folder
    # is no change)
    line: int  # 1-based line number in the file
    mask: Path | None = None  # an edit's region mask (white: the region the instruction may change), if given

    @property
    def image(self) -> Path:
        """The (first) conditioning image: the one image of a backbone that takes one."""
        return self.images[0]


@dataclass
class PromptList:
    """A prompt file as read: what the backbone's encoder takes (`items`: strings, or `PromptRecord`s), their prompt
    texts, and how many lines were left out for each reason."""

    items: list
    texts: list[str]
    skipped: dict[str, int]

    def fingerprint(self) -> str:
        """Content hash for the manifest (text files: of the prompts alone, as before JSONL existed)."""
        lines = [t if isinstance(t, str) else "\t".join((t.text, *t.sources, *([t.mask.name] if t.mask else [])))
                 for t in self.items]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_prompt_file(path: str | Path) -> tuple[list[str], dict[str, int]]:
    """Non-empty, decodable prompt lines (stripped), and how many lines were skipped for each reason."""
    path = require_file(path, "--prompts", "prompt file", " (one prompt per line expected)")
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


def read_prompts(path: str | Path, prompt_format: str = "text", bad_lines: str = "refuse",
                 image_size: tuple[int, int] | None = None, max_images: int = 1) -> PromptList:
    """The prompt file in `prompt_format` (PROMPT_FORMATS). JSONL: each line's images (at most `max_images`) are
    opened and decoded once here, and, given the `image_size` (h, w) the backbone resizes them to, their aspect ratio
    checked; bad lines are refused or skipped as `bad_lines` says (BAD_LINES)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format '{prompt_format}': expected one of {PROMPT_FORMATS}")
    if bad_lines not in BAD_LINES:
        raise ValueError(f"--bad_lines: expected one of {', '.join(BAD_LINES)}, got '{bad_lines}'")
    if prompt_format == "text":
        texts, skipped = read_prompt_file(path)
        return PromptList(texts, texts, skipped)
    return read_jsonl_prompts(path, bad_lines, image_size, max_images)


def read_jsonl_prompts(path: str | Path, bad_lines: str = "refuse", image_size: tuple[int, int] | None = None,
                       max_images: int = 1) -> PromptList:
    """`{"prompt": ..., "image": ...}` (or `"images": [...]`) lines -> PromptRecords (see `read_prompts`)."""
    path = require_file(path, "--prompts", "prompt file", ' (JSONL expected: one {"prompt": ..., "image": '
                        '"path/to/first_frame.png"} per line)')
    records, bad = [], []
    skipped = {"empty": 0, "bad_line": 0, "missing_image": 0, "unreadable_image": 0, "wrong_size": 0}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            bad.append((number, "bad_line", "not UTF-8 text"))
            continue
        if not line:
            skipped["empty"] += 1
            continue
        record, problem = _parse_record(line, number, path.parent, max_images)
        if problem is None and records and len(record.images) != len(records[0].images):
            problem = ("bad_line", f"{len(record.images)} image(s), but line {records[0].line} gives "
                       f"{len(records[0].images)}: every line of a file must give the same number (the stored "
                       "conditioning has one shape per run)")
        for image in (*record.images, *([record.mask] if record.mask else [])) if problem is None else ():
            problem = problem or _check_image(image, image_size)
        if problem is not None:
            bad.append((number, *problem))
            continue
        records.append(record)
    if bad and bad_lines == "refuse":
        listed = "; ".join(f"line {n}: {why}" for n, _, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ValueError(f"--prompts: {path}: {len(bad)} bad line(s) ({listed}); fix them, or pass --bad_lines skip "
                         "(BAD_LINES=skip in the launcher) to leave them out")
    for number, reason, why in bad:
        skipped[reason] += 1
        log.warning("%s: line %d skipped: %s", path, number, why)
    if not records:
        raise ValueError(f"--prompts: {path} holds no usable line (skipped: {skipped})")
    return PromptList(records, [r.text for r in records], skipped)


def _parse_record(line: str, number: int, folder: Path,
                  max_images: int) -> tuple[PromptRecord | None, tuple[str, str] | None]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        return None, ("bad_line", f"not valid JSON ({err.msg})")
    expected = '{"prompt": "<non-empty text>", "image": "<path>"}' + \
        (f' or "images": [<1 to {max_images} paths>]' if max_images > 1 else "")
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip() \
            or ("image" in entry) == ("images" in entry):
        return None, ("bad_line", f"expected {expected}")
    sources = [entry["image"]] if "image" in entry else entry["images"]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s.strip() for s in sources):
        return None, ("bad_line", f"expected {expected}")
    if len(sources) > max_images:
        return None, ("bad_line", f"{len(sources)} images, but this backbone takes at most {max_images}")
    mask = entry.get("mask")
    if mask is not None and not (isinstance(mask, str) and mask.strip()):
        return None, ("bad_line", '"mask" must be the path of a mask image')
    sources = tuple(s.strip() for s in sources)
    images = tuple(_resolve(s, folder) for s in sources)
    return PromptRecord(entry["prompt"].strip(), images, sources, number, mask and _resolve(mask.strip(), folder)), None


def _resolve(source: str, folder: Path) -> Path:
    path = Path(source).expanduser()
    return path if path.is_absolute() else folder / path


def _check_image(image: Path, image_size: tuple[int, int] | None) -> tuple[str, str] | None:
    """None, or (reason, message) for an image that is missing, cannot be decoded, or has the wrong aspect ratio."""
    from PIL import Image

    if not image.is_file():
        return "missing_image", f"image {image} does not exist"
    try:
        with Image.open(image) as handle:
            handle.load()  # decodes it all: a truncated file fails here, not in the middle of a shard
            width, height = handle.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return "unreadable_image", f"image {image} cannot be read ({type(err).__name__}: {err})"
    if image_size is not None and width and height:
        want_h, want_w = image_size
        change = abs((width / height) / (want_w / want_h) - 1.0)
        if change > ASPECT_TOLERANCE:
            return "wrong_size", (f"image {image} is {width} x {height}, an aspect ratio {change:.0%} off the "
                                  f"{want_w} x {want_h} it is resized to (at most {ASPECT_TOLERANCE:.0%}: it would "
                                  "be stretched); crop it to that shape")
    return None


def _manifest(prompts: PromptList, shard_size: int, model: str, encoder_settings: dict | None) -> dict:
    return {"prompts_sha256": prompts.fingerprint(), "num_prompts": len(prompts.texts), "shard_size": shard_size,
            "model": model, "encoder": dict(encoder_settings or {})}


def run_preprocess(
    prompts_path: str | Path | PromptList,
    output_dir: str | Path,
    model: str,
    encode: Encoder,
    shard_size: int = 1024,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    encoder_settings: dict | None = None,
    prompt_format: str = "text",
    bad_lines: str = "refuse",
    image_size: tuple[int, int] | None = None,
    max_images: int = 1,
) -> Path | None:
    """Encode every prompt of `prompts_path` (a file, or a `PromptList` already read) into `output_dir`; returns the
    index path on rank 0.

    `encoder_settings` (e.g. max_sequence_length, dtype) go into the manifest, so that resuming with other settings
    is refused at once instead of after re-encoding, when shards of two shapes or dtypes would not index together.
    `prompt_format`, `bad_lines`, `image_size`, `max_images`: how the prompt file is read (`read_prompts`)."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError("--shard_size and --batch_size must be >= 1")
    output_dir = Path(output_dir)
    prompts = prompts_path if isinstance(prompts_path, PromptList) else \
        read_prompts(prompts_path, prompt_format, bad_lines, image_size, max_images)
    texts, items, skipped = prompts.texts, prompts.items, prompts.skipped
    manifest = _manifest(prompts, shard_size, model, encoder_settings)
    manifest_path = output_dir / "manifest.json"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists():
            old = read_json(manifest_path)
            if old != manifest:
                raise ValueError(
                    f"{output_dir}: holds shards of another prompt list, shard size or encoder settings ({old}, "
                    f"now {manifest}); "
                    "use a new OUTPUT_DIR or delete the old one"
                )
        else:
            manifest_path.write_text(json.dumps(manifest, indent=1))
    barrier()
    if read_json(manifest_path) != manifest:  # another rank read a different file
        raise ValueError(f"rank {rank}: prompt file differs from rank 0's")

    num_shards = (len(texts) + shard_size - 1) // shard_size
    done = encoded = 0
    start = time.time()
    for shard_id in range(rank, num_shards, world_size):
        if (output_dir / shard_name(shard_id)).exists():
            done += 1
            continue
        shard_texts = texts[shard_id * shard_size : (shard_id + 1) * shard_size]
        shard_items = items[shard_id * shard_size : (shard_id + 1) * shard_size]
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(shard_items), batch_size):
            with torch.no_grad():
                out = encode(shard_items[i : i + batch_size])
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
