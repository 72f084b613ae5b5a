"""A small OpenAI-compatible chat-completions server on 127.0.0.1 that judges images by a pixel statistic: the test
double of a VLM judge (the vlm_judge reward's tests, or a smoke run without a GPU).

    python -m branchgrpo.testing.judge_server --mode ok    # prints "listening on http://127.0.0.1:PORT/v1"

The answer's score is a deterministic function of the image it receives: with r the mean of its red channel in
[0, 1], "Final Score: 1 + 4 r" when the question asks for a 'Final Score' (UnifiedReward's template), else
"Score: 10 r". A request showing two images (an editing judge: source, then result) is judged by the result's r
minus the source's, clamped to [0, 1]: an unchanged source scores 0. Modes, to exercise the client's failure
handling:
    ok       answer every request
    slow     the first request for each distinct image waits --delay_s before answering; later ones answer at once
    flaky    the first request for each distinct image gets HTTP 500; later ones are answered
    error    HTTP 500 for every request
    garbage  images with r < 0.5 get a reply that is not JSON, images with 0.5 <= r < 0.75 an answer without a
             score, the others a normal answer
    hang     every request waits --delay_s before answering
`--api_key_env NAME`: requests must carry `Authorization: Bearer $NAME` (else HTTP 401, echoing the header sent).
GET /stats gives the number of requests received, in flight now, and most in flight at once. Loopback only; it
serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import select
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
from aiohttp import web
from PIL import Image

MODES = ("ok", "slow", "flaky", "error", "garbage", "hang")


def red_mean(data_url: str) -> float:
    """Mean of the red channel, in [0, 1], of the PNG in a data URL."""
    png = base64.b64decode(data_url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[..., 0].mean() / 255.0)


def judge_answer(question: str, red: float) -> str:
    if "Final Score" in question:
        return f"The image is fine.\nFinal Score: {1.0 + 4.0 * red:.4f}"
    return f"Score: {10.0 * red:.4f}"


def completion(content: str) -> dict:
    return {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": content}}]}


def make_app(mode: str, delay_s: float, api_key: str | None):
    seen: set[str] = set()
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0}

    async def chat(request):
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            return await answer(request)
        finally:
            stats["in_flight"] -= 1

    async def answer(request):
        if api_key is not None and request.headers.get("Authorization") != f"Bearer {api_key}":
            # echoing what was sent, as careless servers do: the client must keep keys out of its messages
            message = f"invalid API key: {request.headers.get('Authorization')}"
            return web.json_response({"error": {"message": message}}, status=401)
        body = await request.json()
        parts = body["messages"][0]["content"]
        shown = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        image = shown[-1]  # the judged image; an editing request shows its source first
        question = next(p["text"] for p in parts if p["type"] == "text")
        first_time = image not in seen
        seen.add(image)
        if mode == "error" or (mode == "flaky" and first_time):
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if mode == "hang" or (mode == "slow" and first_time):
            await asyncio.sleep(delay_s)
        red = red_mean(image) - (red_mean(shown[0]) if len(shown) > 1 else 0.0)  # an edit: the change in red
        red = min(max(red, 0.0), 1.0)
        if mode == "garbage" and red < 0.5:
            return web.Response(text="<html>bad gateway page</html>", content_type="text/html")
        if mode == "garbage" and red < 0.75:
            return web.json_response(completion("What a lovely picture."))
        return web.json_response(completion(judge_answer(question, red)))

    async def get_stats(request):
        return web.json_response(stats)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", get_stats)
    return app


async def serve(mode: str, delay_s: float, api_key: str | None) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # loopback only; the OS picks a free port
    runner = web.AppRunner(make_app(mode, delay_s, api_key))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    await asyncio.Event().wait()


@contextmanager
def judge_server(mode: str = "ok", delay_s: float = 1.0, api_key_env: str | None = None, start_timeout_s=30.0):
    """Run the server in its own process; yields (process, base URL); killed on exit."""
    command = [sys.executable, "-m", "branchgrpo.testing.judge_server", "--mode", mode, "--delay_s", str(delay_s)]
    if api_key_env:
        command += ["--api_key_env", api_key_env]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], start_timeout_s)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"judge server did not start within {start_timeout_s} s (got {line!r})")
        yield process, line.split()[-1]
    finally:
        process.kill()
        process.wait(timeout=10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m branchgrpo.testing.judge_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--delay_s", type=float, default=1.0)
    parser.add_argument("--api_key_env", default=None)
    args = parser.parse_args(argv)
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    asyncio.run(serve(args.mode, args.delay_s, api_key))


if __name__ == "__main__":
    main()
