"""Context parallelism (``--context-parallel-size N``) for packed (THD) micro-batches, without
Transformer Engine.

Every CP rank of a DP rank gets the same samples and builds the same micro-batches (packing up
to N x ``--max-tokens-per-gpu`` tokens each, as slime does: the N ranks share them). Each
micro-batch is then split, sample by sample, with causal load balancing ("zigzag"): a sample
padded to P, a multiple of 2N, is cut into 2N chunks of P / 2N; CP rank r keeps chunks r and
2N-1-r, so every rank holds as many early (cheap) as late (expensive) causal rows. Labels, loss
weights and the RL per-token fields are computed on the full sequence first (`batching`) and
split the same way, so the loss stays a sum of token terms with global weights: the CP ranks'
partial losses add up to the single-rank loss, and megatron's DDP sums gradients over the
data-parallel group *with* context parallel (config.calculate_per_token_loss: no scaling).

The split micro-batch keeps megatron's THD-with-CP convention: ``cu_seqlens`` are the global,
padded boundaries (megatron's RoPE divides them by N and picks each rank's zigzag positions,
so rotary positions stay exact), and this rank's tokens are, per sample, its two chunks.

Attention (`cp_attention`): K and V are all-gathered over the CP group (autograd-aware: the
backward sums every rank's K/V gradient back to its owner) and each local query attends to
the keys of its own sample at positions <= its own: per sample, two SDPA calls (one per
query chunk) over the key prefix with a bottom-right causal alignment, no mask tensor.
Memory per layer: the whole micro-batch's K and V on every rank (2 x T x kv_heads x
head_dim): K/V memory is not divided by N (a ring exchange would be; not built); on CPU the
math kernel also forms each chunk's [heads, P / 2N, prefix] scores. Transformer Engine's CP
kernels are not used (TE is not installed here).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

__all__ = [
    "CPShard",
    "cp_attention",
    "cp_batching",
    "cp_gather",
    "cp_sum",
    "padded_length",
    "split_micro_batch",
    "zigzag_merge",
    "zigzag_positions",
]


def padded_length(length: int, cp_size: int) -> int:
    """``length`` rounded up to a multiple of 2 x cp_size (two chunks per CP rank)."""
    step = 2 * cp_size
    return -(-length // step) * step


def zigzag_positions(padded: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (in a sample padded to ``padded``) that CP rank ``cp_rank`` keeps: chunks
    ``cp_rank`` and ``2 cp_size - 1 - cp_rank`` of ``2 cp_size``, in that order."""
    if padded % (2 * cp_size):
        raise ValueError(f"padded length {padded} is not a multiple of 2 x CP size {2 * cp_size}")
    c = padded // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)
    return torch.cat([first, second])


@dataclass(frozen=True)
class CPShard:
    """How a split micro-batch sits in the full one: sample ``lengths`` (real tokens) and
    ``padded`` lengths, this rank and the CP size. The full micro-batch's ``spans`` stay valid
    for values brought back with `cp_gather`."""

    cp_size: int
    cp_rank: int
    lengths: tuple[int, ...]
    padded: tuple[int, ...]

    def __post_init__(self):
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"CP rank {self.cp_rank} outside CP size {self.cp_size}")
        if len(self.lengths) != len(self.padded):
            raise ValueError("CPShard: one padded length per sample")

    def source_index(self, cp_rank: int) -> torch.Tensor:
        """For each token of ``cp_rank``'s shard, its index in the full (unpadded) pack; -1 on padding."""
        out, start = [], 0
        for n, p in zip(self.lengths, self.padded):
            pos = zigzag_positions(p, self.cp_size, cp_rank)
            out.append(torch.where(pos < n, pos + start, torch.full_like(pos, -1)))
            start += n
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _take(x: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    """``x[..., index]`` over the last dimension, ``fill`` where index is -1."""
    safe = index.clamp_min(0)
    return torch.where(index >= 0, x[..., safe], torch.full_like(x[..., safe], fill))


def split_micro_batch(mb, cp_size: int, cp_rank: int, multiple: int = 1):
    """This CP rank's zigzag share of a packed (THD) `batching.MicroBatch`; see the module
    docstring. Padding tokens are token 0 with weight 0 and segment -1. ``multiple``: the
    shard's length is made a multiple of it (sequence parallelism: TP) by padding the last
    sample further, 2 x cp_size positions at a time (causal: its real tokens never see them)."""
    if mb.cu_seqlens is None or mb.tokens.shape[0] != 1:
        raise ValueError("context parallelism needs packed micro-batches (--qkv-format thd)")
    bounds = mb.cu_seqlens.tolist()
    lengths = tuple(e - s for s, e in itertools.pairwise(bounds))
    padded = [padded_length(n, cp_size) for n in lengths]
    # Each step adds 2 to the shard length, which is even already: at most `multiple` steps.
    while padded and (sum(padded) // cp_size) % multiple:
        padded[-1] += 2 * cp_size
    shard = CPShard(cp_size, cp_rank, lengths, tuple(padded))
    index = shard.source_index(cp_rank)
    cu = torch.tensor([0, *torch.tensor(shard.padded).cumsum(0).tolist()], dtype=torch.int32)
    # Position of every local token in its sample (padding continues the count: never attended).
    positions = torch.cat([zigzag_positions(p, cp_size, cp_rank) for p in shard.padded])[None]
    weights = _take(mb.weights, index, 0.0)
    segment_ids = None if mb.segment_ids is None else _take(mb.segment_ids, index, -1)
    return dataclasses.replace(
        mb,
        tokens=_take(mb.tokens, index, 0),
        position_ids=positions,
        labels=_take(mb.labels, index, 0),
        weights=weights,
        cu_seqlens=cu,
        max_seqlen=max(shard.padded),
        real_tokens=int((index >= 0).sum()),
        capacity=max(mb.capacity, int(cu[-1])) // cp_size,
        supervised_tokens=int((weights > 0).sum()),
        segment_ids=segment_ids,
        fields={k: _take(v, index, 0.0) for k, v in mb.fields.items()},
        cp=shard,
    )


def zigzag_merge(parts: list[torch.Tensor], shard: CPShard) -> torch.Tensor:
    """The full pack's values ``[..., T]`` from every CP rank's ``[..., T / N]`` shard (rank order)."""
    total = sum(shard.lengths)
    out = parts[0].new_zeros((*parts[0].shape[:-1], total))
    for rank, part in enumerate(parts):
        index = shard.source_index(rank).to(part.device)
        keep = index >= 0
        out[..., index[keep]] = part[..., keep]
    return out


def cp_gather(values: torch.Tensor, shard: CPShard, group) -> torch.Tensor:
    """All-gather a per-token tensor ``[..., T / N]`` over the CP group into the full pack's
    ``[..., T]`` (no gradient; for log-probs and parity checks)."""
    import torch.distributed as dist

    parts = [torch.empty_like(values) for _ in range(shard.cp_size)]
    dist.all_gather(parts, values.contiguous(), group=group)
    return zigzag_merge(parts, shard)


class _GatherKV(torch.autograd.Function):
    """[t, ...] -> [N, t, ...] over the CP group; backward: each rank gets the sum of every
    rank's gradient for its own slice (a reduce-scatter; all-reduce + slice on gloo)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad.flatten(0, 1), group=ctx.group)
        else:
            dist.all_reduce(grad, group=ctx.group)
            out = grad[dist.get_rank(ctx.group)].clone()
        return out, None


def cp_attention(q, k, v, cu_seqlens, scale, dropout_p, group):
    """Causal attention of this CP rank's queries over their samples' full keys.

    q: [t, hq, d], k/v: [t, hkv, d], this rank's zigzag shard (t = total padded / N);
    ``cu_seqlens``: the global padded boundaries. Returns [t, hq, d].

    The gathered shards are put back in sample order; then each of this rank's two query
    chunks (positions [r c, (r+1) c) and [(2N-1-r) c, (2N-r) c)) attends to the key prefix
    ending where the chunk ends, causally aligned to the bottom right (`causal_lower_right`:
    query i of the chunk sees keys <= its own position). No mask tensor is built, so CUDA
    keeps its flash / memory-efficient SDPA kernels.
    """
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    n, rank = dist.get_world_size(group), dist.get_rank(group)
    kv = _GatherKV.apply(torch.stack([k, v]), group)  # [N, 2, t, hkv, d]: one collective per layer
    bounds = (cu_seqlens // n).tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in itertools.pairwise(bounds):
        if e == s:
            continue
        c = (e - s) // 2
        shards = kv[:, :, s:e].unflatten(2, (2, c))  # [N, 2 (k/v), 2 (chunk), c, hkv, d]
        # Sample order: rank j holds chunks j and 2N-1-j, so the first halves come in rank
        # order and the second halves in reverse rank order.
        full = torch.cat([shards[:, :, 0], shards.flip(0)[:, :, 1]]).transpose(0, 1).flatten(1, 2)  # [2, P, hkv, d]
        for half, chunk in enumerate((rank, 2 * n - 1 - rank)):
            qi = q[s + half * c : s + (half + 1) * c].transpose(0, 1).unsqueeze(0)
            end = (chunk + 1) * c
            ki, vi = (x[:end].transpose(0, 1).unsqueeze(0) for x in (full[0], full[1]))
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=causal_lower_right(c, end), scale=scale, dropout_p=dropout_p, enable_gqa=gqa
            )
            outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


def cp_batching(batching, cp_size: int):
    """The `batching.BatchingArgs` a CP group packs with: N x ``--max-tokens-per-gpu`` tokens per
    micro-batch (slime's meaning: the N ranks share them, each holding about max_tokens_per_gpu)."""
    if not batching.max_tokens_per_gpu:
        return batching
    return dataclasses.replace(batching, max_tokens_per_gpu=batching.max_tokens_per_gpu * cp_size)


def cp_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the CP group with gradient (backward: the same sum of the gradients), for
    per-sample statistics whose tokens span the ranks (gspo's sequence-mean ratios)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, group=group)
