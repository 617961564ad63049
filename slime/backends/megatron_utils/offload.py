"""Trainer offload for ``--colocate`` (``--offload-train``): free the actor's device memory while
the inference engines generate on the same GPUs, and bring it back bit-exactly before training.

What moves: every tensor the actor keeps between steps, once per storage: the parameters (with
megatron's DDP and the distributed optimizer they are views into DDP's contiguous param buffer),
DDP's grad buffers (``main_grad`` views), module buffers (rotary tables), the optimizer's state
(Adam moments) and its fp32 main parameters under bf16. Each storage is copied to host memory
(pinned on CUDA) and then resized to 0 bytes; onload resizes it back and copies the bytes in.
Every view (``param.data``, ``main_grad``, bucket views, optimizer references) stays a valid
object because the storage object itself is kept, only its allocation changes.

Why our own and not megatron-core's pieces: megatron-core 0.16 has the same resize trick for
DDP's buffers (``_ParamAndGradBuffer.offload_to_cpu``, which drops grads) and a separate
``offload_to_cpu`` for CUDA optimizer state, but nothing covering parameters outside DDP's
buffer (no distributed optimizer), module buffers or the fp32 main copies, and both skip CPU
tensors. One walk over every storage is one code path for GPU and for the CPU tests, which can
then check that every byte was released and came back.

Two stages (``keep_weights``): a weight sync reads only the weights, so the driver first
offloads the rest (grads, optimizer state, fp32 main params: most of the bytes), lets the
engines take their weights' memory back and syncs, then offloads the weights too. At no point
are the full training state and the engines' weights on the device together.

Cost: a host copy of the whole training state (params + grads + 2 Adam moments + main params:
about 16-18 bytes per parameter under bf16; on CUDA kept, pinned, between offloads) and one
device<->host round trip per rollout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = ["TrainerOffload", "actor_tensors", "weight_tensors"]


def _optimizers(optimizer) -> list:
    """The leaf megatron optimizers of a (possibly chained) megatron optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def actor_tensors(modules: Iterable[torch.nn.Module], optimizer) -> Iterator[torch.Tensor]:
    """Every tensor of the training state: parameters, their main grads, module buffers, DDP's
    param/grad buffers, optimizer state and the parameters the optimizer updates."""
    for module in modules:
        ddp_buffers = _ddp_buffers(module)
        inner = module.module if ddp_buffers or hasattr(module, "zero_grad_buffer") else module
        for p in inner.parameters():
            yield p
            if getattr(p, "main_grad", None) is not None:
                yield p.main_grad
        yield from inner.buffers()
        for buffer in ddp_buffers:
            for name in ("param_data", "grad_data"):
                t = getattr(buffer, name, None)
                if t is not None:
                    yield t
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            yield from (p for p in group["params"] if isinstance(p, torch.Tensor))
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def weight_tensors(modules: Iterable[torch.nn.Module]) -> Iterator[torch.Tensor]:
    """What a forward or a weight sync reads: parameters, module buffers, DDP's param buffers."""
    for module in modules:
        ddp_buffers = _ddp_buffers(module)
        inner = module.module if ddp_buffers or hasattr(module, "zero_grad_buffer") else module
        yield from inner.parameters()
        yield from inner.buffers()
        for buffer in ddp_buffers:
            if getattr(buffer, "param_data", None) is not None:
                yield buffer.param_data


def _ddp_buffers(module) -> list:
    # megatron's DDP keeps its contiguous buffers in plain list attributes (``buffers`` shadows
    # nn.Module.buffers on the instance).
    out = []
    for name in ("buffers", "expert_parallel_buffers"):
        value = module.__dict__.get(name)
        if isinstance(value, list):
            out.extend(value)
    return out


class TrainerOffload:
    """Moves the actor's training state off its device (`offload`) and back (`onload`)."""

    def __init__(self):
        self._saved: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        # CUDA: pinned host buffers kept from one offload to the next (allocating pinned memory
        # costs about as much as the copy itself); keyed by (stage, position in the walk).
        self._pinned: dict[tuple[bool, int], torch.Tensor] = {}
        self.offloaded = False  # anything off the device
        self.weights_offloaded = False

    @staticmethod
    def _storages(tensors: Iterable[torch.Tensor], skip: set | None = None) -> list[torch.UntypedStorage]:
        seen, out = set(skip or ()), []
        for t in tensors:
            storage = t.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            out.append(storage)
        return out

    @torch.no_grad()
    def offload(self, modules: Iterable[torch.nn.Module], optimizer, keep_weights: bool = False) -> int:
        """Copy every storage still on the device to host memory and release it (with
        ``keep_weights`` all but `weight_tensors`'); returns the bytes released."""
        modules = list(modules)
        if self.weights_offloaded or (self.offloaded and keep_weights):
            raise RuntimeError("the trainer is already offloaded: call onload first")
        pin = torch.cuda.is_available()
        skip = None
        if keep_weights:
            skip = {(st.device, st.data_ptr()) for st in self._storages(weight_tensors(modules))}
        saved, total = [], 0
        for i, storage in enumerate(self._storages(actor_tensors(modules, optimizer), skip)):
            view = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            host = self._host_buffer((keep_weights, i), view.numel(), pin)
            host.copy_(view, non_blocking=pin)
            saved.append((storage, host))
            total += view.numel()
        if pin:
            torch.cuda.synchronize()  # the copies must land before the storages are released
        for storage, _ in saved:
            storage.resize_(0)
        if pin:
            torch.cuda.empty_cache()
        self._saved += saved
        self.offloaded, self.weights_offloaded = True, not keep_weights
        what = "all but the weights" if keep_weights else "the training state"
        logger.info("trainer offloaded %s: %.1f MiB in %d storages", what, total / 2**20, len(saved))
        return total

    def _host_buffer(self, key: tuple[bool, int], nbytes: int, pin: bool) -> torch.Tensor:
        if not pin:  # CPU: the "device" is host memory, keep no second copy between offloads
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = self._pinned.get(key)
        if buf is None or buf.numel() != nbytes:
            buf = self._pinned[key] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    @torch.no_grad()
    def onload(self) -> int:
        """Reallocate every released storage and copy its bytes back; returns the bytes restored."""
        if not self.offloaded:
            return 0
        total = 0
        for storage, host in self._saved:
            storage.resize_(host.numel())
            view = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            view.copy_(host, non_blocking=host.is_pinned())
            total += host.numel()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._saved, self.offloaded, self.weights_offloaded = [], False, False
        logger.info("trainer onloaded: %.1f MiB", total / 2**20)
        return total

    def check_resident(self, what: str, weights_only: bool = False) -> None:
        """Raise unless the state ``what`` needs is on the device (``weights_only``: the weights)."""
        if self.weights_offloaded or (self.offloaded and not weights_only):
            raise RuntimeError(f"{what}: the trainer's state is offloaded (--offload-train); onload it first")
