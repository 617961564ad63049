"""Test helpers for the RL rollout: a scripted SGLang-contract server and an args builder.

`FakeSGLang` serves ``POST /generate`` and ``POST /abort_request`` on 127.0.0.1 from a
background thread. Its "model" is a function of the prompt: ``responder(prompt_ids,
payload) -> FakeReply(text, ...)`` gives the full response text; one character is one token
(id ``RESPONSE_ID_BASE + ord(c)``, above the tiny tokenizer's vocabulary, so a continued
request can tell the prompt from what was already generated and emits only the rest).
``max_new_tokens`` truncates (finish ``length``); a reply with ``hang=True`` streams nothing
until ``/abort_request`` arrives and then returns the first ``partial`` characters with
finish ``abort``, like SGLang does for an aborted request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aiohttp import web

RESPONSE_ID_BASE = 100_000


@dataclass
class FakeReply:
    text: str
    hang: bool = False  # wait for /abort_request
    partial: int = 2  # characters produced before an abort
    delay_s: float = 0.0


def split_ids(input_ids: list[int]) -> tuple[list[int], str]:
    """(prompt ids, response text already generated) of a request."""
    prompt = [t for t in input_ids if t < RESPONSE_ID_BASE]
    done = "".join(chr(t - RESPONSE_ID_BASE) for t in input_ids if t >= RESPONSE_ID_BASE)
    return prompt, done


class FakeSGLang:
    def __init__(self, responder: Callable[[list[int], dict], FakeReply]):
        self.responder = responder
        self.requests: list[dict] = []
        self.aborts = 0
        self._abort_event: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _generate(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.requests.append(payload)
        params = payload.get("sampling_params", {})
        prompt_ids, done = split_ids(payload["input_ids"])
        reply = self.responder(prompt_ids, payload)
        if not reply.text.startswith(done):
            return web.json_response({"error": f"continuation {done!r} is not a prefix of {reply.text!r}"}, status=400)
        rest = reply.text[len(done) :]
        finish: dict = {"type": "stop", "matched": 151645}
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.hang:
            await self._abort_event.wait()
            rest, finish = rest[: reply.partial], {"type": "abort", "message": "Abort before prefill"}
        limit = int(params.get("max_new_tokens", 1 << 30))
        if len(rest) > limit:
            rest, finish = rest[:limit], {"type": "length", "length": limit}
        ids = [RESPONSE_ID_BASE + ord(c) for c in rest]
        meta = {
            "id": f"req-{len(self.requests)}",
            "finish_reason": finish,
            "prompt_tokens": len(payload["input_ids"]),
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "output_token_logprobs": [[-0.01 * (i + 1), t, None] for i, t in enumerate(ids)],
            "weight_version": "default",
        }
        return web.json_response({"text": rest, "output_ids": ids, "meta_info": meta})

    async def _abort(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert body.get("abort_all") is True, body
        self.aborts += 1
        self._abort_event.set()
        return web.json_response({})

    async def _start(self) -> None:
        self._abort_event = asyncio.Event()
        app = web.Application()
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/abort_request", self._abort)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def reset_abort(self) -> None:
        self._loop.call_soon_threadsafe(self._abort_event.clear)

    def __enter__(self) -> "FakeSGLang":
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def rl_parser() -> argparse.ArgumentParser:
    """The main parser's data/rollout/trainer groups plus the RL rollout's own group.

    Groups the main parser already carries (once they are wired in there) are not added twice.
    """
    from slime.rollout.config import add_rollout_rl_arguments
    from slime.utils.arguments import add_data_arguments, add_rollout_arguments, add_trainer_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_data_arguments(parser)
    add_rollout_arguments(parser)
    add_trainer_arguments(parser)
    if "--rollout-max-response-len" not in parser._option_string_actions:
        add_rollout_rl_arguments(parser)
    # Engine-side flags the rollout reads (owned by the engine group in the full parser).
    if "--sglang-router-ip" not in parser._option_string_actions:
        parser.add_argument("--sglang-router-ip", default=None)
        parser.add_argument("--sglang-router-port", type=int, default=None)
    return parser


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_args(
    prompt_data: str, url: str | None = None, *extra: str, tokenizer_dir: str | None = None
) -> argparse.Namespace:
    """Parsed RL args over ``prompt_data``; an ``extra`` item starting with ``--`` may hold several flags."""
    from conftest import TINY

    argv = ["--hf-checkpoint", tokenizer_dir or str(TINY), "--prompt-data", prompt_data]
    argv += "--input-key prompt --label-key label --rollout-batch-size 2 --rollout-max-response-len 64".split()
    for item in extra:
        argv += item.split() if item.startswith("--") else [item]
    if url:
        host, port = url.rsplit(":", 1)
        argv += ["--sglang-router-ip", host.split("//")[1], "--sglang-router-port", port]
    return rl_parser().parse_args(argv)
