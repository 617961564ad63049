"""Context parallelism checks, run at CP=2 by torchrun and at CP=1 (the reference) in pytest.

    torchrun --nproc-per-node 2 tests/cp_dist_worker.py HF_DIR IN.pt OUT.pt

IN.pt (``torch.save``; read with weights_only=True): {"samples" (with RL fields), "algorithm"
and "gspo" (AlgorithmConfig fields), "max_tokens" (tokens per micro-batch of the whole CP group)}.
`run_checks` builds three actors in turn, each on the same samples (one DP rank):

* "sft_token": lean loss, per-token, dynamic packing: the pack's per-sample logits (and, at
  CP=1, each sample's own unpacked logits), global loss, HF-named gradients, evaluate, a step;
  at CP > 1 then "state": torch_dist save, HF export (into IN's "workdir"), weight-sync
  buckets, and a fresh actor resumed from the save;
* "sft_sample": plain loss, per-sample, three samples per micro-batch: loss and gradients;
* "policy": policy_loss (lean, per-token): compute_log_probs with entropy, loss, gradients, a step;
* "gspo": policy_loss with --advantage-estimator gspo (IN's "gspo" fields), per-sample, three
  samples per micro-batch: loss, gradients, a step.

Rank 0 writes OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_helpers import build_actor


@torch.no_grad()
def pack_logits(actor, samples: list[dict]) -> list[torch.Tensor]:
    """Full-vocabulary logits of each sample, from ONE packed forward of them all (split over
    the CP ranks and gathered back when CP > 1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.context_parallel import cp_gather
    from slime.backends.megatron_utils.output_head import OutputHead

    actor.model.eval()
    (mb,), _ = actor._micro_batches(samples, BatchingArgs(micro_batch_size=len(samples)))
    out = actor._logits(actor.model, mb)
    out = out.logits() if isinstance(out, OutputHead) else out
    out = gather_from_tensor_model_parallel_region(out)[0, :, : actor.model_args.vocab_size]
    if mb.cp is not None:
        out = cp_gather(out.T, mb.cp, ps.get_context_parallel_group()).T
    return [out[start : start + n].float().cpu() for _, start, n, _ in mb.spans]


def _grads(actor, samples):
    loss, grads = actor.gradients(samples)
    full = actor.gather_hf(grads)
    return {"loss": loss, "grads": None if full is None else {k: v.double() for k, v in full.items()}}


def _save_export_resume(actor, hf: Path, batching, n: int, cp: int, workdir: str) -> dict:
    """torch_dist save, HF export and weight-sync buckets of the trained weights, then a fresh actor
    resumed from the save: its largest weight difference from the saved ones over every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    root = str(Path(workdir) / "ckpt")
    actor.save(root, 1, {"step": actor.step})
    actor.export_hf(str(Path(workdir) / "hf"), str(hf))
    out = {
        "buckets": {name: t for bucket in actor.iter_hf_buckets(1 << 20) for name, t in bucket},
        "trained": actor.megatron_state(),
    }
    ps.destroy_model_parallel()
    resumed = build_actor(hf, batching, n, cp=cp)
    resumed.load(root)
    saved, now = out["trained"], resumed.megatron_state()
    diff = torch.tensor(max(float((saved[k] - now[k]).abs().max()) for k in saved))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    out.update(resume_max_diff=float(diff), resumed_step=resumed.step)
    return out


def run_checks(hf_dir: str, spec: dict, cp: int) -> dict:
    from megatron.core import parallel_state as ps

    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.loss_config import CrossEntropyConfig

    samples, hf = spec["samples"], Path(hf_dir)
    dynamic = {"use_dynamic_batch_size": True, "max_tokens_per_gpu": spec["max_tokens"] // cp}
    dynamic["calculate_per_token_loss"] = True
    result = {}

    actor = build_actor(hf, BatchingArgs(**dynamic), len(samples), cp=cp)
    entry = {"pack_logits": pack_logits(actor, samples[:4])}
    if cp == 1:
        entry["single_logits"] = [actor.logits(s["tokens"]) for s in samples[:4]]
    entry.update(_grads(actor, samples))
    entry["eval"] = actor.evaluate(samples)
    entry["metrics"] = actor.train_step(samples)
    result["sft_token"] = entry
    if cp > 1:
        result["state"] = _save_export_resume(actor, hf, BatchingArgs(**dynamic), len(samples), cp, spec["workdir"])
    ps.destroy_model_parallel()  # keep the process group: the next actor reuses it

    plain = CrossEntropyConfig(chunk_tokens=0)
    actor = build_actor(hf, BatchingArgs(micro_batch_size=3), len(samples), cp=cp, cross_entropy=plain)
    result["sft_sample"] = _grads(actor, samples)
    ps.destroy_model_parallel()

    cfg = AlgorithmConfig(**spec["algorithm"])
    actor = build_actor(hf, BatchingArgs(**dynamic), len(samples), "policy_loss", cfg, cp=cp)
    entry = dict(actor.compute_log_probs(samples, with_entropy=True))
    entry.update(_grads(actor, samples))
    entry["metrics"] = actor.train_step(samples)
    result["policy"] = entry
    ps.destroy_model_parallel()

    gspo = AlgorithmConfig(**spec["gspo"])  # per-sequence ratios: statistics over both CP ranks
    actor = build_actor(hf, BatchingArgs(micro_batch_size=3), len(samples), "policy_loss", gspo, cp=cp)
    entry = _grads(actor, samples)
    entry["metrics"] = actor.train_step(samples)
    result["gspo"] = entry
    ps.destroy_model_parallel()
    return result


def main(hf_dir: str, inp: str, out: str) -> None:
    import torch.distributed as dist

    from slime.backends.megatron_utils.parallel import destroy_parallel

    result = run_checks(hf_dir, torch.load(inp, weights_only=True), cp=2)
    if dist.get_rank() == 0:
        torch.save(result, out)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:4])
