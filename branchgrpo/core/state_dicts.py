"""State-dict mismatches as one line: what the file looks like, what was expected, how many keys are missing,
unexpected or of another shape (three examples each), and the option that fixes it.

`torch.nn.Module.load_state_dict(strict=True)` lists every missing key: loading a small checkpoint into a large
architecture prints hundreds of lines and hides the one fact that matters (wrong architecture). Rewards and backbones
that load a state dict strictly compare it with `state_dict_mismatch` first and raise its `ValueError`.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

NUM_EXAMPLES = 3


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in tensors.items()}


def count_blocks(keys, prefix: str) -> int:
    """How many numbered blocks `<prefix><i>.` the keys hold (1 + the largest i; 0 if none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m[1]) for key in keys if (m := pattern.match(key))]
    return 1 + max(found) if found else 0


def _examples(items: list[str]) -> str:
    more = ", ..." if len(items) > NUM_EXAMPLES else ""
    return f" (e.g. {', '.join(items[:NUM_EXAMPLES])}{more})" if items else ""


def mismatch_summary(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    """'N keys missing (e.g. a, b, c, ...), M unexpected (e.g. ...), K of another shape (e.g. ...)'."""
    return (f"{len(missing)} keys missing{_examples(sorted(missing))}, {len(unexpected)} unexpected"
            f"{_examples(sorted(unexpected))}, {len(reshaped)} of another shape{_examples(sorted(reshaped))}")


def key_summary(found: Mapping[str, tuple], expected: Mapping[str, tuple]) -> str | None:
    """`mismatch_summary` of two shape maps (name -> shape), or None when they are equal."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = [f"{key} {list(found[key])} vs {list(expected[key])}" for key in sorted(set(found) & set(expected))
                if tuple(found[key]) != tuple(expected[key])]
    if not (missing or unexpected or reshaped):
        return None
    return mismatch_summary(missing, unexpected, reshaped)


def state_dict_mismatch(source: str, expected_name: str, found: Mapping[str, tuple], expected: Mapping[str, tuple],
                        describe: Callable[[Mapping[str, tuple]], str] | None = None,
                        fix: str = "") -> ValueError | None:
    """The one-line error for loading the tensors of `source` (shapes `found`) into `expected_name` (shapes
    `expected`), or None when they fit. `describe(shapes)` summarises an architecture from its tensor shapes
    (e.g. depth and width of each tower); `fix` names the option that selects another architecture."""
    summary = key_summary(found, expected)
    if summary is None:
        return None
    looks = f" (the file: {describe(found)}; expected: {describe(expected)})" if describe else ""
    return ValueError(f"{source} does not match {expected_name}{looks}; {summary}" + (f"; {fix}" if fix else ""))


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, expected_name: str,
                describe: Callable[[Mapping[str, tuple]], str] | None = None, fix: str = "", **kwargs) -> None:
    """`module.load_state_dict(state_dict, strict=True)`, with a mismatch reported by `state_dict_mismatch`."""
    error = state_dict_mismatch(source, expected_name, shapes_of(state_dict), shapes_of(module.state_dict()),
                                describe, fix)
    if error is not None:
        raise error
    module.load_state_dict(state_dict, strict=True, **kwargs)
