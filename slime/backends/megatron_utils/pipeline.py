"""Pipeline parallelism (``--pipeline-model-parallel-size``) for the Megatron actor.

Each pipeline rank builds only its stage of megatron's GPTModel (the embedding on the first
stage, final norm and output layer on the last, its decoder layers in between: megatron's
``get_transformer_layer_offset`` numbers them, uneven first/last stages included). The
schedule is megatron's pipelined 1F1B (``get_forward_backward_func``) with
``variable_seq_lengths`` so micro-batches of different lengths (THD packing, dynamic batch
size) pass between stages. Every stage of a DP replica holds the same samples and builds the
same micro-batches, so the micro-batch count agrees (`check_micro_batch_count`).

The loss runs on the last stage only; its weights hold the global denominators (batching),
so the sum over micro-batches is exact. What the last stage computes (loss metrics,
log-probs, logits) is broadcast over the pipeline group, so every rank, global rank 0
included, returns the same values.

Tied embeddings (Qwen3-small): megatron keeps a copy of the embedding on the last stage
(``output_layer.weight``) and all-reduces the two gradients in ``finalize_model_grads``; HF
loading fills that copy, and gathering drops it (the first stage's is the one).

Weights are named per stage (``decoder.layers.{local}``); `to_stage` / `to_global` rename
between the full model's names (what `hf_weights` maps) and a stage's, so the per-layer HF
mapping is unchanged. Gathering a stage's tensors to pipeline rank 0 (export, weight sync,
gradient checks) costs one full TP shard of the model in that rank's host memory.

Virtual (interleaved) stages (``--num-virtual-stages-per-pipeline-rank V`` or
``--num-layers-per-virtual-pipeline-stage``): each pipeline rank builds V model chunks
(``GPTModel(vp_stage=i)``; megatron's layer offset puts chunk i of rank r at virtual stage
i * PP + r, so with PP=2, V=2 and 4 layers rank 0 holds layers 0 and 2), each DDP-wrapped, one
optimizer over all of them, and megatron's interleaved schedule runs them (one data iterator
per chunk over the same micro-batches). Every stage's layers must split into V chunks, uneven
first/last stages included (`check_pipeline_layout`). The schedule takes micro-batches in
groups of PP, so their count is rounded up to a multiple of PP by splitting packs further
(`micro_batch_multiple`, `expert_parallel.MicroBatchAlignment`): the loss weights are fixed
before, so losses and gradients do not change. p2p follows Megatron-LM's settings for virtual
stages (unbatched, overlapped sends; see `config_kwargs`). A rank's chunk dicts become one
dict under global layer numbers with `join_chunks` (and back with `split_chunks`), which is
what the actor's weights and gradients by name use when it has several chunks.

MoE models with PP: every pipeline rank must hold a MoE layer, over all its chunks with virtual
stages (checked at start-up).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from slime.backends.megatron_utils.model_config import ModelArgs
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs

__all__ = [
    "broadcast_from_last_stage",
    "check_pipeline_layout",
    "config_kwargs",
    "chunk_stages",
    "gather_stages",
    "join_chunks",
    "layer_range",
    "micro_batch_multiple",
    "split_chunks",
    "stage_flags",
    "to_global",
    "to_stage",
    "unpacked_batch",
    "virtual_size",
]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


def check_pipeline_layout(model: ModelArgs, build: ModelBuildArgs) -> None:
    """Clear start-up errors for the pipeline sizes (flag names in the messages)."""
    pp = build.pipeline_model_parallel_size
    vpp = build.virtual_pipeline_model_parallel_size or 1
    if pp == 1:
        for flag, n in (
            ("--decoder-first-pipeline-num-layers", build.decoder_first_pipeline_num_layers),
            ("--decoder-last-pipeline-num-layers", build.decoder_last_pipeline_num_layers),
        ):
            if n is not None:
                raise ValueError(f"{flag} needs --pipeline-model-parallel-size > 1")
        return  # virtual stages without PP: refused by `parallel.ParallelLayout`
    rest, stages = model.num_layers, pp
    for flag, n in (
        ("--decoder-first-pipeline-num-layers", build.decoder_first_pipeline_num_layers),
        ("--decoder-last-pipeline-num-layers", build.decoder_last_pipeline_num_layers),
    ):
        if n is not None:
            if n < 1:
                raise ValueError(f"{flag} must be >= 1, got {n}")
            if n % vpp:
                # megatron splits every pipeline rank's layers into V equal chunks, uneven ones too.
                raise ValueError(
                    f"{flag} {n} does not split into {vpp} virtual stages (--num-virtual-stages-per-pipeline-rank)"
                )
            rest, stages = rest - n, stages - 1
    if rest < stages or (stages and rest % stages):
        raise ValueError(
            f"--num-layers {model.num_layers} does not split over --pipeline-model-parallel-size {pp}: "
            f"{rest} layers left for {stages} even stage(s) (see --decoder-first/last-pipeline-num-layers)"
        )
    if stages and (rest // stages) % vpp:
        raise ValueError(
            f"--num-layers {model.num_layers} does not split into --pipeline-model-parallel-size {pp} x {vpp} "
            f"virtual stages (--num-virtual-stages-per-pipeline-rank / --num-layers-per-virtual-pipeline-stage): "
            f"{rest // stages} layers per even stage"
        )
    if model.is_moe and model.moe_token_dispatcher_type != "alltoall":
        # Stages exchange micro-batches of varying length; megatron's other dispatchers refuse that.
        raise ValueError(
            f"--moe-token-dispatcher-type {model.moe_token_dispatcher_type} with --pipeline-model-parallel-size {pp}: "
            "use alltoall (megatron supports variable micro-batch lengths between stages with it only)"
        )
    if model.is_moe:
        # Every stage's MoE statistics meet in collectives over the pipeline group (aux-loss
        # tracker, router counts): a stage without a MoE layer would have none to join with.
        even = rest // stages if stages else 0
        first, last = build.decoder_first_pipeline_num_layers, build.decoder_last_pipeline_num_layers
        sizes = [first or even] + [even] * (pp - 2) + [last or even]
        pattern = model.moe_pattern()
        for stage, layers in enumerate(_rank_layers(sizes, vpp)):
            if not any(pattern[i] for i in layers):
                raise ValueError(
                    f"pipeline stage {stage} (layers {_spans(layers)}) has no MoE layer "
                    "(--moe-layer-freq): move the stage boundary (--decoder-first/last-pipeline-num-layers)"
                )


def _rank_layers(sizes: list[int], vpp: int) -> list[list[int]]:
    """The global layers each pipeline rank holds, over its ``vpp`` chunks: rank r's layers
    (``sizes[r]``) split into equal chunks, numbered chunk-major as megatron places them
    (chunk 0 of every rank, then chunk 1, ...)."""
    out, start = [[] for _ in sizes], 0
    for _ in range(vpp):
        for rank, n in enumerate(sizes):
            out[rank] += range(start, start + n // vpp)
            start += n // vpp
    return out


def _spans(layers: list[int]) -> str:
    """``[0, 1, 4]`` -> ``"0-1, 4-4"``."""
    spans, lo = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            spans.append(f"{lo}-{a}")
            lo = b
    return ", ".join(spans)


def virtual_size(build: ModelBuildArgs) -> int:
    """Model chunks per pipeline rank (1 without interleaving)."""
    return (build.virtual_pipeline_model_parallel_size or 1) if build.pipeline_model_parallel_size > 1 else 1


def micro_batch_multiple(build: ModelBuildArgs) -> int:
    """What the micro-batch count must be a multiple of: megatron's interleaved schedule runs
    micro-batches in groups of PP per chunk (``microbatch_group_size_per_vp_stage``, default
    PP) and refuses a last group smaller than PP."""
    return build.pipeline_model_parallel_size if virtual_size(build) > 1 else 1


def config_kwargs(build: ModelBuildArgs) -> dict:
    """TransformerConfig fields of the pipeline layout (none without PP)."""
    if build.pipeline_model_parallel_size == 1:
        return {}
    vpp = virtual_size(build)
    return {
        "pipeline_model_parallel_size": build.pipeline_model_parallel_size,
        "num_layers_in_first_pipeline_stage": build.decoder_first_pipeline_num_layers,
        "num_layers_in_last_pipeline_stage": build.decoder_last_pipeline_num_layers,
        "virtual_pipeline_model_parallel_size": vpp if vpp > 1 else None,
        # Megatron-LM's p2p settings for virtual stages: separate (overlapped) sends and
        # receives instead of one batched exchange. With PP=2 the interleaved schedule sends an
        # activation and a gradient to the same peer in one step; a batched exchange posts them
        # in an order the peer's receives do not match (gloo swaps them, shapes included),
        # while megatron's unbatched ops keep each direction on its own process group.
        **({"overlap_p2p_comm": True, "batch_p2p_comm": False} if vpp > 1 else {}),
        # Micro-batches differ in length (packing, dynamic batch size): stages exchange the
        # shape before each activation (one small message more per transfer).
        "variable_seq_lengths": True,
        # megatron refuses variable lengths with its default (allgather) MoE dispatcher even for
        # a dense model; a MoE model's own setting (alltoall, checked above) replaces this.
        "moe_token_dispatcher_type": "alltoall",
    }


def stage_flags(vp_stage: int | None = None) -> tuple[bool, bool]:
    """(pre_process, post_process) of this pipeline rank's model chunk ``vp_stage`` (None
    without virtual stages): the embedding on the first chunk of the first rank, the head on
    the last chunk of the last rank."""
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
    )


def layer_range(config, vp_stage: int | None = None) -> tuple[int, int]:
    """[first, end) global decoder-layer indices of this pipeline rank's chunk ``vp_stage``."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage)
    return offset, offset + get_num_layers_to_build(config, vp_stage)


def chunk_stages(num_chunks: int) -> list[int | None]:
    """The ``vp_stage`` of each model chunk of this rank (None: no virtual stages)."""
    return [None] if num_chunks == 1 else list(range(num_chunks))


def to_stage(full: dict[str, torch.Tensor], config, tied: bool, vp_stage: int | None = None) -> dict[str, torch.Tensor]:
    """This stage's (chunk's) part of a full model's megatron-named tensors, layers renamed to
    local indices. Tied embeddings: the last stage (not also first) gets the embedding as its
    ``output_layer.weight`` copy."""
    pre, post = stage_flags(vp_stage)
    first, end = layer_range(config, vp_stage)
    out = {}
    for name, t in full.items():
        m = _LAYER.match(name)
        if m:
            i = int(m.group(1))
            if first <= i < end:
                out[f"decoder.layers.{i - first}.{m.group(2)}"] = t
        elif name == _EMBEDDING:
            if pre:
                out[name] = t
            if post and tied and not pre:
                out[_OUTPUT] = t
        elif post:  # final norm, untied output layer
            out[name] = t
    return out


def to_global(stage: dict[str, torch.Tensor], config, tied: bool, vp_stage: int | None = None) -> dict[str, torch.Tensor]:
    """A stage's (chunk's) tensors under the full model's names (the tied copy on the last
    stage dropped)."""
    pre, _ = stage_flags(vp_stage)
    first, _ = layer_range(config, vp_stage)
    out = {}
    for name, t in stage.items():
        m = _LAYER.match(name)
        if m:
            out[f"decoder.layers.{int(m.group(1)) + first}.{m.group(2)}"] = t
        elif not (name == _OUTPUT and tied and not pre):
            out[name] = t
    return out


def join_chunks(chunks: list[dict], firsts: list[int]) -> dict:
    """One dict of a rank's chunk dicts (chunk ``i``'s layers start at global layer
    ``firsts[i]``): layers under global indices, everything else under its own name (the
    embedding is only on chunk 0, the final norm and output layer only on the last chunk, so
    nothing collides). The inverse of `split_chunks`."""
    out: dict = {}
    for chunk, first in zip(chunks, firsts, strict=True):
        for name, t in chunk.items():
            m = _LAYER.match(name)
            out[f"decoder.layers.{int(m.group(1)) + first}.{m.group(2)}" if m else name] = t
    return out


def split_chunks(joined: dict, ranges: list[tuple[int, int]]) -> list[dict]:
    """`join_chunks`' output back into chunk dicts: a layer to the chunk whose [first, end)
    holds it (local index), the embedding to chunk 0, other non-layer names to the last."""
    out: list[dict] = [{} for _ in ranges]
    for name, t in joined.items():
        m = _LAYER.match(name)
        if not m:
            out[0 if name.startswith("embedding.") else -1][name] = t
            continue
        i = int(m.group(1))
        where = [c for c, (first, end) in enumerate(ranges) if first <= i < end]
        if not where:
            raise ValueError(f"{name}: layer {i} is not on this pipeline rank (its chunks hold {ranges})")
        out[where[0]][f"decoder.layers.{i - ranges[where[0]][0]}.{m.group(2)}"] = t
    return out


def gather_stages(mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every stage's tensors on pipeline rank 0 of this rank's pipeline group, from each
    rank's ``mine`` under full-model names (`to_global`); None on the other stages. A
    collective of the pipeline group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return mine
    group = ps.get_pipeline_model_parallel_group()
    parts = [None] * dist.get_world_size(group) if ps.is_pipeline_first_stage() else None
    dist.gather_object(mine, parts, dst=dist.get_global_rank(group, 0), group=group)
    if parts is None:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def broadcast_from_last_stage(value):
    """The last pipeline stage's ``value`` (any picklable object) on every stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    group = ps.get_pipeline_model_parallel_group()
    box = [value if ps.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, dist.get_world_size(group) - 1), group=group)
    return box[0]


def check_micro_batch_count(count: int) -> None:
    """Every stage of a pipeline must run the same number of micro-batches (they see the same
    samples); a mismatch would hang the schedule, so fail instead."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    t = torch.tensor(
        [count, -count], dtype=torch.int64, device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(
            f"pipeline stages built different micro-batch counts ({-int(t[1])}..{int(t[0])}): every stage of a "
            "data-parallel replica must get the same samples"
        )


def last_stage_outputs(run_schedule: Callable, mbs: list, per_mb: Callable) -> list:
    """Run the forward-only schedule over ``mbs``; ``per_mb(mb, output)`` on the last stage for
    each micro-batch (its result collected in order); the list broadcast to every stage."""
    collected: list = []

    def loss_func(mb, output):
        collected.append(per_mb(mb, output))
        zero = torch.zeros((), device=output.hidden.device if hasattr(output, "hidden") else output.device)
        return zero, torch.ones((), dtype=torch.int, device=zero.device), {}

    run_schedule(mbs, forward_only=True, loss_func=loss_func)
    return broadcast_from_last_stage(collected)


def unpacked_batch(ids: torch.Tensor):
    """A `batching.MicroBatch` of one unpacked sequence ``ids`` ``[1, T]`` (nothing supervised),
    for scoring forwards such as ``MegatronActor.logits`` through the schedule."""
    from slime.backends.megatron_utils.batching import MicroBatch

    n = ids.shape[-1]
    zeros = torch.zeros_like(ids)
    return MicroBatch(
        tokens=ids,
        position_ids=torch.arange(n, device=ids.device)[None],
        labels=zeros,
        weights=zeros.double(),
        cu_seqlens=None,
        max_seqlen=n,
        num_samples=1,
        real_tokens=n,
        capacity=n,
        supervised_tokens=0,
    )
