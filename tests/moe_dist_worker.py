"""Tiny MoE checkpoints in N torchrun processes, several layouts in one start-up.

    torchrun --nproc-per-node N tests/moe_dist_worker.py IN.pt OUT.pt

IN.pt (``torch.save``; read with weights_only=True): {"runs": [run, ...], "tokens": [...]}; a
run is {"name", "hf_dir", "dispatcher", "dist_ckpt" (a torch_dist checkpoint to load, or ""),
"tp", "ep", "etp" (0 = TP), "sp", "pp", "vpp" (0 = none), "cp", "aux_coeff", "z" (--moe-z-loss-coeff, optional), "samples" (per DP rank, [] for none),
"max_tokens", "save" (a directory to save a torch_dist checkpoint in, or ""), "resume" (a
directory for a training-state save/load round trip, optional)}.

For each run both ranks build a MegatronActor of that layout on the HF weights (each rank
converts its own TP shard and experts), and rank 0 records: ``logits`` of ``tokens``
(gathered over TP), ``hf`` (the weights gathered back to HF names), ``buckets`` (the
weight-sync stream); with samples, ``loss``, ``grads`` (HF-named, every expert) and ``moe``
(the step's MoE metrics) of one forward/backward on DP rank r's ``samples[r]``, ``eval`` and
``log_probs`` (every DP rank's, in order) of the forward-only paths, then ``step``
(loss, grad norm of a `train_step` on them) and with "resume" ``resume_exact``; with a
dist_ckpt, ``hf_from_dist`` (that checkpoint loaded at this layout, then gathered).
"""

from __future__ import annotations

import dataclasses
import sys

import torch


def run(inp: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from slime.backends.megatron_utils.actor import MegatronActor, TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.checkpoint import save_model_weights
    from slime.backends.megatron_utils.model_config import ModelArgs, hf_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.moe_layers import moe_step_metrics
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.backends.megatron_utils.parallel import destroy_parallel

    spec = torch.load(inp, weights_only=True)
    result = {}
    for r in spec["runs"]:
        m = dataclasses.replace(
            ModelArgs(**hf_model_args(r["hf_dir"])),
            moe_token_dispatcher_type=r["dispatcher"],
            moe_aux_loss_coeff=r.get("aux_coeff", 0.0),
            moe_z_loss_coeff=r.get("z") or None,
        )
        build = ModelBuildArgs(
            tensor_model_parallel_size=r.get("tp", 1),
            expert_model_parallel_size=r.get("ep", 1),
            expert_tensor_parallel_size=r.get("etp") or None,
            sequence_parallel=r.get("sp", False),
            pipeline_model_parallel_size=r.get("pp", 1),
            virtual_pipeline_model_parallel_size=r.get("vpp") or None,
            context_parallel_size=r.get("cp", 1),
        )
        samples = r.get("samples") or []
        batching = BatchingArgs(
            use_dynamic_batch_size=True, max_tokens_per_gpu=r.get("max_tokens", 512), calculate_per_token_loss=True
        )
        actor = MegatronActor(
            m,
            build,
            batching,
            OptimizerArgs(lr=1e-3),
            TrainArgs(global_batch_size=sum(map(len, samples)) or 2, total_steps=1),
        )
        actor.load_hf(r["hf_dir"])
        if r.get("save"):  # the HF weights as loaded
            save_model_weights(actor.model.module, r["save"], iteration=0)
        entry = {
            "logits": actor.logits(spec["tokens"]),
            "hf": actor.gather_hf(actor.megatron_state()),
            "buckets": [t for bucket in actor.iter_hf_buckets(200_000) for t in bucket],
        }
        if samples:
            mine = samples[actor.info.dp_rank]
            loss, grads = actor.gradients(mine)
            entry["loss"], entry["grads"] = loss, actor.gather_hf(grads)
            entry["micro_batches"] = len(actor._micro_batches(mine, actor.batching)[0])  # after EP alignment
            chunks = torch.nn.ModuleList([c.module for c in actor.chunks])  # every virtual stage's routers
            entry["moe"] = moe_step_metrics(chunks, num_micro_batches=entry["micro_batches"])
            # Forward-only paths (EP ranks stay in step there too): eval loss and per-token log-probs.
            entry["eval"] = actor.evaluate(mine)
            per_rank = [None] * actor.info.dp_size
            dist.all_gather_object(
                per_rank, actor.compute_log_probs(mine)["log_probs"], group=ps.get_data_parallel_group()
            )
            entry["log_probs"] = [t for part in per_rank for t in part]
            step = actor.train_step(mine)  # the same forward/backward, then an optimizer step
            entry["step"] = {k: step[k] for k in ("loss", "grad_norm", "update_successful")}
            if r.get("resume"):  # the whole training state (optimizer too) at this layout, back in place
                before = actor.megatron_state()
                actor.save(r["resume"], iteration=1, extra={})
                with torch.no_grad():
                    for p in actor.model.module.parameters():
                        p.zero_()
                actor.load(r["resume"])
                after = actor.megatron_state()
                entry["resume_exact"] = all(torch.equal(before[k], after[k]) for k in before)
        if r["dist_ckpt"]:
            with torch.no_grad():
                for p in actor.model.module.parameters():
                    p.zero_()  # the checkpoint must bring every weight back
            actor.load_dist(r["dist_ckpt"])
            entry["hf_from_dist"] = actor.gather_hf(actor.megatron_state())
        result[r["name"]] = entry
        ps.destroy_model_parallel()  # keep the process group: the next run reuses it
    if actor.info.rank == 0:
        torch.save(result, out)
    destroy_parallel()


if __name__ == "__main__":
    run(*sys.argv[1:3])
