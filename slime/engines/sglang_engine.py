"""One SGLang server as a Ray actor: launch it on its GPUs, take weight buckets, release memory, stop.

`SGLangEngineActor` runs on the node of its GPUs (see `slime.ray.rollout_engines`) and starts
``python -m sglang.launch_server`` as a child process (`ServerProcess`) with
``CUDA_VISIBLE_DEVICES`` set to the engine's GPUs, ``--tp-size`` = ``--rollout-num-gpus-per-engine``
and every ``--sglang-*`` flag passed through. It waits for ``/health_generate`` (a real token,
not just a listening socket) and returns the URL.

Weight sync (`update_weights`): the trainer calls ``update_weights.remote(bucket, weight_version=,
flush_cache=)`` per bucket of HF-named CPU tensors, like on the CPU engine. Ray's object store
carries the bucket to this actor's node, wherever the trainer runs. The actor then copies it
into one shared-memory segment and posts SGLang's ``/update_weights_from_tensor`` with one
serialized handle per TP rank; each TP worker maps the segment, copies to its GPU and shards
with the model's own weight loaders. Why this and not ``/update_weights_from_distributed``:
that one is a NCCL broadcast whose source must be a GPU rank outside the engine (the trainer),
which does not fit the trainer's per-bucket ``update_weights`` call and needs a process group
spanning trainer and engines; the object store works across nodes with no extra group, and the
actor needs no CUDA context of its own (no GPU memory taken from a colocated trainer). The cost
is one host copy per bucket; see docs/engines.md.

Colocate: ``release_memory_occupation`` / ``resume_memory_occupation`` call SGLang's routes of
the same names (the server runs with ``--enable-memory-saver``).

``SLIME_SGLANG_LAUNCH_COMMAND`` (a shell-quoted command) replaces ``python -m sglang.launch_server``,
e.g. to wrap it in a container or, in tests, to start a stand-in speaking the same contract.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass, field

from slime.engines.server_process import HTTPCallError, ServerProcess, free_port, http_call, url_for

logger = logging.getLogger(__name__)

__all__ = [
    "RESERVED_SERVER_ARGS",
    "SGLangEngineActor",
    "SGLangEngineConfig",
    "sglang_memory_tags",
    "launch_command",
    "server_argv",
    "share_named_tensors",
]

LAUNCH_ENV = "SLIME_SGLANG_LAUNCH_COMMAND"
# Server flags slime sets itself, with the slime flag that decides each.
RESERVED_SERVER_ARGS = {
    "model_path": "--hf-checkpoint",
    "tp_size": "--rollout-num-gpus-per-engine",
    "tensor_parallel_size": "--rollout-num-gpus-per-engine",
    "host": "(chosen per node by slime)",
    "port": "(a free port chosen by slime)",
    "nccl_port": "(a free port chosen by slime)",
    "base_gpu_id": "(the engine's GPUs come from its placement-group bundles)",
    "dist_init_addr": "(engines span one node each)",
    "nnodes": "(engines span one node each)",
    "node_rank": "(engines span one node each)",
}
_ALIGN = 64  # bytes: every tensor in the shared segment starts aligned for any dtype


def launch_command() -> list[str]:
    custom = os.environ.get(LAUNCH_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "sglang.launch_server"]


@dataclass(frozen=True)
class SGLangEngineConfig:
    """One SGLang server.

    model_path: ``--hf-checkpoint``. tp_size: ``--rollout-num-gpus-per-engine``.
    gpu_ids: the physical GPU ids of its bundles (``CUDA_VISIBLE_DEVICES`` of the server);
        empty leaves the variable as inherited.
    server_args: the ``--sglang-*`` flags by SGLang dest (``args.sglang_server_args``).
    host: the address the server binds and advertises. seed: SGLang's ``--random-seed``
        unless ``--sglang-random-seed`` is given. memory_saver: ``--enable-memory-saver``
        (needed to release memory while a colocated trainer runs).
    start_timeout: seconds for the server to load and answer ``/health_generate``.
    """

    model_path: str
    tp_size: int = 1
    gpu_ids: tuple[str, ...] = ()
    server_args: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    seed: int = 42
    memory_saver: bool = False
    start_timeout: float = 1200.0
    name: str = "sglang-engine-0"

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--hf-checkpoint is required for the SGLang engines")
        if self.tp_size < 1:
            raise ValueError(f"--rollout-num-gpus-per-engine must be >= 1, got {self.tp_size}")
        if self.gpu_ids and len(self.gpu_ids) != self.tp_size:
            raise ValueError(f"{self.name}: {len(self.gpu_ids)} GPUs given for a tp size of {self.tp_size}")
        for key in self.server_args:
            if key in RESERVED_SERVER_ARGS:
                raise ValueError(
                    f"--sglang-{key.replace('_', '-')} is set by slime: {RESERVED_SERVER_ARGS[key]} decides it"
                )
        if self.start_timeout <= 0:
            raise ValueError(f"start_timeout must be > 0, got {self.start_timeout}")


def _flag_tokens(key: str, value) -> list[str]:
    """One ``--sglang-*`` value back to SGLang's own command-line tokens."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):  # a switch that was given (store_true/store_false/const)
        return [flag]
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        import json

        return [flag, json.dumps(value)]
    return [flag, str(value)]


def server_argv(config: SGLangEngineConfig, port: int, nccl_port: int) -> list[str]:
    """The full command line of one SGLang server."""
    argv = launch_command() + [
        "--model-path", config.model_path,
        "--tp-size", str(config.tp_size),
        "--host", config.host,
        "--port", str(port),
        "--nccl-port", str(nccl_port),
        "--base-gpu-id", "0",  # CUDA_VISIBLE_DEVICES holds exactly the engine's GPUs
    ]  # fmt: skip
    user = dict(config.server_args)
    if "random_seed" not in user:
        argv += ["--random-seed", str(config.seed)]
    if config.memory_saver and "enable_memory_saver" not in user:
        argv += ["--enable-memory-saver"]
    for key, value in user.items():
        argv += _flag_tokens(key, value)
    return argv


def _serializer():
    """SGLang's own serializer where installed (its reductions patches apply); else the same wire
    format (ForkingPickler bytes, base64) for stand-ins that speak the contract."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer

        return lambda obj: MultiprocessingSerializer.serialize(obj, output_str=True)
    except ImportError:
        import base64
        import io
        from multiprocessing.reduction import ForkingPickler

        def serialize(obj) -> str:
            buf = io.BytesIO()
            ForkingPickler(buf).dump(obj)
            return base64.b64encode(buf.getvalue()).decode()

        return serialize


def _check_shm_room(nbytes: int, path: str = "/dev/shm") -> None:
    """Shared segments live in /dev/shm; writing past a full one kills the process with SIGBUS
    (containers default to 64 MB), so refuse with a clear error instead."""
    try:
        st = os.statvfs(path)
    except OSError:
        return  # no /dev/shm to inspect: let torch report what it finds
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise RuntimeError(
            f"weight update: a bucket of {nbytes / 2**20:.0f} MiB does not fit in {path} ({free / 2**20:.0f} MiB free); "
            "lower --update-weight-buffer-size or give the container more shared memory (docker --shm-size)"
        )


def share_named_tensors(named_tensors) -> tuple[list, object]:
    """(name, tensor) pairs copied into one shared-memory segment: (pairs of views, the segment).

    Views of one segment serialize as one shared file that any process of this node can map
    (``file_system`` sharing: no file descriptors passed, so an unrelated process such as the
    SGLang server can open it). Keep the segment alive until the receivers answered.
    """
    import torch
    import torch.multiprocessing as mp

    mp.set_sharing_strategy("file_system")
    items = list(named_tensors)
    offsets, total = [], 0
    for name, tensor in items:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"weight update: expected (str, torch.Tensor) pairs, got ({type(name).__name__}, {type(tensor).__name__})"
            )
        total = -(-total // _ALIGN) * _ALIGN
        offsets.append(total)
        total += tensor.numel() * tensor.element_size()
    _check_shm_room(total)
    segment = torch.empty(max(total, _ALIGN), dtype=torch.uint8).share_memory_()
    shared = []
    for (name, tensor), offset in zip(items, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        view = (
            segment[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            if nbytes
            else torch.empty(tensor.shape, dtype=tensor.dtype)
        )
        view.copy_(tensor.detach().cpu())
        shared.append((name, view))
    return shared, segment


def sglang_memory_tags(tags: list[str] | None, cuda_graph_tag: bool) -> dict:
    """The request body for SGLang's memory routes. Both our tags (or None) mean all of it;
    SGLang versions that tag CUDA-graph memory ("cuda_graph") get it released and resumed with
    the KV cache (both are only needed to generate, and slime pairs them the same way)."""
    if tags is None or {"weights", "kv_cache"} <= set(tags):
        return {}
    out = list(tags)
    if cuda_graph_tag and "kv_cache" in out:
        out.append("cuda_graph")
    return {"tags": out}


def _sglang_has_cuda_graph_tag() -> bool:
    try:  # a constants module (no CUDA); older SGLang releases have no such tag
        from sglang.srt.constants import GPU_MEMORY_TYPE_CUDA_GRAPH  # noqa: F401
    except ImportError:
        return False
    return True


class SGLangEngineActor:
    """One SGLang server process; the methods mirror `CpuEngineActor` (start/update_weights/shutdown)."""

    def __init__(self, config: SGLangEngineConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.process: ServerProcess | None = None
        self.url: str | None = None
        self.weight_version: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Launch the server and wait until it generates; its URL."""
        if self.url is not None:
            return self.url
        cfg = self.config
        port, nccl_port = free_port(cfg.host), free_port(cfg.host)
        env = dict(os.environ)
        if cfg.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(cfg.gpu_ids)
        # A colocated trainer's allocator settings break SGLang's memory saver; the server gets its own.
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        self.process = ServerProcess(cfg.name, server_argv(cfg, port, nccl_port), env=env)
        url = url_for(cfg.host, port)
        self.process.wait_healthy(url + "/health_generate", timeout=cfg.start_timeout, poll_s=1.0)
        self.url = url
        logger.info(
            "%s serving %s at %s (tp %d, GPUs %s)",
            cfg.name,
            cfg.model_path,
            url,
            cfg.tp_size,
            ",".join(cfg.gpu_ids) or "inherited",
        )
        return url

    def get_url(self) -> str | None:
        return self.url

    def healthy(self) -> bool:
        if self.url is None or self.process is None or not self.process.alive():
            return False
        try:
            http_call("GET", self.url + "/health", timeout=10)
            return True
        except RuntimeError:
            return False

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process, self.url = None, None

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors, weight_version: str | None = None, flush_cache: bool = True) -> str:
        """Load HF-named tensors (one bucket or a full state dict) into the server; the weight version."""
        version = str(weight_version) if weight_version is not None else self.weight_version
        shared, segment = share_named_tensors(named_tensors)
        serialize = _serializer()
        # One pickle per TP rank: each carries its own reference to the segment, which that
        # rank's unpickling releases once it has mapped it.
        payload = {
            "serialized_named_tensors": [serialize(shared) for _ in range(self.config.tp_size)],
            "load_format": None,
            "flush_cache": bool(flush_cache),
        }
        if version is not None:
            payload["weight_version"] = version
        answer = self._post("/update_weights_from_tensor", payload, timeout=600)
        del shared, segment  # every TP rank copied its part to its GPU before answering
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RuntimeError(f"{self.config.name}: update_weights_from_tensor failed: {answer.get('message')}")
        self.weight_version = version
        return version if version is not None else str(self._get("/get_weight_version").get("weight_version"))

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> str:
        body = {"model_path": model_path}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        answer = self._post("/update_weights_from_disk", body, timeout=1800)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RuntimeError(f"{self.config.name}: update_weights_from_disk failed: {answer.get('message')}")
        self.weight_version = body.get("weight_version", self.weight_version)
        return str(self.weight_version)

    def flush_cache(self, timeout: float = 60.0) -> None:
        """Drop the prefix cache; SGLang refuses while requests are still running, so retry."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                self._post("/flush_cache", None)
                return
            except HTTPCallError as e:
                if e.status is None or time.monotonic() > deadline:
                    raise
                logger.info("%s: flush_cache refused (%s); retrying", self.config.name, e)
                time.sleep(1.0)

    # ------------------------------------------------------------------ colocate
    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free the server's weights and KV cache (``tags``: ["weights"], ["kv_cache"]; None:
        all) for training. See `sglang_memory_tags` for SGLang's CUDA-graph memory."""
        self.flush_cache()
        self._post("/release_memory_occupation", sglang_memory_tags(tags, _sglang_has_cuda_graph_tag()))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._post("/resume_memory_occupation", sglang_memory_tags(tags, _sglang_has_cuda_graph_tag()))

    # ------------------------------------------------------------------ HTTP
    def _base(self) -> str:
        if self.url is None:
            raise RuntimeError(f"{self.config.name} is not started: call start() first")
        return self.url

    def _post(self, route: str, body: dict | None, timeout: float = 300.0):
        return http_call("POST", self._base() + route, body if body is not None else {}, timeout=timeout)

    def _get(self, route: str, timeout: float = 60.0):
        return http_call("GET", self._base() + route, timeout=timeout)
