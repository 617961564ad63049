"""Convert a HF checkpoint (Qwen3, Qwen2/2.5, Llama-3, GLM4, Qwen3-/Qwen2-MoE) to a megatron-core torch_dist checkpoint.

    python tools/convert_hf_to_torch_dist.py --hf-checkpoint /path/Qwen3-4B --save /path/Qwen3-4B_torch_dist

Model flags are optional: they are derived from the HF config.json (given ones are checked
against it). The result loads at any tensor/expert-parallel size with --ref-load / --load.
Runs in one process (CPU is fine); torchrun with --tensor-model-parallel-size N,
--pipeline-model-parallel-size P (each stage converts its own layers) and, for MoE,
--expert-model-parallel-size E shards the conversion for models too large for one process.
The checkpoint is the same whatever the sizes: megatron's sharded state dict stores global
layer numbers, expert offsets and full tensor shapes.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from slime.backends.megatron_utils.model_config import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-checkpoint", required=True)
    p.add_argument("--save", required=True, help="output directory")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1, help="MoE: experts split over this many ranks")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="stages: each converts its own layers")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, help="layers of the first stage")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, help="layers of the last stage")
    add_model_arguments(p)
    args = p.parse_args(argv)

    from slime.backends.megatron_utils.checkpoint import save_model_weights
    from slime.backends.megatron_utils.expert_parallel import placement
    from slime.backends.megatron_utils.hf_weights import hf_to_mcore, load_hf_state_dict
    from slime.backends.megatron_utils.model_config import resolve_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_model
    from slime.backends.megatron_utils.parallel import destroy_parallel, init_parallel
    from slime.backends.megatron_utils.pipeline import check_pipeline_layout, to_stage

    model_args = resolve_model_args(args)
    build = ModelBuildArgs(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
    )
    check_pipeline_layout(model_args, build)  # the flag-named message, before any process group
    info = init_parallel(build.layout)
    model = build_gpt_model(model_args, build)
    shards = hf_to_mcore(load_hf_state_dict(args.hf_checkpoint), model_args, info.tp_rank, info.tp_size, placement())
    if info.pp_size > 1:  # this stage's layers under local indices (its embedding / output layer)
        shards = to_stage(shards, model.config, not model_args.untie_embeddings_and_output_weights)
    missing, unexpected = model.load_state_dict(shards, strict=False)
    if unexpected or [k for k in missing if not k.endswith("_extra_state")]:
        raise SystemExit(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    target = save_model_weights(model, args.save, iteration=0)
    if info.rank == 0:
        print(f"saved torch_dist checkpoint of {args.hf_checkpoint} to {target}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
