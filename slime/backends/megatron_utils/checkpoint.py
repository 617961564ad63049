"""megatron-core ``dist_checkpointing`` (torch_dist) checkpoints of the model weights.

Layout (Megatron-LM's): ``DIR/latest_checkpointed_iteration.txt`` holds the iteration,
weights live in ``DIR/iter_0000000/``. A torch_dist checkpoint stores global tensor
metadata, so it loads at any TP size (resharded on load).
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


def save_model_weights(model, root: str, iteration: int = 0) -> str:
    """Save ``model``'s sharded state (all ranks call this) and point the tracker at it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    target = _iter_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(target, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), target)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))  # atomic: the tracker never names a partial save
    dist.barrier()
    return target


def load_model_weights(model, path: str) -> str:
    """Load weights saved by `save_model_weights` (or a converted checkpoint) into ``model``."""
    from megatron.core import dist_checkpointing

    source = checkpoint_dir(path)
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), source)
    except Exception as e:
        raise ValueError(f"cannot load torch_dist checkpoint {source}: {type(e).__name__}: {e}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"checkpoint {source} lacks weights for {missing[:5]}")
    return source
