"""Alignment of MTP-head values with the main head's token positions.

Convention (the one NeMo-RL's ``next_token_logprobs`` uses): index ``j`` scores token ``tok[j+1]``
given ``tok[<=j]``. Megatron's MTP depth ``d`` (1-based) computed at position ``i`` predicts
``tok[i+1+d]`` (Megatron labels are pre-shifted: ``labels[i] = tok[i+1]``; depth ``d`` rolls them
``d`` more to the left). Shifting depth ``d`` right by ``d`` therefore puts, at index ``j``, the MTP
score of the same token ``tok[j+1]`` that the main head scores at ``j``. The first ``d`` positions of
each sequence have no MTP value and are masked.

Packed (THD) sequences: several documents share one row; ``cu_seqlens`` ([N+1] int, cumulative
segment boundaries over the last dim, as in ``PackedSeqParams``) keeps every shift and every target
inside its own document.

Positions after the last ``cu_seqlens`` boundary (padding of a packed row) form a segment of their
own: shifts never mix them with a document, but they may come out "valid"; the caller's token mask
must exclude padding, as NeMo-RL's does.

Letters: B rows, S tokens per row, N packed segments.
"""

from __future__ import annotations

import torch

__all__ = ["shift_left", "shift_right", "mtp_targets", "align_mtp_to_main", "segment_ids"]


def _check_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [N+1] of segment boundaries, got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(torch.long)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must start at 0 and be non-decreasing")
    if int(cu[-1]) > length:
        raise ValueError(
            f"cu_seqlens ends at {int(cu[-1])} but the packed dimension has only {length} tokens"
        )
    return cu


def segment_ids(cu_seqlens: torch.Tensor, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Segment index of each position of a packed row ([length] long); positions past the last
    boundary (padding) get segment id ``N`` (their own segment, never shared with a document)."""
    cu = _check_cu_seqlens(cu_seqlens, length).to(device)
    pos = torch.arange(length, device=device)
    # searchsorted(right=True) - 1 maps position p to the segment k with cu[k] <= p < cu[k+1].
    return torch.searchsorted(cu, pos, right=True) - 1


def _shift(x: torch.Tensor, shift: int, cu_seqlens: torch.Tensor | None, fill) -> torch.Tensor:
    """Shift the last dim by ``shift`` (>0 right, <0 left) without crossing a row or segment."""
    length = x.shape[-1]
    if shift == 0:
        return x.clone()
    if abs(shift) >= length:
        return torch.full_like(x, fill)
    out = torch.full_like(x, fill)
    if shift > 0:
        out[..., shift:] = x[..., :-shift]
    else:
        out[..., :shift] = x[..., -shift:]
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens, length, device=x.device)  # [S]
        src = torch.full_like(seg, -1)
        if shift > 0:
            src[shift:] = seg[:-shift]
        else:
            src[:shift] = seg[-shift:]
        crossed = src != seg  # the value came from another document (or from outside the row)
        out = torch.where(crossed, torch.full_like(out, fill), out)
    return out


def shift_right(
    x: torch.Tensor, shift: int, *, cu_seqlens: torch.Tensor | None = None, fill=0.0
) -> torch.Tensor:
    """``out[..., j] = x[..., j - shift]`` inside each row/segment, ``fill`` where there is no source."""
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    return _shift(x, shift, cu_seqlens, fill)


def shift_left(
    x: torch.Tensor, shift: int, *, cu_seqlens: torch.Tensor | None = None, fill=0
) -> torch.Tensor:
    """``out[..., i] = x[..., i + shift]`` inside each row/segment, ``fill`` where there is no source."""
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    return _shift(x, -shift, cu_seqlens, fill)


def _valid_source(shape: torch.Size, shift: int, cu_seqlens, device) -> torch.Tensor:
    ones = torch.ones(shape, dtype=torch.bool, device=device)
    return _shift(ones, -shift, cu_seqlens, False)


def mtp_targets(
    input_ids: torch.Tensor, depth: int, *, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of MTP depth ``depth`` at each Megatron position: ``tok[i + 1 + depth]``.

    Returns ``(targets, valid)``, both shaped like ``input_ids`` ([B, S], or [1, T] packed with
    ``cu_seqlens``); ``targets`` is 0 where ``valid`` is False (past the end of the row/segment).
    Depth 0 gives the main head's targets.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0 (0 = main head), got {depth}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    targets = shift_left(input_ids, depth + 1, cu_seqlens=cu_seqlens, fill=0)
    valid = _valid_source(input_ids.shape, depth + 1, cu_seqlens, input_ids.device)
    return targets, valid


def align_mtp_to_main(
    values: torch.Tensor, depth: int, *, cu_seqlens: torch.Tensor | None = None, fill=0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move depth-``depth`` values from Megatron positions to main-head positions.

    ``aligned[..., j] = values[..., j - depth]``: both now score ``tok[j+1]``. ``valid[..., j]`` is
    True when ``j - depth`` is inside the same row/segment and the main head has a target at ``j``
    (``j + 1`` inside the segment). Shapes are kept ([B, S] or [1, T]); callers that use the
    [B, S-1] next-token convention slice ``[..., :-1]``.
    """
    if depth < 1:
        raise ValueError(f"MTP depth starts at 1, got {depth}")
    aligned = shift_right(values, depth, cu_seqlens=cu_seqlens, fill=fill)
    has_source = _shift(
        torch.ones(values.shape, dtype=torch.bool, device=values.device), depth, cu_seqlens, False
    )
    main_has_target = _valid_source(values.shape, 1, cu_seqlens, values.device)
    return aligned, has_source & main_has_target
