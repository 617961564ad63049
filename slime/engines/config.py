"""`EngineConfig`: the rollout-engine flags as one typed, checked group, and the engine choice.

``--rollout-engine auto`` picks SGLang where it can run (importable and CUDA present) and our
CPU engine everywhere else, and logs which and why. The CPU engine's own knobs are the
``--cpu-engine-*`` flags; the model comes from ``--hf-checkpoint``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["ENGINE_KINDS", "EngineConfig", "add_cpu_engine_arguments", "resolve_engine_kind"]

ENGINE_KINDS = ("auto", "sglang", "cpu")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one CPU engine server needs.

    model_path: HF model directory (``--hf-checkpoint``): config, weights, tokenizer.
    kind: ``--rollout-engine`` as given (``auto``/``sglang``/``cpu``); see `resolve_engine_kind`.
    max_running_requests: requests decoded together in one batch; later ones wait in a queue.
    max_prefill_per_step: new requests admitted (prefilled) between two decode steps, so a burst
        of arrivals cannot stall the requests already decoding for long.
    prefix_cache_tokens: prompt tokens whose KV the engine keeps to skip the prefill of a repeated
        prompt (the n samples of one RL prompt); 0 disables it.
    device / dtype: where and in which precision the model runs (fp32 on CPU by default).
    num_threads: torch intra-op threads of the engine process (None: leave torch's default).
    seed: seed of requests that carry no ``sampling_seed`` (combined with their arrival index).
    context_length: longest prompt + output (None: the model's ``max_position_embeddings``).
    return_original_logprob: log-probs of the raw logits instead of logits / temperature (what
        SGLang gives with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``).
    host / port: where the HTTP server listens; port 0 picks a free one.
    """

    model_path: str
    kind: str = "auto"
    max_running_requests: int = 32
    max_prefill_per_step: int = 8
    prefix_cache_tokens: int = 16384
    device: str = "auto"
    dtype: str = "float32"
    num_threads: int | None = None
    seed: int = 42
    context_length: int | None = None
    return_original_logprob: bool = False
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--hf-checkpoint is required for the rollout engine (a HF model directory)")
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"--rollout-engine must be one of {ENGINE_KINDS}, got {self.kind!r}")
        for flag, value in (
            ("--cpu-engine-max-running-requests", self.max_running_requests),
            ("--cpu-engine-max-prefill-per-step", self.max_prefill_per_step),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"--cpu-engine-prefix-cache-tokens must be >= 0, got {self.prefix_cache_tokens}")
        if self.device not in DEVICES:
            raise ValueError(f"--cpu-engine-device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--cpu-engine-dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"--cpu-engine-num-threads must be >= 1, got {self.num_threads}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"--cpu-engine-context-length must be >= 2, got {self.context_length}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--cpu-engine-port must be in [0, 65535], got {self.port}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineConfig":
        seed = args.cpu_engine_seed if args.cpu_engine_seed is not None else getattr(args, "rollout_seed", 42)
        return cls(
            model_path=getattr(args, "hf_checkpoint", None),
            kind=args.rollout_engine,
            max_running_requests=args.cpu_engine_max_running_requests,
            max_prefill_per_step=args.cpu_engine_max_prefill_per_step,
            prefix_cache_tokens=args.cpu_engine_prefix_cache_tokens,
            device=args.cpu_engine_device,
            dtype=args.cpu_engine_dtype,
            num_threads=args.cpu_engine_num_threads,
            seed=seed,
            context_length=args.cpu_engine_context_length,
            return_original_logprob=args.cpu_engine_return_original_logprob,
            host=args.cpu_engine_host,
            port=args.cpu_engine_port,
        )


def add_cpu_engine_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("rollout engine")
    g.add_argument(
        "--rollout-engine",
        choices=ENGINE_KINDS,
        default="auto",
        help="inference engine of the RL rollout: auto picks sglang where importable with CUDA, else cpu (and logs which)",
    )
    g.add_argument("--cpu-engine-max-running-requests", type=int, default=32, help="requests decoded together in one batch")
    g.add_argument("--cpu-engine-max-prefill-per-step", type=int, default=8, help="new requests admitted between two decode steps")
    g.add_argument(
        "--cpu-engine-prefix-cache-tokens", type=int, default=16384, help="prompt tokens of KV kept to reuse repeated prompts (0: off)"
    )
    g.add_argument("--cpu-engine-device", choices=DEVICES, default="auto", help="auto: cuda when available, else cpu")
    g.add_argument("--cpu-engine-dtype", choices=DTYPES, default="float32")
    g.add_argument("--cpu-engine-num-threads", type=int, default=None, help="torch threads of the engine process")
    g.add_argument("--cpu-engine-seed", type=int, default=None, help="seed of requests without sampling_seed (default: --rollout-seed)")
    g.add_argument("--cpu-engine-context-length", type=int, default=None, help="max prompt + output tokens (default: the model's)")
    g.add_argument(
        "--cpu-engine-return-original-logprob",
        action="store_true",
        help="log-probs of the raw logits, not logits / temperature (SGLANG_RETURN_ORIGINAL_LOGPROB=1)",
    )
    g.add_argument("--cpu-engine-host", default="127.0.0.1", help="address the engine's HTTP server binds")
    g.add_argument("--cpu-engine-port", type=int, default=0, help="port of the engine's HTTP server (0: a free one)")
    return parser


def _sglang_importable() -> bool:
    return importlib.util.find_spec("sglang") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_engine_kind(kind: str) -> str:
    """``'sglang'`` or ``'cpu'`` for ``--rollout-engine kind``; ``auto`` logs what it picked and why."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"--rollout-engine must be one of {ENGINE_KINDS}, got {kind!r}")
    if kind != "auto":
        logger.info("rollout engine: %s (--rollout-engine %s)", kind, kind)
        return kind
    has_sglang, has_cuda = _sglang_importable(), _cuda_available()
    if has_sglang and has_cuda:
        logger.info("rollout engine: sglang (--rollout-engine auto: sglang is importable and CUDA is available)")
        return "sglang"
    why = "sglang is not installed" if not has_sglang else "CUDA is not available"
    logger.info("rollout engine: cpu (--rollout-engine auto: %s)", why)
    return "cpu"
