"""sglang-router in front of the SGLang engines: one URL for the rollout, load spread over engines.

Two ways, as in slime:
* we start it: `launch_router(worker_urls)` runs ``python -m sglang_router.launch_router`` with
  every engine URL on its command line (``--worker-urls``, stable across router versions),
  waits for its ``/health`` and returns a `Router` (``url``, ``shutdown()``);
* it exists (``--sglang-router-ip/--sglang-router-port``): `register_workers(url, worker_urls)`
  adds our engines to it (``POST /workers``, or ``/add_worker?url=`` on older routers) and
  `unregister_workers` removes them at shutdown.

``SLIME_SGLANG_ROUTER_COMMAND`` (shell-quoted) replaces ``python -m sglang_router.launch_router``.
The router binds 127.0.0.1 unless the engines live on several nodes (then the node's address).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import urllib.parse
from dataclasses import dataclass

from slime.engines.server_process import HTTPCallError, ServerProcess, free_port, http_call, url_for

logger = logging.getLogger(__name__)

__all__ = ["Router", "launch_router", "register_workers", "router_command", "unregister_workers"]

ROUTER_ENV = "SLIME_SGLANG_ROUTER_COMMAND"
POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


def router_command() -> list[str]:
    custom = os.environ.get(ROUTER_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "sglang_router.launch_router"]


@dataclass
class Router:
    """A router we started (``process`` set) or one that exists (``process`` None)."""

    url: str
    worker_urls: list
    process: ServerProcess | None = None

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        else:  # someone else's router: leave it running without our engines
            unregister_workers(self.url, self.worker_urls)


def launch_router(
    worker_urls: list[str],
    host: str = "127.0.0.1",
    port: int | None = None,
    policy: str = "cache_aware",
    timeout: float = 300.0,
) -> Router:
    """Start a router over ``worker_urls``; returns once it answers ``/health``."""
    if not worker_urls:
        raise ValueError("a router needs at least one engine URL")
    if policy not in POLICIES:
        raise ValueError(f"router policy must be one of {POLICIES}, got {policy!r}")
    port = port or free_port(host)
    argv = router_command() + ["--host", host, "--port", str(port), "--policy", policy, "--worker-urls", *worker_urls]
    process = ServerProcess("sglang-router", argv)
    url = url_for(host, port)
    process.wait_healthy(url + "/health", timeout=timeout)
    logger.info("sglang-router at %s over %d engines (%s)", url, len(worker_urls), policy)
    return Router(url=url, worker_urls=list(worker_urls), process=process)


def register_workers(router_url: str, worker_urls: list[str]) -> Router:
    """Add ``worker_urls`` to an existing router."""
    for worker in worker_urls:
        try:
            http_call("POST", router_url + "/workers", {"url": worker}, timeout=60)
        except HTTPCallError as e:
            if e.status not in (404, 405):
                raise RuntimeError(
                    f"--sglang-router-ip/--sglang-router-port: could not add engine {worker} to {router_url}: {e}"
                ) from None
            # Routers before the /workers API take the URL as a query parameter.
            http_call("POST", f"{router_url}/add_worker?url={urllib.parse.quote(worker, safe='')}", None, timeout=60)
        logger.info("engine %s added to the router at %s", worker, router_url)
    return Router(url=router_url, worker_urls=list(worker_urls))


def unregister_workers(router_url: str, worker_urls: list[str]) -> None:
    """Remove ``worker_urls`` from a router we do not own; failures are logged, not raised."""
    for worker in worker_urls:
        try:
            http_call("POST", f"{router_url}/remove_worker?url={urllib.parse.quote(worker, safe='')}", None, timeout=30)
        except HTTPCallError as e:
            logger.warning("could not remove engine %s from the router at %s: %s", worker, router_url, e)
