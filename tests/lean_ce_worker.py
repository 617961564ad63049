"""Lean vs plain output-layer loss on one rank's vocab slice; TP=2 when run under torchrun.

    torchrun --nproc-per-node 2 tests/lean_ce_worker.py OUT.pt

`compare_paths` runs both paths of `log_probs.token_stats` (megatron's vocab-parallel CE on
materialised logits vs `lean_ce` from an `OutputHead`) on the same random hidden states and
output weight, with a loss that weights log-probs and entropy per token, and returns both
results and gradients (hidden: summed over TP, weight: this rank's slice). Rank 0 writes them.
"""

from __future__ import annotations

import sys

import torch


class _Layer(torch.nn.Module):
    """Stand-in for the output layer: `OutputHead` reads only ``weight``/``sequence_parallel``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.sequence_parallel = False


def compare_paths(vocab_size=301, padded=384, seq=37, hidden_size=16, chunk=5, seed=0) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from slime.backends.megatron_utils.log_probs import token_stats
    from slime.backends.megatron_utils.output_head import OutputHead

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq, 1, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(padded, hidden_size, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab_size, (1, seq), generator=gen)
    w_logp, w_ent = torch.rand(2, 1, seq, generator=gen, dtype=torch.float64)
    local = padded // tp
    start = rank * local
    out = {}
    for name in ("plain", "lean"):
        h = hidden.clone().requires_grad_(True)
        layer = _Layer(weight[start : start + local].clone())
        if name == "lean":
            output = OutputHead(hidden=h, layer=layer)
        else:
            output = torch.matmul(copy_to_tensor_model_parallel_region(h), layer.weight.t()).transpose(0, 1)
        logp, ent = token_stats(
            output, labels, vocab_size, start, chunk_tokens=chunk, with_entropy=True, entropy_grad=True
        )
        ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
        out[name] = {
            "logp": logp.detach(),
            "ent": ent.detach(),
            "grad_hidden": h.grad,
            "grad_weight": layer.weight.grad,
        }
    # log-softmax over the full (unpadded) vocabulary: the ground truth both must equal
    full = (hidden[:, 0] @ weight[:vocab_size].t()).log_softmax(-1)
    out["reference"] = {"logp": full.gather(1, labels[0, :, None])[:, 0], "ent": -(full.exp() * full).sum(-1)}
    return out


def main(out_path: str) -> None:
    from slime.backends.megatron_utils.parallel import ParallelLayout, destroy_parallel, init_parallel

    info = init_parallel(ParallelLayout(tensor=2))
    result = compare_paths()
    gathered = [None] * 2
    torch.distributed.all_gather_object(gathered, result)
    if info.rank == 0:
        torch.save(gathered, out_path)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
