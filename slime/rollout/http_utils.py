"""JSON over HTTP for the rollout (engine /generate, /abort_request, remote reward models).

One ``aiohttp.ClientSession`` serves a whole rollout: `session_scope` opens it and binds it
to a context variable, so every task the rollout spawns (including plugin code calling
`post_json`) reuses its connection pool. Outside a scope each call opens a short-lived
session, which keeps plugins unit-testable on their own. Transient failures (connection
refused/reset, 5xx) are retried with backoff; 4xx answers are the caller's bug and raise
at once with the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import Any

import aiohttp

__all__ = ["HTTPRequestError", "get_json", "post_json", "session_scope"]

logger = logging.getLogger(__name__)

_SESSION: contextvars.ContextVar[aiohttp.ClientSession | None] = contextvars.ContextVar(
    "slime_rollout_session", default=None
)

# Generation of long responses can take minutes; a hung server still surfaces eventually.
DEFAULT_TIMEOUT_S = 3600.0


class HTTPRequestError(RuntimeError):
    """A request that failed for good (after retries, or with a 4xx answer)."""


@contextlib.asynccontextmanager
async def session_scope(limit: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Open the rollout's shared session (``limit`` connections, 0 = unbounded) for the body."""
    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        token = _SESSION.set(session)
        try:
            yield session
        finally:
            _SESSION.reset(token)


@contextlib.asynccontextmanager
async def _session():
    session = _SESSION.get()
    if session is not None and not session.closed:
        yield session
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEFAULT_TIMEOUT_S)) as own:
        yield own


async def _request(method: str, url: str, payload: Any, retries: int, backoff_s: float) -> Any:
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            async with _session() as session:
                async with session.request(method, url, json=payload) as resp:
                    if resp.status >= 500:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, resp.history, status=resp.status, message=await resp.text()
                        )
                    if resp.status >= 400:
                        raise HTTPRequestError(f"{method} {url} -> HTTP {resp.status}: {(await resp.text())[:500]}")
                    return await resp.json(content_type=None)
        except (aiohttp.ClientConnectionError, aiohttp.ClientResponseError, asyncio.TimeoutError) as e:
            last = e
            if attempt == retries:
                break
            delay = min(backoff_s * 2**attempt, 10.0)
            logger.warning(
                "%s %s failed (%s: %s); retry %d/%d in %.1fs",
                method,
                url,
                type(e).__name__,
                e,
                attempt + 1,
                retries,
                delay,
            )
            await asyncio.sleep(delay)
    raise HTTPRequestError(
        f"{method} {url} failed after {retries + 1} attempts: {type(last).__name__}: {last}"
    ) from last


async def post_json(url: str, payload: Any, retries: int = 3, backoff_s: float = 0.5) -> Any:
    return await _request("POST", url, payload, retries, backoff_s)


async def get_json(url: str, retries: int = 0, backoff_s: float = 0.5) -> Any:
    return await _request("GET", url, None, retries, backoff_s)
