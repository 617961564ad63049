"""Process group and megatron parallel state set-up for one rank (no Ray here).

`init_parallel` works under torchrun (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the
environment), inside a Ray actor that set the same variables, or in a single process.
Without CUDA it uses gloo and enables `cpu_compat`; with CUDA, nccl.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ParallelInfo",
    "ParallelLayout",
    "destroy_parallel",
    "init_parallel",
    "seed_everything",
    "use_deterministic_algorithms",
]


@dataclass(frozen=True)
class ParallelLayout:
    """How the ranks are split (Megatron-LM's flags); data parallelism takes the rest.

    tensor / pipeline / context: ``--tensor-model-parallel-size``, ``--pipeline-model-parallel-size``,
    ``--context-parallel-size``; their product must divide the world size.
    virtual_pipeline: model chunks per pipeline rank (interleaved schedule), None = 1.
    expert / expert_tensor: ``--expert-model-parallel-size``, ``--expert-tensor-parallel-size``
    (MoE; None = megatron's default, the tensor size).
    """

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    context: int = 1
    expert: int = 1
    expert_tensor: int | None = None

    def __post_init__(self):
        for name in ("tensor", "pipeline", "context", "expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} parallel size must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline is not None and self.virtual_pipeline < 1:
            raise ValueError(f"virtual pipeline size must be >= 1, got {self.virtual_pipeline}")
        if self.virtual_pipeline not in (None, 1) and self.pipeline == 1:
            raise ValueError("virtual pipeline stages need --pipeline-model-parallel-size > 1")
        if self.expert_tensor is not None and self.expert_tensor < 1:
            raise ValueError(f"expert tensor parallel size must be >= 1, got {self.expert_tensor}")

    @property
    def model_parallel(self) -> int:
        """Ranks holding one copy of the (dense) model: TP x PP x CP."""
        return self.tensor * self.pipeline * self.context


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the layout (sizes and ranks of each parallel group)."""

    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    pp_size: int = 1
    pp_rank: int = 0
    vpp_size: int = 1
    cp_size: int = 1
    cp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs, plus megatron's per-TP-rank tracker."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """``--deterministic-mode``, process-wide: torch's deterministic algorithms (an op without a
    deterministic kernel raises rather than run), with the cuBLAS workspace setting they need
    on CUDA (read when cuBLAS starts: call before any CUDA work). NCCL's reduction order is the
    launcher's to fix (e.g. ``NCCL_ALGO=Ring``), as in Megatron-LM. Costs: slower kernels (no
    atomics-based ones) and a larger cuBLAS workspace."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def init_parallel(layout: ParallelLayout | None = None, seed: int = 1234, timeout_minutes: int = 10) -> ParallelInfo:
    """Join (or start) the process group and set megatron's parallel state for ``layout``."""
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    cuda = torch.cuda.is_available()
    if not cuda:
        from slime.backends.megatron_utils.cpu_compat import enable_cpu_mode

        enable_cpu_mode()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if "MASTER_PORT" in os.environ:
            init_method = "env://"
        elif world == 1:
            # A lone process: a private loopback rendezvous, leaving os.environ alone so that
            # child processes (torchrun, converters) do not inherit a port that is taken.
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            raise RuntimeError("WORLD_SIZE > 1 needs MASTER_ADDR/MASTER_PORT (use torchrun or the Ray launcher)")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    layout = layout or ParallelLayout()
    world = dist.get_world_size()
    if world % layout.model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {layout.tensor} x {layout.pipeline} x "
            f"{layout.context} (--tensor/--pipeline/--context-model-parallel-size)"
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
            # None, not 1, without interleaving: megatron treats any set size as virtual stages.
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline if (layout.virtual_pipeline or 1) > 1 else None,
            context_parallel_size=layout.context,
            expert_model_parallel_size=layout.expert,
            expert_tensor_parallel_size=layout.expert_tensor,
        )
    seed_everything(seed)
    info = ParallelInfo(
        rank=dist.get_rank(),
        world_size=world,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        vpp_size=(layout.virtual_pipeline or 1) if layout.pipeline > 1 else 1,
        cp_size=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
    )
    logger.info(
        "rank %d/%d: tp %d/%d, pp %d/%d, cp %d/%d, ep %d/%d, dp %d/%d on %s",
        info.rank, world, info.tp_rank, info.tp_size, info.pp_rank, info.pp_size, info.cp_rank, info.cp_size,
        info.ep_rank, info.ep_size, info.dp_rank, info.dp_size, info.device,
    )  # fmt: skip
    return info


def destroy_parallel() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
