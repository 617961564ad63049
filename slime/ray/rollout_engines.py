"""The inference engines of an RL run, as the driver sees them: start, address, stop.

`start_rollout_engines(args, placement_group=None)` picks the engine (``--rollout-engine``:
SGLang where it can run, our CPU engine elsewhere; `slime.engines.config.resolve_engine_kind`
logs which), starts it as Ray actors on placement-group bundles and returns `RolloutEngines`:
the actor handles (the trainer pushes weights to them), the one URL the rollout talks to, and
what to stop at the end. Rollout code never learns which engine it is.

SGLang: ``--rollout-num-gpus / --rollout-num-gpus-per-engine`` engines, each a server with tp =
``--rollout-num-gpus-per-engine`` on that many GPU bundles of one node. Separate placement puts
them on a placement group of their own; ``--colocate`` puts engine i on bundles
[i*tp, (i+1)*tp) of the trainer's placement group (``placement_group``, which the driver must
create first and pass). Several engines get one sglang-router in front (or join the router at
``--sglang-router-ip/--sglang-router-port``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["RolloutEngines", "add_engine_placement_arguments", "engine_gpu_layout", "start_rollout_engines"]

ENGINE_START_TIMEOUT_S = 1800.0  # SGLang loads weights and captures CUDA graphs; large models take minutes
PG_READY_TIMEOUT_S = 300.0


def add_engine_placement_arguments(parser):
    """Where the engines run and how the rollout reaches them (slime's flag names)."""
    g = parser.add_argument_group("rollout engine placement")
    g.add_argument("--rollout-num-gpus-per-engine", type=int, default=1, help="GPUs per engine (SGLang's tp size)")
    g.add_argument("--sglang-router-ip", default=None, help="an existing router / engine to send requests to")
    g.add_argument("--sglang-router-port", type=int, default=None, help="its port")
    return parser


@dataclass
class RolloutEngines:
    """Started engines: Ray actor handles, the URL the rollout sends requests to, what to stop."""

    handles: list = field(default_factory=list)
    url: str | None = None
    kind: str = "none"
    router: object | None = None  # slime.engines.router.Router
    placement_group: object | None = None  # ours to remove (never the trainer's)

    def shutdown(self) -> None:
        import ray

        if self.router is not None:
            try:
                self.router.shutdown()
            except Exception as e:  # noqa: BLE001 -- shutting down: report, keep going
                logger.warning("router shutdown failed: %s", e)
            self.router = None
        for handle in self.handles:
            try:
                ray.get(handle.shutdown.remote(), timeout=120)
            except Exception as e:  # noqa: BLE001
                logger.warning("engine shutdown failed: %s", e)
        self.handles = []
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None


def engine_gpu_layout(total_gpus: int, per_engine: int) -> list[list[int]]:
    """Bundle indices of each engine: [[0..tp-1], [tp..2tp-1], ...]; checks the counts."""
    if per_engine < 1:
        raise ValueError(f"--rollout-num-gpus-per-engine must be >= 1, got {per_engine}")
    if total_gpus < per_engine or total_gpus % per_engine:
        raise ValueError(
            f"--rollout-num-gpus {total_gpus} must be a positive multiple of --rollout-num-gpus-per-engine {per_engine}"
        )
    return [list(range(i, i + per_engine)) for i in range(0, total_gpus, per_engine)]


def _wait_ready(pg, what: str) -> None:
    import ray

    ready, _ = ray.wait([pg.ready()], timeout=PG_READY_TIMEOUT_S)
    if not ready:
        raise TimeoutError(
            f"placement group for {what} ({pg.bundle_specs}) not ready after {PG_READY_TIMEOUT_S:.0f} s (cluster: {ray.cluster_resources()})"
        )


def _probe_bundles(pg) -> list[tuple[str, str]]:
    """(node IP, physical GPU id) of every bundle: a tiny task holds 1% of each bundle's GPU."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=0.01)
    def where() -> tuple[str, str]:
        ids = ray.get_gpu_ids()
        return ray.util.get_node_ip_address(), str(ids[0]) if ids else ""

    refs = [
        where.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        ).remote()
        for i in range(len(pg.bundle_specs))
    ]
    return ray.get(refs, timeout=PG_READY_TIMEOUT_S)


def _start_sglang(args, placement_group) -> RolloutEngines:
    import ray
    from ray.util.placement_group import placement_group as make_pg
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from slime.engines.router import launch_router, register_workers
    from slime.engines.sglang_engine import SGLangEngineActor, SGLangEngineConfig

    tp = args.rollout_num_gpus_per_engine
    owned_pg = None
    if args.colocate:
        if placement_group is None:
            raise ValueError(
                "--colocate: the engines share the trainer's GPUs; the driver must create the trainer's placement group first and pass it"
            )
        pg, total = placement_group, len(placement_group.bundle_specs)
        if not all(spec.get("GPU", 0) > 0 for spec in pg.bundle_specs):
            raise ValueError(
                "--colocate with SGLang engines needs the trainer on GPUs: its placement group has bundles without a GPU"
            )
        if args.rollout_num_gpus and args.rollout_num_gpus != total:
            raise ValueError(
                f"--colocate: --rollout-num-gpus {args.rollout_num_gpus} must equal the trainer's {total} GPUs (or be left out)"
            )
    else:
        total = args.rollout_num_gpus
        if not total:
            raise ValueError("--rollout-engine sglang needs --rollout-num-gpus (GPUs of the engines) or --colocate")
        engine_gpu_layout(total, tp)  # check before reserving anything
        owned_pg = pg = make_pg([{"GPU": 1, "CPU": 1} for _ in range(total)], strategy="PACK")
        _wait_ready(pg, f"{total} rollout GPUs")
    layout = engine_gpu_layout(total, tp)
    engines = None
    try:
        where = _probe_bundles(pg)
        several_nodes = len({ip for ip, _ in where}) > 1 or len([n for n in ray.nodes() if n.get("Alive")]) > 1
        handles = []
        for i, bundles in enumerate(layout):
            nodes = {where[b][0] for b in bundles}
            if len(nodes) > 1:
                raise ValueError(
                    f"SGLang engine {i} would span nodes {sorted(nodes)}: --rollout-num-gpus-per-engine {tp} must fit on one node"
                )
            node = nodes.pop()
            config = SGLangEngineConfig(
                model_path=args.hf_checkpoint,
                tp_size=tp,
                gpu_ids=tuple(where[b][1] for b in bundles),
                server_args=dict(args.sglang_server_args or {}),
                host=node if several_nodes else "127.0.0.1",
                seed=getattr(args, "rollout_seed", 42) + i,
                memory_saver=bool(args.colocate),
                name=f"sglang-engine-{i}",
            )
            # The GPUs are reserved by the bundles and handed to the server via CUDA_VISIBLE_DEVICES;
            # the actor itself needs none (and no CPU where a colocated trainer rank holds it).
            handles.append(
                ray.remote(SGLangEngineActor)
                .options(
                    num_cpus=0 if args.colocate else 1,
                    num_gpus=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=bundles[0]
                    ),
                )
                .remote(config)
            )
        engines = RolloutEngines(handles=handles, kind="sglang", placement_group=owned_pg)
        urls = ray.get([h.start.remote() for h in handles], timeout=ENGINE_START_TIMEOUT_S)
        if args.sglang_router_ip and args.sglang_router_port:
            from slime.rollout.config import engine_url

            engines.router = register_workers(engine_url(args), urls)
            engines.url = engines.router.url
        elif len(urls) > 1:
            engines.router = launch_router(urls, host=ray.util.get_node_ip_address() if several_nodes else "127.0.0.1")
            engines.url = engines.router.url
        else:
            engines.url = urls[0]
    except BaseException:
        if engines is not None:
            engines.shutdown()
        elif owned_pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(owned_pg)
        raise
    logger.info(
        "%d SGLang engine(s) (tp %d%s) at %s", len(handles), tp, ", colocated" if args.colocate else "", engines.url
    )
    return engines


def _start_cpu(args, config) -> RolloutEngines:
    import ray
    from ray.util.placement_group import placement_group as make_pg

    from slime.engines.ray_engine import create_cpu_engine

    if args.sglang_router_ip or args.sglang_router_port:
        raise ValueError(
            "--sglang-router-ip/--sglang-router-port name an existing router; the CPU engine runs without one"
        )
    if (
        args.rollout_num_gpus
        and args.rollout_num_gpus_per_engine
        and args.rollout_num_gpus // args.rollout_num_gpus_per_engine > 1
    ):
        raise ValueError(
            "the CPU engine runs one server per job for now; use --rollout-num-gpus equal to --rollout-num-gpus-per-engine"
        )
    if args.sglang_server_args:
        logger.warning(
            "the CPU engine does not use SGLang's server flags: %s",
            ", ".join(f"--sglang-{k.replace('_', '-')}" for k in args.sglang_server_args),
        )
    # Its own bundle, like every other actor with resources: the engine's cores are reserved
    # through the same placement machinery as the trainer's ranks.
    pg = make_pg([{"CPU": 1}], strategy="PACK")
    _wait_ready(pg, "the CPU engine")
    try:
        handle = create_cpu_engine(config, pg, bundle_index=0)
        url = ray.get(handle.start.remote(), timeout=ENGINE_START_TIMEOUT_S)
    except BaseException:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
        raise
    logger.info("CPU engine serving %s at %s", config.model_path, url)
    return RolloutEngines(handles=[handle], url=url, kind="cpu", placement_group=pg)


def start_rollout_engines(args, placement_group=None) -> RolloutEngines:
    """Start the engines of ``--rollout-engine``; ``placement_group``: the trainer's, for ``--colocate``."""
    from slime.engines.config import EngineConfig, resolve_engine_kind

    config = EngineConfig.from_args(args)
    kind = resolve_engine_kind(config.kind)
    if kind == "sglang":
        return _start_sglang(args, placement_group)
    return _start_cpu(args, config)
