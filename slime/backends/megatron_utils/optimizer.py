"""megatron-core optimizer and LR/WD schedule from Megatron-LM's flags."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OptimizerArgs", "build_optimizer"]


@dataclass(frozen=True)
class OptimizerArgs:
    """``--optimizer --lr --min-lr --lr-decay-style --lr-warmup-iters/--lr-warmup-fraction
    --lr-decay-iters --weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad``.

    Steps are optimizer steps. ``lr_decay_iters`` defaults to the run's total steps.
    """

    optimizer: str = "adam"
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None
    lr_decay_iters: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"--lr-decay-style must be constant, linear or cosine, got {self.lr_decay_style!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction <= 1:
            raise ValueError("--lr-warmup-fraction must be in [0, 1]")
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise ValueError("give --lr-warmup-iters or --lr-warmup-fraction, not both")

    def warmup_steps(self, total_steps: int) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * (self.lr_decay_iters or total_steps))
        return self.lr_warmup_iters


def build_optimizer(model, args: OptimizerArgs, total_steps: int, bf16: bool, distributed: bool):
    """(optimizer, scheduler): megatron's optimizer (distributed on GPU) and OptimizerParamScheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    optimizer = get_megatron_optimizer(config, [model])
    decay_steps = max(args.lr_decay_iters or total_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.warmup_steps(total_steps) else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.warmup_steps(total_steps),
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
