"""Metrics to JSONL (always, next to the checkpoints), TensorBoard and wandb (optional).

Units: ``loss`` nats per supervised token, ``lr`` per step, ``grad_norm`` L2 before clipping,
``*_tokens`` counts, ``tokens_per_s`` tokens/second, ``packing_efficiency`` real tokens per
micro-batch token slot, ``step_time_s`` seconds. The wandb key is taken from the environment
(or --wandb-key, put into the environment) and never written to any log or config.
"""

from __future__ import annotations

import json
import logging
import os
import sys

logger = logging.getLogger(__name__)

__all__ = ["MetricsLogger"]

_SECRET_ARGS = {"wandb_key"}


def _redact_argv(argv: list[str], flag: str) -> list[str]:
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a == flag:
            out.append(a)
            hide = True
        elif a.startswith(flag + "="):
            out.append(flag + "=***")
        else:
            out.append(a)
    return out


class MetricsLogger:
    def __init__(self, args, log_dir: str | None):
        self.jsonl = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self.tb = None
        if args.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = args.tensorboard_dir or os.path.join(log_dir or "outputs", "tensorboard")
            self.tb = SummaryWriter(tb_dir)
        self.wandb = None
        if args.use_wandb and args.wandb_mode != "disabled":
            import wandb

            if args.wandb_key:
                os.environ["WANDB_API_KEY"] = args.wandb_key
                # wandb records the command line in its run metadata: redact the key there.
                sys.argv = _redact_argv(sys.argv, "--wandb-key")
            config = {k: v for k, v in vars(args).items() if k not in _SECRET_ARGS}
            settings = None
            if args.wandb_host:
                try:  # wandb checks the address (wandb.ai itself is https://api.wandb.ai)
                    settings = wandb.Settings(base_url=args.wandb_host)
                except ValueError as e:  # pydantic's error: its first message is the reason
                    reason = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
                    raise ValueError(f"--wandb-host {args.wandb_host}: {reason}") from None
            self.wandb = wandb.init(
                project=args.wandb_project,
                entity=args.wandb_team,
                group=args.wandb_group,
                mode=args.wandb_mode,
                dir=args.wandb_dir or log_dir,
                config=config,
                settings=settings,
            )

    def log(self, metrics: dict, step: int) -> None:
        record = dict(metrics, global_step=step)
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in numeric.items():
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log({k if "/" in k else f"train/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
