"""The inference engines of an RL run, as the driver sees them: start, address, stop.

`start_rollout_engines(args)` picks the engine (``--rollout-engine``: SGLang where it can run,
our CPU engine elsewhere; `slime.engines.config.resolve_engine_kind` logs which), starts it
as a Ray actor and returns `RolloutEngines`: the actor handles (the trainer pushes weights
to them) and the one URL the rollout talks to. Rollout code never learns which engine it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["RolloutEngines", "add_engine_placement_arguments", "start_rollout_engines"]

ENGINE_START_TIMEOUT_S = 600.0


def add_engine_placement_arguments(parser):
    """Where the engines run and how the rollout reaches them (slime's flag names)."""
    g = parser.add_argument_group("rollout engine placement")
    g.add_argument("--rollout-num-gpus-per-engine", type=int, default=1, help="GPUs per engine (SGLang's tp size)")
    g.add_argument("--sglang-router-ip", default=None, help="an existing router / engine to send requests to")
    g.add_argument("--sglang-router-port", type=int, default=None, help="its port")
    return parser


@dataclass
class RolloutEngines:
    """Started engines: Ray actor handles and the URL the rollout sends requests to."""

    handles: list = field(default_factory=list)
    url: str | None = None
    kind: str = "none"

    def shutdown(self) -> None:
        import ray

        for handle in self.handles:
            try:
                ray.get(handle.shutdown.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 -- shutting down: report, keep going
                logger.warning("engine shutdown failed: %s", e)
        self.handles = []


def start_rollout_engines(args) -> RolloutEngines:
    import ray

    from slime.engines.config import EngineConfig, resolve_engine_kind

    config = EngineConfig.from_args(args)
    kind = resolve_engine_kind(config.kind)
    if kind == "sglang":
        # Where SGLang runs (CUDA + the sglang extra), its servers belong here; until they do,
        # say so rather than silently falling back to a CPU engine on a GPU machine.
        raise ValueError("--rollout-engine sglang: SGLang engines are not started by slime yet; use --rollout-engine cpu")
    if args.sglang_router_ip or args.sglang_router_port:
        raise ValueError("--sglang-router-ip/--sglang-router-port name an existing router; the CPU engine runs without one")
    if args.rollout_num_gpus and args.rollout_num_gpus_per_engine and args.rollout_num_gpus // args.rollout_num_gpus_per_engine > 1:
        raise ValueError("the CPU engine runs one server per job for now; use --rollout-num-gpus equal to --rollout-num-gpus-per-engine")
    if args.sglang_server_args:
        logger.warning("the CPU engine does not use SGLang's server flags: %s", ", ".join(f"--sglang-{k.replace('_', '-')}" for k in args.sglang_server_args))
    from slime.engines.ray_engine import create_cpu_engine

    handle = create_cpu_engine(config, num_cpus=1)
    url = ray.get(handle.start.remote(), timeout=ENGINE_START_TIMEOUT_S)
    logger.info("CPU engine serving %s at %s", config.model_path, url)
    return RolloutEngines(handles=[handle], url=url, kind=kind)
