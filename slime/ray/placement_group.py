"""One placement-group bundle per training rank (a GPU, or a CPU on machines without GPUs)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = ["create_placement_group"]


def create_placement_group(num_nodes: int, per_node: int, timeout_s: float = 120.0):
    """(placement group, uses_gpu). ``--actor-num-gpus-per-node 2`` without GPUs is 2 CPU ranks."""
    import ray
    from ray.util.placement_group import placement_group

    world = num_nodes * per_node
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = gpus >= 1
    if use_gpu and gpus < world:
        raise ValueError(f"{world} training ranks need {world} GPUs; the Ray cluster has {int(gpus)}")
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise TimeoutError(f"placement group of {world} x {bundle} not ready after {timeout_s:.0f} s (cluster: {ray.cluster_resources()})")
    logger.info("placement group: %d ranks on %s", world, "GPUs" if use_gpu else "CPUs")
    return pg, use_gpu
