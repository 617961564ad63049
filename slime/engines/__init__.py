"""Inference engines of the RL rollout, all behind SGLang's HTTP ``/generate`` contract.

- `config`: ``--rollout-engine`` and the ``--cpu-engine-*`` flags (`EngineConfig`).
- `cpu_engine`: `CpuEngine`, continuous batching over a HF causal LM (CPU, or CUDA if present).
- `http_server`: SGLang's native HTTP routes over a `CpuEngine`; `launch_server(config) -> url`.
- `ray_engine`: the engine as a Ray actor placed on a placement-group bundle.
- `sglang_engine`: an SGLang server (``sglang.launch_server``) as a Ray actor on its GPUs.
- `router`: sglang-router in front of several SGLang engines (started, or an existing one).
- `server_process`: a server program in a child process (start, health wait, HTTP, stop).

Importing this package loads neither torch nor Ray; the modules that need them do.
"""

from slime.engines.config import EngineConfig, add_cpu_engine_arguments, resolve_engine_kind

__all__ = ["EngineConfig", "add_cpu_engine_arguments", "resolve_engine_kind"]
