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
``hidden`` (with sequence parallelism only this rank's sequence shard, gathered again in backward as
Megatron's output layer does), ``weight``, ``targets`` and one fp32 log-sum-exp per token. Where Megatron's
DDP keeps an fp32 ``weight.main_grad``, the weight gradient is added into it directly (see
``token_logprobs``), never through a second [Vl, H] buffer. The idea is prior art: Apple's Cut
Cross-Entropy (the ``cut-cross-entropy`` package), Liger Kernel's fused linear cross-entropy and NeMo-RL's
fused linear log-probs (``policy.megatron_cfg.use_fused_linear_logprobs``, main head only) all avoid the
full logits tensor the same way; it is written again here for Megatron's vocab-parallel layout and for
the MTP heads.

Two paths. ``token_logprobs`` returns log-probs with autograd: backward recomputes each chunk's logits,
four GEMMs per chunk. ``fused_token_loss`` takes a loss's gradient per log-prob up front (known in
forward for token-level losses) and does the backward's work inside the forward chunk loop, three
GEMMs per chunk, the physical limit; backward only scales the stored input gradient.

Simplifications: the matmul ``hidden @ weight.T`` runs in the inputs' dtype, exactly like Megatron's
``ColumnParallelLinear`` output layer (BF16 logits with fp32 accumulation on GPU), so the log-probs equal
the ones of the unchunked Megatron path; everything after the matmul is fp32. No context parallelism
inside (the caller re-assembles CP shards of the result); the all-reduce of the partial input gradient
without sequence parallelism is the caller's (see ``token_logprobs``). Megatron-FSDP's parameters (whose
``main_grad`` is fetched per use) are not handled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "defer_error",
    "discard_deferred_errors",
    "fused_token_loss",
    "raise_deferred_errors",
    "token_logprobs",
]

# Tokens per chunk; every caller in the package defaults to it. Peak memory against Megatron's
# cross-entropy on full logits is about T / C lower (docs/benchmarks.md: 6.5x at T = 4096, C = 512;
# 13x at C = 256): 512 rows keep a GPU GEMM efficient, and a training micro-batch has 8k-32k tokens (at
# GLM-4.5-Air's V/TP = 9.25 H in bf16, 10.5x at T = 8192 by the arithmetic there).
DEFAULT_CHUNK_SIZE = 512


def _world_size(group) -> int:
    if group is None:
        return 1
    return dist.get_world_size(group)


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[C, H] x [Vl, H] -> fp32 [C, Vl]; a fresh tensor the caller may modify in place."""
    logits = hidden_c @ weight.t()  # [C, Vl], inputs' dtype (as Megatron's output layer)
    return logits if logits.dtype == torch.float32 else logits.float()


def _gather_tokens(local: torch.Tensor, group) -> torch.Tensor:
    """[Tl, H] sequence shard -> [tp * Tl, H]: the shards of all ranks of ``group``, rank-major.

    The forward of Megatron's ``gather_from_sequence_parallel_region`` (all-gather along dim 0).
    """
    full = local.new_empty(_world_size(group) * local.shape[0], local.shape[1])
    dist.all_gather_into_tensor(full, local.contiguous(), group=group)
    return full


def _reduce_scatter_tokens(full: torch.Tensor, group) -> torch.Tensor:
    """[tp * Tl, H] partial sums -> [Tl, H]: this rank's slice of their sum over ``group``.

    The backward of Megatron's ``gather_from_sequence_parallel_region(tensor_parallel_output_grad=True)``.
    """
    local = full.new_empty(full.shape[0] // _world_size(group), full.shape[1])
    dist.reduce_scatter_tensor(local, full.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return local


def _main_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """Megatron DDP's gradient buffer view of ``weight`` ([Vl, H], fp32 or the param dtype), if any.

    ``DistributedDataParallel`` gives every trainable parameter a ``main_grad``; its backward hook adds
    ``.grad`` into it unless ``grad_added_to_main_grad`` is set (the output layer sets that flag after
    its fused weight-gradient kernel wrote into ``main_grad``) and ``zero_out_wgrad`` is not.
    """
    main_grad = getattr(weight, "main_grad", None)
    if isinstance(main_grad, torch.Tensor) and main_grad.shape == weight.shape:
        return main_grad
    return None


def _fused_wgrad_kernel():
    """The kernel module Megatron's output layer uses for fused fp32 weight-gradient accumulation.

    ``megatron/core/tensor_parallel/layers.py`` imports ``fused_weight_gradient_mlp_cuda`` (APEX / TE
    builds) at module level when it exists; None without it (CPU, or no APEX/TE).
    """
    try:
        from megatron.core.tensor_parallel import layers
    except ImportError:
        return None
    return getattr(layers, "fused_weight_gradient_mlp_cuda", None)


def _add_weight_grad(out: torch.Tensor, grad_logits: torch.Tensor, hidden_c: torch.Tensor, kernel) -> None:
    """out [Vl, H] += grad_logits[C, Vl]^T @ hidden_c [C, H], accumulated in ``out``'s dtype."""
    if out.dtype == hidden_c.dtype:
        out.addmm_(grad_logits.t(), hidden_c)  # no temporary
    elif out.dtype == torch.float32 and kernel is not None:
        # Low-precision operands, fp32 accumulation in one GEMM, no [Vl, H] temporary: the call
        # Megatron's output layer makes (wgrad_gemm_accum_fp32(input, grad_output, main_grad)).
        kernel.wgrad_gemm_accum_fp32(hidden_c.contiguous(), grad_logits.contiguous(), out)
    elif out.dtype == torch.float32:
        # No kernel (CPU, no APEX/TE): the same products in fp32, chunk-sized temporaries only.
        out.addmm_(grad_logits.t().float(), hidden_c.float())
    else:
        raise AssertionError(f"weight gradients are summed in fp32 or the operands' dtype, not {out.dtype}")


def _wgrad_target(weight: torch.Tensor, main_grad: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """(where the chunks' weight gradients are summed [Vl, H], whether it is a temporary to add at the end).

    Megatron's fp32 ``main_grad`` takes them directly.
    A low-precision ``main_grad`` (``grad_reduce_in_fp32: false``) would round once per chunk; Megatron's
    fused kernel rounds once per micro-batch (fp32 accumulation inside one GEMM), so the chunks are summed
    in one fp32 [Vl, H] temporary and added once, which rounds once as well. Without ``main_grad`` the
    temporary becomes the returned gradient.
    """
    if main_grad is not None and main_grad.dtype == torch.float32:
        return main_grad, False
    return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device), True


# Where the weight gradient went into ``main_grad``, backward returns None for the weight, not a dummy:
# a dummy gradient (Megatron's output layer returns one) costs a [Vl, H] buffer per backward anyway, in
# autograd (which sums it with the other contributions, or clones a shared one into ``.grad``) and in
# DDP's hook (which adds it into ``main_grad``). None leaves ``.grad`` to the weight's other users. The
# MTP heads' weight is always the main head's output weight (or the tied embedding), whose own backward
# fires DDP's per-parameter hook; a weight used by nothing else under ``overlap_grad_reduce`` would leave
# its bucket unreported, which megatron-core's ``finish_grad_sync`` refuses loudly (not a silent loss).


# Checks that would need the host to wait for the device (a target owned by no vocab shard, an
# unexpected gradient scale) are recorded as device tensors and raised by ``raise_deferred_errors``
# once per step; ``validate=True`` raises at once instead (one host sync per call).
_DEFERRED: dict[str, torch.Tensor] = {}  # message -> count of failures (on the device)


def defer_error(bad: torch.Tensor, message: str) -> None:
    """Record ``bad`` (a device count, 0 = fine) to be raised with ``message`` by :func:`raise_deferred_errors`.

    Counts of one message are summed on the device, so the record stays one scalar per message.
    """
    bad = bad.detach().reshape(()).to(torch.int64)
    _DEFERRED[message] = (
        _DEFERRED[message] + bad.to(_DEFERRED[message].device) if message in _DEFERRED else bad
    )


def discard_deferred_errors() -> None:
    """Forget the recorded checks (a step that failed for another reason)."""
    _DEFERRED.clear()


def raise_deferred_errors() -> None:
    """Raise the first error recorded since the last call (one host sync for all of them), then forget them.

    The training path calls this once per step (``MTPCapture``'s exit); ``validate=True`` never needs it.
    """
    pending = list(_DEFERRED.items())
    _DEFERRED.clear()
    if not pending:
        return
    counts = torch.stack([bad.to(pending[0][1].device) for _, bad in pending]).tolist()
    for count, (message, _) in zip(counts, pending, strict=True):
        if count:
            raise ValueError(f"{message} ({count} token(s) or call(s); recorded without a host sync)")


_OWNERSHIP_HELP = (
    "Targets must be global vocab ids in [0, V); replace padding/ignore ids (e.g. -100) by any valid id "
    "such as 0 and mask the result; with tp_group, each rank's vocab_start must be its shard offset "
    "(rank * V_local for Megatron's equal shards)."
)


def _check_owners(owners: torch.Tensor, targets: torch.Tensor, validate: bool) -> None:
    """Every token must be owned by exactly one vocab shard; counts are identical on all ranks, so all raise."""
    if not owners.numel():
        return
    if not validate:
        defer_error(
            (owners != 1).sum(),
            "token_logprobs: a target id is owned by no vocab shard or several. " + _OWNERSHIP_HELP,
        )
        return
    if not bool((owners == 1).all()):
        bad = (owners != 1).nonzero()[0].item()
        raise ValueError(
            f"token_logprobs: target id {int(targets[bad])} at flat position {bad} is owned by "
            f"{int(owners[bad])} vocab shards (need exactly 1). " + _OWNERSHIP_HELP
        )


def _shard_targets(targets: torch.Tensor, vocab_start: int, vocab_local: int):
    """(local ids clamped into the shard [T], whether the target lives on this rank [T] bool)."""
    local_ids = targets - vocab_start
    in_shard = (local_ids >= 0) & (local_ids < vocab_local)
    return torch.where(in_shard, local_ids, torch.zeros_like(local_ids)), in_shard


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p = z_y - logsumexp(z), z = hidden @ weight.T over the full (vocab-parallel) vocabulary."""

    @staticmethod
    def forward(
        ctx, hidden_in, weight, targets, tp_group, vocab_start, chunk_size, sequence_parallel, validate
    ):
        # With sequence parallelism hidden_in is this rank's [Tl, H] shard: gathered here without
        # autograd, and only the shard is saved (backward gathers again).
        # long on purpose: the chunk loop keeps one chunk's logits alive at a time and the tensors backward
        # needs are saved in the same place they are made
        hidden = _gather_tokens(hidden_in, tp_group) if sequence_parallel else hidden_in  # [T, H]
        num_tokens = hidden.shape[0]
        safe_ids, in_shard = _shard_targets(targets, vocab_start, weight.shape[0])  # [T] each

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
        del hidden  # the gathered copy (SP) is not kept

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
        _check_owners(owners, targets, validate)

        logsumexp = global_max + torch.log(sumexp)  # [T]
        logprobs = target_logit - logsumexp  # [T]
        # The target is the arg-max iff its logit reaches the global max (ties count as hits). Exact
        # comparison is sound: both numbers come from the same fp32 logits tensor, and the SUM over
        # ranks adds only zeros to the owner's value.
        is_top1 = target_logit >= global_max  # [T]

        ctx.save_for_backward(hidden_in, weight, safe_ids, in_shard, logsumexp)
        ctx.chunk_size = chunk_size
        ctx.tp_group = tp_group
        ctx.sequence_parallel = sequence_parallel
        # Read at forward time, as Megatron's output layer does (not saved as a tensor: the buffer is
        # written in place by other layers' backward, which save_for_backward's version check forbids).
        ctx.main_grad = _main_grad(weight) if weight.requires_grad else None
        ctx.mark_non_differentiable(is_top1)
        return logprobs, is_top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, _grad_top1):
        # d log p_t / d z_tv = 1[v == y_t] - softmax(z_t)_v, restricted to this shard's columns v.
        hidden_in, weight, safe_ids, in_shard, logsumexp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        no_grads = (None,) * 6  # targets, tp_group, vocab_start, chunk_size, sequence_parallel, validate
        if grad_logprobs is None:
            zeros = (torch.zeros_like(hidden_in) if need_hidden else None, None)
            return zeros + no_grads  # (a zero weight gradient is the same as none)
        hidden = _gather_tokens(hidden_in, ctx.tp_group) if ctx.sequence_parallel else hidden_in  # [T, H]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # [T, H]
        main_grad = ctx.main_grad if need_weight else None
        wgrad, temporary = _wgrad_target(weight, main_grad) if need_weight else (None, False)  # [Vl, H]
        mixed = wgrad is not None and wgrad.dtype == torch.float32 and hidden.dtype != torch.float32
        kernel = _fused_wgrad_kernel() if mixed else None
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
                _add_weight_grad(wgrad, grad_logits, hidden[rows], kernel)
            del logits, grad_logits  # free before the next chunk allocates (one chunk alive at a time)
        del hidden

        grad_weight = None  # in main_grad already (see above), or:
        if main_grad is not None and temporary:
            main_grad.add_(wgrad)  # a low-precision main_grad: one rounding per call
        elif main_grad is None and need_weight:
            grad_weight = wgrad.to(weight.dtype)
        if need_hidden and ctx.sequence_parallel:
            grad_hidden = _reduce_scatter_tokens(grad_hidden, ctx.tp_group)  # [Tl, H]
        return (grad_hidden, grad_weight) + no_grads


class _FusedTokenLoss(torch.autograd.Function):
    """A loss L = Σ_t f_t(log p_t) of token log-probs, its gradient taken chunk by chunk in forward.

    Per chunk of C tokens: z = h W^T (GEMM 1), log p = z_y - logsumexp(z) (max and sums all-reduced
    over the TP group per chunk), g = dL/d log p from ``token_grad``, dL/dz = g (onehot(y) - softmax(z))
    built in place in the logits buffer, then dL/dh = dL/dz W (GEMM 2) and dL/dW += dL/dz^T h (GEMM 3,
    into ``main_grad``). Outputs: the log-probs and arg-max hits (no gradient) and a scalar 0 that
    carries L's gradient: its backward only multiplies the stored dL/dh by the incoming scale.
    """

    @staticmethod
    def forward(
        ctx, hidden_in, weight, targets, token_grad, grad_scale, tp_group, vocab_start, chunk_size,
        sequence_parallel, validate,
    ):  # fmt: skip
        # long on purpose: the fused chunk loop (logits, loss gradient, input and weight gradients) keeps
        # one chunk alive at a time; split, each piece would take the same dozen arguments
        hidden = _gather_tokens(hidden_in, tp_group) if sequence_parallel else hidden_in  # [T, H]
        num_tokens = hidden.shape[0]
        safe_ids, in_shard = _shard_targets(targets, vocab_start, weight.shape[0])  # [T] each
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        main_grad = _main_grad(weight) if need_weight else None
        wgrad, temporary = _wgrad_target(weight, main_grad) if need_weight else (None, False)  # [Vl, H]
        mixed = wgrad is not None and wgrad.dtype == torch.float32 and hidden.dtype != torch.float32
        kernel = _fused_wgrad_kernel() if mixed else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [T, H]
        logprobs = hidden.new_empty(num_tokens, dtype=torch.float32)  # [T]
        is_top1 = hidden.new_empty(num_tokens, dtype=torch.bool)  # [T]
        owners = hidden.new_zeros(num_tokens, dtype=torch.float32)  # [T]
        with torch.no_grad():
            for start in range(0, num_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows], weight)  # [C, Vl]  GEMM 1
                z_y = logits.gather(1, safe_ids[rows].unsqueeze(1)).squeeze(1)  # [C]
                row_max = logits.amax(dim=1)  # [C]
                if tp_group is not None:
                    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
                probs = logits.sub_(row_max.unsqueeze(1)).exp_()  # [C, Vl] exp(z - max), in place
                sums = torch.stack(
                    [
                        probs.sum(dim=1),
                        torch.where(in_shard[rows], z_y, torch.zeros_like(z_y)),
                        in_shard[rows].float(),
                    ]
                )  # [3, C]
                if tp_group is not None:
                    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
                sumexp, target_logit, owners[rows] = sums.unbind(0)
                lp = target_logit - (row_max + torch.log(sumexp))  # [C]
                logprobs[rows] = lp
                is_top1[rows] = target_logit >= row_max
                g = token_grad(rows, lp).to(torch.float32) * grad_scale  # [C] dL/d log p, scaled
                # dL/dz = g (onehot - softmax) = -(g / sumexp) exp(z - max) + g onehot
                grad_logits = probs.mul_((-g / sumexp).unsqueeze(1))
                grad_logits.scatter_add_(
                    1,
                    safe_ids[rows].unsqueeze(1),
                    torch.where(in_shard[rows], g, torch.zeros_like(g)).unsqueeze(1),
                )
                grad_logits = grad_logits.to(hidden.dtype)  # [C, Vl]
                if need_hidden:
                    grad_hidden[rows] = grad_logits @ weight  # [C, H]  GEMM 2 (this shard's partial sum)
                if need_weight:
                    _add_weight_grad(wgrad, grad_logits, hidden[rows], kernel)  # GEMM 3
                del logits, probs, grad_logits  # one chunk alive at a time
        del hidden
        _check_owners(owners, targets, validate)
        if need_hidden and sequence_parallel:
            grad_hidden = _reduce_scatter_tokens(grad_hidden, tp_group)  # [Tl, H]
        if main_grad is not None:
            if temporary:
                main_grad.add_(wgrad)  # one rounding into a low-precision main_grad
            wgrad = None
        ctx.grad_hidden = grad_hidden
        ctx.wgrad = wgrad  # [Vl, H] fp32 without main_grad, else None
        ctx.in_main_grad = main_grad is not None
        ctx.grad_scale = grad_scale
        ctx.validate = validate
        ctx.weight_meta = weight.detach()  # dtype of the returned gradient (no copy)
        ctx.mark_non_differentiable(logprobs, is_top1)
        return logprobs, is_top1, hidden_in.new_zeros((), dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_logprobs, _grad_top1, grad_carrier):
        no_grads = (None,) * 8
        ratio = grad_carrier.to(torch.float32) / ctx.grad_scale  # 1 where the scale was right
        if ctx.in_main_grad:
            # The weight's share went into main_grad in forward at grad_scale: any other incoming scale
            # would leave it wrong, so it is an error (raised once per step, or at once with validate).
            off = (ratio - 1).abs() > 1e-6
            if ctx.validate:
                if bool(off):
                    raise RuntimeError(
                        f"fused MTP log-probs: the loss gradient arrived scaled by {float(grad_carrier)} but "
                        f"{ctx.grad_scale} was assumed in forward, where the weight gradient went into main_grad"
                    )
            else:
                defer_error(
                    off,
                    "fused MTP log-probs: the loss gradient arrived with another scale than forward assumed",
                )
        # In place: the stored gradients are handed over, not copied (no second [T, H] / [Vl, H] buffer).
        grad_hidden, wgrad = ctx.grad_hidden, ctx.wgrad
        ctx.grad_hidden = ctx.wgrad = None
        if grad_hidden is not None:
            grad_hidden.mul_(ratio.to(grad_hidden.dtype))
        grad_weight = None  # in main_grad already (see above), or:
        if wgrad is not None:
            grad_weight = wgrad.mul_(ratio).to(ctx.weight_meta.dtype)
        return (grad_hidden, grad_weight) + no_grads


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
    sequence_parallel: bool = False,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | h_t) = z_{t,y_t} - log sum_{v<V} exp(z_{t,v}),   z_t = W h_t,   W = concat_r W_r.

    Exact token log-probs of an output layer (main head or an MTP head) computed in chunks of
    ``chunk_size`` tokens, vocab-parallel over ``tp_group``: each rank holds the rows W_r of W for the
    global ids ``[vocab_start, vocab_start + Vl)``; the per-token max is all-reduced with MAX and the
    rescaled sum of exponentials and the target logit (present on exactly one rank) with SUM. Only one
    [C, Vl] fp32 logits chunk exists at a time; backward recomputes it from ``hidden`` and ``weight``
    (saved: hidden as passed, i.e. this rank's sequence shard under ``sequence_parallel``, weight,
    targets and the fp32 log-sum-exp per token).

    GRADIENT SEMANTICS (same as Megatron's ColumnParallelLinear output layer):
      * ``sequence_parallel=False``: ``hidden.grad`` receives only THIS RANK'S PARTIAL contribution,
        sum_{v in shard} dL/dz_v W_v. The caller must sum it over the TP group by passing the hidden
        states through megatron's ``copy_to_tensor_model_parallel_region`` (identity forward,
        all-reduce backward) first, exactly as ``output_layer`` does. Without that wrapper the trunk
        gradient is silently wrong under TP > 1.
      * ``sequence_parallel=True``: ``hidden`` is this rank's shard of the tokens along dim 0 (Megatron's
        sequence-parallel layout); it is all-gathered over ``tp_group`` in forward and again in backward,
        and the partial input gradients are reduce-scattered, as ``output_layer`` with sequence
        parallelism does: ``hidden.grad`` is complete, and only the shard is kept for backward.
      * Weight: the gradient of this rank's shard (no reduction needed). Where Megatron's DDP gave the
        weight a ``main_grad`` buffer, it is added into ``weight.main_grad`` (fp32 with
        ``grad_reduce_in_fp32``, bf16 operands through Megatron's fused fp32-accumulating wgrad kernel
        where it is installed; a bf16 ``main_grad`` receives one rounded sum per call) and ``.grad``
        receives nothing (None: see the note above ``defer_error``). With
        ``gradient_accumulation_fusion`` the output layer marks the weight ``grad_added_to_main_grad``
        and DDP then ignores ``.grad``: a gradient returned through ``.grad`` would be dropped for an
        untied output weight.
      * Pass ``weight.detach()`` (e.g. the frozen-output-weight regime) and the weight gradient is not
        computed at all; likewise for ``hidden`` when it does not require grad.

    Args:
        hidden: [T, H] (or [..., H]) hidden states, identical on all ranks of ``tp_group``; with
            ``sequence_parallel`` this rank's [T / tp, ...] slice along dim 0.
        weight: [Vl, H] this rank's vocab shard of the output weight ([V, H] without ``tp_group``);
            same dtype as ``hidden``. The matmul runs in that dtype (as Megatron's output layer),
            softmax and log-probs in fp32.
        targets: [T] (or [...]) integer global vocab ids in [0, V), shaped like ``hidden`` without H (with
            ``sequence_parallel``: the gathered shape, dim 0 tp times longer). Padding must be a valid id
            (mask the result); an id owned by no shard raises ValueError (checked once per call, one
            host sync).
        tp_group: tensor-parallel group over which the vocabulary is split; None = full vocab here.
        vocab_start: global id of this rank's first vocab row (Megatron: rank * Vl).
        chunk_size: tokens per chunk. Peak extra memory ~ chunk_size * Vl * 4 bytes (one fp32 logits
            chunk; 1.5x that for bf16/fp16 inputs) plus the gradients; for bf16/fp16 weights without a
            ``main_grad`` (or with a bf16 one) the weight gradient is summed in an fp32 [Vl, H] buffer.
            At T=4096, H=512, V=32768 (fp32, CPU) 512 kept 6.3x less peak memory than Megatron's
            cross-entropy at 1.31x its CPU time, 256 12.9x at 1.37x (docs/benchmarks.md). The extra time
            is the recomputed logits matmul in backward (4 GEMMs instead of 3; ``fused_token_loss`` does
            3). Smaller saves memory, larger amortises per-chunk overhead.
        return_top1: also return a bool tensor, True where the target attains the maximum logit over
            the full vocabulary (ties count as hits); no gradient. Used as the MTP draft-acceptance proxy.
        sequence_parallel: ``hidden`` is this rank's sequence shard (see GRADIENT SEMANTICS).
        validate: raise at once for a target owned by no vocab shard (one host sync per call); False
            records the check on the device and :func:`raise_deferred_errors` raises it later (the
            training path: once per step).

    Returns:
        fp32 log-probs shaped like ``targets``; with ``return_top1`` a tuple (log-probs, is_top1).
    """
    # long mostly in its docstring (the formula and what is saved for backward); the body checks the
    # arguments and calls the autograd function
    _check_inputs(hidden, weight, targets, sequence_parallel, tp_group)
    tp_size = _world_size(tp_group)
    _check_options(chunk_size, vocab_start, tp_group)
    if tp_size == 1:
        tp_group = None  # a group of one needs no collectives
        sequence_parallel = False

    lead_shape = targets.shape
    # Flattening a dim-0 shard gives a contiguous run of the flat tokens: the all-gather of the flat
    # shards is the flat gathered tensor.
    logprobs, is_top1 = _ChunkedTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]),  # [T, H] or this rank's [T / tp, H]
        weight,
        targets.reshape(-1).long(),  # [T]
        tp_group,
        vocab_start,
        chunk_size,
        sequence_parallel,
        validate,
    )
    logprobs = logprobs.view(lead_shape)
    if return_top1:
        return logprobs, is_top1.view(lead_shape)
    return logprobs


def _check_options(chunk_size, vocab_start, tp_group) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be a positive int; got {chunk_size!r}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"token_logprobs: vocab_start must be a non-negative int; got {vocab_start!r}")
    if tp_group is None and vocab_start != 0:
        raise ValueError(
            "token_logprobs: vocab_start != 0 needs tp_group (without a group the weight is the full vocab)"
        )


def _check_inputs(hidden, weight, targets, sequence_parallel, tp_group) -> tuple[int, ...]:
    """The leading (token) shape targets must have; raises TypeError/ValueError on bad inputs."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("token_logprobs: hidden and weight must be torch.Tensors")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex():
        raise TypeError("token_logprobs: targets must be an integer tensor of vocab ids (e.g. torch.long)")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"token_logprobs: need hidden [..., H] and weight [V_local, H] with the same H; got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"token_logprobs: sequence_parallel must be a bool; got {sequence_parallel!r}")
    lead_shape = tuple(hidden.shape[:-1])
    if sequence_parallel:
        if hidden.dim() < 2:
            raise ValueError("token_logprobs: with sequence_parallel, hidden must be [S/tp, ..., H]")
        lead_shape = (hidden.shape[0] * _world_size(tp_group), *lead_shape[1:])
    if tuple(targets.shape) != lead_shape:
        raise ValueError(
            f"token_logprobs: targets must have shape {lead_shape} (hidden's leading shape"
            f"{', dim 0 gathered over the TP group' if sequence_parallel else ''}); got {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise TypeError(
            f"token_logprobs: hidden and weight must share one floating dtype; got {hidden.dtype} and "
            f"{weight.dtype} (cast hidden to the output layer's dtype)"
        )
    return lead_shape


def fused_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_grad,
    *,
    grad_scale: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sequence_parallel: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p [lead], arg-max hits [lead], carrier []) for a loss L = Σ_t f_t(log p_t) known token by token.

    The same log-probs as :func:`token_logprobs` (same arguments, same vocab-parallel layout and
    GRADIENT SEMANTICS for ``hidden``), but L's gradient is taken in the forward chunk loop, three GEMMs
    per chunk instead of four (see ``_FusedTokenLoss``): ``token_grad(rows, logprobs)`` returns
    dL/d log p [C] (fp32) for the flat token positions ``rows`` (a slice of ``targets.reshape(-1)``)
    given their log-probs [C], which it may not keep. The log-probs and hits come back detached; the
    carrier is a scalar 0 whose gradient is L's: add it to the loss whose value uses the detached
    log-probs. The weight's share is added into ``weight.main_grad`` in forward, already multiplied by
    ``grad_scale``, the factor the caller knows backward will bring to the carrier (Megatron: the loss
    scale and its own loss normalisation); the input gradient is scaled by what backward actually
    brings. If that differs from ``grad_scale`` by more than 1e-6 (relative), ``main_grad`` holds a wrong
    share: an error at once with ``validate``, else from :func:`raise_deferred_errors`. Without
    ``main_grad`` the weight gradient is summed in one fp32 [Vl, H] buffer and scaled in backward.
    Run it only where backward follows (a forward alone still writes ``main_grad``).
    """
    lead_shape = _check_inputs(hidden, weight, targets, sequence_parallel, tp_group)
    _check_options(chunk_size, vocab_start, tp_group)
    if not callable(token_grad):
        raise TypeError("fused_token_loss: token_grad must be a callable (rows, logprobs) -> dL/dlogprobs")
    if _world_size(tp_group) == 1:
        tp_group = None
        sequence_parallel = False
    logprobs, is_top1, carrier = _FusedTokenLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1).long(),
        token_grad,
        float(grad_scale),
        tp_group,
        vocab_start,
        chunk_size,
        sequence_parallel,
        validate,
    )
    return logprobs.view(lead_shape), is_top1.view(lead_shape), carrier
