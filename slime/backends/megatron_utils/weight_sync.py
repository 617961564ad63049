"""Weight-sync source: the trainer's current weights as HF-named tensors, in size-capped buckets.

After a training step the inference engines need the new weights under HF names. The trainer
walks its model one part at a time (embedding/final norm/output layer together with decoder
layer 0, then each further decoder layer), gathers that part's tensor-parallel shards on
global rank 0 (`MegatronActor.gather_tp`), converts it with `hf_weights.mcore_to_hf` (the one
Megatron -> HF mapping, the exporter's) and cuts the stream into buckets of at most
``--update-weight-buffer-size`` bytes. Host memory on rank 0 stays about one layer plus one
bucket instead of the whole model; a tensor larger than the cap travels alone.

Only the ranks of the first data-parallel replica take part (every DP replica holds the same
weights), and with expert parallelism those of the first expert-data-parallel replica (they
hold the other experts); only global rank 0 receives tensors. The Ray side (`slime.ray.train_group`) sends
each bucket to every engine and waits before gathering the next.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    import torch

    from slime.backends.megatron_utils.actor import MegatronActor
    from slime.backends.megatron_utils.model_config import ModelArgs

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "WeightSyncConfig",
    "add_weight_sync_arguments",
    "bucket_named_tensors",
    "hf_buckets",
    "tensor_bytes",
]

DEFAULT_BUCKET_BYTES = 512 * 2**20  # slime's default --update-weight-buffer-size
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# HF names `mcore_to_hf` always writes; placeholders when converting one later layer alone.
_NON_LAYER_HF = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def add_weight_sync_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("weight sync (trainer -> engines)")
    g.add_argument(
        "--update-weight-buffer-size",
        type=int,
        default=DEFAULT_BUCKET_BYTES,
        help="bytes per bucket of HF-named tensors sent to the engines after each step (a larger tensor goes alone)",
    )
    return parser


@dataclass(frozen=True)
class WeightSyncConfig:
    """bucket_bytes: cap on one bucket's tensor bytes (``--update-weight-buffer-size``)."""

    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __post_init__(self):
        if self.bucket_bytes < 1:
            raise ValueError(f"--update-weight-buffer-size must be >= 1 byte, got {self.bucket_bytes}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WeightSyncConfig":
        return cls(bucket_bytes=args.update_weight_buffer_size)


def tensor_bytes(t: "torch.Tensor") -> int:
    return t.numel() * t.element_size()


def bucket_named_tensors(
    named: Iterable[tuple[str, "torch.Tensor"]], bucket_bytes: int
) -> Iterator[tuple[list[tuple[str, "torch.Tensor"]], bool]]:
    """(bucket, is_last) in order; a bucket holds tensors up to ``bucket_bytes`` in total, or one
    larger tensor alone. ``is_last`` is exact: a bucket closed mid-stream always has a successor."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {bucket_bytes}")
    bucket: list = []
    size = 0
    for name, t in named:
        n = tensor_bytes(t)
        if bucket and size + n > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket, True


def _parts(names: Iterable[str]) -> list[list[str]]:
    """Megatron names grouped for conversion: [non-layer + layer 0, layer 1, layer 2, ...]."""
    by_layer: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in names:
        m = _LAYER.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
        else:
            rest.append(name)
    layers = sorted(by_layer)
    if layers != list(range(len(layers))):
        raise ValueError(f"decoder layers are not numbered 0..n-1: {layers[:8]}")
    first = rest + (by_layer[0] if layers else [])
    return [first] + [by_layer[i] for i in layers[1:]]


def _layer_to_hf(shards: list[dict], m: "ModelArgs", layer: int) -> dict[str, "torch.Tensor"]:
    """Decoder layer ``layer`` alone, through `mcore_to_hf`: renamed to layer 0 of a one-layer
    model whose embedding, final norm and output layer are empty placeholders (dropped after)."""
    import torch

    from slime.backends.megatron_utils.hf_weights import mcore_to_hf

    src, dst = f"decoder.layers.{layer}.", "decoder.layers.0."
    hidden = m.hidden_size
    placeholders = {
        "embedding.word_embeddings.weight": torch.empty(0, hidden),
        "decoder.final_layernorm.weight": torch.empty(0),
        "output_layer.weight": torch.empty(0, hidden),
    }
    views = [{**placeholders, **{dst + k[len(src) :]: v for k, v in s.items()}} for s in shards]
    hf = mcore_to_hf(views, dataclasses.replace(m, num_layers=1))
    return {k.replace("model.layers.0.", f"model.layers.{layer}.", 1): v for k, v in hf.items() if k not in _NON_LAYER_HF}


def _part_to_hf(shards: list[dict], m: "ModelArgs", index: int) -> dict[str, "torch.Tensor"]:
    from slime.backends.megatron_utils.hf_weights import mcore_to_hf

    if index == 0:  # non-layer weights + layer 0: a one-layer model, converted as is
        return mcore_to_hf(shards, dataclasses.replace(m, num_layers=1))
    return _layer_to_hf(shards, m, index)


def _iter_hf_tensors(actor: "MegatronActor") -> Iterator[tuple[str, "torch.Tensor"]]:
    """HF-named full tensors, part by part, on global rank 0 (nothing elsewhere). The ranks of
    the first DP (and expert-DP) replica must all iterate it together (each part is a TP /
    expert-parallel collective)."""
    from slime.backends.megatron_utils.expert_parallel import joins_weight_gather

    if not joins_weight_gather(actor.info):
        return
    state = actor.named_weights()
    if actor.info.pp_size > 1:  # every stage's layers (every chunk's) on pipeline rank 0, full-model names
        state = actor.gather_stages({k: v.detach().cpu() for k, v in state.items()})
        if state is None:
            return
    for index, names in enumerate(_parts(state)):
        shard = {k: state[k].detach().cpu() for k in names}
        shards = actor.gather_tp(shard)
        del shard
        if shards is not None:
            yield from _part_to_hf(shards, actor.model_args, index).items()


def hf_buckets(actor: "MegatronActor", bucket_bytes: int) -> Iterator[tuple[list[tuple[str, "torch.Tensor"]], bool]]:
    """(bucket, is_last) of the actor's current weights (see the module docstring)."""
    actor.check_weights_resident("a weight sync")
    yield from bucket_named_tensors(_iter_hf_tensors(actor), bucket_bytes)
