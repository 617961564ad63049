"""policy_loss at TP=2 and then DP=2 in the same two torchrun processes (one start-up for both).

    torchrun --nproc-per-node 2 tests/rl_dist_worker.py HF_DIR IN.pt OUT.pt

IN.pt (``torch.save``; read with weights_only=True): {"samples" (with ``reward``), "algorithm"
and "advantage_algorithm" (AlgorithmConfig fields), "per_token"}. Rank 0 writes OUT.pt: for
"tp2" and "dp2", the global loss, HF-named gradients (float64), the first train step's
metrics; (tp2) the per-sample log-probs and entropies of `compute_log_probs`, and after the
step the weight-sync buckets of `iter_hf_buckets` ("bucket_bytes") with the log-probs of
sample 0 (``probe_log_probs``); (dp2) rank 0's advantages from `compute_advantages` under
"advantage_algorithm" and their statistics.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_helpers import build_actor  # noqa: E402


def run(hf_dir: str, inp: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.parallel import destroy_parallel

    spec = torch.load(inp, weights_only=True)
    samples, cfg = spec["samples"], AlgorithmConfig(**spec["algorithm"])
    batching = BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=200, calculate_per_token_loss=spec["per_token"])
    result = {}
    for name, tp in (("tp2", 2), ("dp2", 1)):
        actor = build_actor(Path(hf_dir), batching, len(samples), "policy_loss", cfg, tp=tp)
        mine = samples if tp == 2 else samples[actor.info.dp_rank :: actor.info.dp_size]
        entry = {}
        if tp == 2:
            entry.update(actor.compute_log_probs(mine, with_entropy=True))
        loss, grads = actor.gradients(mine)
        full = actor.gather_hf(grads)
        entry.update(loss=loss, grads=None if full is None else {k: v.double() for k, v in full.items()})
        entry["metrics"] = actor.train_step(mine)
        if tp == 2:  # both ranks iterate (TP gathers); rank 0 gets the tensors
            entry["buckets"] = list(actor.iter_hf_buckets(spec["bucket_bytes"]))
            entry["probe_log_probs"] = actor.compute_log_probs(mine[:1])["log_probs"][0]
        if tp == 1:  # advantages whitened over both DP ranks' samples
            actor.loss_ctx = dataclasses.replace(actor.loss_ctx, algorithm=AlgorithmConfig(**spec["advantage_algorithm"]))
            entry["advantage_stats"] = actor.compute_advantages(mine)
            entry["advantages"] = [s["advantages"] for s in mine]
        result[name] = entry
        ps.destroy_model_parallel()  # keep the process group: the next layout reuses it
    if actor.info.rank == 0:
        torch.save(result, out)
    destroy_parallel()


if __name__ == "__main__":
    run(*sys.argv[1:4])
