"""Optional cross-rank reductions for the core math.

The core never needs ``torch.distributed``; callers that shard a batch over data-parallel or
context-parallel ranks pass the process group that spans those ranks, and the sums below make every
rank see the full-batch value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return group is not None or (dist.is_available() and dist.is_initialized())


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over ``group`` (the default group when ``group`` is None and a default exists).

    No-op when torch.distributed is not initialised, so single-process code can call it freely.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
