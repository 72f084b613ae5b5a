"""One request to a scoring server, bounded in time: the transport of the rewards that score over HTTP (vlm_judge,
remote). aiohttp is imported by the callers' factories (requirements-rewards.txt)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from branchgrpo.rewards.base import RewardUnavailable

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


async def request_with_retries(session, method: str, url: str, body: dict | None, *, who: str, retries: int,
                               backoff_s: float, timeout_s: float, check: Callable[[str], str | None] | None = None,
                               redact: Callable[[str], str] = str, input_statuses: frozenset = frozenset()) -> str:
    """The body of a 200 reply to `method url` (JSON `body`). A timeout (`session`'s), a connection error, HTTP
    5xx / 429 or a 200 reply in which `check` finds a problem (its one-line description) is retried `retries` times,
    `backoff_s` apart (doubling), each retry logged; then `RewardUnavailable` says in one line (prefixed `who`) what
    failed. Another status raises at once: a ValueError for `input_statuses` (the request was refused as bad
    input), else RewardUnavailable. `redact` cleans what a server echoes (an API key) before it is shown."""
    import aiohttp

    last = ""
    for attempt in range(retries + 1):
        if attempt:
            log.warning("%s: %s failed (%s); attempt %d of %d", who, url, last, attempt + 1, retries + 1)
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            async with session.request(method, url, json=body) as response:
                text = await response.text(errors="replace")
            if response.status == 200:
                last = check(text) if check is not None else None
                if last is None:
                    return text
                continue
            last = f"HTTP {response.status}: {redact(' '.join(text.split())[:200])}"
            if response.status in input_statuses:
                raise ValueError(f"{who}: {url} refused the request: {last}")
            if response.status not in RETRY_STATUSES:
                raise RewardUnavailable(f"{who}: {url} answered {last}")
        except asyncio.TimeoutError:
            last = f"no answer within timeout_s={timeout_s:g}"
        except aiohttp.ClientError as err:
            last = f"{type(err).__name__}: {err}"
    raise RewardUnavailable(f"{who}: {url} failed {retries + 1} times (timeout_s={timeout_s:g}, retries={retries}); "
                            f"last: {last}")
