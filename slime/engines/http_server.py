"""The CPU engine behind SGLang's native HTTP API (aiohttp, its own thread and event loop).

Routes, with SGLang's request and response shapes:

    POST /generate                  {"text" | "input_ids", "sampling_params", "return_logprob",
                                     "logprob_start_len", "rid", "stream": false}; lists batch
    GET  /health, /health_generate  200 when the engine runs (health_generate: one real token)
    GET  /get_model_info, /get_server_info, /get_weight_version
    GET|POST /flush_cache           drop the prefix cache
    POST /abort_request             {"rid": ..., "abort_all": bool} -> finish_reason abort
    POST /update_weights_from_disk  {"model_path", "weight_version", "abort_all_requests", "flush_cache"}
    POST /update_weight_version     {"new_version"}

Errors are ``{"error": {"message": ...}}`` with status 400, as SGLang answers them.
`launch_server(config)` starts a server (bound to 127.0.0.1 by default) and returns its URL;
`shutdown_server(url)` stops it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

from slime.engines.config import EngineConfig

logger = logging.getLogger(__name__)

__all__ = ["EngineServer", "build_app", "launch_server", "shutdown_server"]

_SERVERS: dict[str, "EngineServer"] = {}


def _error(message: str, status: int = 400):
    from aiohttp import web

    return web.json_response({"error": {"message": message}}, status=status)


def _per_item(value, n: int, name: str) -> list:
    """A batch field: one value for all prompts, or a list of exactly one per prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"'{name}' has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


def _split_batch(body: dict) -> tuple[list[dict], bool]:
    """The per-prompt submit kwargs of a /generate body, and whether it was a batch."""
    if body.get("stream"):
        raise ValueError("'stream': true is not supported by the CPU engine")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise ValueError("give exactly one of 'text' and 'input_ids'")
    batched = isinstance(text, list) or (isinstance(ids, list) and bool(ids) and isinstance(ids[0], list))
    prompts = (text if text is not None else ids) if batched else [text if text is not None else ids]
    key = "text" if text is not None else "input_ids"
    n = len(prompts)
    if n == 0:
        raise ValueError(f"'{key}' is an empty batch")
    rid = body.get("rid")
    if batched and rid is not None and not isinstance(rid, list):
        raise ValueError("'rid' of a batch must be a list with one id per prompt")
    fields = {
        "sampling_params": _per_item(body.get("sampling_params") or {}, n, "sampling_params"),
        "return_logprob": [bool(v) for v in _per_item(body.get("return_logprob", False), n, "return_logprob")],
        "logprob_start_len": _per_item(body.get("logprob_start_len", -1), n, "logprob_start_len"),
        "rid": _per_item(rid, n, "rid") if batched else [rid],
    }
    return [{key: p, **{k: v[i] for k, v in fields.items()}} for i, p in enumerate(prompts)], batched


def build_app(engine, config: EngineConfig):
    """The aiohttp application serving ``engine`` (a `CpuEngine`)."""
    from aiohttp import web

    from slime.engines.cpu_engine import EngineError

    routes = web.RouteTableDef()

    async def _json(request) -> dict:
        try:
            body = await request.json()
        except ValueError as e:
            raise ValueError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body

    async def _blocking(fn, *args, **kwargs):
        # Weight loads and cache flushes wait for the engine's step lock: keep them off the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))

    @routes.post("/generate")
    async def generate(request):
        futures = []
        try:
            items, batched = _split_batch(await _json(request))
            for item in items:
                futures.append(engine.submit(**item))
        except (ValueError, EngineError) as e:
            for f in futures:  # a bad prompt later in a batch: drop the ones already queued
                engine.abort(rid=f.rid)
            return _error(str(e), status=400 if isinstance(e, ValueError) else 503)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except asyncio.CancelledError:  # the client went away: stop spending compute on it
            for f in futures:
                if f.cancelled() or not f.done():  # asyncio's cancel already reached some of them
                    engine.abort(rid=f.rid)
            raise
        except Exception as e:  # noqa: BLE001 - engine failure: report it to the client
            return _error(f"generation failed: {e}", status=500)
        return web.json_response(results if batched else results[0])

    @routes.get("/health")
    async def health(request):
        return web.Response(status=200 if engine.healthy else 503)

    @routes.get("/health_generate")
    async def health_generate(request):
        try:
            future = engine.submit(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
            await asyncio.wait_for(asyncio.wrap_future(future), timeout=60)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            return web.Response(status=503, text=str(e))
        return web.Response(status=200)

    @routes.get("/get_model_info")
    async def model_info(request):
        hf = engine.model.config
        return web.json_response(
            {
                "model_path": config.model_path,
                "tokenizer_path": config.model_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": engine.weight_version,
                "model_type": getattr(hf, "model_type", None),
                "architectures": getattr(hf, "architectures", None),
            }
        )

    @routes.get("/get_server_info")
    async def server_info(request):
        return web.json_response(dict(dataclasses.asdict(config), engine="cpu", **engine.load()))

    @routes.get("/get_weight_version")
    async def weight_version(request):
        return web.json_response({"weight_version": engine.weight_version})

    @routes.route("*", "/flush_cache")
    async def flush_cache(request):
        if request.method not in ("GET", "POST"):
            return web.Response(status=405)
        await _blocking(engine.flush_cache)
        return web.Response(text="Cache flushed.\n")

    @routes.post("/abort_request")
    async def abort_request(request):
        try:
            body = await _json(request)
        except ValueError as e:
            return _error(str(e))
        engine.abort(rid=body.get("rid") or None, abort_all=bool(body.get("abort_all", False)))
        return web.Response(status=200)

    @routes.post("/update_weights_from_disk")
    async def update_weights_from_disk(request):
        try:
            body = await _json(request)
            if not body.get("model_path"):
                raise ValueError("'model_path' is required")
            if body.get("load_format") not in (None, "auto"):
                raise ValueError(f"load_format {body['load_format']!r} is not supported (HF safetensors / .bin dirs only)")
            version = await _blocking(
                engine.update_weights_from_disk,
                body["model_path"],
                weight_version=body.get("weight_version"),
                flush_cache=bool(body.get("flush_cache", True)),
                abort_all_requests=bool(body.get("abort_all_requests", False)),
            )
        except (ValueError, KeyError, TypeError, OSError) as e:
            return web.json_response({"success": False, "message": str(e), "num_paused_requests": 0}, status=400)
        message = f"Succeeded to update model weights from {body['model_path']} (weight_version {version})."
        return web.json_response({"success": True, "message": message, "num_paused_requests": 0})

    @routes.post("/update_weight_version")
    async def update_weight_version(request):
        try:
            body = await _json(request)
            if body.get("new_version") is None:
                raise ValueError("'new_version' is required")
        except ValueError as e:
            return _error(str(e))
        if body.get("abort_all_requests"):
            engine.abort(abort_all=True)
        engine.weight_version = str(body["new_version"])
        return web.json_response({"success": True, "message": f"weight_version set to {engine.weight_version}"})

    def _memory_route(method):
        # SGLang's body: {"tags": ["weights", "kv_cache"]} (absent: all); answers with what is released.
        async def handler(request):
            try:
                body = await _json(request) if request.can_read_body else {}
                return web.json_response(await _blocking(method, body.get("tags")))
            except ValueError as e:
                return _error(str(e))
            except EngineError as e:  # busy (requests running) or a weight update missing
                return _error(str(e), status=409)

        return handler

    routes.post("/release_memory_occupation")(_memory_route(engine.release_memory_occupation))
    routes.post("/resume_memory_occupation")(_memory_route(engine.resume_memory_occupation))

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.add_routes(routes)
    return app


class EngineServer:
    """A `CpuEngine` and its HTTP server on a background thread; `start` returns the URL."""

    def __init__(self, config: EngineConfig, engine=None):
        self.config = config
        self.engine = engine
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 120.0, advertise_host: str | None = None) -> str:
        from slime.engines.cpu_engine import CpuEngine

        if self.engine is None:
            self.engine = CpuEngine(self.config)
        ready, failure = threading.Event(), []
        self._thread = threading.Thread(target=self._serve, args=(ready, failure), name="cpu-engine-http", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the CPU engine's HTTP server did not start within {timeout:.0f} s")
        if failure:
            self.engine.shutdown()
            raise failure[0]
        host = advertise_host or ("127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host)
        self.url = f"http://{host}:{self.port}"
        logger.info("CPU engine serving %s at %s", self.config.model_path, self.url)
        return self.url

    def _serve(self, ready: threading.Event, failure: list) -> None:
        from aiohttp import web

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            # handler_cancellation: a client that hangs up cancels its handler, which aborts its requests.
            app = build_app(self.engine, self.config)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, handler_cancellation=True)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.config.host, self.config.port)
            loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as e:  # reported to start()'s caller
            failure.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish in-flight requests with abort, close the server, stop the engine."""
        if self.engine is not None:
            self.engine.shutdown(timeout)
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        _SERVERS.pop(self.url, None)


def launch_server(config: EngineConfig, timeout: float = 120.0) -> str:
    """Start a CPU engine server for ``config`` in this process; its URL (stop it with `shutdown_server`)."""
    server = EngineServer(config)
    url = server.start(timeout)
    _SERVERS[url] = server
    return url


def shutdown_server(url: str) -> None:
    """Stop the server `launch_server` started at ``url``."""
    server = _SERVERS.get(url)
    if server is None:
        raise KeyError(f"no CPU engine server of this process at {url}")
    server.stop()


def get_server(url: str) -> EngineServer:
    """The `EngineServer` at ``url`` (its ``.engine`` takes in-process weight updates)."""
    return _SERVERS[url]
