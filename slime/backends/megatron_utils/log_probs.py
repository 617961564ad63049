"""Per-token log-probabilities and entropy from this TP rank's slice of the vocabulary.

The output layer is column-parallel: each TP rank holds logits for ``vocab_start ..
vocab_start + V/tp`` only. Both quantities need sums over the full vocabulary, so partial
sums are all-reduced over the TP group. The all-reduce used for values that carry gradient is
megatron's ``reduce_from_tensor_model_parallel_region`` (sum forward, identity backward): the
loss is the same on every TP rank, so each rank's partial sum gets the gradient of the total.

Logits beyond the tokenizer's vocabulary (padding added to divide by TP) are never predictions.
"""

from __future__ import annotations

import torch

__all__ = ["mask_padded_vocab", "token_entropy", "token_log_probs"]


def _padding(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor | None:
    local = logits.shape[-1]
    n_real = vocab_size - vocab_start
    if n_real >= local:
        return None
    pad = torch.zeros(local, dtype=torch.bool, device=logits.device)
    pad[max(n_real, 0) :] = True
    return pad


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """-inf on the padded vocabulary entries of this slice (a new tensor only when there are any)."""
    pad = _padding(logits, vocab_size, vocab_start)
    return logits if pad is None else logits.masked_fill(pad, float("-inf"))


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """log p(labels) per position (float32, differentiable), with megatron's vocab-parallel CE.

    megatron's kernel overwrites its input in place; callers that need ``logits`` afterwards
    (e.g. for the entropy) must compute from them first or pass a copy.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(mask_padded_vocab(logits.float(), vocab_size, vocab_start), labels)


def token_entropy(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """-sum_v p_v log p_v per position over the full (TP-split) vocabulary; float32.

    H = log Z - sum_v p_v l_v with Z = sum_v exp(l_v), evaluated on l - max(l); the max is
    all-reduced without gradient since H does not depend on it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    pad = _padding(logits, vocab_size, vocab_start)
    real = logits if pad is None else logits.masked_fill(pad, 0.0)  # finite everywhere for p * l
    shift = (logits if pad is None else logits.masked_fill(pad, float("-inf"))).detach().amax(-1, keepdim=True)
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    centered = real - shift  # H is shift-invariant: work with l - max to keep the sums small
    exp = centered.exp()
    if pad is not None:
        exp = exp.masked_fill(pad, 0.0)
    z = reduce_from_tensor_model_parallel_region(exp.sum(-1))
    p_dot_l = reduce_from_tensor_model_parallel_region((exp * centered).sum(-1)) / z
    return z.log() - p_dot_l
