"""`CpuEngine`: continuous-batching generation over a HF causal LM, with SGLang's result format.

One background thread owns the model. Each step it (1) settles aborts, (2) admits waiting
requests up to ``max_running_requests`` (at most ``max_prefill_per_step`` per step): each
is prefilled alone (or taken from the prefix cache), samples its first token and joins the
batch's left-padded KV cache, and (3) runs one decode forward for the whole batch, after
which finished requests leave. Requests arriving meanwhile join at the next step.

Results are SGLang ``/generate`` dicts (``text``, ``output_ids``, ``meta_info`` with
``finish_reason``, token counts, ``weight_version`` and, with ``return_logprob``,
``output_token_logprobs`` as ``[logprob, token_id, None]``). See `slime.engines.sampling` for
what the log-probs are. Weights change in place between steps (`update_weights`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterable

from slime.engines.config import EngineConfig
from slime.engines.kv_cache import BatchKV, cache_layers
from slime.engines.memory import ReleasableParameters, parse_memory_tags
from slime.engines.sampling import SamplingParams, log_probs, sample_next

logger = logging.getLogger(__name__)

__all__ = ["CpuEngine", "EngineError"]


class EngineError(RuntimeError):
    """The engine is stopped or its loop died; the message says why."""


@dataclass
class _Request:
    rid: str
    seq: int  # arrival index: orders abort_all and seeds requests without sampling_seed
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_new_tokens, clamped to the context length
    return_logprob: bool
    logprob_start_len: int
    generator: object
    future: Future
    arrived: float
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    input_logprobs: list | None = None
    cached_tokens: int = 0


def _seed(engine_seed: int, seq: int) -> int:
    # SplitMix-style mix so nearby (seed, index) pairs give unrelated streams.
    x = (engine_seed * 0x9E3779B97F4A7C15 + seq + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def _future_for(rid: str) -> Future:
    future = Future()
    future.rid = rid  # lets a caller that gives up abort the request
    return future


def _fail(future: Future, error: Exception) -> None:
    if not future.done():  # a caller may have cancelled it
        future.set_exception(error)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(int(i) for i in ids)


def _check_attention(config, path: str) -> None:
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or (getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)):
        raise NotImplementedError(f"{path}: the CPU engine supports full attention only (layer types {sorted(types)})")


class CpuEngine:
    """Generation engine for one HF model; thread-safe `submit`/`generate`/`abort`/`update_weights`."""

    def __init__(self, config: EngineConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--cpu-engine-device cuda: CUDA is not available")
        self.device = torch.device("cuda" if use_cuda else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=getattr(torch, config.dtype), trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"--hf-checkpoint {config.model_path!r}: cannot load a HF causal LM: {e}") from e
        _check_attention(model.config, config.model_path)
        self.model = model.to(self.device).eval()
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.context_length = config.context_length or int(getattr(self.model.config, "max_position_embeddings", 1 << 20))
        self.weight_version = "default"
        self.num_weight_updates = 0
        self.stats = {"generated_tokens": 0, "decode_steps": 0, "decode_rows": 0, "prefills": 0, "prefix_hits": 0}

        self._step_lock = threading.RLock()  # the model and the batch: held for one step or one weight update
        self._cond = threading.Condition()  # the waiting queue and abort requests
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._next_tokens: list[int] = []  # per running row: sampled, not yet in the cache
        self._kv = BatchKV(self.device)
        self._prefix: OrderedDict[tuple, tuple] = OrderedDict()
        self._prefix_tokens = 0
        self._abort_rids: set[str] = set()
        self._abort_below = -1  # abort_all: every request with seq below this
        self._seq = itertools.count()
        self._tok_lock = threading.Lock()  # HF tokenizers are not guaranteed thread-safe
        self._stopping = False
        self._error: BaseException | None = None
        # --colocate (slime.engines.memory): what is released, and weights given back but not refilled.
        self._params = ReleasableParameters(self.model)
        self._released: set[str] = set()
        self._weights_stale = False
        self._thread = threading.Thread(target=self._loop, name="cpu-engine", daemon=True)
        self._thread.start()
        logger.info(
            "CPU engine: %s on %s (%s), eos %s, context %d, max running %d",
            config.model_path, self.device, config.dtype, sorted(self.eos_ids), self.context_length, config.max_running_requests,
        )

    # ---- public API -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._stopping and self._thread.is_alive()

    def submit(
        self,
        input_ids: list[int] | None = None,
        text: str | None = None,
        sampling_params: dict | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        rid: str | None = None,
    ) -> Future:
        """Queue one request; the future (``.rid`` is its id) resolves to its SGLang-format result dict.

        Bad input raises ValueError here, naming the field.
        """
        import torch

        if (input_ids is None) == (text is None):
            raise ValueError("give exactly one of 'text' and 'input_ids'")
        if text is not None:
            if not isinstance(text, str):
                raise ValueError(f"'text' must be a string, got {type(text).__name__}")
            with self._tok_lock:
                input_ids = self.tokenizer.encode(text)
        if not isinstance(input_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            raise ValueError("'input_ids' must be a list of token ids (int)")
        if not input_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"'input_ids' has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(input_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(input_ids)} tokens; the context length is {self.context_length}")
        if not isinstance(logprob_start_len, int) or logprob_start_len < -1 or logprob_start_len >= len(input_ids):
            raise ValueError(f"'logprob_start_len' must be -1 or in [0, {len(input_ids)}), got {logprob_start_len!r}")
        params = SamplingParams.from_request(sampling_params)
        seq = next(self._seq)
        seed = params.sampling_seed if params.sampling_seed is not None else _seed(self.config.seed, seq)
        rid = rid or uuid.uuid4().hex
        req = _Request(
            rid=rid,
            seq=seq,
            prompt=list(input_ids),
            params=params,
            max_new=min(params.max_new_tokens, self.context_length - len(input_ids)),
            return_logprob=bool(return_logprob),
            logprob_start_len=logprob_start_len,
            generator=torch.Generator().manual_seed(seed),
            future=_future_for(rid),
            arrived=time.perf_counter(),
        )
        with self._cond:
            # Checked under the lock the loop drains the queue with, so no request is left behind.
            if self._error is not None or self._stopping:
                raise EngineError(f"the engine is not running: {self._error or 'shut down'}")
            self._check_memory("generate")
            self._waiting.append(req)
            self._cond.notify()
        return req.future

    def generate(self, timeout: float | None = None, **kwargs) -> dict:
        """Blocking `submit`: the result dict."""
        return self.submit(**kwargs).result(timeout)

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Finish ``rid`` (or every request so far) with finish_reason abort and its partial output."""
        with self._cond:
            if abort_all:
                self._abort_below = next(self._seq)
            elif rid:
                self._abort_rids.add(rid)
            self._cond.notify()

    def flush_cache(self) -> None:
        """Drop the prefix cache (running requests keep their own KV)."""
        with self._step_lock:
            self._prefix.clear()
            self._prefix_tokens = 0

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, object]],
        weight_version: str | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
    ) -> str:
        """Copy HF-named tensors (all, or one bucket) into the model between two steps; returns the version.

        Running requests continue on the new weights unless ``abort_all_requests``. The version
        becomes ``weight_version`` when given (pass the same one with every bucket), else the
        update count.
        """
        from slime.engines.weights import apply_named_tensors

        if abort_all_requests:
            self.abort(abort_all=True)
        with self._step_lock:
            if self._params.released:
                raise EngineError("update_weights: the weights' memory is released; resume_memory_occupation(['weights']) first")
            n = apply_named_tensors(self.model, named_tensors)
            if flush_cache:  # the last bucket of a sync: the weights are whole again
                self.flush_cache()
                self._weights_stale = False
            self.num_weight_updates += 1
            self.weight_version = str(weight_version) if weight_version is not None else str(self.num_weight_updates)
        logger.info("weights updated: %d tensors, weight_version %s", n, self.weight_version)
        return self.weight_version

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None, **kwargs) -> str:
        """`update_weights` with every tensor of the HF checkpoint dir ``model_path`` (one bucket)."""
        from slime.engines.weights import iter_hf_tensors

        return self.update_weights(list(iter_hf_tensors(model_path)), weight_version=weight_version, **kwargs)

    # ---- --colocate: memory given to the trainer (slime.engines.memory) ------------------
    def release_memory_occupation(self, tags: list[str] | None = None) -> dict:
        """Free ``tags``' memory (None: weights and KV cache); the engine must be idle.
        Returns ``{"released": [...], "bytes": n}`` (parameter bytes freed now)."""
        tags = parse_memory_tags(tags)
        with self._cond:
            busy = len(self._waiting) + len(self._running)
            if busy:
                raise EngineError(f"release_memory_occupation: {busy} request(s) still queued or running; abort or finish them first")
            self._released.update(tags)  # from here on submit refuses, so the engine stays idle
        freed = 0
        with self._step_lock:
            if "kv_cache" in tags:
                self.flush_cache()
                self._kv = BatchKV(self.device)
            if "weights" in tags:
                freed = self._params.release()
        logger.info("released %s (%.1f MiB of weights)", list(tags), freed / 2**20)
        return {"released": sorted(self._released), "bytes": freed}

    def resume_memory_occupation(self, tags: list[str] | None = None) -> dict:
        """Take ``tags``' memory back (None: all). Resumed weights hold no values: the engine
        generates again after the next full weight update."""
        tags = parse_memory_tags(tags)
        with self._step_lock:
            restored = self._params.restore() if "weights" in tags else 0
            if restored:
                self._weights_stale = True
            with self._cond:
                self._released.difference_update(tags)
        return {"released": sorted(self._released), "bytes": restored}

    def _check_memory(self, what: str) -> None:
        if self._released:
            raise EngineError(f"{what}: the engine's memory is released ({sorted(self._released)}); resume_memory_occupation first")
        if self._weights_stale:
            raise EngineError(f"{what}: the weights were released and resumed but not updated since; push weights first")

    def load(self) -> dict:
        """Queue lengths and counters (for /get_server_info and benchmarks)."""
        with self._cond:
            waiting = len(self._waiting)
        return dict(
            self.stats, num_running=len(self._running), num_waiting=waiting, weight_version=self.weight_version,
            memory_released=sorted(self._released), weights_stale=self._weights_stale,
        )  # fmt: skip

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still queued or running finish with abort."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._running):
                        self._cond.wait()
                    if self._stopping:
                        break
                with self._step_lock, torch.inference_mode():
                    self._step()
        except BaseException as e:  # the loop must not die silently: fail every caller with the cause
            logger.exception("CPU engine loop failed")
            with self._cond:
                self._error = e
        with self._cond:
            pending, self._waiting = list(self._waiting) + self._running, deque()
        self._running, self._next_tokens, self._kv = [], [], BatchKV(self.device)
        for req in pending:
            if self._error is not None:
                _fail(req.future, EngineError(f"the CPU engine failed: {self._error!r}"))
            else:
                self._resolve(req, self._abort_reason("the engine shut down"))

    @staticmethod
    def _abort_reason(message: str) -> dict:
        return {"type": "abort", "message": message, "status_code": None, "err_type": None}

    def _step(self) -> None:
        self._settle_aborts()
        admitted = 0
        while admitted < self.config.max_prefill_per_step and len(self._running) < self.config.max_running_requests:
            with self._cond:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            admitted += 1
            try:
                self._prefill(req)
            except BaseException as e:  # neither queued nor running any more: fail it here
                _fail(req.future, EngineError(f"prefill failed: {e!r}"))
                raise
        if self._running:
            self._decode()

    def _settle_aborts(self) -> None:
        with self._cond:
            rids, below = self._abort_rids, self._abort_below
            self._abort_rids = set()
            hit = lambda r: r.rid in rids or r.seq < below  # noqa: E731
            waiting = [r for r in self._waiting if hit(r)]
            self._waiting = deque(r for r in self._waiting if not hit(r))
        for req in waiting:
            self._resolve(req, self._abort_reason("aborted while waiting"))
        keep = [i for i, r in enumerate(self._running) if not hit(r)]
        if len(keep) < len(self._running):
            for req in filter(hit, self._running):
                self._resolve(req, self._abort_reason("aborted while running"))
            self._keep_rows(keep)

    def _keep_rows(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        self._next_tokens = [self._next_tokens[i] for i in rows]
        self._kv.keep(rows)

    def _prefill(self, req: _Request) -> None:
        self.stats["prefills"] += 1
        key = tuple(req.prompt)
        want_input = req.return_logprob and req.logprob_start_len >= 0
        hit = None if want_input else self._prefix.get(key)
        if hit is not None:
            self._prefix.move_to_end(key)
            layers, last_logits = hit
            req.cached_tokens = len(req.prompt)
            self.stats["prefix_hits"] += 1
        else:
            import torch

            ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=0 if want_input else 1)
            # clone: a view would keep the whole [L, V] logits alive in the prefix cache
            layers, last_logits = cache_layers(out.past_key_values), out.logits[0, -1].clone()
            if want_input:
                req.input_logprobs = self._input_logprobs(req, out.logits[0])
            self._remember(key, layers, last_logits)
        if req.max_new == 0:
            self._resolve(req, {"type": "length", "length": 0})
            return
        token = self._sample([req], last_logits.unsqueeze(0))[0]
        if self._finished(req, token) is None:
            self._kv.add(layers, len(req.prompt))
            self._running.append(req)
            self._next_tokens.append(token)

    def _input_logprobs(self, req: _Request, logits) -> list:
        lp = log_probs(logits[:-1], [req.params] * (len(req.prompt) - 1), self.config.return_original_logprob)
        out = []
        for i in range(req.logprob_start_len, len(req.prompt)):
            value = None if i == 0 else float(lp[i - 1, req.prompt[i]])
            out.append([value, req.prompt[i], None])
        return out

    def _remember(self, key: tuple, layers, last_logits) -> None:
        budget = self.config.prefix_cache_tokens
        if len(key) > budget:
            return
        while self._prefix and self._prefix_tokens + len(key) > budget:
            old, _ = self._prefix.popitem(last=False)
            self._prefix_tokens -= len(old)
        if key not in self._prefix:
            self._prefix[key] = (layers, last_logits)
            self._prefix_tokens += len(key)

    def _decode(self) -> None:
        inputs = self._kv.step_inputs(self._next_tokens)
        out = self.model(**inputs, use_cache=True)
        self._kv.advanced(inputs["attention_mask"])
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(self._running)
        tokens = self._sample(self._running, out.logits[:, -1, :])
        keep = []
        for i, (req, token) in enumerate(zip(self._running, tokens)):
            if self._finished(req, token) is None:
                keep.append(i)
        self._next_tokens = tokens
        self._keep_rows(keep)

    def _sample(self, reqs: list[_Request], logits) -> list[int]:
        """Sample one token per request from ``logits`` [B, V] and record it (and its log-prob)."""
        params = [r.params for r in reqs]
        tokens = sample_next(logits, params, [r.generator for r in reqs])
        if any(r.return_logprob for r in reqs):
            lp = log_probs(logits, params, self.config.return_original_logprob)
            values = lp[list(range(len(reqs))), tokens].tolist()
        else:
            values = [None] * len(reqs)
        for req, token, value in zip(reqs, tokens, values):
            req.output.append(token)
            if req.return_logprob:
                req.logprobs.append(value)
        self.stats["generated_tokens"] += len(reqs)
        return tokens

    def _finished(self, req: _Request, token: int) -> dict | None:
        """SGLang's order: length first, then EOS / stop token ids, then stop strings. Resolves when done."""
        params = req.params
        reason = None
        if len(req.output) >= req.max_new:
            reason = {"type": "length", "length": req.max_new}
        elif (not params.ignore_eos and token in self.eos_ids) or token in params.stop_token_ids:
            reason = {"type": "stop", "matched": token}
        elif params.stop:
            text = self._decode_text(req.output, params)
            reason = next(({"type": "stop", "matched": s} for s in params.stop if s in text), None)
        if reason is not None:
            self._resolve(req, reason)
        return reason

    def _decode_text(self, ids: list[int], params: SamplingParams) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(
                ids, skip_special_tokens=params.skip_special_tokens, spaces_between_special_tokens=params.spaces_between_special_tokens
            )

    def _resolve(self, req: _Request, finish: dict) -> None:
        matched = finish.get("matched")
        ids = req.output
        if isinstance(matched, int) and not req.params.no_stop_trim:
            ids = ids[:-1]  # the stop token leaves the text (it stays in output_ids)
        text = self._decode_text(ids, req.params)
        if isinstance(matched, str):
            pos = text.find(matched)
            if pos >= 0:
                text = text[: pos + len(matched)] if req.params.no_stop_trim else text[:pos]
        meta = {
            "id": req.rid,
            "finish_reason": finish,
            "prompt_tokens": len(req.prompt),
            "weight_version": self.weight_version,
            "completion_tokens": len(req.output),
            "cached_tokens": req.cached_tokens,
            "e2e_latency": time.perf_counter() - req.arrived,
        }
        if req.return_logprob:
            meta["input_token_logprobs"] = req.input_logprobs or []
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(req.logprobs, req.output)]
        if not req.future.done():
            req.future.set_result({"text": text, "output_ids": list(req.output), "meta_info": meta})
