"""Megatron-LM training flags and the typed groups the actor is built from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from slime.backends.megatron_utils.model_config import ModelArgs, add_model_arguments, resolve_model_args

__all__ = ["ActorConfig", "actor_config_from_args", "add_megatron_arguments"]


def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser)
    g = parser.add_argument_group("training (Megatron-LM names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--bf16", action="store_true", help="bf16 params and activations (CUDA); CPU runs are fp32")
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument(
        "--attention-backend",
        choices=("auto", "sdpa", "flex", "varlen"),
        default="auto",
        help="packed attention: sdpa (reference, any device), flex or varlen (CUDA); auto = flex on CUDA, sdpa on CPU",
    )
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None, help="samples per optimizer step (all DP ranks)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--use-dynamic-batch-size", action="store_true", help="pack micro-batches up to --max-tokens-per-gpu")
    g.add_argument("--max-tokens-per-gpu", type=int, default=None)
    g.add_argument("--qkv-format", choices=("thd", "sbhd"), default="thd", help="thd: packed sequences; sbhd: padded")
    g.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="average over every supervised token of the global batch (default: mean of per-sample means)",
    )
    g.add_argument("--loss-type", default="sft_loss", help="sft_loss (policy_loss is reserved for RL)")
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
    g.add_argument("--seed", type=int, default=1234)
    c = parser.add_argument_group("checkpoints")
    c.add_argument("--load", default=None, help="torch_dist checkpoint to resume from")
    c.add_argument("--ref-load", default=None, help="torch_dist checkpoint of the initial weights (when --load has none)")
    return parser


@dataclass(frozen=True)
class ActorConfig:
    """The actor's typed groups, built once from the command line."""

    model: "ModelArgs"
    build: object
    batching: object
    optim: object
    train: object


def actor_config_from_args(args: argparse.Namespace, total_steps: int) -> ActorConfig:
    import torch

    from slime.backends.megatron_utils.actor import TrainArgs
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.model_provider import ModelBuildArgs
    from slime.backends.megatron_utils.optimizer import OptimizerArgs
    from slime.utils.arguments import global_batch_size

    backend = args.attention_backend
    if backend == "auto":
        backend = "flex" if torch.cuda.is_available() else "sdpa"
    return ActorConfig(
        model=resolve_model_args(args),
        build=ModelBuildArgs(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
            bf16=args.bf16,
            attention_dropout=args.attention_dropout,
            hidden_dropout=args.hidden_dropout,
            attention_backend=backend,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
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
        ),
        train=TrainArgs(
            global_batch_size=global_batch_size(args),
            total_steps=total_steps,
            seed=args.seed,
            loss_type=args.loss_type,
            custom_loss_function_path=args.custom_loss_function_path,
        ),
    )
