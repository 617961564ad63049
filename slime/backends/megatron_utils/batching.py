"""From SFT samples to micro-batches: packing, dynamic batch size, per-token loss weights.

A sample arrives as ``tokens`` + ``loss_mask`` over its last ``response_length`` tokens
(slime's `Sample` convention). Position t predicts token t+1, so its label is ``tokens[t+1]``
and its weight comes from the mask of token t+1; the last position of each sample predicts
nothing (weight 0), which is also what keeps packed samples from training across boundaries.

Both loss normalizations of invariant 1 are a weighted sum of token cross-entropies with
weights fixed here, before the step, from global counts:

* per token (``--calculate-per-token-loss``): w = 1 / (supervised tokens in the global batch);
* per sample: w = 1 / (supervised tokens of the sample * samples in the global batch).

So the loss is the same whatever the micro-batching, packing, DP or TP layout, and gradients
are summed (never averaged) across micro-batches and DP ranks.

Layouts whose ranks run collectives inside every forward need the micro-batches to line up:
under expert parallelism each EP rank must run as many micro-batches as the others
(``num_micro_batches``: the greedy groups are split further, then empty ones added), and
sequence parallelism (TP > 1) or the all-gather token dispatcher need token counts that tile
the TP group or match across EP ranks (`pad_micro_batch`). Padding positions get weight 0 and
a segment of their own (so they attend to nothing real and no sample attends to them) and
``segment_ids`` -1, which is also the MoE routers' padding mask (excluded from the
load-balancing loss and the router statistics).

RL samples also carry per-response-token values (``TOKEN_FIELDS``: advantages, old / reference /
engine log-probs, one value per response token as in slime). They are placed on the position
that predicts their token, like the weights, and travel in ``MicroBatch.fields``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from slime.backends.megatron_utils.context_parallel import CPShard

__all__ = [
    "TOKEN_FIELDS",
    "BatchingArgs",
    "MicroBatch",
    "make_micro_batches",
    "pad_micro_batch",
    "partition_dynamic",
    "partition_fixed",
    "token_weights",
]

# Per-response-token sample values carried to the loss (key in the sample = key in MicroBatch.fields).
TOKEN_FIELDS = ("advantages", "log_probs", "ref_log_probs", "rollout_log_probs")


@dataclass(frozen=True)
class BatchingArgs:
    """How one DP rank's samples become micro-batches.

    use_dynamic_batch_size / max_tokens_per_gpu: pack up to N tokens per micro-batch (a longer
    sample goes alone); otherwise ``micro_batch_size`` samples each.
    qkv_format: ``thd`` packs samples into one row with cu_seqlens; ``sbhd`` pads a
    [batch, seq] micro-batch (the unpacked reference).
    calculate_per_token_loss: per-token normalization (else per-sample means).
    """

    micro_batch_size: int = 1
    use_dynamic_batch_size: bool = False
    max_tokens_per_gpu: int | None = None
    qkv_format: str = "thd"
    calculate_per_token_loss: bool = False

    def __post_init__(self):
        if self.use_dynamic_batch_size and not self.max_tokens_per_gpu:
            raise ValueError("--use-dynamic-batch-size needs --max-tokens-per-gpu")
        if self.micro_batch_size < 1:
            raise ValueError("--micro-batch-size must be >= 1")
        if self.qkv_format not in ("thd", "sbhd"):
            raise ValueError(f"--qkv-format must be thd or sbhd, got {self.qkv_format!r}")
        if self.use_dynamic_batch_size and self.qkv_format != "thd":
            raise ValueError("--use-dynamic-batch-size packs sequences: it needs --qkv-format thd")


@dataclass
class MicroBatch:
    """Tensors of one forward pass (all on CPU until `to`)."""

    tokens: torch.Tensor  # [1, T] (thd) or [b, s] (sbhd)
    position_ids: torch.Tensor  # same shape; restarts at 0 per sample
    labels: torch.Tensor  # same shape; next token (0 where weight is 0)
    weights: torch.Tensor  # same shape, float64 -> cast in the loss; 0 on unsupervised positions
    cu_seqlens: torch.Tensor | None  # [n + 1] int32 for thd, None for sbhd
    max_seqlen: int
    num_samples: int
    real_tokens: int
    capacity: int  # token slots this micro-batch occupies (packing efficiency = real / capacity)
    supervised_tokens: int
    segment_ids: torch.Tensor | None = None  # same shape: index of the sample in this micro-batch, -1 on padding
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # TOKEN_FIELDS present, float32, same shape
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)  # (row, start, length, response_length)
    cp: CPShard | None = None  # this CP rank's share (`context_parallel.split_micro_batch`); spans: the full pack's

    def to(self, device) -> "MicroBatch":
        for name in ("tokens", "position_ids", "labels", "weights", "cu_seqlens", "segment_ids"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device, non_blocking=True))
        self.fields = {k: v.to(device, non_blocking=True) for k, v in self.fields.items()}
        return self

    @property
    def padding_mask(self) -> torch.Tensor | None:
        """True on padding positions (megatron's MoE routing mask), None when there are none.
        A CP shard always has one: megatron's router counts the micro-batch's tokens over the
        CP group from the mask when given, from the shard sizes otherwise, so one CP rank with
        padding and one without would disagree on that count (and on the aux loss)."""
        if self.segment_ids is None or (self.cp is None and self.real_tokens == self.tokens.numel()):
            return None
        return self.segment_ids < 0

    def response_positions(self, i: int) -> tuple[int, slice]:
        """(row, positions) whose predictions are sample i's response tokens, in order."""
        row, start, length, resp = self.spans[i]
        if resp >= length:
            raise ValueError(f"sample of {length} tokens, response_length {resp}: no prompt token before the response")
        return row, slice(start + length - resp - 1, start + length - 1)


def _full_mask(sample: dict) -> list[int]:
    tokens, mask, resp = sample["tokens"], sample["loss_mask"], sample["response_length"]
    if len(mask) != resp or resp > len(tokens):
        raise ValueError(f"sample has {len(tokens)} tokens, response_length {resp}, loss_mask of {len(mask)}")
    return [0] * (len(tokens) - resp) + list(mask)


def _position_field(sample: dict, key: str, index: int) -> torch.Tensor:
    """A per-response-token value moved onto the positions that predict those tokens."""
    values = torch.as_tensor(sample[key], dtype=torch.float32).flatten()
    resp, n = sample["response_length"], len(sample["tokens"])
    if values.numel() != resp:
        raise ValueError(f"sample {index}: {key!r} has {values.numel()} values, response_length is {resp}")
    full = torch.cat([values.new_zeros(n - resp), values])
    return torch.cat([full[1:], values.new_zeros(1)])


def _present_fields(samples: list[dict]) -> tuple[str, ...]:
    keys = []
    for key in TOKEN_FIELDS:
        have = [s.get(key) is not None for s in samples]
        if any(have) and not all(have):
            raise ValueError(f"{key!r} is set on some samples but missing on sample {have.index(False)}")
        if all(have):
            keys.append(key)
    return tuple(keys)


def token_weights(samples: list[dict], per_token: bool, global_supervised: int, global_samples: int) -> list[torch.Tensor]:
    """Per-position loss weights (float64) for each sample; see the module docstring."""
    out = []
    for s in samples:
        mask = torch.tensor(_full_mask(s)[1:] + [0], dtype=torch.float64)
        n = float(mask.sum())
        if per_token:
            w = mask / max(global_supervised, 1)
        else:
            w = mask / (n * global_samples) if n else mask
        out.append(w)
    return out


def partition_dynamic(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy in order: start a new micro-batch when the next sample would exceed max_tokens."""
    groups: list[list[int]] = []
    current, used = [], 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def partition_fixed(n: int, micro_batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]


def split_to_count(groups: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """At least ``count`` groups, in sample order: the group of most tokens (with two or more
    samples) is split in two until there are enough; then empty groups are appended."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [i for i, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            groups += [[] for _ in range(count - len(groups))]
            break
        i = max(splittable, key=lambda j: sum(lengths[k] for k in groups[j]))
        g = groups[i]
        groups[i : i + 1] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups


def _empty(length: int) -> MicroBatch:
    """A micro-batch of padding only (a rank with fewer samples than micro-batches elsewhere)."""
    zeros = torch.zeros(1, length, dtype=torch.long)
    return MicroBatch(
        tokens=zeros,
        position_ids=torch.arange(length)[None],
        labels=zeros.clone(),
        weights=torch.zeros(1, length, dtype=torch.float64),
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32),
        max_seqlen=length,
        num_samples=0,
        real_tokens=0,
        capacity=length,
        supervised_tokens=0,
        segment_ids=torch.full((1, length), -1, dtype=torch.long),
    )


def pad_micro_batch(mb: MicroBatch, length: int) -> MicroBatch:
    """``mb`` (packed THD) padded to ``length`` tokens: one padding segment at the end, weight
    0, positions from 0, segment id -1 (see the module docstring). Returns ``mb`` itself when
    it already has ``length`` tokens."""
    n = mb.tokens.shape[-1]
    if mb.cu_seqlens is None or mb.tokens.shape[0] != 1:
        raise ValueError("padding micro-batches needs packed sequences (--qkv-format thd)")
    if length < n:
        raise ValueError(f"cannot pad a micro-batch of {n} tokens to {length}")
    if length == n:
        return mb
    extra = length - n

    def cat(t: torch.Tensor, fill) -> torch.Tensor:
        return torch.cat([t, t.new_full((1, extra), fill)], dim=1)

    return MicroBatch(
        tokens=cat(mb.tokens, 0),
        position_ids=torch.cat([mb.position_ids, torch.arange(extra, dtype=mb.position_ids.dtype)[None]], dim=1),
        labels=cat(mb.labels, 0),
        weights=cat(mb.weights, 0.0),
        cu_seqlens=torch.cat([mb.cu_seqlens, mb.cu_seqlens.new_tensor([length])]),
        max_seqlen=max(mb.max_seqlen, extra),
        num_samples=mb.num_samples,
        real_tokens=mb.real_tokens,
        capacity=max(mb.capacity, length),
        supervised_tokens=mb.supervised_tokens,
        segment_ids=cat(mb.segment_ids, -1),
        fields={k: cat(v, 0.0) for k, v in mb.fields.items()},
        spans=list(mb.spans),
    )


def _pack(
    samples: list[dict], weights: list[torch.Tensor], capacity: int, fields: list[dict[str, torch.Tensor]]
) -> MicroBatch:
    toks, pos, labels, ws, cu = [], [], [], [], [0]
    for s, w in zip(samples, weights):
        t = torch.tensor(s["tokens"], dtype=torch.long)
        toks.append(t)
        pos.append(torch.arange(len(t)))
        labels.append(torch.cat([t[1:], t.new_zeros(1)]))
        ws.append(w)
        cu.append(cu[-1] + len(t))
    lengths = [len(t) for t in toks]
    return MicroBatch(
        tokens=torch.cat(toks)[None],
        position_ids=torch.cat(pos)[None],
        labels=torch.cat(labels)[None],
        weights=torch.cat(ws)[None],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(lengths),
        num_samples=len(samples),
        real_tokens=cu[-1],
        capacity=max(capacity, cu[-1]),
        supervised_tokens=int(sum(int((w > 0).sum()) for w in ws)),
        segment_ids=torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])[None],
        fields={k: torch.cat([f[k] for f in fields])[None] for k in fields[0]},
        spans=[(0, cu[i], n, s["response_length"]) for i, (n, s) in enumerate(zip(lengths, samples))],
    )


def _pad(samples: list[dict], weights: list[torch.Tensor], fields: list[dict[str, torch.Tensor]]) -> MicroBatch:
    s_max = max(len(s["tokens"]) for s in samples)
    b = len(samples)
    tokens = torch.zeros(b, s_max, dtype=torch.long)
    labels = torch.zeros(b, s_max, dtype=torch.long)
    ws = torch.zeros(b, s_max, dtype=torch.float64)
    segment_ids = torch.full((b, s_max), -1, dtype=torch.long)
    padded = {k: torch.zeros(b, s_max, dtype=torch.float32) for k in fields[0]}
    for i, (s, w, f) in enumerate(zip(samples, weights, fields)):
        t = torch.tensor(s["tokens"], dtype=torch.long)
        tokens[i, : len(t)] = t
        labels[i, : len(t) - 1] = t[1:]
        ws[i, : len(t)] = w
        segment_ids[i, : len(t)] = i
        for k, v in f.items():
            padded[k][i, : len(t)] = v
    real = sum(len(s["tokens"]) for s in samples)
    return MicroBatch(
        tokens=tokens,
        position_ids=torch.arange(s_max).expand(b, s_max).contiguous(),
        labels=labels,
        weights=ws,
        cu_seqlens=None,
        max_seqlen=s_max,
        num_samples=b,
        real_tokens=real,
        capacity=b * s_max,
        supervised_tokens=int((ws > 0).sum()),
        segment_ids=segment_ids,
        fields=padded,
        spans=[(i, 0, len(s["tokens"]), s["response_length"]) for i, s in enumerate(samples)],
    )


def make_micro_batches(
    samples: list[dict],
    args: BatchingArgs,
    global_supervised: int,
    global_samples: int,
    num_micro_batches: int = 0,
) -> list[MicroBatch]:
    """This rank's micro-batches for one optimizer step; samples keep their order across them.
    ``num_micro_batches``: at least that many (`split_to_count`; empty ones are one padding
    token each), so that ranks with collectives in every forward run the same number."""
    if not samples:
        return [_empty(1) for _ in range(num_micro_batches)]
    weights = token_weights(samples, args.calculate_per_token_loss, global_supervised, global_samples)
    keys = _present_fields(samples)
    fields = [{k: _position_field(s, k, i) for k in keys} for i, s in enumerate(samples)]
    lengths = [len(s["tokens"]) for s in samples]
    if args.use_dynamic_batch_size:
        groups = partition_dynamic(lengths, args.max_tokens_per_gpu)
    else:
        groups = partition_fixed(len(samples), args.micro_batch_size)
    if num_micro_batches > len(groups):
        if args.qkv_format != "thd":
            raise ValueError(
                "aligning micro-batch counts (across expert-parallel ranks, or to a multiple of "
                "--pipeline-model-parallel-size with virtual pipeline stages) needs --qkv-format thd"
            )
        groups = split_to_count(groups, lengths, num_micro_batches)
    out = []
    for g in groups:
        if not g:
            out.append(_empty(1))
            continue
        chosen, w, f = [samples[i] for i in g], [weights[i] for i in g], [fields[i] for i in g]
        if args.qkv_format == "thd":
            cap = args.max_tokens_per_gpu if args.use_dynamic_batch_size else sum(lengths[i] for i in g)
            out.append(_pack(chosen, w, cap, f))
        else:
            out.append(_pad(chosen, w, f))
    return out
