"""Per-token log-probs of the main head and every MTP depth of a megatron-core GPTModel.

``forward_with_mtp_logprobs`` runs one forward and returns the main head's and each MTP depth's
log-probs of the sampled tokens, all aligned to NeMo-RL's ``next_token_logprobs`` convention
(index j scores tok[j+1]); neither the main nor the MTP logits are ever materialised (the output
layer is skipped and ``chunked_logprobs.token_logprobs`` computes the log-probs in chunks). It is
``MTPCapture`` around the model's own forward plus the main head: the MTP depths go through the
same ``head_logprobs.logprobs_from_hidden`` and come back as the same ``ModelLogProbs``.
``forward_main_logits`` is the cheap sampling forward (no MTP block at all).

Letters: B batch rows, S tokens per row, V vocabulary, K MTP depths.
"""

from __future__ import annotations

import torch

from nemo_occ.megatron.chunked_logprobs import DEFAULT_CHUNK_SIZE
from nemo_occ.megatron.head_logprobs import FusedMTPTerm, ModelLogProbs, logprobs_from_hidden
from nemo_occ.megatron.model_access import mtp_disabled, swapped_attributes, unwrap_gpt_model
from nemo_occ.megatron.mtp_capture import MTPCapture


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
    fused: FusedMTPTerm | None = None,
) -> ModelLogProbs:
    """One forward of ``model`` -> main-head and per-depth MTP log-probs with gradient.

    ``input_ids``/``position_ids``: [B, S], or [1, T] packed with ``packed_seq_params`` (THD); with
    context parallelism this rank's shard, exactly what ``model`` takes. Every CP rank gets the
    full-sequence result. ``detach_trunk=True`` (``detach`` regime): the MTP log-probs' gradient
    reaches only ``mtp.*`` parameters; the main log-probs always train the trunk. Megatron's own
    MTP loss is not computed (see ``MTPCapture``). Needs the last pipeline stage. ``fused``: the MTP
    depths take the MTP term's gradient in their chunk loops (``ModelLogProbs.mtp_carrier``, see
    ``head_logprobs.FusedMTPTerm``); the main head is unchanged.
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
    return logprobs_from_hidden(
        gpt,
        input_ids,
        main_hidden=main_hidden,
        mtp_hidden=capture.take().mtp_hidden if capture.active else [],
        packed_seq_params=packed_seq_params,
        detach_trunk=detach_trunk,
        chunk_size=chunk_size,
        return_top1=return_top1,
        fused=fused,
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
