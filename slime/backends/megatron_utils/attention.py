"""Core attention for megatron-core's local layer spec, with packed (THD) sequences.

megatron-core's local ``DotProductAttention`` rejects packed sequences and builds its causal
mask on CUDA; Transformer Engine is not available everywhere. `PackedCoreAttention` takes its
place in the layer spec (same constructor and forward signature) and offers three backends
(``--attention-backend``):

* ``sdpa``: the reference. Each sample of the pack gets its own causal SDPA call, so no token
  can attend across a sample boundary by construction. Runs on CPU and GPU.
* ``flex``: one FlexAttention call over the whole pack with a document-causal block mask
  (``torch.compile``-d on CUDA). The CUDA fast path.
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash varlen in PyTorch), CUDA only.

Positions restart per sample because megatron applies RoPE per ``cu_seqlens`` segment in THD.

Under context parallelism (``--context-parallel-size`` > 1) every backend takes the masked
all-gather path of `context_parallel.cp_attention` (sdpa with a zigzag-causal mask): the flex
and varlen kernels are not wired for CP yet.

``--attention-softmax-in-fp32`` (``config.attention_softmax_in_fp32``) under bf16/fp16: flex and
varlen keep the softmax statistics in fp32 inside the kernel already; sdpa gets q/k/v upcast to
fp32 (exact softmax in fp32, at twice the activation memory of that call).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

__all__ = ["BACKENDS", "PackedCoreAttention", "packed_attention"]

BACKENDS = ("sdpa", "flex", "varlen")


def _sdpa_per_sample(q, k, v, cu_seqlens, scale, dropout_p):
    """q: [t, hq, d], k/v: [t, hkv, d]; one causal SDPA per sample."""
    outs = []
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qi, ki, vi = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention


def _document_block_mask(cu_seqlens: torch.Tensor, total: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths.to(device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)


def _flex(q, k, v, cu_seqlens, scale, block_mask):
    total = q.shape[0]
    if block_mask is None:
        block_mask = _document_block_mask(cu_seqlens, total, q.device)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = _compiled_flex()(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


def _varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    params = inspect.signature(varlen_attn).parameters
    # Its causal switch changed between torch releases (is_causal -> window_size).
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    extra = {"enable_gqa": True} if "enable_gqa" in params and q.shape[1] != k.shape[1] else {}
    if not extra and q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, **causal, **extra)


def packed_attention(q, k, v, cu_seqlens, backend="sdpa", scale=None, dropout_p=0.0, max_seqlen=None, block_mask=None):
    """Attention over a pack: q [t, hq, d], k/v [t, hkv, d] -> [t, hq, d], causal within samples."""
    if backend == "sdpa":
        return _sdpa_per_sample(q, k, v, cu_seqlens, scale, dropout_p)
    if dropout_p:
        raise ValueError(f"attention dropout is only supported by the sdpa backend, not {backend!r}")
    if backend == "flex":
        return _flex(q, k, v, cu_seqlens, scale, block_mask)
    if backend == "varlen":
        if not q.is_cuda:
            raise ValueError("the varlen attention backend needs CUDA; use sdpa or flex on CPU")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return _varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")


class PackedCoreAttention(MegatronModule):
    """Drop-in for megatron's ``DotProductAttention`` that handles THD packed sequences."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "sdpa",
    ):
        super().__init__(config=config)
        self.cp_group = None
        if config.context_parallel_size > 1:
            from megatron.core import parallel_state as ps

            cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            self.cp_group = cp if cp is not None else ps.get_context_parallel_group()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
        self.backend = backend
        kv_channels = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_in_fp32 = bool(config.attention_softmax_in_fp32)
        self._mask_cache: tuple | None = None  # (cu_seqlens tensor, block mask), shared across layers

    def _block_mask(self, cu_seqlens, total, device):
        if self.backend != "flex":
            return None
        cached = self._mask_cache
        if cached is not None and cached[0] is cu_seqlens:
            return cached[1]
        mask = _document_block_mask(cu_seqlens, total, device)
        self._mask_cache = (cu_seqlens, mask)
        return mask

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention bias is not supported")
        dropout_p = self.dropout_p if self.training else 0.0
        out_dtype = query.dtype
        if self.softmax_in_fp32 and self.backend == "sdpa" and out_dtype in (torch.bfloat16, torch.float16):
            query, key, value = query.float(), key.float(), value.float()
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # [t, heads, d]; megatron reshapes the output to [t, 1, heads * d].
            cu = packed_seq_params.cu_seqlens_q
            if self.cp_group is not None:  # every backend: the masked path of `context_parallel`
                from slime.backends.megatron_utils.context_parallel import cp_attention

                out = cp_attention(query, key, value, cu, self.scale, dropout_p, self.cp_group)
                return out.reshape(out.shape[0], -1).to(out_dtype)
            out = packed_attention(
                query,
                key,
                value,
                cu,
                self.backend,
                self.scale,
                dropout_p,
                packed_seq_params.max_seqlen_q,
                self._block_mask(cu, query.shape[0], query.device),
            )
            return out.reshape(out.shape[0], -1).to(out_dtype)
        if self.cp_group is not None:
            raise ValueError("context parallelism needs packed (THD) micro-batches (--qkv-format thd)")
        # [s, b, heads, d]: ordinary causal attention over each row of the batch.
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1]
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1).to(out_dtype)
