"""Tiny MoE checkpoints at TP=2 in two torchrun processes (one start-up for all checks).

    torchrun --nproc-per-node 2 tests/moe_dist_worker.py IN.pt OUT.pt

IN.pt (``torch.save``; read with weights_only=True): {"runs": [{"name", "hf_dir",
"dispatcher", "dist_ckpt" (a torch_dist checkpoint saved at TP=1, or "")}], "tokens": [...]}.
For each run both ranks build a TP=2 MegatronActor on the HF weights (converted per rank by
`hf_to_mcore`), and rank 0 records: ``logits`` of ``tokens`` (gathered over TP), ``hf`` (the
weights gathered back to HF names), ``buckets`` (the weight-sync stream), and with a
dist_ckpt, ``hf_from_dist`` (that checkpoint loaded at TP=2, resharded, then gathered).
"""

from __future__ import annotations

import dataclasses
import sys

import torch


def run(inp: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.backends.megatron_utils.parallel import destroy_parallel

    spec = torch.load(inp, weights_only=True)
    result = {}
    for run_spec in spec["runs"]:
        m = dataclasses.replace(
            ModelArgs(**hf_model_args(run_spec["hf_dir"])), moe_token_dispatcher_type=run_spec["dispatcher"]
        )
        actor = MegatronActor(
            m,
            ModelBuildArgs(tensor_model_parallel_size=2),
            BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=512),
            OptimizerArgs(lr=1e-3),
            TrainArgs(global_batch_size=1, total_steps=1),
        )
        actor.load_hf(run_spec["hf_dir"])
        entry = {
            "logits": actor.logits(spec["tokens"]),
            "hf": actor.gather_hf(actor.megatron_state()),
            "buckets": [t for bucket in actor.iter_hf_buckets(200_000) for t in bucket],
        }
        if run_spec["dist_ckpt"]:
            with torch.no_grad():
                for p in actor.model.module.parameters():
                    p.zero_()  # the checkpoint must bring every weight back
            actor.load_dist(run_spec["dist_ckpt"])
            entry["hf_from_dist"] = actor.gather_hf(actor.megatron_state())
        result[run_spec["name"]] = entry
        ps.destroy_model_parallel()  # keep the process group: the next run reuses it
    if actor.info.rank == 0:
        torch.save(result, out)
    destroy_parallel()


if __name__ == "__main__":
    run(*sys.argv[1:3])
