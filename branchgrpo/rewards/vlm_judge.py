"""A vision-language model as judge, over an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, ...).

Each image goes as a base64 PNG data URL in one chat-completions request with the judge's question, at temperature
0; the answer's score is parsed with the template's pattern and scaled to [0, 1]:
- "unifiedreward": UnifiedReward's pointwise question (as Flow-GRPO sends it to UnifiedReward-7b-v1.5, the
  `<image>` placeholder line included), answered with `Final Score: x` for x in 1..5; reward x / 5;
- "score10": a generic question for any instruction-following VLM, answered with `Score: x` for x in 0..10;
  reward x / 10;
- "edit10": for image editing, the source image and then the edited one in the same request, with the edit
  instruction as the prompt: how well the edit follows the instruction while keeping everything else, answered with
  `Score: x` for x in 0..10; reward x / 10. The source is each sample's `source_image` (rewards/edit.py), read
  through the conditioning extension of the reward call, resized to the edited image's size.
An answer without a score (or a reply that is not a chat completion) scores 0 and is counted (`num_unparseable`),
with one warning line per call that has any, as are images with non-finite pixels (`num_invalid`, not sent).

Transport failures are not scores: a request that times out (`timeout_s`), cannot connect, or gets HTTP 5xx / 429 is
retried up to `retries` times with exponential backoff (`backoff_s`, doubled each time); when every attempt fails,
or on any other HTTP error (a wrong model name, a missing key), the call raises one line naming the endpoint
(`RewardUnavailable`, a RuntimeError: the trainer stops with a checkpoint), never a hang (rewards/_http.py). At most
`concurrency` requests are in flight. `api_key_env` names an environment variable holding the API key (sent as a
bearer token, never logged or printed); the key itself is never an option, so it stays out of config.json. The HTTP
client is aiohttp (requirements-rewards.txt).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from branchgrpo.rewards._http import request_with_retries
from branchgrpo.rewards._pixels import to_uint8_images
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, register_reward
from branchgrpo.rewards.edit import SOURCE_KEY, source_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeTemplate:
    question: str  # with a {prompt} field
    score_pattern: str  # group 1: the score
    scale: float  # reward = score / scale
    sees_source: bool = False  # the request shows each sample's source image before it (image editing)

    def parse(self, answer: str) -> float | None:
        """The reward in the judge's answer, or None when the answer holds no score in range."""
        match = re.search(self.score_pattern, answer)
        if match is None:
            return None
        score = float(match.group(1))
        return score / self.scale if 0.0 <= score <= self.scale else None


TEMPLATES = {
    "unifiedreward": JudgeTemplate(
        question=("<image>\nYou are given a text caption and a generated image based on that caption. Your task is to "
                  "evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well "
                  "this image aligns with the provided caption. Consider the accuracy of depicted objects, their "
                  "relationships, and attributes as described in the caption.\n2. Overall Image Quality: Examine the "
                  "visual quality of this image, including clarity, detail preservation, color accuracy, and overall "
                  "aesthetic appeal.\nBased on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
                  "Your task is provided as follows:\nText Caption: [{prompt}]"),
        score_pattern=r"Final Score:\s*([1-5](?:\.\d+)?)",
        scale=5.0,
    ),
    "score10": JudgeTemplate(
        question=("You are shown an image generated from a text caption. Rate from 0 to 10 how well the image matches "
                  "the caption (objects, counts, attributes, relations, text) and how good it looks (no distortions "
                  "or artifacts); 10 is a faithful, flawless image. Reply with one line 'Score: N' and nothing else."
                  "\nText Caption: [{prompt}]"),
        score_pattern=r"Score:\s*(\d+(?:\.\d+)?)",
        scale=10.0,
    ),
    "edit10": JudgeTemplate(
        question=("You are shown two images: the first is the source image, the second is the result of editing it "
                  "with the instruction below. Rate from 0 to 10 how well the result carries out the instruction "
                  "while keeping everything the instruction does not ask to change as in the source (identity, "
                  "layout, background, style) and how good it looks; an unchanged source scores 0, an edit that "
                  "also changes what it should keep scores low. Reply with one line 'Score: N' and nothing else."
                  "\nInstruction: [{prompt}]"),
        score_pattern=r"Score:\s*(\d+(?:\.\d+)?)",
        scale=10.0,
        sees_source=True,
    ),
}


def png_data_url(image_HWC: np.ndarray) -> str:
    """An RGB uint8 image as a `data:image/png;base64,...` URL (lossless: the judge sees the rollout's pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_HWC).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def answer_text(body: str) -> str | None:
    """The first choice's message content of a chat-completions reply body, or None if it is not one."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def chat_endpoint(url: str) -> str:
    """`url` as given when it names .../chat/completions, else that path appended to the base URL (e.g. .../v1)."""
    parsed = urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"reward 'vlm_judge': option url must be an http(s) URL of an OpenAI-compatible server "
                         f"(e.g. http://127.0.0.1:8000/v1), got {url!r}")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class VlmJudge:
    """Scores images by asking a VLM served over HTTP (module docstring)."""

    name = "vlm_judge"
    reward_max = 1.0
    out_of_process = True  # scoring waits on the judge's server: it can overlap the rollout

    def __init__(self, endpoint: str, model: str, template: JudgeTemplate, concurrency: int, timeout_s: float,
                 retries: int, backoff_s: float, api_key: str | None, max_tokens: int):
        self.endpoint, self.model, self.template = endpoint, model, template
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.max_tokens = max_tokens
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.num_unparseable = 0  # answers without a score, since construction
        self.num_invalid = 0  # images with non-finite pixels (not sent)
        if template.sees_source:
            self.conditioning = (SOURCE_KEY,)  # the per-prompt tensor it reads (rewards/base.py)

    def request_body(self, image_HWC: np.ndarray, prompt: str, source_HWC: np.ndarray | None = None) -> dict:
        shown = [image_HWC] if source_HWC is None else [source_HWC, image_HWC]
        content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in shown]
        content.append({"type": "text", "text": self.template.question.format(prompt=prompt)})
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": self.max_tokens}

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: Sequence[str],
                 conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        images, finite = to_uint8_images(media, self.name)
        if len(prompts) != len(images):
            raise ValueError(f"reward 'vlm_judge': {len(images)} images but {len(prompts)} prompts")
        sources = [None] * len(images)
        if self.template.sees_source:
            sources, _ = to_uint8_images(source_images(media.float(), conditions, self.name), self.name)
        bodies = {i: self.request_body(images[i], prompts[i], sources[i]) for i in range(len(images)) if finite[i]}
        answers = asyncio.run(self._ask_all(bodies)) if bodies else {}
        scores, unparseable = [], []
        for i in range(len(images)):
            reward = None if answers.get(i) is None else self.template.parse(answers[i])
            if i in answers and reward is None:
                unparseable.append(answers[i])
            scores.append(reward or 0.0)
        self._count(len(images), unparseable, len(images) - len(bodies))
        return torch.tensor(scores, dtype=torch.float32)

    def _count(self, num_images: int, unparseable: list[str | None], invalid: int) -> None:
        self.num_unparseable += len(unparseable)
        self.num_invalid += invalid
        if unparseable:
            first = "not a chat completion" if unparseable[0] is None else repr(unparseable[0][:120])
            log.warning(f"reward 'vlm_judge': {len(unparseable)} of {num_images} answers from {self.endpoint} hold no "
                        f"score, scored 0 ({self.num_unparseable} so far); first: {first}")
        if invalid:
            log.warning(f"reward 'vlm_judge': {invalid} of {num_images} images have non-finite pixels, scored 0 "
                        f"without asking ({self.num_invalid} so far)")

    def _redact(self, text: str) -> str:
        """`text` (a server's error page, which may echo the request) without the API key."""
        key = self._headers.get("Authorization", "").removeprefix("Bearer ")
        return text.replace(key, "<api key>") if key else text

    async def _ask_all(self, bodies: dict[int, dict]) -> dict[int, str | None]:
        """Every request, at most `concurrency` at a time; {index: answer text, None when not a chat completion}."""
        import aiohttp

        limit = asyncio.Semaphore(self.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers) as session:

            async def ask(body: dict) -> str | None:
                async with limit:
                    return await self._ask(session, body)

            answers = await asyncio.gather(*(ask(body) for body in bodies.values()))
        return dict(zip(bodies, answers))

    async def _ask(self, session, body: dict) -> str | None:
        """One request with its retries: the answer text, None for a 200 reply that is not a chat completion."""
        text = await request_with_retries(session, "POST", self.endpoint, body, who="reward 'vlm_judge'",
                                          retries=self.retries, backoff_s=self.backoff_s, timeout_s=self.timeout_s,
                                          redact=self._redact)
        return answer_text(text)


def _check_positive(name: str, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"reward 'vlm_judge': option {name} must be >= {minimum}, got {value}")


@register_reward("vlm_judge")
def build_vlm_judge(
    device: torch.device | str = "cpu",
    model_dir: str = DEFAULT_MODEL_DIR,
    url: str | None = None,
    model: str | None = None,
    template: str = "unifiedreward",
    concurrency: int = 8,
    timeout_s: float = 120.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    api_key_env: str | None = None,
    max_tokens: int = 512,
) -> VlmJudge:
    """A VLM judge at `url` (an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1) serving `model`;
    `template`: unifiedreward | score10 | edit10 (image editing: sees each sample's source image too);
    `concurrency`: requests in flight; `timeout_s`: per request; `retries`:
    extra attempts after a timeout, connection error or HTTP 5xx/429, `backoff_s` apart (doubling);
    `api_key_env`: the environment variable holding an API key. Nothing is loaded locally (`device` and `model_dir`
    are not read)."""
    del device, model_dir  # the model runs in the server
    endpoint = chat_endpoint(url)
    if not model:
        raise ValueError("reward 'vlm_judge': option model must name the model the server serves "
                         '(e.g. --reward_options \'{"vlm_judge": {"url": ..., "model": "UnifiedReward-7b-v1.5"}}\')')
    if template not in TEMPLATES:
        raise ValueError(f"reward 'vlm_judge': template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    _check_positive("concurrency", concurrency, 1)
    _check_positive("timeout_s", timeout_s, 1e-3)
    _check_positive("retries", retries, 0)
    _check_positive("backoff_s", backoff_s, 0.0)
    _check_positive("max_tokens", max_tokens, 1)
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"reward 'vlm_judge': api_key_env names the environment variable {api_key_env}, "
                             "which is not set or empty")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ImportError("reward 'vlm_judge' needs the aiohttp package (pip install -r requirements-rewards.txt)") \
            from None
    return VlmJudge(endpoint, model, TEMPLATES[template], int(concurrency), float(timeout_s), int(retries),
                    float(backoff_s), api_key, int(max_tokens))
