"""Expert parallelism (EP) and expert tensor parallelism (ETP) for the MoE models.

Layout (megatron-core's): ``--expert-model-parallel-size E`` takes its ranks from the data
parallel ones, so the dense part of the model is still replicated over DP while each of the
E ranks of an expert-parallel group holds ``num_experts / E`` experts: EP rank e holds global
experts ``e * n/E ... (e + 1) * n/E - 1`` as its local experts ``0 .. n/E - 1``.
``--expert-tensor-parallel-size`` (default: the TP size) splits each expert like a dense MLP
over ETP ranks. Megatron's DDP reduces expert gradients (params marked ``allreduce=False``)
over the expert-data-parallel group and dense ones over DP, both summed (we compute
per-token loss, so nothing is divided).

This module owns the slime side:

* `ExpertPlacement` / `placement`: this rank's EP and ETP coordinates, for `hf_weights`
  (each rank converts only its own experts and ETP slice);
* `global_expert_name`: a local expert's parameter name under its global index;
* `check_expert_layout`: the start-up check of ``--expert-*`` sizes against the model;
* `gather_shards`: every TP rank's weights with all experts under global names, on global
  rank 0 (export, weight sync and gradient checks), the one place that knows EP and ETP;
* `MicroBatchAlignment`: equal micro-batch counts across EP ranks (every MoE layer is an EP
  collective), equal token counts for the all-gather dispatcher, padding to a multiple of TP
  under sequence parallelism.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from slime.backends.megatron_utils.model_config import ModelArgs
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs

__all__ = [
    "ExpertPlacement",
    "MicroBatchAlignment",
    "check_expert_layout",
    "check_world",
    "gather_shards",
    "global_expert_name",
    "is_expert_param",
    "joins_weight_gather",
    "merge_expert_shards",
    "placement",
]

_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)\.")


@dataclass(frozen=True)
class ExpertPlacement:
    """Where this rank's experts sit: EP rank/size (which experts) and ETP rank/size (which
    slice of each). The default is a single rank holding every expert whole."""

    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1

    def __post_init__(self):
        if not (0 <= self.ep_rank < self.ep_size and 0 <= self.etp_rank < self.etp_size):
            raise ValueError(f"bad expert placement {self}")

    def expert_ids(self, num_experts: int) -> list[tuple[int, int]]:
        """(local index, global HF index) of this rank's experts."""
        if num_experts % self.ep_size:
            raise ValueError(
                f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {self.ep_size}"
            )
        n = num_experts // self.ep_size
        return [(j, self.ep_rank * n + j) for j in range(n)]


def placement() -> ExpertPlacement:
    """This rank's placement from megatron's parallel state (initialised by `init_parallel`)."""
    from megatron.core import parallel_state as ps

    return ExpertPlacement(
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
    )


def is_expert_param(name: str) -> bool:
    return _LOCAL_EXPERT.search(name) is not None


def global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """``...local_experts.{j}...`` of EP rank ``ep_rank`` renamed to its global index."""
    return _LOCAL_EXPERT.sub(lambda mo: f"{mo.group(1)}{ep_rank * local_experts + int(mo.group(2))}.", name, count=1)


def check_world(world_size: int, ep: int, etp: int | None, tp: int, pp: int) -> None:
    """The expert layout must tile the world as the dense one does (torch-free, start-up)."""
    per = ep * (etp or tp) * pp
    if ep < 1 or world_size % per:
        raise ValueError(
            f"{world_size} ranks are not divisible by --expert-model-parallel-size x --expert-tensor-parallel-size x "
            f"--pipeline-model-parallel-size = {ep} x {etp or tp} x {pp}"
        )


def check_expert_layout(model: ModelArgs, build: ModelBuildArgs, world_size: int | None = None) -> None:
    """Refuse ``--expert-*`` sizes the model or layout cannot take, naming the flag."""
    ep, tp = build.expert_model_parallel_size, build.tensor_model_parallel_size
    etp = build.expert_tensor_parallel_size or tp
    if not model.is_moe:  # slime's dense scripts pass --expert-tensor-parallel-size 1: no experts to split
        if ep > 1:
            raise ValueError(f"--expert-model-parallel-size {ep} needs a MoE model (--num-experts); this one is dense")
        return
    if tp > 1 and not build.sequence_parallel:
        raise ValueError(
            f"a MoE model at --tensor-model-parallel-size {tp} trains with --sequence-parallel only "
            "(megatron-core's MoE layer refuses tensor parallelism without it)"
        )
    if model.num_experts % ep:
        raise ValueError(f"--num-experts {model.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    cp = build.context_parallel_size
    if cp > 1 and ep > 1 and model.moe_token_dispatcher_type == "allgather":
        # The all-gather dispatcher needs equal token counts across the EP group; a CP shard's
        # length is fixed by its split, so `MicroBatchAlignment`'s padding cannot give them.
        raise ValueError(
            f"--moe-token-dispatcher-type allgather with --expert-model-parallel-size {ep} and "
            f"--context-parallel-size {cp}: use --moe-token-dispatcher-type alltoall"
        )
    ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
    if ffn % etp:
        raise ValueError(f"--moe-ffn-hidden-size {ffn} is not divisible by --expert-tensor-parallel-size {etp}")
    if etp > tp or tp % etp:
        # The export gathers ETP slices next to TP shards: ETP must divide TP.
        raise ValueError(f"--expert-tensor-parallel-size {etp} must divide --tensor-model-parallel-size {tp}")
    if etp != tp and ep == 1:
        # megatron marks expert params for the expert-data-parallel reduction only when EP > 1:
        # with EP = 1 an ETP slice replicated over TP ranks would miss the sum over them.
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} != --tensor-model-parallel-size {tp} needs "
            "--expert-model-parallel-size > 1"
        )
    if world_size is not None:
        check_world(world_size, ep, etp, tp, build.pipeline_model_parallel_size)


def joins_weight_gather(info) -> bool:
    """Whether this rank holds weights rank 0 gathers (the first DP replica's dense shards or
    the first expert-data-parallel replica's experts); the others may skip the gathers."""
    from megatron.core import parallel_state as ps

    if info.dp_rank == 0:
        return True
    return info.ep_size > 1 and ps.get_expert_data_parallel_rank() == 0


def gather_shards(shard: dict[str, torch.Tensor], info) -> list[dict[str, torch.Tensor]] | None:
    """Every TP rank's ``shard`` (CPU tensors, weights or grads by megatron name), in TP rank
    order, on global rank 0 (None elsewhere). Expert entries are renamed to their global
    index and hold every EP rank's experts; with ETP < TP, ETP slice s sits in entry s and
    the later entries carry no experts. A collective of this rank's TP group and, with
    EP or ETP != TP, of its expert tensor-and-model-parallel group: all their ranks call it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    where = placement()
    if where.ep_size == 1 and where.etp_size == info.tp_size:
        shards = [None] * info.tp_size
        dist.all_gather_object(shards, shard, group=ps.get_tensor_model_parallel_group())
        return shards if info.rank == 0 else None
    dense = {k: v for k, v in shard.items() if not is_expert_param(k)}
    experts = {k: v for k, v in shard.items() if is_expert_param(k)}
    shards = [None] * info.tp_size
    dist.all_gather_object(shards, dense, group=ps.get_tensor_model_parallel_group())
    group = ps.get_expert_tensor_and_model_parallel_group()
    pieces = [None] * dist.get_world_size(group)
    dist.all_gather_object(pieces, (where.ep_rank, where.etp_rank, experts), group=group)
    return merge_expert_shards(shards, pieces) if info.rank == 0 else None


def merge_expert_shards(shards: list[dict], pieces) -> list[dict]:
    """``shards`` (one dict per TP rank) with every (ep_rank, etp_rank, local expert entries)
    piece added under global expert names, ETP slice s into ``shards[s]`` (what `mcore_to_hf`
    reads). Pure: the gather's second half, also used by the conversion tests."""
    for ep_rank, etp_rank, part in pieces:
        n = len({int(_LOCAL_EXPERT.search(k).group(2)) for k in part})  # local experts per layer
        for k, v in part.items():
            shards[etp_rank][global_expert_name(k, ep_rank, n)] = v
    return shards


@dataclass(frozen=True)
class MicroBatchAlignment:
    """What the ranks' micro-batches must share because a forward runs collectives across them.

    same_count: every DP rank runs as many micro-batches (EP > 1 on a MoE model: each MoE layer
        dispatches tokens across the EP ranks, which are DP ranks with different samples);
    same_lengths: micro-batch i has as many tokens on every EP rank (the all-gather dispatcher
        gathers equal-sized token blocks across the EP group);
    multiple: token counts are padded to a multiple of this (sequence parallelism: TP);
    count_multiple: micro-batch counts are a multiple of this (virtual pipeline stages: PP,
        `pipeline.micro_batch_multiple`), reached by splitting groups like ``same_count``.

    Padding and extra micro-batches follow `batching` (weight 0, a segment of their own, masked
    out of MoE routing statistics and the aux loss), so losses and gradients do not change.
    """

    same_count: bool = False
    same_lengths: bool = False
    multiple: int = 1
    count_multiple: int = 1

    def __post_init__(self):
        if self.multiple < 1:
            raise ValueError(f"micro-batch padding multiple must be >= 1, got {self.multiple}")
        if self.count_multiple < 1:
            raise ValueError(f"micro-batch count multiple must be >= 1, got {self.count_multiple}")

    @classmethod
    def for_layout(cls, model: ModelArgs, build: ModelBuildArgs) -> MicroBatchAlignment:
        from slime.backends.megatron_utils.pipeline import micro_batch_multiple

        ep = build.expert_model_parallel_size if model.is_moe else 1
        sp = build.sequence_parallel and build.tensor_model_parallel_size > 1
        return cls(
            same_count=ep > 1,
            same_lengths=ep > 1 and model.moe_token_dispatcher_type == "allgather",
            multiple=build.tensor_model_parallel_size if sp else 1,
            count_multiple=micro_batch_multiple(build),
        )

    @property
    def active(self) -> bool:
        return self.same_count or self.same_lengths or self.multiple > 1 or self.count_multiple > 1

    def round_count(self, mbs: list, remake) -> list:
        """``mbs``, or ``remake(n)`` for the next multiple ``n`` of ``count_multiple`` (no
        collective: every stage of a pipeline holds the same samples and rounds alike)."""
        k = self.count_multiple
        if k > 1 and len(mbs) % k:
            mbs = remake(-(-len(mbs) // k) * k)
        return mbs

    def match_counts(self, mbs: list, remake) -> list:
        """``mbs`` with ``same_count`` and ``count_multiple`` met (see `align`); a collective
        of the DP group when ``same_count``: every rank calls it."""
        if self.same_count:
            import torch
            import torch.distributed as dist
            from megatron.core import parallel_state as ps

            count = torch.tensor([len(mbs)], dtype=torch.int64)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
            if int(count) > len(mbs):
                mbs = remake(int(count))
        return self.round_count(mbs, remake)

    def align(self, mbs: list, remake) -> list:
        """``mbs`` aligned; ``remake(n)`` rebuilds this rank's micro-batches as at least ``n``
        (`batching.make_micro_batches`' ``num_micro_batches``). Collectives of the DP group
        (counts) and the EP group (lengths) when those are asked for: every rank calls it."""
        if not self.active:
            return mbs
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from slime.backends.megatron_utils.batching import pad_micro_batch

        mbs = self.match_counts(mbs, remake)
        if not (self.same_lengths or self.multiple > 1):
            return mbs
        lengths = torch.tensor([mb.tokens.shape[-1] for mb in mbs], dtype=torch.int64)
        if self.same_lengths and lengths.numel():
            dist.all_reduce(lengths, op=dist.ReduceOp.MAX, group=ps.get_expert_model_parallel_group())
        m = self.multiple
        return [pad_micro_batch(mb, -(-int(n) // m) * m) for mb, n in zip(mbs, lengths)]
