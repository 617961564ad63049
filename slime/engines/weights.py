"""Weight updates by HF name: copy (name, tensor) pairs into a live model, and read them from a HF dir.

The trainer sends HF-named tensors (the names the HF exporter writes), whole or in buckets;
each bucket is checked in full (every name known, every shape right) before any tensor of it
is copied, so a bad bucket leaves the model as it was. Tied weights answer to each of their
names (``lm_head.weight`` and ``model.embed_tokens.weight`` of a tied model).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

__all__ = ["apply_named_tensors", "iter_hf_tensors"]


def apply_named_tensors(model, named_tensors: Iterable[tuple[str, object]]) -> int:
    """Copy each tensor into ``model``'s parameter or buffer of that name; returns how many."""
    import torch

    targets = model.state_dict(keep_vars=True)
    bucket = list(named_tensors)
    for name, tensor in bucket:
        if name not in targets:
            sample = ", ".join(sorted(targets)[:4])
            raise KeyError(f"weight update: {name!r} is not a weight of this model (names look like: {sample}, ...)")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight update: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tuple(tensor.shape) != tuple(targets[name].shape):
            raise ValueError(f"weight update: {name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, tensor in bucket:
            targets[name].data.copy_(tensor)
    return len(bucket)


def _weight_files(path: str) -> list[str]:
    """The weight files of a HF dir: safetensors (sharded or not), else pytorch .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(f"{path!r} holds no HF weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def iter_hf_tensors(path: str) -> Iterator[tuple[str, object]]:
    """(name, tensor) of every weight in the HF checkpoint dir ``path``, one file at a time."""
    import torch

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model_path {path!r} is not a directory")
    for file in _weight_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()
