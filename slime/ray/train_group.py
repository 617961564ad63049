"""The train actor group: one Ray actor per rank, each wrapping a `MegatronActor`.

Besides training, the group is the source of weight syncs: `RayTrainGroup.update_weights`
streams the current weights, HF-named and bucketed (`megatron_utils.weight_sync`), from
global rank 0 to every inference engine handle (``handle.update_weights.remote(bucket,
weight_version=..., flush_cache=...)``, e.g. `slime.engines.ray_engine.CpuEngineActor`).
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)

__all__ = ["RayTrainGroup"]


class TrainRayActor:
    """Runs in its own process; sets the torch.distributed environment, then builds the actor."""

    def address(self) -> tuple[str, int]:
        import socket

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))  # a free port on the address the other ranks will dial
            port = s.getsockname()[1]
        return ip, port

    def init(self, args, rank: int, world: int, master: tuple[str, int], total_steps: int) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the local device is 0.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        from slime.backends.megatron_utils.actor import MegatronActor
        from slime.backends.megatron_utils.arguments import actor_config_from_args
        from slime.backends.megatron_utils.checkpoint import has_checkpoint

        cfg = actor_config_from_args(args, total_steps)
        self.actor = MegatronActor(
            cfg.model, cfg.build, cfg.batching, cfg.optim, cfg.train, cfg.algorithm, cfg.cross_entropy, cfg.throughput
        )
        self.args = args
        state: dict = {}
        if has_checkpoint(args.load):  # resume: weights, optimizer, schedule, RNG, data position
            # The reference weights (KL terms) come from where the run started, not from --load.
            state = self.actor.load(args.load, ref_load=args.ref_load, hf_checkpoint=args.hf_checkpoint)
        elif args.ref_load:
            self.actor.load_dist(args.ref_load)
        else:
            self.actor.load_hf(args.hf_checkpoint)
        return {"dp_rank": self.actor.info.dp_rank, "dp_size": self.actor.info.dp_size, "state": state, "attention": cfg.attention_note}

    def train(self, rollout_id: int, steps: list) -> list[dict]:
        return [dict(m, rollout_id=rollout_id) for m in self.actor.train_rollout(steps)]

    def update_weights(self, engine_handles: list, weight_version: str, bucket_bytes: int) -> dict:
        """Send the current weights to every engine, one bucket at a time (global rank 0 sends;
        the other ranks of its TP group take part in the gathers). Each bucket is put in the
        object store once, applied by all engines, and released before the next is gathered, so
        about one bucket is in flight; the last one flushes the engines' prefix caches.

        Returns (rank 0) ``weight_version``, ``buckets``, ``tensors``, ``bytes`` (HF tensor bytes
        sent per engine), ``seconds``; other ranks return the same keys with zero counts.
        """
        from slime.backends.megatron_utils.weight_sync import hf_buckets, tensor_bytes

        start = time.perf_counter()
        buckets = tensors = nbytes = 0
        for bucket, last in hf_buckets(self.actor, bucket_bytes):
            buckets, tensors = buckets + 1, tensors + len(bucket)
            nbytes += sum(tensor_bytes(t) for _, t in bucket)
            ref = ray.put(bucket)  # one copy in the object store, read by every engine
            del bucket
            versions = ray.get(
                [h.update_weights.remote(ref, weight_version=weight_version, flush_cache=last) for h in engine_handles]
            )
            del ref
            bad = [v for v in versions if v != str(weight_version)]
            if bad:
                raise RuntimeError(f"weight sync: an engine reports version {bad[0]!r} after receiving {weight_version!r}")
        return {
            "weight_version": str(weight_version),
            "buckets": buckets,
            "tensors": tensors,
            "bytes": nbytes,
            "seconds": time.perf_counter() - start,
        }

    def evaluate(self, samples: list) -> float:
        return self.actor.evaluate(samples)

    def offload(self, keep_weights: bool = False) -> int:
        return self.actor.offload(keep_weights=keep_weights)

    def onload(self) -> int:
        return self.actor.onload()

    def save(self, root: str, iteration: int, extra: dict) -> str:
        return self.actor.save(root, iteration, dict(extra, step=self.actor.step))

    def export_hf(self, out_dir: str, origin: str) -> None:
        self.actor.export_hf(out_dir, origin)

    def shutdown(self) -> None:
        from slime.backends.megatron_utils.parallel import destroy_parallel

        destroy_parallel()


class RayTrainGroup:
    """``--actor-num-nodes x --actor-num-gpus-per-node`` ranks in a placement group."""

    def __init__(self, args, pg, use_gpu: bool, world: int):
        env = {"OMP_NUM_THREADS": "1"} if not use_gpu else {}
        remote = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(TrainRayActor)
        self.actors = [
            remote.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env},
            ).remote()
            for i in range(world)
        ]
        self.world = world

    def init(self, args, total_steps: int) -> list[dict]:
        master = ray.get(self.actors[0].address.remote())
        infos = ray.get([a.init.remote(args, r, self.world, master, total_steps) for r, a in enumerate(self.actors)])
        self.dp_ranks = [i["dp_rank"] for i in infos]
        return infos

    def train(self, rollout_id: int, data_refs: list) -> list[dict]:
        """Each rank trains on its DP share (a ref resolved inside the actor); rank 0's metrics."""
        results = ray.get([a.train.remote(rollout_id, data_refs[d]) for a, d in zip(self.actors, self.dp_ranks)])
        return results[0]

    def evaluate(self, data_refs: list) -> float:
        return ray.get([a.evaluate.remote(data_refs[d]) for a, d in zip(self.actors, self.dp_ranks)])[0]

    def update_weights(self, engine_handles: list, weight_version: str, bucket_bytes: int | None = None) -> dict:
        """Push the current weights to ``engine_handles`` (see `TrainRayActor.update_weights`);
        ``bucket_bytes`` defaults to slime's 512 MiB. Returns rank 0's sync statistics."""
        from slime.backends.megatron_utils.weight_sync import DEFAULT_BUCKET_BYTES

        cap = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        return ray.get([a.update_weights.remote(engine_handles, weight_version, cap) for a in self.actors])[0]

    def offload(self, keep_weights: bool = False) -> int:
        """--offload-train: every rank's state to host memory (``keep_weights``: all but the
        weights); the bytes released, summed over ranks."""
        return sum(ray.get([a.offload.remote(keep_weights) for a in self.actors]))

    def onload(self) -> int:
        return sum(ray.get([a.onload.remote() for a in self.actors]))

    def save(self, root: str, iteration: int, extra: dict) -> str:
        return ray.get([a.save.remote(root, iteration, extra) for a in self.actors])[0]

    def export_hf(self, out_dir: str, origin: str) -> None:
        ray.get([a.export_hf.remote(out_dir, origin) for a in self.actors])

    def shutdown(self) -> None:
        ray.get([a.shutdown.remote() for a in self.actors])
