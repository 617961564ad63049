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

__all__ = ["ParallelInfo", "destroy_parallel", "init_parallel", "seed_everything"]


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs, plus megatron's per-TP-rank tracker."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_parallel(tensor_model_parallel_size: int = 1, seed: int = 1234, timeout_minutes: int = 10) -> ParallelInfo:
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
    world = dist.get_world_size()
    if world % tensor_model_parallel_size:
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {tensor_model_parallel_size}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    seed_everything(seed)
    info = ParallelInfo(
        rank=dist.get_rank(),
        world_size=world,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
    )
    logger.info("rank %d/%d: tp %d/%d, dp %d/%d on %s", info.rank, world, info.tp_rank, info.tp_size, info.dp_rank, info.dp_size, info.device)
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
