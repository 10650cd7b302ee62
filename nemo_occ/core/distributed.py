"""Optional cross-rank reductions for the core math.

The core never needs ``torch.distributed``; callers that shard a batch over data-parallel ranks pass
the process group that spans those ranks, and the sums below make every rank see the full-batch value.
On NeMo-RL that is the data-parallel group only, the group its Megatron worker sums the loss's valid
token counts over: every context-parallel rank of a replica holds the CP-gathered log-probs of whole
sequences, so adding the CP ranks would count each token CP times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over ``group``; a no-op in a single process.

    With several processes the group must be given explicitly: the right one is the data-parallel
    group (module docstring), and the default world group would also sum over tensor-, context- and
    pipeline-parallel ranks that hold copies or other shards. Pass ``dist.group.WORLD`` for pure data
    parallelism.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return tensor
    if group is None:
        if dist.get_world_size() == 1:
            return tensor
        raise ValueError(
            "torch.distributed runs with several processes: pass the data-parallel process group to reduce "
            "over (dist.group.WORLD for pure data parallelism)"
        )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def collective_device(group=None) -> torch.device:
    """Where a tensor must live to be reduced over ``group``: gloo reduces CPU tensors, nccl CUDA ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
