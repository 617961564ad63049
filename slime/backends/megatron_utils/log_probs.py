"""Per-token log-probabilities and entropy from this TP rank's slice of the vocabulary.

The output layer is column-parallel: each TP rank holds logits for ``vocab_start ..
vocab_start + V/tp`` only. Both quantities need sums over the full vocabulary, so partial
sums are all-reduced over the TP group. The all-reduce used for values that carry gradient is
megatron's ``reduce_from_tensor_model_parallel_region`` (sum forward, identity backward): the
loss is the same on every TP rank, so each rank's partial sum gets the gradient of the total.

Logits beyond the tokenizer's vocabulary (padding added to divide by TP) are never predictions.

The model's output is either those logits (plain path) or an `OutputHead` (the output layer's
input, with the memory-lean cross-entropy on): `token_stats` takes both and gives the same
numbers and gradients, so every built-in loss and `compute_log_probs` share one entry point.
"""

from __future__ import annotations

import torch

__all__ = ["mask_padded_vocab", "token_entropy", "token_log_probs", "token_stats"]


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


def token_stats(
    output,
    labels: torch.Tensor,
    vocab_size: int,
    vocab_start: int,
    *,
    chunk_tokens: int,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(labels), entropy or None), each shaped like ``labels``, float32.

    ``output``: this TP rank's logits slice, or an `OutputHead` (then computed chunk by chunk,
    ``chunk_tokens`` at a time, see `lean_ce`). The log-probs always carry gradient; the
    entropy only with ``entropy_grad`` (as a metric it keeps no graph).
    """
    from slime.backends.megatron_utils.output_head import OutputHead

    if isinstance(output, OutputHead):
        from megatron.core import parallel_state as ps

        from slime.backends.megatron_utils.lean_ce import chunked_log_probs

        hidden = output.tp_hidden()
        if hidden.shape[:2] != labels.shape:
            raise ValueError(f"hidden states {tuple(hidden.shape[:2])} do not match labels {tuple(labels.shape)}")
        group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        logp, ent = chunked_log_probs(
            hidden.reshape(-1, hidden.shape[-1]),
            output.output_weight,
            labels.reshape(-1),
            vocab_size,
            vocab_start,
            chunk_tokens,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            group=group,
        )
        return logp.view(labels.shape), (None if ent is None else ent.view(labels.shape))
    # Plain path. Entropy first: megatron's CE kernel overwrites the logits in place (the
    # entropy graph saves only tensors derived from them, and autograd's version check would
    # catch it otherwise).
    entropy = None
    if with_entropy:
        if entropy_grad:
            entropy = token_entropy(output, vocab_size, vocab_start)
        else:
            with torch.no_grad():
                entropy = token_entropy(output.detach(), vocab_size, vocab_start)
    return token_log_probs(output, labels, vocab_size, vocab_start), entropy
