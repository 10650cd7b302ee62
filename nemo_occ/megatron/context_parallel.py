"""Megatron's load-balanced context-parallel (CP) sequence layout, and re-assembly of the full sequence.

With CP of size C the sequence dimension is cut into 2C equal chunks and rank r keeps chunks r and
2C-1-r (so every rank gets the same amount of causal-attention work); megatron's
``get_batch_on_this_cp_rank`` and NeMo-RL's ``_get_tokens_on_this_cp_rank`` do this for [B, S] rows.
Packed (THD) rows apply the same cut to every document separately: each padded segment of
``cu_seqlens_padded`` (lengths divisible by 2C) is cut into 2C chunks, and rank r keeps chunks r and
2C-1-r of every document, documents in order (Transformer Engine's ``thd_get_partitioned_indices``).

``gather_context_parallel`` all-gathers per-token values and puts them back in sequence order, so
every CP rank ends with the full-sequence tensor (what NeMo-RL hands to its loss). Its backward
follows NeMo-RL's convention (its ``AllGatherCPTensor``): the incoming gradient is summed over the CP
group and this rank keeps its slice. Every CP rank evaluates the same full-sequence loss, so the
loss built on the gathered tensor must be divided by the CP size, as NeMo-RL's loss post-processor
does (``cp_normalize``) for the main and the MTP term alike; megatron's gradient all-reduce over the
data-parallel x CP group then adds the per-rank parameter gradients to the full-sequence gradient.

Letters: B rows, L full (padded) sequence length, C context-parallel size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_occ.megatron.chunked_logprobs import defer_error


def cp_local_positions(
    length: int, cp_size: int, cp_rank: int, *, cu_seqlens_padded: torch.Tensor | None = None
) -> torch.Tensor:
    """Global positions (long [L / C]) that CP rank ``cp_rank`` holds, in its local order.

    Computed on ``cu_seqlens_padded``'s device without reading it on the host (no sync per micro-batch):
    each position's document, its chunk within the document, kept iff the chunk is ``cp_rank`` or
    ``2C-1-cp_rank``, ordered by (document, first or second chunk, position). A layout that does not fit
    (a segment length not divisible by 2C, bounds that do not end at ``length``) is recorded and raised
    by ``chunked_logprobs.raise_deferred_errors``, once per step.
    """
    if cp_size == 1:
        return torch.arange(length)
    if cu_seqlens_padded is None:
        bounds = torch.tensor([0, length])
    else:
        bounds = cu_seqlens_padded.to(torch.long)  # [N+1]
    device = bounds.device
    sizes = bounds[1:] - bounds[:-1]  # [N]
    defer_error(
        (sizes % (2 * cp_size) != 0).sum() + (bounds[-1] != length).long(),
        f"with context parallel size {cp_size} every (padded) sequence length must be divisible by "
        f"{2 * cp_size} and cu_seqlens_padded must end at the packed row length {length} (pad it)",
    )
    pos = torch.arange(length, device=device)  # [L]
    doc = (torch.searchsorted(bounds, pos, right=True) - 1).clamp(0, sizes.numel() - 1)  # [L]
    chunk = (sizes[doc] // (2 * cp_size)).clamp(min=1)  # [L] chunk length of each position's document
    index = (pos - bounds[doc]) // chunk  # [L] which of the document's 2C chunks
    mirror = 2 * cp_size - 1 - cp_rank
    keep = (index == cp_rank) | (index == mirror)
    key = (doc * 2 + (index == mirror).long()) * length + pos  # document, then chunk r before 2C-1-r
    key = torch.where(keep, key, torch.full_like(key, 2 * length * (sizes.numel() + 1)))
    return pos[torch.argsort(key)[: length // cp_size]]


class _GatherContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group, cu_seqlens_padded):
        cp_size = dist.get_world_size(group)
        cp_rank = dist.get_rank(group)
        length = local.shape[-1] * cp_size
        parts = [torch.empty_like(local) for _ in range(cp_size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        positions = torch.cat(
            [
                cp_local_positions(length, cp_size, r, cu_seqlens_padded=cu_seqlens_padded)
                for r in range(cp_size)
            ]
        ).to(local.device)  # [L]: position of each gathered element
        full = local.new_empty(*local.shape[:-1], length)
        full.index_copy_(-1, positions, torch.cat(parts, dim=-1))
        ctx.local_positions = positions[cp_rank * local.shape[-1] : (cp_rank + 1) * local.shape[-1]]
        ctx.group = group
        return full

    @staticmethod
    def backward(ctx, grad_full):
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, op=dist.ReduceOp.SUM, group=ctx.group)  # NeMo-RL's convention
        return grad_full.index_select(-1, ctx.local_positions), None, None


def gather_context_parallel(
    local: torch.Tensor, group, *, cu_seqlens_padded: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., L / C] CP shards -> [..., L] in sequence order on every CP rank (differentiable).

    No-op without a group or with a group of one. See the module docstring for the gradient rule.
    """
    if group is None or dist.get_world_size(group) == 1:
        return local
    return _GatherContextParallel.apply(local, group, cu_seqlens_padded)
