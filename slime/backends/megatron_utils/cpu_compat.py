"""What megatron-core needs to run on a CPU-only torch, in one place, applied explicitly.

megatron-core assumes CUDA in a few spots that do no CUDA work of their own: it asks
``torch.cuda.current_device()`` for where to allocate, creates some small tensors with
``device="cuda"``, and keeps per-parallel-rank RNG states through ``torch.cuda`` RNG calls.
`enable_cpu_mode` redirects exactly those to the CPU for the life of the process:

* ``torch.cuda.current_device`` -> ``torch.device("cpu")``; ``synchronize`` / ``empty_cache`` -> no-ops;
* ``torch.cuda.manual_seed`` / ``get_rng_state`` and megatron's ``_get/_set_cuda_rng_state`` -> the
  CPU generator (so megatron's RNG tracker, used by dropout under TP and by activation
  recomputation, works unchanged);
* a ``TorchFunctionMode`` that rewrites ``device="cuda"`` in tensor factories and makes
  ``Tensor.cuda()`` a no-op;
* ``torch.cuda.Stream`` / ``current_stream`` / ``stream`` / ``Event`` -> `_CpuStream` no-ops: the
  MoE all-to-all token dispatcher copies token counts to the host on a side stream and waits
  on an event; CPU work is synchronous, so there is nothing to order;
* the MoE all-to-all dispatcher (expert parallelism) moves its token split sizes to the host
  with ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts only CUDA tensors: on
  CPU the splits stay tensors and gloo's ``all_to_all_single`` rejects them as split sizes.
  `_counts_to_host` converts CPU tensors too (the same numpy arrays the GPU path gets);
* megatron's ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads; the
  optimizer gets the same scaling (grads * max_norm / (norm + 1e-6) when that is < 1) without
  the assert. The norm itself is megatron's (its no-apex fallback, placed on CPU by the mode).

It is never applied when CUDA is available, and the training step itself has one code path.
The cost: the TorchFunctionMode adds a Python call per torch function on the CPU path only.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

__all__ = ["cpu_mode_enabled", "enable_cpu_mode"]

_STATE: dict = {}  # what enable_cpu_mode replaced, for disable (tests) and idempotence


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # a bare index means a CUDA device to torch
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placement requests to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _CpuEvent:
    """A CUDA event stand-in: CPU ops have completed when they return."""

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuStream(_CpuEvent):
    """A CUDA stream stand-in for code that only orders work between streams."""

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()


_CPU_STREAM = _CpuStream()


def cpu_mode_enabled() -> bool:
    return bool(_STATE)


def enable_cpu_mode() -> None:
    """Make megatron-core run on CPU tensors. Idempotent; a no-op (with a check) under CUDA."""
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_mode() is for CPU-only runs; CUDA is available here")
    if _STATE:
        return
    from megatron.core.tensor_parallel import random as tp_random

    _STATE["cuda"] = {
        name: getattr(torch.cuda, name)
        for name in (
            "current_device", "manual_seed", "manual_seed_all", "get_rng_state", "synchronize", "empty_cache",
            "Stream", "current_stream", "stream", "Event",
        )
    }
    torch.cuda.Stream = lambda *a, **k: _CpuStream()
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.Event = lambda *a, **k: _CpuEvent()
    torch.cuda.synchronize = lambda device=None: None  # CPU ops are synchronous (dist checkpoint save calls it)
    torch.cuda.empty_cache = lambda: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by torch.manual_seed
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    _STATE["rng"] = (tp_random._set_cuda_rng_state, tp_random._get_cuda_rng_state)
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()

    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.transformer.moe import token_dispatcher

    _STATE["clip"] = mcore_optimizer.clip_grad_by_total_norm_fp32
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    _STATE["to_host"] = token_dispatcher.maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _counts_to_host
    _STATE["mode"] = _CudaToCpu()
    _STATE["mode"].__enter__()
    logger.info("megatron-core CPU mode enabled (gloo, fp32)")


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 minus its CUDA type assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def _counts_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's maybe_move_tensor_to_cpu for CPU tensors: ``as_numpy`` converts them too."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().cpu().numpy()
    return tensor


@contextlib.contextmanager
def cpu_mode():
    """``with cpu_mode():`` for tests that need it scoped."""
    enable_cpu_mode()
    try:
        yield
    finally:
        disable_cpu_mode()


def disable_cpu_mode() -> None:
    if not _STATE:
        return
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import token_dispatcher

    _STATE["mode"].__exit__(None, None, None)
    token_dispatcher.maybe_move_tensor_to_cpu = _STATE["to_host"]
    for name, fn in _STATE["cuda"].items():
        setattr(torch.cuda, name, fn)
    tp_random._set_cuda_rng_state, tp_random._get_cuda_rng_state = _STATE["rng"]
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _STATE["clip"]
    _STATE.clear()
