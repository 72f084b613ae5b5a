"""A reward server: any registered rewards, built once, scoring what `remote` rewards send (the protocol is in
branchgrpo.rewards.remote's docstring).

    python -m branchgrpo.serve_reward --reward hps=1.0,clip=1.0 --reward_model_dir hps_ckpt --device cuda:0 \\
        --host 127.0.0.1 --port 8765

One process scores one request at a time on its device (a thread beside the event loop, so /health and /version
answer while it scores); run one per GPU, on ports of their own. It prints `listening on http://HOST:PORT` once it
answers (`--port 0`: a free port the OS picks) and serves until stopped. The weights of `--reward` are not used:
the client asks for raw scores by name and weighs them itself. `--delay_s` holds each /score answer back that long:
a stand-in for a slower reward model (the overlap benchmark). Bind to 127.0.0.1 unless the network is trusted:
the server has no authentication.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

import torch

from branchgrpo import __version__
from branchgrpo.core.distributed import resolve_device
from branchgrpo.rewards.base import DEFAULT_MODEL_DIR, RewardSet, build_reward_set, parse_reward_options
from branchgrpo.rewards.remote import PROTOCOL, decode_media
from branchgrpo.runtime.entry import add_debug_flag, run_cli

log = logging.getLogger(__name__)


def describe(rewards: RewardSet) -> dict:
    """The /version answer."""
    return {"protocol": PROTOCOL, "package": __version__,
            "rewards": {name: {"reward_max": getattr(model, "reward_max", None)}
                        for name, model in rewards.models.items()}}


def score_request(rewards: RewardSet, request: dict) -> dict:
    """The /score answer for a decoded request body; ValueError saying what is wrong with the request."""
    names, prompts = request.get("rewards"), request.get("prompts")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("rewards must be a non-empty list of reward names")
    missing = [name for name in names if name not in rewards.models]
    if missing:
        raise ValueError(f"this server does not serve {', '.join(missing)} (it serves "
                         f"{', '.join(rewards.models)})")
    media = decode_media(request)
    if not isinstance(prompts, list) or len(prompts) != media.shape[0] or \
            not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of {media.shape[0]} strings, one per medium")
    subset = RewardSet({name: rewards.models[name] for name in names}, {name: 1.0 for name in names})
    return {"scores": {name: values.tolist() for name, values in subset.score(media, prompts).items()}}


def make_app(rewards: RewardSet, delay_s: float = 0.0):
    from aiohttp import web

    scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")  # one request on the device at a time

    async def health(_request):
        return web.json_response({"status": "ok"})

    async def version(_request):
        return web.json_response(describe(rewards))

    async def score(request):
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the request body is not JSON"}, status=400)
        if delay_s:
            await asyncio.sleep(delay_s)
        try:
            answer = await asyncio.get_running_loop().run_in_executor(scorer, score_request, rewards, body)
        except ValueError as err:
            return web.json_response({"error": str(err)}, status=400)
        return web.Response(text=json.dumps(answer), content_type="application/json")  # NaN scores stay NaN

    app = web.Application(client_max_size=1 << 30)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_post("/score", score)
    return app


async def serve(app, host: str, port: int) -> None:
    from aiohttp import web

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise ValueError(f"--host/--port: cannot listen on {host}:{port} ({err.strerror})") from None
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(f"listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def build_rewards(args) -> RewardSet:
    """The served rewards, refused in one line if one reads per-prompt tensors (which the protocol does not carry)."""
    rewards = build_reward_set(args.reward, "sum", resolve_device(args.device),
                               parse_reward_options(args.reward_options), model_dir=args.reward_model_dir)
    for name, model in rewards.models.items():
        if getattr(model, "conditioning", ()):
            raise ValueError(f"--reward: '{name}' reads per-prompt {', '.join(model.conditioning)}, which the reward "
                             "server's protocol does not carry; score it in process")
    return rewards


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m branchgrpo.serve_reward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", required=True, help="rewards to serve, e.g. hps=1.0,clip=1.0 (weights unused)")
    parser.add_argument("--reward_model_dir", default=DEFAULT_MODEL_DIR,
                        help="folder holding reward checkpoints (see hps_ckpt/README.md)")
    parser.add_argument("--reward_options", default="", help="JSON {reward: {option: value}} for the factories")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device the rewards run on (default: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: a free one, printed)")
    parser.add_argument("--delay_s", type=float, default=0.0,
                        help="hold each /score answer back this long (a stand-in for a slower reward model)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port: need 0..65535, got {args.port}")
    if not args.delay_s >= 0:
        raise ValueError(f"--delay_s: need >= 0, got {args.delay_s}")
    return args


def _main(argv) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_app(build_rewards(args), args.delay_s)
    try:
        asyncio.run(serve(app, args.host, args.port))
    except KeyboardInterrupt:
        pass


def main(argv=None) -> int:
    return run_cli(_main, argv)
