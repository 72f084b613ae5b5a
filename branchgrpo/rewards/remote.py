"""Any registered reward, scored by a reward server in another process (`python -m branchgrpo.serve_reward`).

    --reward remote=1.0 --reward_options '{"remote": {"url": "http://127.0.0.1:8765", "reward": "hps"}}'

The wire protocol (version `PROTOCOL`, JSON over HTTP; the server is branchgrpo.serve_reward):
    GET  /health   {"status": "ok"}
    GET  /version  {"protocol": 1, "package": version, "rewards": {name: {"reward_max": float | null}}}
    POST /score    {"rewards": [names], "prompts": [B strings], "encoding": ..., "shape": [B, ...], "media": ...}
                -> {"scores": {name: [B floats]}}   (HTTP 400 {"error": line} for a request it refuses)
Media go as `encoding`:
- "float32": the raw float32 tensor, little-endian, base64 - lossless: the server's scores are bitwise those of
  in-process scoring (what the tests check);
- "uint8": quantised to 8 bits as a saved PNG holds them (a quarter of the bytes), raw, any shape (videos too);
- "png": one base64 PNG per image (images [B, 3, H, W] only; the smallest for natural images).
With "uint8" and "png" the server scores the 8-bit images, so scores differ slightly from in-process scoring of the
float media (exactly those of the quantised media). A medium with a non-finite value is scored NaN by the client
itself (the trainer's non-finite guard counts it), as in-process rewards score it.

At start-up the client asks /version: a server that cannot be reached, speaks another protocol or does not serve
the reward is refused in one line naming the URL and what is missing. While scoring, a request that times out
(`timeout_s`), cannot connect, gets HTTP 5xx / 429 or a reply that is not a score list is retried `retries` times,
`backoff_s` apart (doubling); then `RewardUnavailable` says in one line what failed (the trainer stops with a
checkpoint), never a hang. The HTTP client is aiohttp (requirements-rewards.txt).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from functools import partial
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from branchgrpo.rewards._http import request_with_retries
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, RewardUnavailable, register_reward

PROTOCOL = 1
ENCODINGS = ("float32", "uint8", "png")


# --- the wire format of media (the server decodes with the same functions) ------------------------------------------
def quantise(media: torch.Tensor) -> torch.Tensor:
    """Media in [0, 1] -> uint8 as a saved image holds them (non-finite values -> 0)."""
    media = torch.nan_to_num(media.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    return (media.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def encode_media(media: torch.Tensor, encoding: str) -> dict:
    """The `encoding`, `shape` and `media` fields of a /score request for media [B, C, ...] in [0, 1]."""
    shape = list(media.shape)
    if encoding == "float32":
        raw = media.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
        return {"encoding": encoding, "shape": shape, "media": base64.b64encode(raw).decode("ascii")}
    pixels = quantise(media)
    if encoding == "uint8":
        return {"encoding": encoding, "shape": shape, "media": base64.b64encode(pixels.numpy().tobytes()).decode()}
    from PIL import Image

    if media.dim() != 4 or media.shape[1] != 3:
        raise ValueError(f"reward 'remote': encoding 'png' takes images [B, 3, H, W], got {shape}; use 'uint8'")
    pngs = []
    for image_HWC in pixels.permute(0, 2, 3, 1).contiguous().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image_HWC).save(buffer, format="PNG")
        pngs.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"encoding": encoding, "shape": shape, "media": pngs}


def decode_media(request: dict) -> torch.Tensor:
    """Float32 media [B, C, ...] in [0, 1] from a /score request's fields; ValueError saying what is malformed."""
    encoding, shape, data = request.get("encoding"), request.get("shape"), request.get("media")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValueError(f"shape must be a list of positive integers [B, C, ...], got {shape!r}")
    if encoding == "png":
        from PIL import Image

        if not isinstance(data, list) or len(data) != shape[0]:
            raise ValueError(f"media must be a list of {shape[0]} base64 PNGs")
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")) for png in data]
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        if list(pixels.shape) != shape:
            raise ValueError(f"the PNGs hold images {list(pixels.shape)}, not {shape}")
        return pixels.float() / 255.0
    raw = base64.b64decode(data if isinstance(data, str) else "")
    dtype = np.dtype("<f4") if encoding == "float32" else np.dtype(np.uint8)
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"media holds {len(raw)} bytes, not the {math.prod(shape) * dtype.itemsize} of {encoding} "
                         f"{shape}")
    values = torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())
    return values if encoding == "float32" else values.float() / 255.0


# --- the client ------------------------------------------------------------------------------------------------------
def server_url(url: str | None) -> str:
    parsed = urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--reward_options: reward 'remote': option url must be the http(s) URL of a reward server "
                         f"(python -m branchgrpo.serve_reward prints it, e.g. http://127.0.0.1:8765), got {url!r}")
    return url.rstrip("/")


class RemoteReward:
    """One reward of a reward server (module docstring)."""

    name = "remote"
    out_of_process = True  # scoring waits on the server: it can overlap the rollout

    def __init__(self, url: str, reward: str, encoding: str, timeout_s: float, retries: int, backoff_s: float):
        self.url, self.reward, self.encoding = url, reward, encoding
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.reward_max = self._check_server()

    def _check_server(self) -> float | None:
        """Start-up: the server answers /version, speaks PROTOCOL and serves `reward`; its reward_max."""
        try:
            info = json.loads(asyncio.run(self._request("GET", "/version")))
            served, protocol = info["rewards"], info["protocol"]
        except RewardUnavailable as err:
            raise ValueError(f"--reward_options: {err}; is the reward server running (python -m "
                             "branchgrpo.serve_reward)?") from None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--reward_options: reward 'remote': {self.url}/version is not a branchgrpo reward "
                             "server's answer (start one with python -m branchgrpo.serve_reward)") from None
        if protocol != PROTOCOL:
            raise ValueError(f"--reward_options: reward 'remote': {self.url} speaks protocol {protocol}, this client "
                             f"{PROTOCOL}: run the same branchgrpo version on both sides")
        if self.reward not in served:
            raise ValueError(f"--reward_options: reward 'remote': {self.url} does not serve '{self.reward}' (it "
                             f"serves {', '.join(sorted(served)) or 'nothing'}); start it with --reward {self.reward}")
        return served[self.reward].get("reward_max")

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != media.shape[0]:
            raise ValueError(f"reward 'remote': {media.shape[0]} media but {len(prompts)} prompts")
        body = {"rewards": [self.reward], "prompts": list(prompts), **encode_media(media, self.encoding)}
        reply = asyncio.run(self._request("POST", "/score", body, expect_scores=media.shape[0]))
        scores = torch.tensor(json.loads(reply)["scores"][self.reward], dtype=torch.float32)
        if self.encoding != "float32":  # the 8-bit copy of a non-finite medium says nothing about it
            finite_B = torch.isfinite(media.detach().float()).flatten(1).all(dim=1).cpu()
            scores = torch.where(finite_B, scores, torch.tensor(float("nan")))
        return scores

    async def _request(self, method: str, path: str, body: dict | None = None, expect_scores: int = 0) -> str:
        """The reply body of one request, with its retries (module docstring)."""
        import aiohttp

        check = partial(_score_problem, reward=self.reward, num=expect_scores) if expect_scores else None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            return await request_with_retries(session, method, self.url + path, body, who="reward 'remote'",
                                              retries=self.retries, backoff_s=self.backoff_s,
                                              timeout_s=self.timeout_s, check=check, input_statuses=frozenset({400}))


def _score_problem(text: str, reward: str, num: int) -> str | None:
    """What is wrong with a /score reply that should hold `num` scores of `reward` (None: nothing)."""
    try:
        values = json.loads(text)["scores"][reward]
    except (ValueError, KeyError, TypeError):
        return f"the reply is not a score list: {' '.join(text.split())[:120]!r}"
    if not isinstance(values, list) or len(values) != num or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return f"the reply holds no {num} numbers for '{reward}'"
    return None


@register_reward("remote")
def build_remote(
    device: torch.device | str = "cpu",
    model_dir: str = DEFAULT_MODEL_DIR,
    url: str | None = None,
    reward: str | None = None,
    encoding: str = "float32",
    timeout_s: float = 120.0,
    retries: int = 3,
    backoff_s: float = 1.0,
) -> RemoteReward:
    """The reward `reward` of the reward server at `url`; `encoding`: float32 (lossless) | uint8 | png; `timeout_s`:
    per request; `retries`: extra attempts after a timeout, connection error, HTTP 5xx/429 or a malformed reply,
    `backoff_s` apart (doubling). Nothing is loaded locally (`device` and `model_dir` are the server's business)."""
    del device, model_dir  # the model runs in the server
    url = server_url(url)
    if not reward:
        raise ValueError("--reward_options: reward 'remote': option reward must name the reward to ask the server "
                         'for (e.g. {"remote": {"url": "http://127.0.0.1:8765", "reward": "hps"}})')
    if encoding not in ENCODINGS:
        raise ValueError(f"--reward_options: reward 'remote': encoding must be one of {', '.join(ENCODINGS)}, got "
                         f"{encoding!r}")
    for option, value, minimum in (("timeout_s", timeout_s, 1e-3), ("retries", retries, 0),
                                   ("backoff_s", backoff_s, 0.0)):
        if not value >= minimum:
            raise ValueError(f"--reward_options: reward 'remote': option {option} must be >= {minimum:g}, got {value}")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ImportError("reward 'remote' needs the aiohttp package (pip install -r requirements-rewards.txt)") \
            from None
    return RemoteReward(url, reward, encoding, float(timeout_s), int(retries), float(backoff_s))
