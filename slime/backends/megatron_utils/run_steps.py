"""Run N SFT steps of the Megatron actor without Ray: one process, or torchrun for several.

    python -m slime.backends.megatron_utils.run_steps --hf-checkpoint slime/assets/tiny-qwen3 \
        --prompt-data slime/assets/tiny_sft.jsonl --rollout-batch-size 16 --num-steps 10 \
        --use-dynamic-batch-size --max-tokens-per-gpu 1024 --calculate-per-token-loss --lr 3e-3

    torchrun --nproc-per-node 2 -m slime.backends.megatron_utils.run_steps ... --tensor-model-parallel-size 2

Every rank builds the same data source (same order), takes the global batch of each step and
keeps its DP share (token-balanced). Initial weights come from --load / --ref-load (torch_dist)
or else --hf-checkpoint's safetensors (``--no-load-hf`` keeps the random init, e.g. for
benchmarks from a config only). Rank 0
prints one JSON line of metrics per step (and writes them to --metrics-out); --dump-grads
writes the first step's global loss and HF-layout gradients (``torch.save``; load with
``weights_only=True``) before any optimizer step, for equality tests.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace

logger = logging.getLogger(__name__)


def _add_run_arguments(parser):
    g = parser.add_argument_group("run_steps")
    g.add_argument("--num-steps", type=int, default=1, help="optimizer steps to run")
    g.add_argument("--metrics-out", default=None, help="JSONL file for the per-step metrics (rank 0)")
    g.add_argument("--dump-grads", default=None, help="write the first step's loss and HF-layout grads here")
    g.add_argument("--no-load-hf", action="store_true", help="keep the random init instead of loading HF weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    from slime.backends.megatron_utils.actor import MegatronActor
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.data.config import SFTDataConfig, build_data_source
    from slime.rollout import SFT_ROLLOUT_FUNCTION
    from slime.utils.arguments import get_parser
    from slime.utils.data_split import split_balanced

    parser = _add_run_arguments(get_parser(description=__doc__))
    parser.set_defaults(rollout_function_path=SFT_ROLLOUT_FUNCTION)  # SFT steps on prepared samples
    args = parser.parse_args(argv)
    if not args.rollout_batch_size:
        parser.error("--rollout-batch-size is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from slime.utils.arguments import global_batch_size

    global_batch = global_batch_size(args)
    cfg = actor_config_from_args(args, total_steps=args.num_steps)
    # Whole-first: tokenizing in the background would share the cores with the steps being timed.
    source = build_data_source(replace(SFTDataConfig.from_args(args), streaming=False), progress=False)
    actor = MegatronActor(cfg.model, cfg.build, cfg.batching, cfg.optim, cfg.train, cfg.algorithm, cfg.cross_entropy, cfg.throughput)
    initial = args.load or args.ref_load
    if initial:
        actor.load_dist(initial)
    elif not args.no_load_hf:
        actor.load_hf(args.hf_checkpoint)
    rank0 = actor.info.rank == 0
    out = open(args.metrics_out, "w") if (args.metrics_out and rank0) else None
    for step in range(args.num_steps):
        batch = source.get_samples(global_batch)
        parts = split_balanced([len(s.tokens) for s in batch], actor.info.dp_size)
        mine = [
            {"tokens": batch[i].tokens, "loss_mask": batch[i].loss_mask, "response_length": batch[i].response_length}
            for i in parts[actor.info.dp_rank]
        ]
        if step == 0 and args.dump_grads:
            loss, grads = actor.gradients(mine)
            full = actor.gather_hf(grads)
            if rank0:
                full = {k: v.to(torch.float64) for k, v in full.items()}
                torch.save({"loss": loss, "grads": full}, args.dump_grads)
        metrics = actor.train_step(mine)
        if rank0:
            line = json.dumps(metrics)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    if out:
        out.close()
    from slime.backends.megatron_utils.parallel import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
