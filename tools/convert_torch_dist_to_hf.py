"""Convert a megatron-core torch_dist checkpoint back to a HF checkpoint transformers loads.

    python tools/convert_torch_dist_to_hf.py --input-dir /path/ckpt --output-dir /path/hf_out \
        --origin-hf-dir /path/Qwen3-4B

--input-dir is a checkpoint root (with latest_checkpointed_iteration.txt) or one iteration
directory. The architecture comes from --origin-hf-dir's config.json (model flags optional),
whose config, tokenizer and generation config are copied next to the new model.safetensors.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from slime.backends.megatron_utils.model_config import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--origin-hf-dir", required=True)
    add_model_arguments(p)
    args = p.parse_args(argv)
    args.hf_checkpoint = args.origin_hf_dir

    from slime.backends.megatron_utils.checkpoint import load_model_weights
    from slime.backends.megatron_utils.hf_weights import mcore_to_hf, save_hf_checkpoint
    from slime.backends.megatron_utils.model_config import resolve_model_args
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_model
    from slime.backends.megatron_utils.parallel import destroy_parallel, init_parallel

    model_args = resolve_model_args(args)
    init_parallel()
    model = build_gpt_model(model_args, ModelBuildArgs())
    source = load_model_weights(model, args.input_dir)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    save_hf_checkpoint(mcore_to_hf([state], model_args), args.output_dir, args.origin_hf_dir, model_args)
    print(f"wrote HF checkpoint of {source} to {args.output_dir}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
