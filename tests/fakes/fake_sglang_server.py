"""A stand-in for ``python -m sglang.launch_server`` on machines without SGLang/CUDA (tests only).

It takes SGLang's command line (the flags slime sets, others recorded), serves our CPU engine's
SGLang-compatible routes and adds the SGLang control routes the engine actor uses:
``/update_weights_from_tensor`` (the same wire format: one base64 ForkingPickler payload per TP
rank, unpickled here as SGLang does), ``/release_memory_occupation`` and
``/resume_memory_occupation`` (generation is refused while released, as with SGLang's memory
saver the weights are gone), ``/get_weights_by_name`` and ``/fake_info`` (what it was started with).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import pickle
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--nccl-port", type=int)
    p.add_argument("--base-gpu-id", type=int, default=0)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--fail-at-start", action="store_true", help="exit at once (tests the launch error path)")
    return p.parse_known_args(argv)


def main(argv=None):
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    if args.fail_at_start:
        print("fake sglang: asked to fail at start", flush=True)
        raise SystemExit(3)
    from aiohttp import web  # heavy imports after the fast failure path

    from slime.engines.config import EngineConfig
    from slime.engines.cpu_engine import CpuEngine
    from slime.engines.http_server import build_app

    config = EngineConfig(
        model_path=args.model_path, kind="cpu", seed=args.random_seed, host=args.host, port=args.port, num_threads=1
    )
    engine = CpuEngine(config)
    state = {"released": False, "generate_calls": 0, "updates": 0}

    @web.middleware
    async def gate(request, handler):
        # SGLang's memory routes, as SGLang has them (they need --enable-memory-saver), in place
        # of the CPU engine's own (which also refuse generating on resumed, unfilled weights).
        if request.path == "/release_memory_occupation":
            return await release(request)
        if request.path == "/resume_memory_occupation":
            return await resume(request)
        if request.path == "/generate":
            state["generate_calls"] += 1
            if state["released"]:
                return web.json_response({"error": {"message": "memory released"}}, status=503)
        return await handler(request)

    app = build_app(engine, config)
    app.middlewares.append(gate)

    async def update_from_tensor(request):
        body = await request.json()
        entries = body.get("serialized_named_tensors") or []
        if len(entries) != args.tp_size:
            return web.json_response(
                {"success": False, "message": f"{len(entries)} payloads for tp {args.tp_size}"}, status=400
            )
        per_rank = [pickle.load(io.BytesIO(base64.b64decode(e))) for e in entries]  # what each TP rank unpickles
        first = per_rank[0]
        for other in per_rank[1:]:
            if [n for n, _ in other] != [n for n, _ in first] or not all(
                a.equal(b) for (_, a), (_, b) in zip(first, other)
            ):
                return web.json_response({"success": False, "message": "TP ranks got different tensors"}, status=400)
        named = [(n, t.clone()) for n, t in first]
        del per_rank, first
        try:
            engine.update_weights(
                named, weight_version=body.get("weight_version"), flush_cache=bool(body.get("flush_cache", True))
            )
        except (KeyError, ValueError, TypeError) as e:
            return web.json_response({"success": False, "message": str(e)}, status=400)
        state["updates"] += 1
        return web.json_response({"success": True, "message": f"updated {len(named)} tensors"})

    async def release(request):
        if not args.enable_memory_saver:
            return web.json_response(
                {"error": {"message": "release_memory_occupation needs --enable-memory-saver"}}, status=400
            )
        state["released"] = True
        return web.json_response({"success": True})

    async def resume(request):
        state["released"] = False
        return web.json_response({"success": True})

    async def weights_by_name(request):
        body = await request.json()
        tensor = dict(engine.model.named_parameters())[body["name"]]
        return web.json_response(tensor.detach().flatten()[: int(body.get("truncate_size", 100))].tolist())

    async def info(request):
        return web.json_response(
            {
                "args": vars(args),
                "extra": extra,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                **state,
            }
        )

    app.router.add_post("/update_weights_from_tensor", update_from_tensor)
    app.router.add_post("/get_weights_by_name", weights_by_name)
    app.router.add_get("/fake_info", info)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
