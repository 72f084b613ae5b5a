"""What a file holds, checked from its first bytes or read with errors that name it: JSON files, safetensors files
(as long as their own header says), torch checkpoints (by their format's magic bytes) - so that a wrong, cut or
damaged file is refused in one line before anything is built from it."""

from __future__ import annotations

import json
from pathlib import Path

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy torch.save format: a pickle (protocol 2+)


def read_json(path: str | Path, flag: str = ""):
    """The JSON value of a file; a file that is missing, not text or not JSON is an error naming it (and `flag`)."""
    path = Path(path)
    where = f"{flag}: {path}" if flag else str(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not a text file (JSON expected)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err})") from None


def check_safetensors(file: str | Path, flag: str) -> None:
    """A safetensors file is as long as its own header says - 8 bytes of header length, the JSON header, then the
    data its tensors' offsets end at - so that a file cut short is refused naming it (`flag` first), even where a
    listing of sizes agrees with the cut file or there is none."""
    file = Path(file)
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError("its header is cut")
            header = json.loads(handle.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{flag}: {file} is not a readable safetensors file ({err}); it is damaged") from None
    if 8 + header_len + end != size:
        raise ValueError(f"{flag}: {file} is truncated or damaged ({size} bytes; its header says "
                         f"{8 + header_len + end})")


def check_weights_file(path: str | Path, flag: str) -> None:
    """A weights file a flag names, checked without loading it: a file (not a folder, not missing), and either a
    complete safetensors file or a torch.save file (zip or legacy pickle) - not a text file or another format."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag}: {path} is a folder; give the weights file")
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: {path} does not exist")
    if path.suffix == ".safetensors":
        check_safetensors(path, flag)
        return
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise ValueError(f"{flag}: {path} is not a weights file (neither torch.save's format nor safetensors)")
