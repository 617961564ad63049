"""Who holds the shared devices under ``--colocate``: the trainer or the inference engines.

slime's flags: ``--offload-train`` (the trainer's state leaves the devices while the engines
generate) and ``--offload-rollout`` (the engines release their weights and KV cache while the
trainer trains); ``--offload`` sets both, and ``--colocate`` turns both on unless one is set
off explicitly (``--no-offload-train``). `OffloadArgs` is that resolved pair.

`Residency` is the driver's state machine. Each verb of the loop asks for what it needs and
the transitions run in an order that frees memory before it takes any:

    generate      trainer offloaded, engines' weights and KV cache resident
    train, save   engines released, trainer resident (the loop saves before the sync)
    weight sync   engines' KV cache released, the trainer's weights resident (grads and
                  optimizer state offloaded first), engines' weights resumed, then synced

So the engines' weights and the trainer's full state are never on the devices at the same
time: a sync holds the trainer's weights and the engines' weights (about 2 bytes per parameter
twice under bf16), as in slime. Released engine weights hold no values: the next sync refills
them, and an engine refuses to generate until then (`slime.engines.memory`).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["OffloadArgs", "Residency", "add_offload_arguments"]

WEIGHTS, KV_CACHE = "weights", "kv_cache"


def add_offload_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("colocate offload")
    g.add_argument("--offload", action="store_true", help="--offload-train and --offload-rollout")
    g.add_argument(
        "--offload-train",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RL: move the trainer's state to host memory while the engines generate (default: on with --colocate)",
    )
    g.add_argument(
        "--offload-rollout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RL: the engines release their weights and KV cache while the trainer trains (default: on with --colocate)",
    )
    return parser


@dataclass(frozen=True)
class OffloadArgs:
    """Resolved offload settings.

    train: the trainer offloads its state while engines generate (``--offload-train``);
    rollout: the engines release their memory while the trainer trains (``--offload-rollout``).
    """

    train: bool = False
    rollout: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OffloadArgs:
        if args.debug_rollout_only:  # no trainer to share the devices with (slime turns both off too)
            return cls()

        def pick(value):
            if args.offload:
                return True if value is None else value
            return bool(args.colocate) if value is None else value

        return cls(train=pick(args.offload_train), rollout=pick(args.offload_rollout))

    @property
    def active(self) -> bool:
        return self.train or self.rollout


def explicit_offload_flags(args: argparse.Namespace) -> list[str]:
    """The offload flags given on the command line (for refusing them where they cannot apply)."""
    out = ["--offload"] if args.offload else []
    for flag, value in (("--offload-train", args.offload_train), ("--offload-rollout", args.offload_rollout)):
        if value:
            out.append(flag)
    return out


class Residency:
    """Moves the trainer (a `RayTrainGroup`, or None) and the engines (Ray handles with
    ``release_memory_occupation`` / ``resume_memory_occupation``) between the states above.

    ``history`` lists every transition in order (``"trainer: offload"``, ``"engines: release
    kv_cache"``, ...); ``seconds`` is the time spent in them, both read by the driver's metrics.
    """

    def __init__(self, plan: OffloadArgs, group=None, engines: list | None = None):
        self.plan = plan
        self.group = group
        self.engines = list(engines or [])
        self.trainer = "resident"  # resident | weights (all but the weights offloaded) | offloaded
        self.engine_memory = {WEIGHTS, KV_CACHE}
        self.history: list[str] = []
        self.seconds = 0.0

    # ------------------------------------------------------------------ what each verb needs
    def before_trainer_starts(self) -> None:
        """The engines started first (their placement comes from the trainer's): give the
        trainer room to build and load."""
        self._release({WEIGHTS, KV_CACHE})

    def for_generation(self) -> None:
        if WEIGHTS not in self.engine_memory:
            raise RuntimeError("the engines' weights are released: a weight sync must come before generating")
        self._offload_trainer(keep_weights=False)
        self._resume({KV_CACHE})

    def for_training(self) -> None:
        self._release({WEIGHTS, KV_CACHE})
        self._onload_trainer()

    def for_weight_sync(self) -> None:
        self._release({KV_CACHE})
        if self.trainer == "offloaded":
            self._onload_trainer()
        self._offload_trainer(keep_weights=True)
        self._resume({WEIGHTS})

    # ------------------------------------------------------------------ transitions
    def _offload_trainer(self, keep_weights: bool) -> None:
        target = "weights" if keep_weights else "offloaded"
        # Without engines (--debug-train-only) there is nothing to make room for.
        if not (self.plan.train and self.group is not None and self.engines) or self.trainer in (target, "offloaded"):
            return
        self._timed(f"trainer: offload{' all but the weights' if keep_weights else ''}", self.group.offload, keep_weights)
        self.trainer = target

    def _onload_trainer(self) -> None:
        if self.trainer == "resident":
            return
        self._timed("trainer: onload", self.group.onload)
        self.trainer = "resident"

    def _release(self, tags: set[str]) -> None:
        tags = tags & self.engine_memory
        if not (self.plan.rollout and self.engines and tags):
            return
        ordered = sorted(tags)
        self._timed(f"engines: release {' '.join(ordered)}", self._call_engines, "release_memory_occupation", ordered)
        self.engine_memory -= tags

    def _resume(self, tags: set[str]) -> None:
        tags = tags - self.engine_memory
        if not tags:
            return
        ordered = sorted(tags)
        self._timed(f"engines: resume {' '.join(ordered)}", self._call_engines, "resume_memory_occupation", ordered)
        self.engine_memory |= tags

    def _call_engines(self, method: str, tags: list[str]) -> None:
        import ray

        ray.get([getattr(h, method).remote(tags) for h in self.engines])

    def _timed(self, what: str, fn, *fn_args) -> None:
        start = time.perf_counter()
        fn(*fn_args)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.history.append(what)
        logger.info("colocate: %s (%.2f s)", what, seconds)
