"""Memory-lean vocab-parallel log-probs and entropy straight from hidden states.

The plain path materialises the logits of a whole micro-batch, ``[tokens, vocab]`` in fp32
(8k tokens x 151,936 = 4.6 GiB), keeps them for backward and adds a gradient of the same size.
Here the output projection and the softmax statistics are fused per chunk of tokens: the
forward keeps only per-token numbers (log-sum-exp and entropy), and the backward recomputes a
chunk's logits from (hidden, output weight), turns them into the logits' gradient in place and
folds it straight into the gradients of the hidden states and of the weight. At most one or
two ``[chunk, vocab/tp]`` fp32 buffers exist at a time.

Vocab-parallel (TP): each rank holds its slice of the output weight, so each chunk's row max
and sums (exp-sum, label logit, sum p*l) are all-reduced over the TP group; the backward needs
no collective since the saved log-sum-exp and entropy are already global. The gradient of the
hidden states is each rank's partial sum; the caller routes the input through megatron's
``copy_to_tensor_model_parallel_region`` (see `log_probs`), whose backward sums it over TP,
exactly as the column-parallel output layer does.

Math (l: logits, L = logsumexp(l), p = exp(l - L), y: label):
    log p(y) = l_y - L                     d/dl = onehot(y) - p
    H = L - sum_v p_v l_v                  dH/dl = -p * (log p + H)
Vocabulary entries past the tokenizer's (TP padding) get l = -inf: p = 0, never a label.
"""

from __future__ import annotations

import torch

# The flag group lives in a torch-free module so the CLI parses fast; re-exported here.
from slime.backends.megatron_utils.loss_config import DEFAULT_CHUNK_TOKENS, CrossEntropyConfig, add_loss_arguments

__all__ = ["CrossEntropyConfig", "DEFAULT_CHUNK_TOKENS", "add_loss_arguments", "chunked_log_probs"]


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, n_real: int) -> torch.Tensor:
    """fp32 logits of one chunk on this rank's vocab slice, -inf on padded entries.

    The GEMM runs in the model's dtype as the output layer's does, then is upcast, so the
    values equal the plain path's ``logits.float()``.
    """
    logits = torch.matmul(hidden, weight.t()).float()
    if n_real < logits.shape[1]:
        logits[:, max(n_real, 0) :] = float("-inf")
    return logits


def _label_columns(labels: torch.Tensor, vocab_start: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column in this slice, whether the label lives on this rank) per token."""
    col = labels - vocab_start
    mine = (col >= 0) & (col < local)
    return col.clamp(0, local - 1), mine


# Vocabulary rows per GEMM when accumulating a bf16/fp16 weight gradient: bounds the
# low-precision partial product that is added into the fp32 accumulator.
_WGRAD_ROWS = 16384


def _accumulate_weight_grad(acc: torch.Tensor, grad_fp32: torch.Tensor, grad_low: torch.Tensor, hidden: torch.Tensor):
    """acc (fp32, [V, H]) += grad^T @ hidden for one chunk of tokens.

    fp32 models: one in-place GEMM. Half-precision models: the GEMM runs in the model's dtype
    (tensor cores, fp32 accumulation inside, as the plain path's single weight-gradient GEMM),
    over slices of the vocabulary so the half-precision partial stays small, then is added in fp32.
    """
    if hidden.dtype == torch.float32:
        acc.addmm_(grad_fp32.t(), hidden)
        return
    for a in range(0, acc.shape[0], _WGRAD_ROWS):
        b = min(a + _WGRAD_ROWS, acc.shape[0])
        acc[a:b].add_(torch.mm(grad_low[:, a:b].t(), hidden))


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size, vocab_start, chunk, with_entropy, entropy_grad, group):
        import torch.distributed as dist

        n, local = hidden.shape[0], weight.shape[0]
        n_real = vocab_size - vocab_start
        reduce = group is not None and dist.get_world_size(group) > 1
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.zeros_like(logp)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = _chunk_logits(hidden[s:e], weight, n_real)
            shift = logits.amax(-1)
            if reduce:
                dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(shift[:, None])  # l - max: exp cannot overflow
            col, mine = _label_columns(labels[s:e], vocab_start, local)
            picked = torch.where(mine, logits.gather(1, col[:, None]).squeeze(1), 0.0)
            if with_entropy:
                exp = logits.exp()
                if n_real < local:  # 0 * -inf would be nan in sum(p * l); those p are 0
                    logits[:, max(n_real, 0) :] = 0.0
                p_dot_l = torch.bmm(exp[:, None, :], logits[:, :, None]).view(-1)  # row dots, no [C, V] temp
                stats = torch.stack([exp.sum(-1), picked, p_dot_l])
                del exp
            else:
                stats = torch.stack([logits.exp_().sum(-1), picked])
            del logits
            if reduce:
                dist.all_reduce(stats, group=group)
            log_z = stats[0].log()
            logp[s:e] = stats[1] - log_z
            lse[s:e] = shift + log_z
            if with_entropy:
                ent[s:e] = log_z - stats[2] / stats[0]
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.args = (vocab_size, vocab_start, chunk, with_entropy and entropy_grad)
        if not (with_entropy and entropy_grad):
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        vocab_size, vocab_start, chunk, entropy_grad = ctx.args
        n, local = hidden.shape[0], weight.shape[0]
        n_real = vocab_size - vocab_start
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # fp32 accumulator over chunks (the plain path's single GEMM accumulates in fp32 too).
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        grad_logp = grad_logp.float()
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            g = grad_logp[s:e, None]
            buf = _chunk_logits(hidden[s:e], weight, n_real).sub_(lse[s:e, None])  # log p
            if entropy_grad:
                p = buf.exp()
                # -p * (glogp + gH * (log p + H)), in place in the log p buffer
                buf.add_(ent[s:e, None]).mul_(grad_ent[s:e, None].float()).add_(g)
                if n_real < local:  # -inf * 0 there; p = 0 anyway
                    buf[:, max(n_real, 0) :] = 0.0
                buf.mul_(p).neg_()
                del p
            else:
                buf.exp_().mul_(-g)  # -glogp * p
            col, mine = _label_columns(labels[s:e], vocab_start, local)
            buf.scatter_add_(1, col[:, None], torch.where(mine, g.squeeze(1), 0.0)[:, None])  # + glogp * onehot
            h = hidden[s:e]
            low = buf.to(hidden.dtype)
            if grad_hidden is not None:
                torch.matmul(low, weight, out=grad_hidden[s:e])
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, buf, low, h)
            del buf, low
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def chunked_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    vocab_start: int,
    chunk_tokens: int,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(labels), entropy or None) per token, fp32, without the ``[N, vocab]`` logits.

    hidden: ``[N, H]`` (the same on every TP rank); weight: this rank's ``[V/tp, H]`` slice of
    the output layer starting at vocabulary index ``vocab_start``; labels: ``[N]`` global ids;
    vocab_size: the tokenizer's (entries past it are padding); group: the TP process group
    (None or size 1: no collectives). The entropy carries gradient when ``entropy_grad``.
    The gradient w.r.t. ``hidden`` is this rank's partial sum (sum it over TP).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    logp, ent = _ChunkedLogProbs.apply(
        hidden, weight, labels, vocab_size, vocab_start, chunk_tokens, with_entropy, entropy_grad, group
    )
    return logp, (ent if with_entropy else None)
