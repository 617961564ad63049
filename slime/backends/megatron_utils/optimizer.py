"""megatron-core optimizer and LR/WD schedule from Megatron-LM's flags.

Optimizer CPU offload (``--optimizer-cpu-offload``, ``--optimizer-offload-fraction``,
``--overlap-cpu-optimizer-d2h-h2d``) and ``--use-precision-aware-optimizer`` are megatron-core's
own (`HybridDeviceOptimizer`, precision-aware Adam): passed to its OptimizerConfig on CUDA,
where the distributed optimizer runs. On CPU the parameters and optimizer states already
live in host memory and the optimizer is not the distributed one, so the flags change
nothing: they are accepted and logged as such. megatron-core 0.16.1's OptimizerConfig reads
Transformer Engine's version for ``--use-precision-aware-optimizer`` and fails without TE:
there the flag is refused with that reason (CUDA only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = ["OptimizerArgs", "build_optimizer"]


@dataclass(frozen=True)
class OptimizerArgs:
    """``--optimizer --lr --min-lr --lr-decay-style --lr-warmup-iters/--lr-warmup-fraction
    --lr-decay-iters --weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad``, and
    megatron-core's CPU offload / precision-aware optimizer flags (CUDA only, see above;
    ``optimizer_offload_fraction`` is the share of optimizer states offloaded, Megatron-LM's
    default 1.0).

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
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0
    overlap_cpu_optimizer_d2h_h2d: bool = False
    use_precision_aware_optimizer: bool = False

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
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            raise ValueError(f"--optimizer-offload-fraction must be in [0, 1], got {self.optimizer_offload_fraction}")
        if self.use_precision_aware_optimizer and self.optimizer != "adam":
            raise ValueError("--use-precision-aware-optimizer needs --optimizer adam (megatron's precision-aware Adam)")

    def offload_config(self, cuda: bool, te_installed: bool = True) -> dict:
        """OptimizerConfig fields of the CPU offload / precision-aware flags: as given on CUDA;
        on CPU none (logged when a flag was given: it changes nothing there)."""
        given = {
            "--optimizer-cpu-offload": self.optimizer_cpu_offload,
            "--overlap-cpu-optimizer-d2h-h2d": self.overlap_cpu_optimizer_d2h_h2d,
            "--use-precision-aware-optimizer": self.use_precision_aware_optimizer,
        }
        if not cuda:
            on = [flag for flag, value in given.items() if value]
            if on:
                logger.info(
                    "%s: no effect on CPU (parameters and optimizer states are in host memory already, "
                    "and the CPU optimizer is not megatron's distributed one)",
                    " ".join(on),
                )
            return {}
        if self.use_precision_aware_optimizer and not te_installed:
            raise ValueError(
                "--use-precision-aware-optimizer: megatron-core's OptimizerConfig needs Transformer Engine for it "
                "(it reads TE's version), which is not installed; install TE or drop the flag"
            )
        out = dict(
            use_precision_aware_optimizer=self.use_precision_aware_optimizer,
            overlap_cpu_optimizer_d2h_h2d=self.overlap_cpu_optimizer_d2h_h2d,
        )
        if self.optimizer_cpu_offload:
            out.update(optimizer_cpu_offload=True, optimizer_offload_fraction=self.optimizer_offload_fraction)
        return out

    def warmup_steps(self, total_steps: int) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * (self.lr_decay_iters or total_steps))
        return self.lr_warmup_iters


def _te_installed() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_optimizer(model, args: OptimizerArgs, total_steps: int, bf16: bool, distributed: bool):
    """(optimizer, scheduler): megatron's optimizer (distributed on GPU) over ``model`` (one
    DDP-wrapped model or a list of model chunks) and OptimizerParamScheduler."""
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
        **args.offload_config(torch.cuda.is_available(), _te_installed()),
    )
    optimizer = get_megatron_optimizer(config, list(model) if isinstance(model, (list, tuple)) else [model])
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
