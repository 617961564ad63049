"""megatron-core ``dist_checkpointing`` (torch_dist) checkpoints of the model weights.

Layout (Megatron-LM's): ``DIR/latest_checkpointed_iteration.txt`` holds the iteration,
weights live in ``DIR/iter_0000000/``. A torch_dist checkpoint stores global tensor
metadata, so it loads at any TP size (resharded on load). Tensor keys are the unwrapped
model's (``decoder.layers...``, as Megatron-LM saves them), in weights-only and training
checkpoints alike, so either serves as initial weights (``--ref-load``). Training checkpoints
of this trainer before 2026-12-03 carry a ``module.`` prefix (megatron's DDP wrapper): they
load too.

``model`` is one module or a pipeline rank's list of model chunks (virtual stages). Each
chunk's sharded state dict names its layers by global index (megatron's layer offset), so the
nesting below "model" (``chunk{i}`` under virtual stages) only shapes the in-memory dict: the
stored tensors are the same whatever the layout, and a save at PP x V loads at any other.
"""

from __future__ import annotations

import os

__all__ = ["checkpoint_dir", "load_model_weights", "save_model_weights"]

TRACKER = "latest_checkpointed_iteration.txt"


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def checkpoint_dir(path: str) -> str:
    """The directory holding the weights: ``path`` itself, or its tracked iteration."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    tracker = os.path.join(path, TRACKER)
    if not os.path.exists(tracker):
        raise FileNotFoundError(f"{path} is not a torch_dist checkpoint (no {TRACKER} and no metadata.json)")
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(path, "release")
    try:
        it = int(text)
    except ValueError:
        raise ValueError(f"{tracker}: unreadable iteration {text!r}") from None
    out = _iter_dir(path, it)
    if not os.path.isdir(out):
        raise FileNotFoundError(f"{tracker} points at {out}, which does not exist")
    return out


def _point_tracker(root: str, iteration: int) -> None:
    """Rank 0 points the tracker at ``iteration`` once every rank has finished writing it.

    ``os.replace`` is atomic, so the tracker never names a partial save.
    """
    import torch.distributed as dist

    if dist.get_rank() == 0:
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))
    dist.barrier()


def _chunks(model) -> list:
    """The model chunks without megatron's DDP (or fp16) wrapper, as Megatron-LM saves them:
    the wrapper's sharded state dict would prefix every key with ``module.``."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model) if isinstance(model, (list, tuple)) else [model])


# Tensor keys of checkpoints saved before the chunks were unwrapped (this trainer until
# 2026-12-03): loaded as they are, by asking for the same prefix.
LEGACY_PREFIX = "module."


_MODEL_ROOTS = ("decoder.", "embedding.", "output_layer.")  # GPTModel's top-level modules


def key_prefix_of(keys) -> str:
    """``LEGACY_PREFIX`` when a checkpoint's tensor ``keys`` name the model under it (and never
    without it), else "". Optimizer keys (``optimizer.state...``, ``chained_N.optimizer...``
    with megatron's chained optimizers, at EP > 1 say) embed the model keys further in: only
    keys that start with a model module count."""
    keys = list(keys)
    new = any(k.startswith(_MODEL_ROOTS) for k in keys)
    old = any(k.startswith(tuple(LEGACY_PREFIX + r for r in _MODEL_ROOTS)) for k in keys)
    return LEGACY_PREFIX if old and not new else ""


def _key_prefix(source: str) -> str:
    """`key_prefix_of` the checkpoint in ``source``."""
    from megatron.core import dist_checkpointing

    try:
        keys = dist_checkpointing.load_tensors_metadata(source).keys()
    except Exception:  # unreadable metadata: the load itself reports it, naming the directory
        return ""
    return key_prefix_of(keys)


def _sharded_state_dict(model, prefix: str = "") -> dict:
    chunks = _chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict(prefix=prefix)
    return {f"chunk{i}": c.sharded_state_dict(prefix=prefix) for i, c in enumerate(chunks)}


def _load_state_dict(model, state: dict, prefix: str = "") -> list[str]:
    """``state`` (shaped like `_sharded_state_dict(model, prefix)`'s) into the chunks; the
    missing keys."""
    chunks = _chunks(model)
    parts = [state] if len(chunks) == 1 else [state[f"chunk{i}"] for i in range(len(chunks))]
    missing = []
    for chunk, part in zip(chunks, parts):
        part = {k.removeprefix(prefix): v for k, v in part.items()}
        result = chunk.load_state_dict(part, strict=False)
        missing += result[0] if result is not None else []  # megatron's DDP returns nothing
    return missing


def save_model_weights(model, root: str, iteration: int = 0) -> str:
    """Save ``model``'s sharded state (all ranks call this) and point the tracker at it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    target = _iter_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(target, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model), target)
    dist.barrier()
    _point_tracker(root, iteration)
    return target


def load_model_weights(model, path: str) -> str:
    """Load weights saved by `save_model_weights`, a training checkpoint or a converted one
    (Megatron-LM's, slime's converter) into ``model``.

    Only the weights must be there. Layers' ``_extra_state`` (Transformer Engine's fp8
    metadata; nothing for the local layers) is stored under names that depend on the layer
    implementation that saved it, so a checkpoint without ours still loads: megatron's
    RETURN_UNEXPECTED load leaves out what the checkpoint lacks and says what that was, and
    anything but ``_extra_state`` among it is an error naming the tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    source = checkpoint_dir(path)
    prefix = _key_prefix(source)
    try:
        state, _, absent = dist_checkpointing.load(  # (state, missing, unexpected)
            _sharded_state_dict(model, prefix), source, strict=StrictHandling.RETURN_UNEXPECTED
        )
    except Exception as e:
        raise ValueError(f"cannot load torch_dist checkpoint {source}: {type(e).__name__}: {e}") from e
    lacking = {k for k in absent if "_extra_state" not in k}
    lacking |= {k for k in _load_state_dict(model, state, prefix) if not k.endswith("_extra_state")}
    if lacking:
        raise ValueError(f"checkpoint {source} lacks weights for {sorted(lacking)[:5]}")
    return source


# --------------------------------------------------------------------------- training state
STATE_FILE = "slime_state.json"  # rollout id, scheduler and data position (rank 0)


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] is not None],
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(keys.copy()), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    *internal, _ = state["python"]
    random.setstate((state["python_version"], tuple(internal), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(model, optimizer, scheduler, root: str, iteration: int, extra: dict) -> str:
    """Model + optimizer (torch_dist), scheduler, RNG per rank and ``extra`` (JSON), then the tracker.

    The tracker is replaced atomically after every rank finished, so a crash mid-save leaves
    the previous checkpoint current.
    """
    import json
    import shutil

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    target = _iter_dir(root, iteration)
    rank = dist.get_rank()
    if rank == 0:
        if os.path.isdir(target):
            shutil.rmtree(target)  # a partial save of this iteration from an earlier crash
        os.makedirs(target)
    dist.barrier()
    model_sd = _sharded_state_dict(model)
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, target)
    torch.save(_rng_state(), os.path.join(target, f"rng_rank{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(target, STATE_FILE), "w") as f:
            json.dump({"iteration": iteration, "scheduler": scheduler.state_dict(), **extra}, f)
    dist.barrier()
    _point_tracker(root, iteration)
    return target


def has_checkpoint(root: str | None) -> bool:
    return bool(root) and os.path.exists(os.path.join(root, TRACKER))


def load_training_state(model, optimizer, scheduler, root: str) -> dict:
    """Restore what `save_training_state` wrote; returns its JSON state (iteration, extra)."""
    import json

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    source = checkpoint_dir(root)
    state_path = os.path.join(source, STATE_FILE)
    if not os.path.exists(state_path):
        raise ValueError(f"{source} holds weights only (no {STATE_FILE}); use --ref-load for initial weights")
    with open(state_path) as f:
        state = json.load(f)
    prefix = _key_prefix(source)
    model_sd = _sharded_state_dict(model, prefix)
    try:
        loaded = dist_checkpointing.load(
            {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}, source
        )
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {source}: {type(e).__name__}: {e}") from e
    _load_state_dict(model, loaded["model"], prefix)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_path = os.path.join(source, f"rng_rank{dist.get_rank():05d}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=True))
    return state
