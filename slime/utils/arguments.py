"""Command line, parsed once. Flag names follow THUDM/slime and Megatron-LM.

Each part of the program gets a small typed group built from the parsed namespace
(e.g. `slime.data.config.SFTDataConfig.from_args`), never the namespace to mutate.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Callable

from slime.rollout import DEFAULT_ROLLOUT_FUNCTION, SFT_ROLLOUT_FUNCTION

__all__ = [
    "DEFAULT_ROLLOUT_FUNCTION",
    "SFT_ROLLOUT_FUNCTION",
    "add_data_arguments",
    "add_rollout_arguments",
    "data_parallel_size",
    "get_parser",
    "global_batch_size",
    "is_sft",
    "parse_args",
    "starts_engines",
    "validate_trainer_args",
]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("data")
    g.add_argument("--hf-checkpoint", type=str, default=None, help="HF model dir; its tokenizer and chat template render the data")
    g.add_argument("--prompt-data", type=str, default=None, help="SFT rows: .jsonl, .json (list), .parquet or a save_to_disk dir")
    g.add_argument("--input-key", type=str, default="messages", help="column with the OpenAI-style messages")
    g.add_argument("--tool-key", type=str, default="tools", help="column with the tools of each row (list or JSON string)")
    g.add_argument("--metadata-key", type=str, default="metadata", help="column copied into Sample.metadata")
    g.add_argument("--label-key", type=str, default=None, help="column copied into Sample.label")
    g.add_argument(
        "--apply-chat-template-kwargs",
        type=_json_object,
        default={},
        help='extra chat template variables as JSON, e.g. \'{"enable_thinking": false}\'',
    )
    g.add_argument(
        "--multi-turn-policy",
        choices=("full", "keep-reasoning", "per-turn"),
        default="full",
        help="full: the conversation as the template renders it; keep-reasoning: every assistant turn "
        "rendered as if last (history reasoning kept); per-turn: one sample per assistant turn with its "
        "exact inference-time context (see docs/sft_data.md)",
    )
    g.add_argument(
        "--rollout-max-context-len",
        "--max-length",
        dest="rollout_max_context_len",
        type=_positive_int,
        default=None,
        help="tokens per sample; longer samples are truncated (counted), those left with no supervised token are invalid",
    )
    g.add_argument(
        "--skip-invalid-samples",
        action="store_true",
        help="skip (and count) invalid rows instead of stopping before training",
    )
    g.add_argument(
        "--data-num-workers",
        type=_positive_int,
        default=None,
        help="processes that tokenize the data (default: every core this job may use; 1 = in the calling process)",
    )
    g.add_argument(
        "--data-cache-dir",
        type=str,
        default=None,
        help="token cache root, shared by training, eval, restarts and the data tools "
        "(default: $SLIME_DATA_CACHE_DIR, else ~/.cache/slime/sft-data); see docs/sft_data.md",
    )
    g.add_argument("--no-data-cache", action="store_true", help="tokenize on every start and store nothing")
    g.add_argument("--overwrite-data-cache", action="store_true", help="rebuild the cache entry even if one exists")
    g.add_argument(
        "--no-data-streaming",
        action="store_true",
        help="on a cache miss, tokenize every row before the first step (default: training starts once its first "
        "samples are tokenized, the rest follows in the background in training order; see docs/sft_data.md)",
    )
    g.add_argument("--rollout-shuffle", action="store_true", help="shuffle the samples, reshuffled every epoch")
    g.add_argument("--rollout-seed", type=int, default=42, help="seed of the data order")
    g.add_argument("--num-epoch", type=_positive_int, default=None, help="epochs over the data (sets --num-rollout)")
    g.add_argument("--num-rollout", type=_positive_int, default=None, help="number of rollouts (overrides --num-epoch)")
    return parser


def add_rollout_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("rollout")
    g.add_argument("--rollout-batch-size", type=_positive_int, default=None, help="samples per rollout")
    g.add_argument(
        "--rollout-function-path",
        type=str,
        default=DEFAULT_ROLLOUT_FUNCTION,
        help=f"generate_rollout(args, rollout_id, data_source, evaluation=False); SFT: {SFT_ROLLOUT_FUNCTION}",
    )
    # Sampling flags of the RL path. SFT generates nothing: they never touch the SFT loss.
    g.add_argument("--rollout-temperature", type=float, default=1.0, help="RL sampling temperature; ignored by SFT")
    g.add_argument("--rollout-top-p", type=float, default=1.0, help="RL sampling only; ignored by SFT")
    g.add_argument("--rollout-top-k", type=int, default=-1, help="RL sampling only; ignored by SFT")
    return parser


def is_sft(args: argparse.Namespace) -> bool:
    """SFT run: the rollout is sft_rollout (prepared chat samples, no inference engine)."""
    return args.rollout_function_path == SFT_ROLLOUT_FUNCTION


def starts_engines(args: argparse.Namespace) -> bool:
    """Inference engines start for RL rollouts, never with --debug-train-only (slime's meaning)."""
    return not is_sft(args) and not args.debug_train_only


def data_parallel_size(args: argparse.Namespace) -> int:
    """Trainer ranks holding different samples: world / (TP x PP x CP); the PP and CP ranks of a
    DP rank share its rollout share."""
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if world % (tp * pp * cp):
        raise ValueError(
            f"{world} ranks are not divisible by TP x PP x CP = {tp} x {pp} x {cp} "
            "(--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size)"
        )
    return world // (tp * pp * cp)


def global_batch_size(args: argparse.Namespace) -> int:
    """Samples per optimizer step (slime's rule: rollout_batch_size x n_samples_per_prompt =
    global_batch_size x num_steps_per_rollout; by default the whole rollout is one step)."""
    from slime.algorithms.config import derive_global_batch_size

    return derive_global_batch_size(
        args.rollout_batch_size, args.n_samples_per_prompt, args.global_batch_size, args.num_steps_per_rollout
    )


def add_trainer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("trainer (Ray)")
    g.add_argument("--actor-num-nodes", type=_positive_int, default=1)
    g.add_argument("--actor-num-gpus-per-node", type=_positive_int, default=1, help="ranks per node (CPU ranks without GPUs)")
    g.add_argument("--save", default=None, help="checkpoint directory (model, optimizer, schedule, RNG, data position)")
    g.add_argument("--save-interval", type=_positive_int, default=None, help="save every N rollouts (and at the end)")
    g.add_argument("--save-hf", default=None, help="export the final model as a HF checkpoint here")
    g.add_argument("--eval-prompt-data", nargs="+", default=None, help="NAME PATH [NAME PATH ...] held-out SFT data")
    g.add_argument("--eval-interval", type=_positive_int, default=None, help="evaluate every N rollouts (and before the first, see below)")
    g.add_argument(
        "--skip-eval-before-train",
        action="store_true",
        help="with --eval-interval, do not evaluate the starting model before rollout 0 (a resumed run never does)",
    )
    g.add_argument("--use-wandb", action="store_true")
    g.add_argument("--wandb-project", default="slime-sft")
    g.add_argument("--wandb-group", default=None)
    g.add_argument("--wandb-team", default=None, help="wandb entity (team or user) the run is logged under")
    g.add_argument("--wandb-host", default=None, help="wandb server URL (default: wandb's, https://api.wandb.ai)")
    g.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), default="online")
    g.add_argument("--wandb-dir", default=None)
    g.add_argument("--wandb-key", default=None, help="API key (prefer the WANDB_API_KEY environment variable); never logged")
    g.add_argument("--use-tensorboard", action="store_true")
    g.add_argument("--tensorboard-dir", default=None, help="default: SAVE/tensorboard")
    g.add_argument("--debug-train-only", action="store_true", help="start no inference engine (SFT never starts one)")
    g.add_argument("--debug-rollout-only", action="store_true", help="RL: generate and score rollouts, train nothing")
    g.add_argument("--disable-compute-advantages-and-returns", action="store_true", help="skip RL pre-computation (SFT never runs it)")
    g.add_argument("--n-samples-per-prompt", type=_positive_int, default=1, help="RL: samples per prompt (a group); 1 for SFT")
    g.add_argument("--colocate", action="store_true", help="RL: engines share the trainer's GPUs; rejected for SFT")
    g.add_argument(
        "--balance-data",
        action="store_true",
        help="balance tokens across DP ranks (always done here: each step is split token-balanced; kept for slime's scripts)",
    )
    g.add_argument("--rollout-num-gpus", type=int, default=None, help="RL: GPUs of the inference engines; rejected for SFT")
    return parser


def validate_trainer_args(args: argparse.Namespace, overlap: bool = False) -> None:
    """Flag combinations checked before anything starts; raises ValueError naming the flags.
    ``overlap``: train_async.py (the next rollout is generated while the trainer trains)."""
    import os

    from slime.ray.colocate import OffloadArgs, explicit_offload_flags

    if not args.rollout_batch_size:
        raise ValueError("--rollout-batch-size is required")
    gbs = global_batch_size(args)  # raises naming the flags when they disagree
    from slime.backends.megatron_utils.arguments import check_parallel_sizes, resolve_loss_type

    check_parallel_sizes(args)
    from slime.backends.megatron_utils.layer_spec_plugin import check_spec

    check_spec(args.spec)  # imports the --spec module now (a typo fails before Ray starts)
    dp = data_parallel_size(args)
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    from slime.backends.megatron_utils.expert_parallel import check_world

    check_world(
        world, args.expert_model_parallel_size, args.expert_tensor_parallel_size, args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
    )  # fmt: skip
    if gbs % dp:
        raise ValueError(f"--global-batch-size {gbs} is not divisible by the data-parallel size {dp}")
    if args.eval_prompt_data and len(args.eval_prompt_data) % 2:
        raise ValueError("--eval-prompt-data takes NAME PATH pairs")
    if args.eval_interval and not args.eval_prompt_data:
        raise ValueError("--eval-interval needs --eval-prompt-data")
    if args.save_interval and not args.save:
        raise ValueError("--save-interval needs --save")
    if not args.num_rollout and not args.num_epoch:
        raise ValueError("give --num-epoch or --num-rollout")
    log = logging.getLogger(__name__)
    loss_type = resolve_loss_type(args)
    if args.debug_rollout_only and (is_sft(args) or args.debug_train_only):
        raise ValueError("--debug-rollout-only generates with an inference engine: not with sft_rollout or --debug-train-only")
    if is_sft(args):
        if args.n_samples_per_prompt != 1:
            raise ValueError("--n-samples-per-prompt must be 1 for SFT (each sample is trained once per epoch)")
        if args.colocate or args.rollout_num_gpus:
            raise ValueError("--colocate/--rollout-num-gpus configure inference engines, which SFT does not start")
        offload_flags = explicit_offload_flags(args)
        if offload_flags:
            raise ValueError(f"{'/'.join(offload_flags)}: SFT starts no inference engine to share the devices with")
        sampling = (("--rollout-temperature", args.rollout_temperature, 1.0), ("--rollout-top-p", args.rollout_top_p, 1.0), ("--rollout-top-k", args.rollout_top_k, -1))
        for flag, value, default in sampling:
            if value != default:
                log.warning("%s %s is an RL sampling flag: SFT generates nothing, so it has no effect", flag, value)
        if not args.debug_train_only:
            log.info("SFT starts no inference engine (as with --debug-train-only)")
    else:
        # The RL groups check themselves (typed configs); building them here fails before Ray starts.
        from slime.algorithms.config import AlgorithmConfig
        from slime.rollout.config import RolloutConfig

        AlgorithmConfig.from_args(args)
        RolloutConfig.from_args(args)
        if loss_type == "sft_loss":
            log.warning("--loss-type sft_loss on RL rollouts: every generated token is supervised, rewards are unused")
        if starts_engines(args):
            from slime.engines.config import EngineConfig

            EngineConfig.from_args(args)
    if overlap and (args.colocate or OffloadArgs.from_args(args).active):
        # Engines and trainer would need the same devices at the same time (slime refuses it too).
        raise ValueError(
            "train_async.py generates the next rollout while training: not with --colocate or --offload*; "
            "use train.py, or give the engines their own GPUs (--rollout-num-gpus)"
        )
    for flag, path in [("--prompt-data", args.prompt_data), *[("--eval-prompt-data", p) for p in (args.eval_prompt_data or [])[1::2]]]:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag}: data file not found: {path}")
    if not os.path.isdir(args.hf_checkpoint):
        raise FileNotFoundError(f"--hf-checkpoint: directory not found: {args.hf_checkpoint}")
    if args.ref_load and not os.path.isdir(args.ref_load):
        raise FileNotFoundError(f"--ref-load: checkpoint directory not found: {args.ref_load}")
    from slime.backends.megatron_utils.checkpoint import checkpoint_dir, has_checkpoint

    if has_checkpoint(args.load):  # a resume: its tracker must name an iteration that exists
        try:
            checkpoint_dir(args.load)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"--load: {e}") from None


def get_parser(add_custom_arguments: Callable | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add_data_arguments(parser)
    add_rollout_arguments(parser)
    # Light module (argparse only): the CLI stays fast to import.
    from slime.backends.megatron_utils.arguments import add_megatron_arguments

    add_megatron_arguments(parser)
    add_trainer_arguments(parser)
    # RL groups, each owned by the module that uses it (argparse-only imports).
    from slime.algorithms.config import add_algorithm_arguments
    from slime.engines.config import add_cpu_engine_arguments
    from slime.backends.megatron_utils.weight_sync import add_weight_sync_arguments
    from slime.ray.rollout_engines import add_engine_placement_arguments
    from slime.rollout.config import add_rollout_rl_arguments

    add_algorithm_arguments(parser)
    add_rollout_rl_arguments(parser)
    add_cpu_engine_arguments(parser)
    add_engine_placement_arguments(parser)
    add_weight_sync_arguments(parser)
    from slime.ray.colocate import add_offload_arguments

    add_offload_arguments(parser)
    from slime.ray.sglang_flags import add_sglang_server_arguments

    add_sglang_server_arguments(parser)  # SGLang's own flags, --sglang- prefixed, where it is installed
    if add_custom_arguments is not None:
        add_custom_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None, add_custom_arguments: Callable | None = None) -> argparse.Namespace:
    """Parse and check the command line; errors exit with the flag named (argparse's style)."""
    from slime.ray.sglang_flags import collect_derived, sglang_available, split_sglang_flags

    parser = get_parser(add_custom_arguments)
    args, unknown = parser.parse_known_args(argv)
    # Without SGLang installed, any --sglang-* flag is accepted as given (slime's scripts parse
    # everywhere); with it, they were checked by SGLang's own parser above.
    passthrough, rest = ({}, unknown) if sglang_available() else split_sglang_flags(unknown)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.sglang_server_args = {**collect_derived(args), **passthrough}
    if args.prompt_data is None:
        parser.error("--prompt-data is required")
    if args.hf_checkpoint is None:
        parser.error("--hf-checkpoint is required")
    return args
