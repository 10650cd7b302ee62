"""Token log-probs of one output head (main or MTP depth d) from its hidden states, any Megatron layout.

For depth d (0 = main head) at Megatron position i the head scores tok[i+1+d]; the result is moved
to the main head's index j = i + d (``nemo_occ.core.alignment``), so index j of every depth scores
tok[j+1] given tok[<=j], NeMo-RL's ``next_token_logprobs`` convention, and has length L-1.

The pipeline for one head, following megatron's own output layer step by step:

1. hidden [s, b, H] (sequence-parallel shard of this CP rank's tokens): with SP it goes to step 3 as
   the shard, which all-gathers it over TP in forward and again in backward and reduce-scatters the
   input gradient (what the output layer does with SP: only the shard is kept for backward, not the
   TP-times larger gathered tensor); without SP through ``copy_to_tensor_model_parallel_region``
   (all-reduce in backward): the vocab-parallel log-prob only returns this rank's partial input
   gradient, exactly like the output layer.
2. targets: computed on the full sequence (CP shards of ``input_ids`` are all-gathered first) with
   ``alignment.mtp_targets`` inside each packed document, then cut to this CP rank's positions.
3. ``chunked_logprobs.token_logprobs`` against this rank's vocab shard of the output weight
   (never a [T, V] logits tensor), in Megatron's token order [s, b], with the logits scaled like
   megatron's (:func:`logit_scale`); its weight gradient goes into Megatron DDP's ``main_grad``
   where there is one (see there).
4. CP re-assembly (``context_parallel.gather_context_parallel``) and alignment to main positions.

Packed rows (THD): ``cu_seqlens_q`` gives the documents, ``cu_seqlens_q_padded`` (if set) where
each padded document starts; padding tokens between documents are their own segments, so no target
and no shift computed here ever crosses a document or lands on padding. That covers the main head in
any layout. The MTP depths' hidden states come from megatron's MTP layers, whose input roll reads
``cu_seqlens_q`` as row positions: with ``cu_seqlens_q != cu_seqlens_q_padded`` they are wrong for
every document after the first, so ``MTPCapture`` refuses that layout (pass the padded bounds as
``cu_seqlens_q`` too, as NeMo-RL does for GPT models).

``logprobs_from_hidden`` runs this for the main head and every MTP depth of one forward and returns
them as one ``ModelLogProbs``: the only loop over heads, used by ``forward_with_mtp_logprobs`` and by
``MTPCapture`` alike.

Letters: B rows, L full (padded) sequence length, s local sequence length, H hidden, V vocabulary,
K MTP depths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from nemo_occ.core.alignment import align_mtp_to_main, mtp_targets, segment_ids, shift_right
from nemo_occ.megatron.chunked_logprobs import DEFAULT_CHUNK_SIZE, fused_token_loss, token_logprobs
from nemo_occ.megatron.context_parallel import cp_local_positions, gather_context_parallel


@dataclasses.dataclass
class SequenceLayout:
    """Where the model's input tokens sit: full ids, packed segments and this rank's CP positions."""

    full_ids: torch.Tensor  # [B, L] token ids of the whole sequence (all CP shards)
    boundaries: torch.Tensor | None  # [M+1] segment bounds (documents and padding gaps), packed only
    is_real: torch.Tensor  # [B, L] bool: a real token (not packing padding)
    local_positions: torch.Tensor  # [L / C] global positions held by this CP rank, local order
    cu_seqlens_padded: torch.Tensor | None  # [N+1] padded document starts (CP layout), packed only
    cp_group: object | None


def _groups(gpt):
    from megatron.core import parallel_state

    pgs = getattr(gpt, "pg_collection", None)
    tp = getattr(pgs, "tp", None) or parallel_state.get_tensor_model_parallel_group()
    cp = getattr(pgs, "cp", None) or parallel_state.get_context_parallel_group()
    return tp, cp


def sequence_layout(gpt: torch.nn.Module, input_ids: torch.Tensor, packed_seq_params=None) -> SequenceLayout:
    """Describe the model input ``input_ids`` (as passed to the model: this CP rank's shard)."""
    import torch.distributed as dist

    _, cp_group = _groups(gpt)
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    cp_rank = dist.get_rank(cp_group) if cp_size > 1 else 0
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S] (packed: [1, T]); got shape {tuple(input_ids.shape)}")
    packed = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "thd") == "thd"
    cu_real = cu_padded = boundaries = None
    length = input_ids.shape[-1] * cp_size
    device = input_ids.device
    if packed:
        if input_ids.shape[0] != 1:
            raise ValueError(f"packed (THD) input_ids must be one row [1, T]; got {tuple(input_ids.shape)}")
        cu_real = packed_seq_params.cu_seqlens_q.to(device=device, dtype=torch.long)
        cu_padded = packed_seq_params.cu_seqlens_q_padded
        cu_padded = cu_real if cu_padded is None else cu_padded.to(device=device, dtype=torch.long)
        lengths = cu_real[1:] - cu_real[:-1]  # [N]
        if bool((lengths > cu_padded[1:] - cu_padded[:-1]).any()):
            raise ValueError(
                "packed_seq_params: a document is longer than its padded slot (cu_seqlens_q_padded)"
            )
        # Interleave [doc 0, pad 0, doc 1, pad 1, ...]; empty pads are zero-length segments.
        starts = cu_padded[:-1]
        boundaries = torch.cat([torch.stack([starts, starts + lengths], dim=1).flatten(), cu_padded[-1:]])
        if int(boundaries[-1]) < length:  # padding after the last document: its own segment
            boundaries = torch.cat([boundaries, boundaries.new_tensor([length])])
        segment = segment_ids(boundaries, length, device=device)  # [L]
        is_real = ((segment % 2) == 0) & (segment < 2 * lengths.numel())
        is_real = is_real.unsqueeze(0)  # [1, L]
        layout_bounds = cu_padded if int(cu_padded[-1]) == length else None
        if cp_size > 1 and layout_bounds is None:
            raise ValueError("with context parallelism cu_seqlens_q_padded must end at the packed row length")
    else:
        is_real = torch.ones(input_ids.shape[0], length, dtype=torch.bool, device=device)
        layout_bounds = None
    with torch.no_grad():
        full_ids = gather_context_parallel(
            input_ids, cp_group if cp_size > 1 else None, cu_seqlens_padded=layout_bounds
        )
    local_positions = cp_local_positions(length, cp_size, cp_rank, cu_seqlens_padded=layout_bounds).to(device)
    return SequenceLayout(
        full_ids=full_ids,
        boundaries=boundaries,
        is_real=is_real,
        local_positions=local_positions,
        cu_seqlens_padded=layout_bounds,
        cp_group=cp_group if cp_size > 1 else None,
    )


def output_weight(gpt: torch.nn.Module) -> torch.Tensor:
    """This TP rank's vocab shard [V / tp, H] of the weight the output layer multiplies with."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def await_output_weight(gpt: torch.nn.Module) -> None:
    """Wait for the output weight's all-gather, as the output layer's forward would have.

    Under Megatron's distributed optimizer with ``overlap_param_gather``, DDP all-gathers the updated
    parameters bucket by bucket and each module's forward pre-hook waits for its own bucket (and
    dispatches the next). The log-probs here read the output weight outside ``output_layer.forward``:
    where that forward did not run in this step (``forward_with_mtp_logprobs`` stops the model before
    it), the weight would be read before its all-gather finished and the bucket's handle left pending
    (megatron-core asserts on it at the next step). Runs DDP's own pre-hooks of the module holding the
    weight; they do nothing where the gather is done already (NeMo-RL's forward ran the output layer).
    """
    module = gpt.output_layer
    if gpt.share_embeddings_and_output_weights and getattr(gpt, "pre_process", False):
        module = gpt.embedding.word_embeddings
    for hook in list(module._forward_pre_hooks.values()):
        if "_make_forward_pre_hook" in getattr(hook, "__qualname__", ""):  # DistributedDataParallel's
            hook(module, ())


def keep_lookup_grad_of_tied_copy(gpt: torch.nn.Module) -> None:
    """Make DDP keep the ``.grad`` of the last stage's tied word-embedding copy under fused wgrad accumulation.

    With pipeline parallelism, tied output weights and MTP, the last stage holds a copy of the word
    embedding that both its MTP layers (embedding lookup: ``.grad``) and the output layer read. With
    ``gradient_accumulation_fusion`` the output layer adds its weight gradient into ``main_grad`` and
    marks the weight ``grad_added_to_main_grad``; DDP's hook then skips ``.grad`` unless ``zero_out_wgrad``
    is set, so the MTP layers' lookup gradient would be dropped. megatron-core (0.16 to 0.20) sets the
    flag for tied weights at PP = 1 only; this sets it on the last stage's copy as PP = 1 does (the output
    layer's dummy gradient is then zeros). Without fusion the flag changes nothing.
    """
    if gpt.share_embeddings_and_output_weights and getattr(gpt, "mtp_process", False) and not gpt.pre_process:
        gpt.shared_embedding_or_output_weight().zero_out_wgrad = True


def logit_scale(gpt: torch.nn.Module) -> float:
    """The factor megatron multiplies the output layer's logits by, main head and MTP depths alike.

    MuP (``use_mup``, newer cores): ``GPTModel._scale_logits`` multiplies by ``mup_output_mult``
    (1 / width multiplier unless set), and ``process_mtp_loss`` applies the same function to the MTP
    logits. 1 otherwise. Applied here to the hidden states: (m h) W^T = m (h W^T).
    """
    config = gpt.config
    if not getattr(config, "use_mup", False):
        return 1.0
    return float(config.mup_output_mult)


@dataclasses.dataclass(frozen=True)
class FusedMTPTerm:
    """The MTP loss term's gradient per token, known before the depths' chunk loops (the fused path).

    ``prepare(depth, valid)`` is called once per MTP depth with the depth's aligned validity [B, L-1]
    (what ``ModelLogProbs.mtp_masks`` will hold) and returns ``grad(b, j, logprobs)``: dL/d log p (fp32)
    of the aligned positions (b, j) given their log-probs (1-D tensors of one length), 0 where the loss
    does not read the position. ``grad_scale``: the factor backward will bring to the loss (Megatron's
    loss scale and normalisation), see ``chunked_logprobs.fused_token_loss``. The CP ranks' sum of the
    gathered log-probs' gradient is applied here (each CP rank's loss is the full-sequence loss / C).
    """

    prepare: Callable[[int, torch.Tensor], Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
    grad_scale: float = 1.0


def _aligned_valid(layout: SequenceLayout, has_target: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, L] bool: aligned position j scores a real target of depth ``depth`` (before the last column is cut)."""
    if depth == 0:
        return has_target & layout.is_real
    _, valid = align_mtp_to_main(
        torch.zeros(has_target.shape, device=has_target.device), depth, cu_seqlens=layout.boundaries
    )
    return valid & layout.is_real


def head_logprobs(
    gpt: torch.nn.Module,
    hidden: torch.Tensor,
    layout: SequenceLayout,
    depth: int,
    *,
    detach_weight: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs [B, L-1] fp32, valid [B, L-1] bool, top-1 hits [B, L-1] bool or None) of one head.

    ``hidden`` is the head's output [s, b, H] as megatron produced it (before the output layer).
    ``detach_weight`` stops the gradient into the (shared) output weight.
    """
    return _head(
        gpt,
        hidden,
        layout,
        depth,
        detach_weight=detach_weight,
        chunk_size=chunk_size,
        return_top1=return_top1,
    )[:3]


def _head(
    gpt: torch.nn.Module,
    hidden: torch.Tensor,
    layout: SequenceLayout,
    depth: int,
    *,
    detach_weight: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
    fused: FusedMTPTerm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`head_logprobs` and a carrier: with ``fused`` the loss gradient is taken in the chunk loop
    (``chunked_logprobs.fused_token_loss``), the log-probs come back detached and the carrier (a scalar 0)
    brings the gradient; else the carrier is None."""
    from megatron.core import tensor_parallel

    # long on purpose: one head's path from Megatron's hidden states to aligned log-probs (checks, targets,
    # fused or chunked log-probs, context-parallel gather, alignment) in order, sharing its layout
    tp_group, _ = _groups(gpt)
    tp_size = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = torch.distributed.get_rank(tp_group) if tp_size > 1 else 0
    scale = logit_scale(gpt)
    if scale != 1.0:  # on this rank's shard, before the TP gather makes it tp times larger
        hidden = hidden * scale
    sequence_parallel = bool(gpt.config.sequence_parallel) and tp_size > 1
    if not sequence_parallel:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    tokens = hidden.shape[0] * (tp_size if sequence_parallel else 1)  # s_cp: this CP rank's positions
    if hidden.dim() != 3 or (tokens, hidden.shape[1]) != (
        layout.local_positions.numel(),
        layout.full_ids.shape[0],
    ):
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} (sequence-parallel: {sequence_parallel}) do not match "
            f"input_ids (rows {layout.full_ids.shape[0]}, {layout.local_positions.numel()} local tokens): "
            f"pass the input_ids the model was called with"
        )
    weight = output_weight(gpt)
    if weight.dtype != hidden.dtype:
        # A cast would copy the whole [V / tp, H] shard (and cut its gradient off main_grad); Megatron's
        # output layer multiplies the two as they are and fails on a mismatch too.
        raise TypeError(
            f"hidden states are {hidden.dtype} but the output weight is {weight.dtype}: run the model in "
            f"the output layer's dtype (megatron's Float16Module casts both to bf16/fp16)"
        )
    if detach_weight:
        weight = weight.detach()

    targets, has_target = mtp_targets(layout.full_ids, depth, cu_seqlens=layout.boundaries)  # [B, L]
    local_targets = targets.index_select(-1, layout.local_positions)  # [B, L / C]
    kernel_args = dict(
        tp_group=tp_group if tp_size > 1 else None,
        vocab_start=tp_rank * weight.shape[0],
        chunk_size=chunk_size,
        sequence_parallel=sequence_parallel,
        validate=False,  # checked once per step (MTPCapture), not with a host sync per head
    )
    carrier = None
    if fused is not None:
        grad = fused.prepare(depth, _aligned_valid(layout, has_target, depth)[..., :-1])
        local_lp, local_top1, carrier = fused_token_loss(
            hidden, weight, local_targets.t(), _local_token_grad(layout, depth, grad), grad_scale=fused.grad_scale,
            **kernel_args,
        )  # fmt: skip
        local_top1 = local_top1 if return_top1 else None
    else:
        result = token_logprobs(
            hidden,  # [s, b, H] (SP: this TP rank's s / tp rows)
            weight,
            local_targets.t(),  # [L / C, B]: Megatron's sequence-first token order
            return_top1=return_top1,
            **kernel_args,
        )
        local_lp, local_top1 = result if return_top1 else (result, None)
    local_lp = local_lp.t()  # [B, L / C]
    local_top1 = local_top1.t() if local_top1 is not None else None
    logprobs = gather_context_parallel(local_lp, layout.cp_group, cu_seqlens_padded=layout.cu_seqlens_padded)
    top1 = None
    if local_top1 is not None:
        with torch.no_grad():
            top1 = gather_context_parallel(
                local_top1.to(torch.uint8), layout.cp_group, cu_seqlens_padded=layout.cu_seqlens_padded
            ).bool()

    if depth == 0:
        valid = has_target & layout.is_real
    else:
        logprobs, valid = align_mtp_to_main(logprobs, depth, cu_seqlens=layout.boundaries)
        valid = valid & layout.is_real
        if top1 is not None:
            top1 = shift_right(top1, depth, cu_seqlens=layout.boundaries, fill=False)
    # Positions without a target carry 0 (a fixed value, not a score of a padding token).
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    if top1 is not None:
        top1 = (top1 & valid)[..., :-1]
    return logprobs[..., :-1], valid[..., :-1], top1, carrier


def _local_token_grad(layout: SequenceLayout, depth: int, grad):
    """``fused_token_loss``'s token_grad: the kernel's flat rows r = s * B + b ([L / C, B] order) mapped to
    the aligned position (b, j = position + depth) the loss reads, times C (the CP ranks' sum)."""
    rows_b = layout.full_ids.shape[0]
    length = layout.full_ids.shape[-1]
    positions = layout.local_positions.repeat_interleave(rows_b)  # [L / C * B]
    b_index = torch.arange(rows_b, device=positions.device).repeat(layout.local_positions.numel())
    j_index = positions + depth  # aligned index of each row's log-prob
    inside = j_index <= length - 2  # the last aligned column is cut
    j_index = j_index.clamp(max=length - 2)
    cp_size = 1 if layout.cp_group is None else torch.distributed.get_world_size(layout.cp_group)

    def token_grad(rows: slice, logprobs: torch.Tensor) -> torch.Tensor:
        g = grad(b_index[rows], j_index[rows], logprobs) * cp_size
        return torch.where(inside[rows], g, torch.zeros_like(g))

    return token_grad


@dataclasses.dataclass
class ModelLogProbs:
    """Log-probs of the sampled tokens; index j of every head scores tok[j+1] given tok[<=j].

    ``main_*`` are None when only the MTP depths were computed (``MTPCapture``: the caller's own forward
    produced the main head's logits).
    """

    main_logprobs: torch.Tensor | None  # [B, L-1] fp32
    main_mask: torch.Tensor | None  # [B, L-1] bool: a next token exists (False at packed-document ends)
    mtp_logprobs: list[torch.Tensor]  # K x [B, L-1] fp32, 0 where masked
    mtp_masks: list[torch.Tensor]  # K x [B, L-1] bool: a valid MTP target exists at j
    main_top1: torch.Tensor | None = None  # [B, L-1] bool: sampled token is the main arg-max
    mtp_top1: list[torch.Tensor] | None = None  # K x [B, L-1] bool: MTP draft would be accepted
    # fused path: a scalar 0 carrying the MTP term's gradient (the log-probs are detached); add it to the loss
    mtp_carrier: torch.Tensor | None = None


def logprobs_from_hidden(
    gpt: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    main_hidden: torch.Tensor | None,
    mtp_hidden: list[torch.Tensor],
    packed_seq_params=None,
    detach_trunk: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
    fused: FusedMTPTerm | None = None,
) -> ModelLogProbs:
    """:func:`head_logprobs` of the main head (``main_hidden``, skipped when None) and of depth d = 1..K
    (``mtp_hidden[d-1]``), all [s, b, H] as one forward of ``gpt`` on ``input_ids`` produced them.

    ``detach_trunk`` (the ``detach`` regime) stops the MTP depths' gradient into the shared output
    weight; the main head always trains it.
    """
    layout = sequence_layout(gpt, input_ids, packed_seq_params)
    await_output_weight(gpt)
    if mtp_hidden and not gpt.pre_process:  # the last stage's tied copy exists only with PP > 1
        keep_lookup_grad_of_tied_copy(gpt)
    heads = [(0, main_hidden)] if main_hidden is not None else []
    heads += list(enumerate(mtp_hidden, start=1))
    results = {
        depth: _head(
            gpt,
            hidden,
            layout,
            depth,
            detach_weight=detach_trunk and depth > 0,
            chunk_size=chunk_size,
            return_top1=return_top1,
            fused=fused if depth > 0 else None,
        )
        for depth, hidden in heads
    }
    main_lp, main_mask, main_top1, _ = results.pop(0, (None, None, None, None))
    mtp = [results[depth] for depth in range(1, len(mtp_hidden) + 1)]
    return ModelLogProbs(
        main_logprobs=main_lp,
        main_mask=main_mask,
        mtp_logprobs=[lp for lp, _, _, _ in mtp],
        mtp_masks=[valid for _, valid, _, _ in mtp],
        main_top1=main_top1,
        mtp_top1=[hit for _, _, hit, _ in mtp] if return_top1 else None,
        mtp_carrier=sum(c for _, _, _, c in mtp) if fused is not None and mtp else None,
    )
