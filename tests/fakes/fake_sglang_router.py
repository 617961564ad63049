"""A stand-in for ``python -m sglang_router.launch_router`` (tests only): round-robin over workers.

Takes the router's flags (``--host --port --policy --worker-urls ...``), forwards ``/generate``
to the workers in turn, answers ``/health`` and keeps the worker list (``GET/POST /workers``,
``POST /remove_worker?url=``).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import aiohttp
from aiohttp import web


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--worker-urls", nargs="*", default=[])
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    workers = list(args.worker_urls)
    turn = itertools.count()

    async def generate(request):
        if not workers:
            return web.json_response({"error": {"message": "no workers"}}, status=503)
        target = workers[next(turn) % len(workers)]
        async with (
            aiohttp.ClientSession() as s,
            s.post(target + "/generate", data=await request.read(), headers={"Content-Type": "application/json"}) as r,
        ):
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    async def health(request):
        return web.Response(text="ok")

    async def list_workers(request):
        return web.json_response({"workers": [{"url": u} for u in workers], "policy": args.policy})

    async def add_worker(request):
        workers.append((await request.json())["url"])
        return web.json_response({"status": "accepted"})

    async def remove_worker(request):
        url = request.query.get("url")
        if url in workers:
            workers.remove(url)
        return web.json_response({"status": "removed"})

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/workers", list_workers)
    app.router.add_post("/workers", add_worker)
    app.router.add_post("/remove_worker", remove_worker)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
