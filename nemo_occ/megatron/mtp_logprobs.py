"""Per-token log-probs of the main head and every MTP depth of a megatron-core GPTModel.

``forward_with_mtp_logprobs`` runs one forward and returns the main head's and each MTP depth's
log-probs of the sampled tokens, all aligned to NeMo-RL's ``next_token_logprobs`` convention
(index j scores tok[j+1]); neither the main nor the MTP logits are ever materialised (the output
layer is skipped and ``chunked_logprobs.token_logprobs`` computes the log-probs in chunks).
``forward_main_logits`` is the cheap sampling forward (no MTP block at all).

Letters: B batch rows, S tokens per row, V vocabulary, K MTP depths.
"""

from __future__ import annotations

import dataclasses

import torch

from nemo_occ.megatron.chunked_logprobs import DEFAULT_CHUNK_SIZE
from nemo_occ.megatron.head_logprobs import head_logprobs, sequence_layout
from nemo_occ.megatron.model_access import mtp_disabled, swapped_attributes, unwrap_gpt_model
from nemo_occ.megatron.mtp_capture import MTPCapture


@dataclasses.dataclass
class ModelLogProbs:
    """Log-probs of the sampled tokens; index j of every head scores tok[j+1] given tok[<=j]."""

    main_logprobs: torch.Tensor  # [B, S-1] fp32
    main_mask: torch.Tensor  # [B, S-1] bool: a next token exists (False at packed-document ends)
    mtp_logprobs: list[torch.Tensor]  # K x [B, S-1] fp32, 0 where masked
    mtp_masks: list[torch.Tensor]  # K x [B, S-1] bool
    main_top1: torch.Tensor | None = None  # [B, S-1] bool: sampled token is the main arg-max
    mtp_top1: list[torch.Tensor] | None = None  # K x [B, S-1] bool: MTP draft would be accepted


def forward_with_mtp_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    packed_seq_params=None,
    detach_trunk: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
) -> ModelLogProbs:
    """One forward of ``model`` -> main-head and per-depth MTP log-probs with gradient.

    ``input_ids``/``position_ids``: [B, S], or [1, T] packed with ``packed_seq_params`` (THD); with
    context parallelism this rank's shard, exactly what ``model`` takes. Every CP rank gets the
    full-sequence result. ``detach_trunk=True`` (``detach`` regime): the MTP log-probs' gradient
    reaches only ``mtp.*`` parameters; the main log-probs always train the trunk. Megatron's own
    MTP loss is not computed (see ``MTPCapture``). Needs the last pipeline stage.
    """
    gpt = unwrap_gpt_model(model)
    if not gpt.post_process:
        raise ValueError("forward_with_mtp_logprobs needs the last pipeline stage (post_process=True)")
    if position_ids.shape != input_ids.shape:
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    capture = MTPCapture(model, detach_trunk=detach_trunk)
    # post_process=False makes GPTModel return the hidden states right after the MTP block, before
    # the output layer: the main logits are never computed either.
    with capture, swapped_attributes(gpt, post_process=False):
        main_hidden = model(input_ids, position_ids, attention_mask, packed_seq_params=packed_seq_params)
    layout = sequence_layout(gpt, input_ids, packed_seq_params)
    main_lp, main_mask, main_top1 = head_logprobs(
        gpt, main_hidden, layout, 0, chunk_size=chunk_size, return_top1=return_top1
    )
    mtp_lp, mtp_masks, mtp_top1 = [], [], []
    if capture.active:
        captured = capture.take()
        for depth, hidden in enumerate(captured.mtp_hidden, start=1):
            lp, valid, hit = head_logprobs(
                gpt,
                hidden,
                layout,
                depth,
                detach_weight=detach_trunk,
                chunk_size=chunk_size,
                return_top1=return_top1,
            )
            mtp_lp.append(lp)
            mtp_masks.append(valid)
            mtp_top1.append(hit)
    return ModelLogProbs(
        main_logprobs=main_lp,
        main_mask=main_mask,
        mtp_logprobs=mtp_lp,
        mtp_masks=mtp_masks,
        main_top1=main_top1,
        mtp_top1=mtp_top1 if return_top1 else None,
    )


def forward_main_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main-head logits [B, S, V] (full vocabulary, gathered over TP), skipping the MTP block.

    For sampling loops: the MTP layers and megatron's MTP loss are not run, so no labels are
    needed (megatron-core 0.16.1 otherwise crashes on ``labels=None`` when MTP is configured).
    Wrap the call in ``torch.no_grad()`` when no gradient is wanted.
    """
    if input_ids.dim() != 2 or position_ids.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and position_ids must both be [B, S]; got {tuple(input_ids.shape)} "
            f"and {tuple(position_ids.shape)}"
        )
    with mtp_disabled(model) as gpt:
        if not gpt.post_process:
            raise ValueError("forward_main_logits needs the last pipeline stage (post_process=True)")
        logits = model(input_ids, position_ids, attention_mask, runtime_gather_output=True)  # [B, S, V]
    return logits
