"""Run a test body in several gloo processes on 127.0.0.1 (megatron-layer tests only).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes that each call
``fn(rank, world_size, *args)`` with torch.distributed (gloo) initialised and the CPU patches of
``nemo_occ.lab.cpu_compat`` on; a failure on any rank re-raises here with its traceback.
"""

from __future__ import annotations

import os
import traceback
import warnings

import torch
import torch.multiprocessing as mp


def _entry(rank, world_size, port, fn, args, errors):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        import torch.distributed as dist

        from nemo_occ.lab.cpu_compat import cpu_compat

        with cpu_compat():
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            fn(rank, world_size, *args)
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        errors.put((rank, traceback.format_exc()))
        raise


def run_ranks(fn, world_size: int, *args, timeout_s: float = 150.0) -> None:
    from nemo_occ.lab.parallel import free_port

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise AssertionError(f"worker exit codes {codes} (timeout or crash)")
