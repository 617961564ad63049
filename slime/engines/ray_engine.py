"""The CPU engine as a Ray actor: it serves HTTP from inside the actor and hands back its URL.

`create_cpu_engine(config, placement_group, bundle_index)` places the actor on one bundle of
a placement group (as the trainer places its ranks, see `slime.ray.placement_group`) and
takes its ``num_cpus`` / ``num_gpus`` from that bundle, so engines and train ranks share one
resource plan. Rollout code then talks to ``ray.get(actor.start.remote())``, a plain URL;
the trainer pushes weights with ``actor.update_weights.remote(named_tensors)``.
"""

from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slime.engines.config import EngineConfig

logger = logging.getLogger(__name__)

__all__ = ["CpuEngineActor", "bundle_resources", "create_cpu_engine"]


class CpuEngineActor:
    """Owns one `EngineServer` in the actor's process."""

    def __init__(self, config: EngineConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.server = None

    def start(self, timeout: float = 300.0) -> str:
        """Load the model, start serving on a free port; the URL other actors can reach."""
        from slime.engines.http_server import EngineServer

        if self.server is None:
            self.server = EngineServer(self.config)
            wildcard = self.config.host in ("0.0.0.0", "::", "")
            self.server.start(timeout, advertise_host=ray.util.get_node_ip_address() if wildcard else None)
        return self.server.url

    def url(self) -> str | None:
        return None if self.server is None else self.server.url

    def update_weights(self, named_tensors, weight_version: str | None = None, flush_cache: bool = True) -> str:
        """Apply HF-named tensors (a full state dict or one bucket); returns the weight version."""
        return self._engine().update_weights(named_tensors, weight_version=weight_version, flush_cache=flush_cache)

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> str:
        return self._engine().update_weights_from_disk(model_path, weight_version=weight_version)

    def release_memory_occupation(self, tags: list[str] | None = None) -> dict:
        """--colocate: free the weights / KV cache (``tags``, None: both) while the trainer trains."""
        return self._engine().release_memory_occupation(tags)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> dict:
        return self._engine().resume_memory_occupation(tags)

    def healthy(self) -> bool:
        return self.server is not None and self.server.engine.healthy

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _engine(self):
        if self.server is None:
            raise RuntimeError("the engine actor is not started: call start() first")
        return self.server.engine


def bundle_resources(placement_group, bundle_index: int) -> tuple[float, float]:
    """(num_cpus, num_gpus) of one bundle of ``placement_group``."""
    specs = placement_group.bundle_specs
    if not 0 <= bundle_index < len(specs):
        raise ValueError(f"bundle_index {bundle_index} is outside the placement group's {len(specs)} bundles")
    spec = specs[bundle_index]
    return float(spec.get("CPU", 0)), float(spec.get("GPU", 0))


def create_cpu_engine(config: EngineConfig, placement_group=None, bundle_index: int = 0, num_cpus: float = 1.0):
    """A `CpuEngineActor` handle on bundle ``bundle_index`` of ``placement_group`` (or anywhere, ``num_cpus``)."""
    options: dict = {"num_cpus": num_cpus, "num_gpus": 0}
    if placement_group is not None:
        cpus, gpus = bundle_resources(placement_group, bundle_index)
        options = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=bundle_index
            ),
        }
    if not options["num_gpus"]:
        # A CPU engine uses the cores it was given, not every core of the node (oversubscribed
        # OpenMP threads slow every process on it several-fold).
        threads = config.num_threads or max(1, int(options["num_cpus"]))
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    logger.info("CPU engine actor: %s", {k: v for k, v in options.items() if k != "scheduling_strategy"})
    return ray.remote(CpuEngineActor).options(**options).remote(config)
