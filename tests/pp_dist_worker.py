"""Pipeline-parallel layouts in four torchrun processes (one start-up for all of them).

    torchrun --nproc-per-node 4 tests/pp_dist_worker.py IN.pt OUT.pt

IN.pt (``torch.save``; read with weights_only=True): {"samples" (RL fields attached),
"algorithm" (AlgorithmConfig fields), "tokens", "runs": [{"name", "hf_dir", "build"
(ModelBuildArgs fields), "loss_type", "per_token" (the train steps' normalization), "norms" (per_token flags to take
gradients under),
"log_probs" (bool), "steps" (train steps), "resume_from" / "save_to" (torch_dist roots or ""),
"ref_log_probs" / "offload" / "reload_dist" (bools, optional)}]}.

For each run every rank builds the layout's MegatronActor, loads the HF weights (or resumes
from ``resume_from``), takes its DP share (``samples[dp_rank::dp_size]``), and rank 0 records:
``grads[per_token]`` = (global loss, HF-named gradients), ``eval`` (`evaluate`), ``log_probs`` / ``entropy`` of its
share (indices in ``share``), ``logits`` of ``tokens``, ``hf`` (weights gathered to HF names),
``buckets`` (the weight-sync stream), then ``steps`` train steps (their ``metrics``) and,
with ``save_to``, a save after those steps (``hf_saved``: the weights saved) and as many
steps again; ``hf_after``: the weights after the last step. ``ref_log_probs``: the reference
weights' log-probs of the share after the steps (``hf_after_ref``: the weights after that); ``offload_exact``: an offload/onload round
trip gave every weight back bit for bit; ``hf_reloaded``: the weights after a weights-only
save at the end, `load_hf` and `load_dist` of that save (``hf_after`` again).
"""

from __future__ import annotations

import sys
import time

import torch


def run(inp: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from slime.algorithms.config import AlgorithmConfig
    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.backends.megatron_utils.parallel import destroy_parallel

    spec = torch.load(inp, weights_only=True)
    samples = spec["samples"]
    result = {}
    for r in spec["runs"]:
        start = time.perf_counter()
        rl = r["loss_type"] == "policy_loss"
        actor = MegatronActor(
            ModelArgs(**hf_model_args(r["hf_dir"])),
            ModelBuildArgs(**r["build"]),
            BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=160, calculate_per_token_loss=r["per_token"]),
            OptimizerArgs(lr=1e-2, weight_decay=0.0),
            TrainArgs(global_batch_size=len(samples), total_steps=4, loss_type=r["loss_type"]),
            AlgorithmConfig(**spec["algorithm"]) if rl else None,
        )
        if r["resume_from"]:
            actor.load(r["resume_from"])
        else:
            actor.load_hf(r["hf_dir"])
        share = list(range(actor.info.dp_rank, len(samples), actor.info.dp_size))
        mine = [
            samples[i] if rl else {k: samples[i][k] for k in ("tokens", "loss_mask", "response_length")} for i in share
        ]
        entry = {"share": share, "grads": {}}
        for per_token in r["norms"]:
            actor.batching = BatchingArgs(
                use_dynamic_batch_size=True, max_tokens_per_gpu=160, calculate_per_token_loss=per_token
            )
            loss, grads = actor.gradients(mine)
            full = actor.gather_hf(grads)
            entry["grads"][per_token] = (loss, None if full is None else {k: v.double() for k, v in full.items()})
        actor.batching = BatchingArgs(
            use_dynamic_batch_size=True, max_tokens_per_gpu=160, calculate_per_token_loss=r["per_token"]
        )
        if r["norms"]:  # the token-weighted eval loss of all DP ranks' samples
            entry["eval"] = actor.evaluate(mine)
        if r["log_probs"]:
            entry.update(actor.compute_log_probs(mine, with_entropy=True))
        if r.get("offload"):
            before = actor.megatron_state()
            actor.offload()
            actor.onload()
            after = actor.megatron_state()
            entry["offload_exact"] = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        entry["logits"] = actor.logits(spec["tokens"])
        entry["hf"] = actor.gather_hf(actor.megatron_state())
        entry["buckets"] = [t for bucket in actor.iter_hf_buckets(60_000) for t in bucket]
        if r["steps"]:  # steps, a save (when asked), the same number of steps again
            entry["metrics"] = [actor.train_step(mine) for _ in range(r["steps"])]
            if r["save_to"]:
                actor.save(r["save_to"], 1, {"rollout_id": 1})
                entry["hf_saved"] = actor.gather_hf(actor.megatron_state())
                entry["metrics"] += [actor.train_step(mine) for _ in range(r["steps"])]
            entry["hf_after"] = actor.gather_hf(actor.megatron_state())
            if r.get("reload_dist"):  # a weights-only save of every chunk, HF weights, then load_dist of it
                from slime.backends.megatron_utils.checkpoint import save_model_weights

                save_model_weights([c.module for c in actor.chunks], r["save_to"] + "_weights")
                actor.load_hf(r["hf_dir"])
                actor.load_dist(r["save_to"] + "_weights")
                entry["hf_reloaded"] = actor.gather_hf(actor.megatron_state())
        if r.get("ref_log_probs"):  # after the steps: the reference weights are not the trained ones
            entry["ref_log_probs"] = actor.compute_ref_log_probs(mine)
            entry["hf_after_ref"] = actor.gather_hf(actor.megatron_state())
        result[r["name"]] = entry
        print(
            f"rank {actor.info.rank}: {r['name']} took {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True
        )
        ps.destroy_model_parallel()  # keep the process group: the next layout reuses it
    if actor.info.rank == 0:
        torch.save(result, out)
    destroy_parallel()


if __name__ == "__main__":
    run(*sys.argv[1:3])
