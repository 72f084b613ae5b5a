"""Keyed randomness: every noise tensor comes from a generator seeded by a key such as
(seed, iteration, "node", prompt, node), never from a global stream. Same key -> bitwise the same noise, whatever
the batch composition, the rollout batch size, or the order in which nodes are evaluated; a resumed run redraws
exactly what the unbroken run drew; ranks differ because their prompts (or ranks) differ.
"""

from __future__ import annotations

import functools

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=1024)  # the same few labels, hashed thousands of times per rollout
def _fnv1a(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return h


def mix_key(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across runs and Python processes)."""
    h = 0x243F6A8885A308D3
    for part in parts:
        value = _fnv1a(part) if isinstance(part, str) else int(part) & _MASK64
        h = _splitmix64(h ^ value)
    return h & ((1 << 63) - 1)


def keyed_generator(key: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(key)
    return gen


def keyed_normal(shape: tuple[int, ...], key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal fp32 noise of `shape`, a pure function of `key` (and of the device type)."""
    return torch.randn(shape, generator=keyed_generator(key, device), device=device, dtype=torch.float32)


def keyed_permutation(n: int, key: int) -> torch.Tensor:
    return torch.randperm(n, generator=keyed_generator(key, "cpu"))
