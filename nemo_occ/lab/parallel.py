"""Set up and tear down torch.distributed + megatron-core model parallelism for CPU runs (gloo).

Used by the CPU tests (several processes on 127.0.0.1) and the CPU demo (one process). On a GPU
cluster NeMo-RL / Megatron-Bridge own this set-up; nothing here is used there.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_model_parallel(
    *,
    rank: int = 0,
    world_size: int = 1,
    port: int | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    seed: int = 1234,
    timeout_s: float = 120.0,
    backend: str = "gloo",
) -> None:
    """Initialise a process group (if none yet; gloo by default) and megatron's model-parallel groups.

    ``world_size`` must be a multiple of tensor x pipeline x context parallel sizes; the rest is
    data parallel. Calling it again after ``destroy_model_parallel()`` re-creates only megatron's
    groups, which lets a test build a TP=1 reference and a TP=2 model in the same processes.
    ``backend="nccl"`` is for the single-GPU benches and ``gpu`` tests, whose tensors live on CUDA.
    """
    from megatron.core import parallel_state

    model_parallel = tensor_parallel * pipeline_parallel * context_parallel
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world_size={world_size} is not a multiple of tensor_parallel*pipeline_parallel*"
            f"context_parallel={model_parallel}; change the parallel sizes or the process count"
        )
    if not dist.is_initialized():
        if port is None and world_size > 1:
            raise ValueError("several processes need a shared port: pass port=free_port() from the parent")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port if port is not None else free_port())
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        create_gloo_process_groups=False,
    )
    torch.manual_seed(seed)


def destroy_model_parallel(*, destroy_process_group: bool = True) -> None:
    """Tear down megatron's groups and (by default) the torch.distributed process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def model_parallel(**kwargs) -> Iterator[None]:
    """``with model_parallel(tensor_parallel=1):`` init on entry, destroy on exit (see init_model_parallel)."""
    init_model_parallel(**kwargs)
    try:
        yield
    finally:
        destroy_model_parallel()
