"""Flags as dataclass fields: one field per command-line flag, with its default and a one-line doc, and the generic
machinery around them (argparse from fields, YAML values, type checks, comma-separated integer lists).

Every config section (branchgrpo.config.sections), every algorithm unit's section (branchgrpo.algorithms) and every
backbone's section (branchgrpo.models) is a dataclass built from `flag(...)` fields; the command line is the union of
their fields, flat, under the official flag names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import field
from pathlib import Path


def flag(default, help: str, choices=None):
    """A dataclass field that is also a command-line flag `--<name>` with this help text (and choices)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


def require(ok: bool, message: str) -> None:
    """Flag validation: a ValueError whose message names the flag, the value and what is allowed."""
    if not ok:
        raise ValueError(message)


def require_path(value, flag_name: str) -> str:
    """A path flag's value; an empty or blank one - what an unset shell variable gives - is refused naming the flag,
    never taken to mean the current folder."""
    if value is None or not str(value).strip():
        raise ValueError(f"{flag_name}: empty path {value!r} (an unset shell variable?); give a folder or file")
    return str(value)


def require_file(value, flag_name: str, what: str = "", expected: str = "") -> Path:
    """An input file a flag names (`what` says which, `expected` what it should hold): an empty path, a folder and a
    path that does not exist are each refused naming the flag, as what they are."""
    path = Path(require_path(value, flag_name))
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag_name}: {label} is a folder, not a file{expected}")
    if not path.is_file():
        raise FileNotFoundError(f"{flag_name}: {label} does not exist{expected}")
    return path


def parse_int_list(text: str, flag_name: str) -> list[int]:
    """'0,3,6,9' -> [0, 3, 6, 9]; empty entries, non-integers and duplicates are refused naming the flag."""
    values = []
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            raise ValueError(f"{flag_name}: empty entry in '{text}' (expected comma-separated integers)")
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"{flag_name}: '{item}' is not an integer (in '{text}')") from None
    if len(set(values)) != len(values):
        raise ValueError(f"{flag_name}: duplicate entries in '{text}'")
    return values


def arg_type(tp):
    """The scalar type of a field annotation (`int | None` -> int)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: arg_type(hints[f.name]) for f in dataclasses.fields(cls)}


def check_value_type(name: str, value, tp) -> None:
    """YAML values reach the dataclasses unconverted: `branch_factor: 2.5` or `eta: .inf` must fail here, naming
    the flag, not later in a traceback. Integer fields need integers; float fields finite numbers."""
    if value is None:
        return
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"--{name}: need an integer, got {value!r}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"--{name}: need a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"--{name}: need true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ValueError(f"--{name}: need a string, got {value!r}")


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of a section that are flags (built with `flag`); a section may also hold a nested section."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_flag(group, f: dataclasses.Field, tp, help: str | None = None) -> None:
    """Add one field as `--name` (defaults suppressed: only flags actually given reach the values); `help`: instead
    of the field's own."""
    kwargs = {"help": f.metadata.get("help", "") if help is None else help, "default": argparse.SUPPRESS}
    if tp is bool:
        group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        return
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    group.add_argument(f"--{f.name}", type=tp, **kwargs)


def normalise_yaml_value(value, tp):
    """YAML spellings of comma-list flags: [0, 3, 6, 9] or a single 15 for a string flag."""
    if tp is str and isinstance(value, (list, int)) and not isinstance(value, bool):
        return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return value


def load_yaml(path: str | Path) -> dict:
    """The flag values of a --config YAML file. Refused, naming the file: a folder or missing file, text that is not
    YAML, a file without any flag (empty, or comments only: it would silently mean the defaults), anything but a
    mapping, and a key given twice in one mapping (YAML forbids it; PyYAML would keep the last silently)."""
    import yaml

    path = require_file(path, "--config", expected=" (a YAML file of flag values is expected)")
    try:
        data = yaml.load(path.read_text(), Loader=_unique_key_loader())
    except UnicodeDecodeError:
        raise ValueError(f"--config: {path} is not a text file (a YAML file of flag values is expected)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"--config: {path} is not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if data is None or data == {}:
        raise ValueError(f"--config: {path} holds no flag (empty, or comments only); give the flags it should set, "
                         "or leave --config out for the defaults")
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    return data


@functools.cache
def _unique_key_loader():
    """yaml.SafeLoader that refuses a key repeated within one mapping (a YAMLError naming the key and its line)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"'{key}' is given twice (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def section_from(cls, values: dict):
    """An instance of the section `cls` from the flat flag values (its own fields only)."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def either(names) -> str:
    """'a', 'a or b', 'a, b or c': the alternatives of a flag condition, for messages."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
