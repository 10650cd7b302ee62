"""Memory-bounded, vocab-parallel token log-probs: log p(y_t | h_t) without a [T, V] logits tensor.

Shapes (one legend for this file):
    T   tokens (any leading dims of ``hidden``/``targets`` are flattened into T)
    C   tokens per chunk (``chunk_size``; the last chunk may be shorter)
    H   hidden size
    V   full (padded) vocabulary, split over the tensor-parallel group
    Vl  this rank's vocabulary shard: global ids [vocab_start, vocab_start + Vl)

What it replaces: ``output_layer(hidden)`` -> [T, Vl] logits -> vocab-parallel cross-entropy. That keeps
[T, Vl] fp32 logits alive for backward (plus copies made by the softmax): for 32k tokens and
GLM-4.5-Air's 151,552-token vocabulary that is 18 GiB per head at TP1, 9 GiB per rank at TP2. Here the logits exist only one chunk of
C tokens at a time, in forward and again (recomputed) in backward; what is saved for backward is
``hidden``, ``weight``, ``targets`` and one fp32 log-sum-exp per token. This is the idea of Cut
Cross-Entropy / Liger's fused linear cross-entropy / NeMo-RL's chunked fused linear log-probs, written
here for Megatron's vocab-parallel layout and the MTP heads (see REFERENCE.md section 8).

Simplifications: the matmul ``hidden @ weight.T`` runs in the inputs' dtype, exactly like Megatron's
``ColumnParallelLinear`` output layer (BF16 logits with fp32 accumulation on GPU), so the log-probs equal
the ones of the unchunked Megatron path; everything after the matmul is fp32. No context parallelism
and no sequence-parallel handling inside: the caller gathers ``hidden`` first (see ``token_logprobs``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["DEFAULT_CHUNK_SIZE", "token_logprobs"]

# Tokens per chunk: chosen by bench/bench_chunked_logprobs.py (>= 8x lower peak memory than full logits
# at 4096 tokens, vocab 32k); every caller in the package defaults to it.
DEFAULT_CHUNK_SIZE = 512


def _world_size(group) -> int:
    if group is None:
        return 1
    return dist.get_world_size(group)


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[C, H] x [Vl, H] -> fp32 [C, Vl]; a fresh tensor the caller may modify in place."""
    logits = hidden_c @ weight.t()  # [C, Vl], inputs' dtype (as Megatron's output layer)
    return logits if logits.dtype == torch.float32 else logits.float()


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p = z_y - logsumexp(z), z = hidden @ weight.T over the full (vocab-parallel) vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, vocab_start, chunk_size):
        num_tokens = hidden.shape[0]
        vocab_local = weight.shape[0]
        local_ids = targets - vocab_start  # [T]
        in_shard = (local_ids >= 0) & (local_ids < vocab_local)  # [T] bool: target lives on this rank
        safe_ids = torch.where(in_shard, local_ids, torch.zeros_like(local_ids))  # [T]

        # Per-token statistics of this rank's shard; reduced over the group once per call (not once per
        # chunk): 2 small all-reduces instead of 3 per chunk, and no synchronisation inside the loop.
        shard_max = hidden.new_empty(num_tokens, dtype=torch.float32)  # [T] max_v z over the shard
        shard_sumexp = hidden.new_empty(num_tokens, dtype=torch.float32)  # [T] sum exp(z - shard_max)
        target_logit = hidden.new_empty(num_tokens, dtype=torch.float32)  # [T] z_y, 0 if not in shard
        with torch.no_grad():
            for start in range(0, num_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows], weight)  # [C, Vl]
                z_y = logits.gather(1, safe_ids[rows].unsqueeze(1)).squeeze(1)  # [C]
                target_logit[rows] = torch.where(in_shard[rows], z_y, torch.zeros_like(z_y))
                row_max = logits.amax(dim=1)  # [C]
                shard_max[rows] = row_max
                shard_sumexp[rows] = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)  # in place: no copy
                del logits  # free before the next chunk's matmul allocates, or two chunks coexist

        global_max = shard_max.clone()  # [T]
        if tp_group is not None:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        # Rescale each shard's sum to the common max (<= 1 factors, so no overflow) and add them up,
        # together with the target logit (non-zero on exactly one rank) and the owner count (must be 1).
        sums = torch.stack(
            [shard_sumexp * torch.exp(shard_max - global_max), target_logit, in_shard.to(torch.float32)]
        )  # [3, T]
        if tp_group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
        sumexp, target_logit, owners = sums.unbind(0)  # [T] each

        # One host sync per call: every token must be owned by exactly one vocab shard. Counts are
        # identical on all ranks after the all-reduce, so all ranks raise together (no hang).
        if num_tokens and not bool((owners == 1).all()):
            bad = (owners != 1).nonzero()[0].item()
            raise ValueError(
                f"token_logprobs: target id {int(targets[bad])} at flat position {bad} is owned by "
                f"{int(owners[bad])} vocab shards (need exactly 1). Targets must be global vocab ids in "
                f"[0, V); replace padding/ignore ids (e.g. -100) by any valid id such as 0 and mask the "
                f"result; with tp_group, each rank's vocab_start must be its shard offset "
                f"(rank * V_local for Megatron's equal shards)."
            )

        logsumexp = global_max + torch.log(sumexp)  # [T]
        logprobs = target_logit - logsumexp  # [T]
        # The target is the arg-max iff its logit reaches the global max (ties count as hits). Exact
        # comparison is sound: both numbers come from the same fp32 logits tensor, and the SUM over
        # ranks adds only zeros to the owner's value.
        is_top1 = target_logit >= global_max  # [T]

        ctx.save_for_backward(hidden, weight, safe_ids, in_shard, logsumexp)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(is_top1)
        return logprobs, is_top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, _grad_top1):
        # d log p_t / d z_tv = 1[v == y_t] - softmax(z_t)_v, restricted to this shard's columns v.
        hidden, weight, safe_ids, in_shard, logsumexp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # [T, H]
        # fp32 accumulator for low-precision weights: chunks are added up in fp32, rounded once at the end.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None  # [Vl, H]
        if grad_logprobs is None or not (need_hidden or need_weight):
            return grad_hidden, grad_weight, None, None, None, None
        grad_logprobs = grad_logprobs.to(torch.float32)  # [T]

        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g = grad_logprobs[rows]  # [C]
            logits = _chunk_logits(hidden[rows], weight)  # [C, Vl] recomputed instead of stored
            # -g * softmax, built in place in the logits buffer
            grad_logits = logits.sub_(logsumexp[rows].unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
            grad_logits.scatter_add_(
                1,
                safe_ids[rows].unsqueeze(1),
                torch.where(in_shard[rows], g, torch.zeros_like(g)).unsqueeze(1),
            )
            grad_logits = grad_logits.to(hidden.dtype)  # [C, Vl]
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight  # [C, H] this shard's partial sum only
            if need_weight:
                if grad_weight.dtype == hidden.dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows])  # [Vl, H], no temporary
                else:
                    grad_weight += (
                        grad_logits.t() @ hidden[rows]
                    )  # fp32 += bf16: cast on the fly, no fp32 copy
            del logits, grad_logits  # free before the next chunk allocates (one chunk alive at a time)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | h_t) = z_{t,y_t} - log sum_{v<V} exp(z_{t,v}),   z_t = W h_t,   W = concat_r W_r.

    Exact token log-probs of an output layer (main head or an MTP head) computed in chunks of
    ``chunk_size`` tokens, vocab-parallel over ``tp_group``: each rank holds the rows W_r of W for the
    global ids ``[vocab_start, vocab_start + Vl)``; the per-token max is all-reduced with MAX and the
    rescaled sum of exponentials and the target logit (present on exactly one rank) with SUM. Only one
    [C, Vl] fp32 logits chunk exists at a time; backward recomputes it from ``hidden`` and ``weight``
    (saved: hidden, weight, targets and the fp32 log-sum-exp per token).

    GRADIENT SEMANTICS (same as Megatron's ColumnParallelLinear output layer):
      * ``hidden.grad`` receives only THIS RANK'S PARTIAL contribution, sum_{v in shard} dL/dz_v W_v.
        The caller must sum it over the TP group by passing the hidden states through megatron's
        ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) or, with
        sequence parallelism, ``gather_from_sequence_parallel_region`` (all-gather forward,
        reduce-scatter backward) before calling this function, exactly as ``output_layer`` does.
        Without that wrapper the trunk gradient is silently wrong under TP > 1.
      * ``weight.grad`` is the gradient of this rank's shard (no reduction needed).
      * Pass ``weight.detach()`` (e.g. the frozen-output-weight regime) and the weight gradient is not
        computed at all; likewise for ``hidden`` when it does not require grad.

    Args:
        hidden: [T, H] (or [..., H]) hidden states, identical on all ranks of ``tp_group``.
        weight: [Vl, H] this rank's vocab shard of the output weight ([V, H] without ``tp_group``);
            same dtype as ``hidden``. The matmul runs in that dtype (as Megatron's output layer),
            softmax and log-probs in fp32.
        targets: [T] (or [...]) integer global vocab ids in [0, V). Padding must be a valid id (mask the
            result); an id owned by no shard raises ValueError (checked once per call, one host sync).
        tp_group: tensor-parallel group over which the vocabulary is split; None = full vocab here.
        vocab_start: global id of this rank's first vocab row (Megatron: rank * Vl).
        chunk_size: tokens per chunk. Peak extra memory ~ chunk_size * Vl * 4 bytes (one fp32 logits
            chunk; 1.5x that for bf16/fp16 inputs) plus the gradients; for bf16/fp16 weights the weight
            gradient is summed in an fp32 [Vl, H] buffer (plus one [Vl, H] low-precision product per
            chunk). 512 gave 10.5x less peak memory than full logits at 1.21-1.35x the time (fp32, CPU,
            T=4096, H=512, V=32768; bench/bench_chunked_logprobs.py). The extra time is the recomputed
            logits matmul in backward (4 matmuls instead of 3). Smaller saves memory, larger amortises
            per-chunk overhead.
        return_top1: also return a bool tensor, True where the target attains the maximum logit over
            the full vocabulary (ties count as hits); no gradient. Used as the MTP draft-acceptance proxy.

    Returns:
        fp32 log-probs shaped like ``targets``; with ``return_top1`` a tuple (log-probs, is_top1).
    """
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("token_logprobs: hidden and weight must be torch.Tensors")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex():
        raise TypeError("token_logprobs: targets must be an integer tensor of vocab ids (e.g. torch.long)")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"token_logprobs: need hidden [..., H] and weight [V_local, H] with the same H; got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"token_logprobs: targets must have hidden's leading shape {tuple(hidden.shape[:-1])}; "
            f"got {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise TypeError(
            f"token_logprobs: hidden and weight must share one floating dtype; got {hidden.dtype} and "
            f"{weight.dtype} (cast hidden to the output layer's dtype)"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be a positive int; got {chunk_size!r}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"token_logprobs: vocab_start must be a non-negative int; got {vocab_start!r}")
    if tp_group is None and vocab_start != 0:
        raise ValueError(
            "token_logprobs: vocab_start != 0 needs tp_group (without a group the weight is the full vocab)"
        )
    if _world_size(tp_group) == 1:
        tp_group = None  # a group of one needs no collectives

    lead_shape = targets.shape
    logprobs, is_top1 = _ChunkedTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]),  # [T, H]
        weight,
        targets.reshape(-1).long(),  # [T]
        tp_group,
        vocab_start,
        chunk_size,
    )
    logprobs = logprobs.view(lead_shape)
    if return_top1:
        return logprobs, is_top1.view(lead_shape)
    return logprobs
