"""The real reward server (branchgrpo.serve_reward) with a fault in front of /score, for the remote reward's tests:

    python tests/reward_fault_server.py MODE START COUNT DELAY_S -- <serve_reward flags>

/score requests START + 1 to START + COUNT (COUNT = -1: all from START + 1 on) meet the fault of MODE; the others
are answered by the server:
    slow     wait DELAY_S before answering (beyond the client's timeout: a hung server)
    error    HTTP 500
    garbage  HTTP 200 with an HTML page instead of scores
    die      the process exits at once, the request unanswered (a server killed mid-run)
POST /fault {"mode", "start", "count", "delay_s"} sets another fault and restarts the count (one server process
serves several cases).
"""

import asyncio
import os
import sys

from aiohttp import web

from branchgrpo.serve_reward.server import build_rewards, make_app, parse_args, serve


def faulty(mode: str, start: int, count: int, delay_s: float):
    now = {"mode": mode, "start": start, "count": count, "delay_s": delay_s, "seen": 0}

    @web.middleware
    async def fault(request, handler):
        if request.path == "/fault":
            now.update(await request.json(), seen=0)
            return web.json_response(now)
        if request.path != "/score":
            return await handler(request)
        now["seen"] += 1
        start, count, mode = now["start"], now["count"], now["mode"]
        if now["seen"] <= start or (count >= 0 and now["seen"] > start + count):
            return await handler(request)
        if mode == "die":
            os._exit(1)
        if mode == "error":
            return web.json_response({"error": "internal error"}, status=500)
        if mode == "garbage":
            return web.Response(text="<html>502 bad gateway</html>", content_type="text/html")
        await asyncio.sleep(now["delay_s"])
        return await handler(request)

    return fault


def main() -> None:
    mode, start, count, delay_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    args = parse_args(sys.argv[6:])
    app = make_app(build_rewards(args))
    app.middlewares.append(faulty(mode, start, count, delay_s))
    asyncio.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
