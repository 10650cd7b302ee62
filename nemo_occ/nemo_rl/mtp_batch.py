"""The MTP entries nemo-occ adds to NeMo-RL's batches: their keys, the code that writes and that reads them.

Per MTP depth d (1-based) a micro-batch ``data`` carries, next to NeMo-RL's own keys:

- :func:`mtp_logprobs_key`: [B, S-1] log-probs aligned like ``next_token_logprobs`` (index j scores
  token j+1); :func:`mtp_valid_key`: [B, S-1] bool, False where no depth-d target exists;
  :func:`mtp_correct_key`: [B, S-1] bool, depth d's arg-max is the sampled token. Written by the
  training forward (:func:`attach_mtp_to_batch`).
- :func:`mtp_old_logprobs_key`: [B, S] like ``prev_logprobs`` (position i scores token i, 0 at i = 0).
  Written by ``get_logprobs`` (:func:`old_logprobs_rows`, :func:`stack_old_logprobs`).

The loss reads them back with :func:`read_mtp_inputs` and :func:`read_mtp_old_logprobs`, which crop to
the loss's [B, S-1] in one place. The old log-probs travel from ``get_logprobs`` to ``train`` through the
driver (:func:`take_mtp_old_logprobs`, ``nemo_occ.nemo_rl.policy``), carried by NeMo-RL like ``logprobs``.
This module imports torch only: the driver imports it.

Letters: B sequences, S tokens per sequence, T packed tokens, N documents of a packed row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "mtp_logprobs_key",
    "mtp_valid_key",
    "mtp_correct_key",
    "mtp_old_logprobs_key",
    "attach_mtp_to_batch",
    "old_logprobs_rows",
    "stack_old_logprobs",
    "take_mtp_old_logprobs",
    "read_mtp_inputs",
    "read_mtp_old_logprobs",
    "unpack_rows",
]

_OLD_LOGPROBS_PREFIX = "nemo_occ_mtp_old_logprobs_"


def mtp_logprobs_key(depth: int) -> str:
    """Data key of depth ``depth``'s aligned MTP log-probs, [B, S-1] (1-based depth)."""
    return f"nemo_occ_mtp_logprobs_{depth}"


def mtp_valid_key(depth: int) -> str:
    """Data key of depth ``depth``'s validity, [B, S-1] bool (False where no MTP target exists)."""
    return f"nemo_occ_mtp_valid_{depth}"


def mtp_correct_key(depth: int) -> str:
    """Data key of whether depth ``depth``'s argmax equals the sampled token, [B, S-1] bool."""
    return f"nemo_occ_mtp_correct_{depth}"


def mtp_old_logprobs_key(depth: int) -> str:
    """Data key of depth ``depth``'s old log-probs, [B, S] like NeMo-RL's ``prev_logprobs`` (position i
    holds the MTP head's log-prob of token i, aligned to the main head's; 0 where there is none)."""
    return f"{_OLD_LOGPROBS_PREFIX}{depth}"


# -- writing ---------------------------------------------------------------------------------------
def unpack_rows(
    packed: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor | None, width: int, fill=0
) -> torch.Tensor:
    """[1, T-1] per-position values of a packed row -> [N, width] rows, one per document.

    Document n starts at ``cu_seqlens_padded[n]`` (``cu_seqlens[n]`` when unpadded) and has
    ``cu_seqlens[n+1] - cu_seqlens[n]`` tokens; row n holds its first ``min(len-1, width)`` positions
    and ``fill`` after them. Differentiable (a gather).
    """
    starts = (cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens)[:-1].to(packed.device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(packed.device)  # [N]
    cols = torch.arange(width, device=packed.device)  # [width]
    index = starts.unsqueeze(1) + cols.unsqueeze(0)  # [N, width]
    inside = (cols.unsqueeze(0) < (lengths - 1).unsqueeze(1)) & (index < packed.shape[-1])
    index = torch.where(inside, index, torch.zeros_like(index))
    rows = packed.reshape(-1)[index]  # [N, width]
    return torch.where(inside, rows, torch.full_like(rows, fill))


def _fit(x: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Crop or pad [B, L-1] to [B, width] (the model may see a longer, padded sequence)."""
    if x.shape[1] >= width:
        return x[:, :width]
    pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def attach_mtp_to_batch(data: Any, mtp: Any, packed_seq_params: Any = None) -> None:
    """Put one micro-batch's MTP log-probs (``MTPHeadLogProbs``) into ``data`` as [B, S-1] rows.

    ``mtp`` is in the model's layout: [B, L-1] rows, or one packed row [1, T-1] when
    ``packed_seq_params`` is given (then unpacked per document with its ``cu_seqlens_q(_padded)``).
    This is where the model's layout becomes the loss's [B, S-1], S = ``data["input_ids"].shape[1]``.
    """
    width = data["input_ids"].shape[1] - 1
    for d, lp in enumerate(mtp.logprobs, start=1):
        valid = mtp.masks[d - 1]
        hit = mtp.top1[d - 1] if mtp.top1 is not None else None
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q
            cu_pad = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
            lp = unpack_rows(lp, cu, cu_pad, width, fill=0.0)
            valid = unpack_rows(valid, cu, cu_pad, width, fill=False)
            hit = None if hit is None else unpack_rows(hit, cu, cu_pad, width, fill=False)
        else:
            lp, valid = _fit(lp, width, 0.0), _fit(valid, width, False)
            hit = None if hit is None else _fit(hit, width, False)
        data[mtp_logprobs_key(d)] = lp
        data[mtp_valid_key(d)] = valid
        if hit is not None:
            data[mtp_correct_key(d)] = hit


def old_logprobs_rows(input_ids: torch.Tensor, mtp: Any, packed_seq_params: Any = None) -> list[torch.Tensor]:
    """Per depth, one ``get_logprobs`` micro-batch's MTP log-probs in ``prev_logprobs``' layout [B, S].

    ``input_ids`` [B, S] is the micro-batch as NeMo-RL hands it to the post-processor; ``mtp`` and
    ``packed_seq_params`` are as in :func:`attach_mtp_to_batch`, which aligns them to [B, S-1] first.
    """
    rows = {"input_ids": input_ids}
    attach_mtp_to_batch(rows, mtp, packed_seq_params)
    aligned = [rows[mtp_logprobs_key(d)].float() for d in range(1, len(mtp.logprobs) + 1)]  # [B, S-1]
    # prev_logprobs' layout: position i scores token i, position 0 has none
    return [torch.cat([torch.zeros_like(a[:, :1]), a], dim=1) for a in aligned]


def stack_old_logprobs(
    microbatches: Sequence[Sequence[torch.Tensor]], num_depths: int, width: int
) -> dict[str, torch.Tensor]:
    """The ``get_logprobs`` result's MTP entries: each depth's micro-batch rows ([B_mb, S_mb], from
    :func:`old_logprobs_rows`) padded to the batch's ``width`` and stacked, as NeMo-RL does ``logprobs``."""
    out = {}
    for d in range(1, num_depths + 1):
        rows = [mb[d - 1] for mb in microbatches]
        out[mtp_old_logprobs_key(d)] = torch.cat(
            [torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows]
        )
    return out


def take_mtp_old_logprobs(logprobs: Any) -> dict[str, torch.Tensor]:
    """The :func:`mtp_old_logprobs_key` entries of a ``get_logprobs`` result (left in place)."""
    return {k: logprobs[k] for k in list(logprobs.keys()) if str(k).startswith(_OLD_LOGPROBS_PREFIX)}


# -- reading ---------------------------------------------------------------------------------------
def read_mtp_inputs(
    data: Mapping[str, Any], num_depths: int, width: int, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """Per depth: aligned log-probs [B, S-1], validity [B, S-1] bool, arg-max correctness [B, S-1] or None.

    ``width`` = S-1, the width of the loss's ``next_token_logprobs``. Raises ValueError, saying how to
    launch, when the training forward did not write the entries.
    """
    lps, valids, correct = [], [], []
    positions = torch.arange(width, device=device)  # [S-1]
    for d in range(1, num_depths + 1):
        key = mtp_logprobs_key(d)
        if key not in data:
            raise ValueError(
                f"the micro-batch has no '{key}': the MTP log-probs are produced by nemo-occ's Megatron worker "
                "extension; launch with `python -m nemo_occ.nemo_rl.run_grpo` (not NeMo-RL's examples/run_grpo.py)"
            )
        lps.append(data[key][:, :width])
        valid = data.get(mtp_valid_key(d))
        if valid is None:  # one sequence per row: the first d positions have no MTP target
            valid = (positions >= d).unsqueeze(0).expand(data[key].shape[0], width)
        valids.append(valid[:, :width].bool())
        hit = data.get(mtp_correct_key(d))
        correct.append(None if hit is None else hit[:, :width])
    return lps, valids, correct


def read_mtp_old_logprobs(
    data: Mapping[str, Any], num_depths: int, width: int, *, required: bool
) -> list[torch.Tensor] | None:
    """Per depth the MTP heads' own old log-probs [B, S-1] (``prev_logprobs[:, 1:]``'s alignment), or None
    when the batch carries none; ``required`` raises ValueError instead, saying how to launch."""
    keys = [mtp_old_logprobs_key(d) for d in range(1, num_depths + 1)]
    if all(k in data for k in keys):
        return [data[k][:, 1 : 1 + width] for k in keys]
    if required:
        missing = [k for k in keys if k not in data]
        raise ValueError(
            f"nemo_occ.old_logprobs is 'mtp' but the micro-batch has no {missing}: they are captured with "
            "prev_logprobs by nemo-occ's policy (nemo_occ.nemo_rl.policy); launch with "
            "`python -m nemo_occ.nemo_rl.run_grpo`"
        )
    return None
