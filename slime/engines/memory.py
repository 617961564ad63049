"""Releasing a CPU engine's memory while a colocated trainer runs (SGLang's
``/release_memory_occupation`` and ``/resume_memory_occupation``, same tags).

``--colocate`` puts the trainer and the engines on the same devices: the engines give their
memory back while the trainer trains, and take it again to generate. SGLang's contract, which
the CPU engine keeps so the driver's order is exercised in CI:

- ``weights``: the parameters' memory is freed and their values are lost; resuming gives
  the memory back uninitialized, and the engine generates again only after new weights came
  in (the driver syncs the trainer's weights right after resuming them). Module buffers
  (rotary tables, a few KB; a weight sync does not carry them) stay.
- ``kv_cache``: the prefix cache is dropped (a running batch has none: releasing needs an
  idle engine).

While anything is released, or the weights are resumed but not yet refilled, generation is
refused with a clear error rather than run on missing or stale memory.
"""

from __future__ import annotations

__all__ = ["MEMORY_TAGS", "ReleasableParameters", "parse_memory_tags"]

MEMORY_TAGS = ("weights", "kv_cache")


def parse_memory_tags(tags) -> tuple[str, ...]:
    """``tags`` (None: all) as a tuple of known tags; an unknown one is a ValueError naming it."""
    if tags is None:
        return MEMORY_TAGS
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"'tags' must be a list of strings from {list(MEMORY_TAGS)}, got {tags!r}")
    unknown = sorted(set(tags) - set(MEMORY_TAGS))
    if unknown:
        raise ValueError(f"unknown memory tag(s) {unknown}: the CPU engine has {list(MEMORY_TAGS)}")
    return tuple(t for t in MEMORY_TAGS if t in tags)


class ReleasableParameters:
    """Frees and gives back the storage of a module's parameters (values are not kept).

    Each storage is resized to 0 bytes and back, so every view of it (tied embeddings, the
    module's ``Parameter`` objects) stays the same object: a later in-place weight update
    writes into the given-back memory as it would into the original.
    """

    def __init__(self, module):
        self.module = module
        self._sizes: list[tuple[object, int]] | None = None  # (storage, bytes) while released

    @property
    def released(self) -> bool:
        return self._sizes is not None

    def release(self) -> int:
        """Free every parameter storage; the bytes freed (0 when already released)."""
        if self._sizes is not None:
            return 0
        self._own_storages()
        seen, sizes = set(), []
        for p in self.module.parameters():
            storage = p.data.untyped_storage()
            key = storage.data_ptr()
            if key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            sizes.append((storage, storage.nbytes()))
        for storage, _ in sizes:
            storage.resize_(0)
        self._sizes = sizes
        return sum(n for _, n in sizes)

    def _own_storages(self) -> None:
        """HF loads safetensors memory-mapped: such storages cannot be resized. Copy each once
        into an ordinary storage (parameters sharing one keep sharing the copy)."""
        import torch

        copies: dict[int, object] = {}
        for p in self.module.parameters():
            storage = p.data.untyped_storage()
            if storage.resizable():
                continue
            key = storage.data_ptr()
            if key not in copies:
                copies[key] = torch.UntypedStorage(storage.nbytes(), device=storage.device)
                copies[key].copy_(storage)
            with torch.no_grad():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device).set_(
                    copies[key], p.storage_offset(), p.size(), p.stride()
                )

    def restore(self) -> int:
        """Give the storages back, uninitialized; the bytes given back (0 when resident)."""
        if self._sizes is None:
            return 0
        for storage, n in self._sizes:
            storage.resize_(n)
        total = sum(n for _, n in self._sizes)
        self._sizes = None
        return total
