"""Megatron-LM training flags and the typed groups the actor is built from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from slime.backends.megatron_utils.model_config import ModelArgs, add_model_arguments, resolve_model_args

__all__ = [
    "ATTENTION_BACKEND_CHOICES",
    "ActorConfig",
    "actor_config_from_args",
    "add_megatron_arguments",
    "check_context_parallel",
    "check_parallel_sizes",
    "resolve_attention_backend",
    "resolve_loss_type",
]

# Ours (sdpa, flex, varlen) plus Megatron-LM's names, so slime's scripts run unchanged.
ATTENTION_BACKEND_CHOICES = ("auto", "sdpa", "flex", "varlen", "flash", "fused", "unfused", "local")

# Layouts parsed for slime's scripts but not built yet (issue "Parallelism and MoE parity").
_NOT_YET = {
}


def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser)
    g = parser.add_argument_group("training (Megatron-LM names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split activations over TP ranks along the sequence; needed by MoE at TP > 1 "
        "(pads tokens to a multiple of TP); off at TP 1, as in Megatron-LM",
    )
    g.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="pipeline stages (megatron's 1F1B schedule, interleaved with virtual stages); "
        "data parallelism = world / (TP x PP x CP)",
    )
    g.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="split every packed sample over N ranks (zigzag, causal load balance; THD only; docs/backend.md)",
    )
    g.add_argument(
        "--expert-model-parallel-size",
        type=int,
        default=1,
        help="MoE: ranks each layer's experts are split over, taken from the data-parallel ranks (docs/moe.md)",
    )
    g.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="MoE: ranks each expert is split over; must divide TP (default: the tensor parallel size)",
    )
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="interleaved pipeline: layers per model chunk (Megatron-LM); the micro-batch count is rounded up to "
        "a multiple of PP (docs/backend.md)",
    )
    g.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=int,
        default=None,
        help="interleaved pipeline: model chunks per pipeline rank (the other way to say the same)",
    )
    g.add_argument(
        "--decoder-first-pipeline-num-layers", type=int, default=None, help="layers of the first stage (uneven pipeline)"
    )
    g.add_argument(
        "--decoder-last-pipeline-num-layers", type=int, default=None, help="layers of the last stage (uneven pipeline)"
    )
    g.add_argument("--bf16", action="store_true", help="bf16 params and activations (CUDA); CPU runs are fp32")
    g.add_argument(
        "--accumulate-allreduce-grads-in-fp32",
        action="store_true",
        help="accumulate and all-reduce gradients in fp32 (Megatron-LM; always on with --bf16, as there; fp32 runs already are)",
    )
    g.add_argument(
        "--attention-softmax-in-fp32",
        action="store_true",
        help="attention scores and softmax in fp32 under --bf16 (flex/varlen keep softmax statistics in fp32 anyway; "
        "sdpa upcasts q/k/v, costing memory)",
    )
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument(
        "--transformer-impl",
        choices=("local", "transformer_engine"),
        default="local",
        help="megatron-core layer implementation: local (megatron's local spec, our packed attention on every "
        "device). transformer_engine is accepted for slime's scripts but builds the local spec too, and says so "
        "at start-up: Transformer Engine's layers are not wired up (docs/backend.md)",
    )
    g.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKEND_CHOICES,
        default="auto",
        help="packed attention: sdpa (reference, any device), flex or varlen (CUDA); auto = flex on CUDA, sdpa on CPU; "
        "Megatron-LM's flash/fused = the fastest exact packed path on the device (varlen, else flex, sdpa on CPU), "
        "unfused/local = sdpa",
    )
    g.add_argument(
        "--deterministic-mode",
        action="store_true",
        help="bitwise-reproducible training: megatron's deterministic kernels and torch's deterministic "
        "algorithms (an op without one raises); set NCCL_ALGO=Ring for reproducible reductions on GPUs",
    )
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None, help="samples per optimizer step (all DP ranks)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--use-dynamic-batch-size", action="store_true", help="pack micro-batches up to --max-tokens-per-gpu")
    g.add_argument(
        "--max-tokens-per-gpu",
        type=int,
        default=None,
        help="tokens per micro-batch and GPU; with --context-parallel-size N a micro-batch packs N x this "
        "over the N ranks",
    )
    g.add_argument("--qkv-format", choices=("thd", "sbhd"), default="thd", help="thd: packed sequences; sbhd: padded")
    g.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="average over every supervised token of the global batch (default: mean of per-sample means)",
    )
    g.add_argument(
        "--loss-type",
        choices=("sft_loss", "policy_loss", "custom_loss"),
        default=None,
        help="default: sft_loss for the SFT rollout, policy_loss (slime's default) for RL rollouts; custom_loss needs "
        "--custom-loss-function-path",
    )
    g.add_argument("--custom-loss-function-path", default=None, help="loss_fn(logits, batch, ctx) -> (loss, metrics)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="constant")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="accepted for slime's scripts: megatron's distributed optimizer is always used on CUDA "
        "(optimizer states sharded over DP); CPU runs use the plain one",
    )
    g.add_argument(
        "--no-gradient-accumulation-fusion",
        action="store_true",
        help="accepted for slime's scripts: the fused weight-gradient accumulation (apex / Transformer Engine "
        "kernels) is never used with the local layer spec",
    )
    g.add_argument(
        "--optimizer-cpu-offload",
        action="store_true",
        help="optimizer states and step in host memory (megatron-core's HybridDeviceOptimizer; CUDA only)",
    )
    g.add_argument(
        "--optimizer-offload-fraction", type=float, default=1.0, help="share of the optimizer states offloaded"
    )
    g.add_argument(
        "--overlap-cpu-optimizer-d2h-h2d",
        action="store_true",
        help="overlap the offloaded step with its device<->host copies (CUDA only)",
    )
    g.add_argument(
        "--use-precision-aware-optimizer",
        action="store_true",
        help="megatron-core's precision-aware Adam (CUDA only; needs Transformer Engine unless offloading)",
    )
    g.add_argument("--seed", type=int, default=1234)
    from slime.backends.megatron_utils.loss_config import add_loss_arguments
    from slime.backends.megatron_utils.throughput import add_throughput_arguments

    add_loss_arguments(parser)
    add_throughput_arguments(parser)
    c = parser.add_argument_group("checkpoints")
    c.add_argument("--load", default=None, help="torch_dist checkpoint to resume from")
    c.add_argument("--ref-load", default=None, help="torch_dist checkpoint of the initial weights (when --load has none)")
    return parser


def check_parallel_sizes(args: argparse.Namespace) -> None:
    """Refuse layouts slime's scripts name but we do not build yet, before anything starts."""
    for dest, (flag, what) in _NOT_YET.items():
        size = getattr(args, dest)
        if size is not None and size != 1:
            raise ValueError(
                f"{flag} {size}: {what} is not implemented yet; only size 1 runs today "
                "(use --tensor-model-parallel-size and data parallelism to scale)"
            )
    if args.pipeline_model_parallel_size == 1:  # the rest of the layout is checked with the model
        for flag, value in (
            ("--num-layers-per-virtual-pipeline-stage", args.num_layers_per_virtual_pipeline_stage),
            ("--num-virtual-stages-per-pipeline-rank", args.num_virtual_stages_per_pipeline_rank),
        ):
            if value is not None and not (flag.startswith("--num-virtual") and value == 1):
                raise ValueError(f"{flag} {value}: virtual pipeline stages need --pipeline-model-parallel-size > 1")
    check_context_parallel(args.context_parallel_size, args.qkv_format)


def model_parallel_ranks(args: argparse.Namespace) -> int:
    """Ranks holding one copy of the model (TP x PP x CP); data parallelism takes the rest."""
    return args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size


def check_context_parallel(cp_size: int, qkv_format: str) -> None:
    """Refuse what ``--context-parallel-size`` > 1 does not cover yet (`context_parallel`)."""
    if cp_size < 1:
        raise ValueError(f"--context-parallel-size must be >= 1, got {cp_size}")
    if cp_size == 1:
        return
    flag = f"--context-parallel-size {cp_size}"
    if qkv_format != "thd":
        raise ValueError(f"{flag} splits packed sequences: it needs --qkv-format thd, got {qkv_format}")


def virtual_pipeline_size(args: argparse.Namespace, num_layers: int) -> int | None:
    """Model chunks per pipeline rank from ``--num-virtual-stages-per-pipeline-rank`` or
    ``--num-layers-per-virtual-pipeline-stage`` (None: no interleaving)."""
    pp = args.pipeline_model_parallel_size
    per_stage, chunks = args.num_layers_per_virtual_pipeline_stage, args.num_virtual_stages_per_pipeline_rank
    if per_stage is not None and chunks is not None:
        raise ValueError("give --num-layers-per-virtual-pipeline-stage or --num-virtual-stages-per-pipeline-rank, not both")
    if chunks is not None:
        return chunks if chunks > 1 else None
    if per_stage is None:
        return None
    if per_stage < 1:
        raise ValueError(f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {per_stage}")
    # Uneven first/last stages take their layers out before the rest is split evenly.
    rest, stages = num_layers, pp
    for n in (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers):
        if n is not None:
            rest, stages = rest - n, stages - 1
    if stages < 1 or rest % (stages * per_stage):
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage {per_stage}: the {rest} layers left for {stages} even "
            f"pipeline stage(s) do not split into chunks of {per_stage}"
        )
    chunks = rest // (stages * per_stage)
    return chunks if chunks > 1 else None


def resolve_loss_type(args: argparse.Namespace) -> str:
    """``--loss-type``, or its default for the rollout: sft_loss for SFT, policy_loss for RL."""
    if args.loss_type:
        return args.loss_type
    from slime.rollout import SFT_ROLLOUT_FUNCTION

    return "sft_loss" if args.rollout_function_path == SFT_ROLLOUT_FUNCTION else "policy_loss"


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str, cuda: bool) -> tuple[str, str]:
    """``--attention-backend`` -> (one of `attention.BACKENDS`, why), for the device at hand.

    Every result is exact on packed data (no attention across samples). flash/fused ask for
    the fastest: PyTorch's flash varlen kernel where it exists, else compiled FlexAttention;
    on CPU only sdpa trains (flex's CPU path is for tests, varlen is CUDA-only).
    """
    if name in ("sdpa", "flex", "varlen"):
        return name, "as requested"
    if name in ("unfused", "local"):
        return "sdpa", f"{name}: the unfused reference path"
    if not cuda:
        return "sdpa", f"{name} on CPU: sdpa is the only CPU training path"
    if name == "auto":
        return "flex", "auto on CUDA"
    if _varlen_available():
        return "varlen", f"{name} on CUDA: PyTorch's flash varlen kernel"
    return "flex", f"{name} on CUDA: this torch has no varlen kernel, using compiled FlexAttention"


@dataclass(frozen=True)
class ActorConfig:
    """The actor's typed groups, built once from the command line."""

    model: "ModelArgs"
    build: object
    batching: object
    optim: object
    train: object
    algorithm: object = None  # slime.algorithms.config.AlgorithmConfig
    cross_entropy: object = None  # lean_ce.CrossEntropyConfig
    throughput: object = None  # throughput.ThroughputConfig
    attention_note: str = ""  # which attention path --attention-backend resolved to, and why


def actor_config_from_args(args: argparse.Namespace, total_steps: int) -> ActorConfig:
    import torch

    from slime.algorithms.config import AlgorithmConfig, derive_global_batch_size
    from slime.backends.megatron_utils.actor import TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.loss_config import CrossEntropyConfig
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.backends.megatron_utils.throughput import ThroughputConfig

    check_parallel_sizes(args)
    backend, why = resolve_attention_backend(args.attention_backend, torch.cuda.is_available())
    model = resolve_model_args(args)
    config = ActorConfig(
        model=model,
        build=ModelBuildArgs(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_size(args, model.num_layers),
            decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            # Megatron-LM turns the flag off at TP 1 (megatron-core's config refuses it there);
            # slime's TP-1 scripts pass it, so do the same.
            sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
            bf16=args.bf16,
            grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32 or args.bf16,
            attention_softmax_in_fp32=args.attention_softmax_in_fp32,
            attention_dropout=args.attention_dropout,
            hidden_dropout=args.hidden_dropout,
            attention_backend=backend,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
            deterministic_mode=args.deterministic_mode,
        ),
        batching=BatchingArgs(
            micro_batch_size=args.micro_batch_size,
            use_dynamic_batch_size=args.use_dynamic_batch_size,
            max_tokens_per_gpu=args.max_tokens_per_gpu,
            qkv_format=args.qkv_format,
            calculate_per_token_loss=args.calculate_per_token_loss,
        ),
        optim=OptimizerArgs(
            optimizer=args.optimizer,
            lr=args.lr,
            min_lr=args.min_lr,
            lr_decay_style=args.lr_decay_style,
            lr_warmup_iters=args.lr_warmup_iters,
            lr_warmup_fraction=args.lr_warmup_fraction,
            lr_decay_iters=args.lr_decay_iters,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            optimizer_cpu_offload=args.optimizer_cpu_offload,
            optimizer_offload_fraction=args.optimizer_offload_fraction,
            overlap_cpu_optimizer_d2h_h2d=args.overlap_cpu_optimizer_d2h_h2d,
            use_precision_aware_optimizer=args.use_precision_aware_optimizer,
        ),
        train=TrainArgs(
            global_batch_size=derive_global_batch_size(
                args.rollout_batch_size, args.n_samples_per_prompt, args.global_batch_size, args.num_steps_per_rollout
            ),
            total_steps=total_steps,
            seed=args.seed,
            loss_type=resolve_loss_type(args),
            custom_loss_function_path=args.custom_loss_function_path,
        ),
        algorithm=AlgorithmConfig.from_args(args),
        cross_entropy=CrossEntropyConfig.from_args(args),
        throughput=ThroughputConfig.from_args(args),
        attention_note=f"attention: --attention-backend {args.attention_backend} -> {backend} ({why})"
        + (
            "; --transformer-impl transformer_engine: megatron-core's local layer spec is built "
            "(Transformer Engine's layers are not wired up in this trainer)"
            if args.transformer_impl == "transformer_engine"
            else ""
        ),
    )
    from slime.backends.megatron_utils.expert_parallel import check_expert_layout
    from slime.backends.megatron_utils.pipeline import check_pipeline_layout

    check_pipeline_layout(config.model, config.build)  # at start-up, before any process group
    check_expert_layout(config.model, config.build)
    return config
