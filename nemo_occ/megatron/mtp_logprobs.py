"""Per-token log-probs of the main head and every MTP depth of a megatron-core GPTModel.

Letters: B batch rows, S tokens per row, V vocabulary, K MTP depths.
"""

from __future__ import annotations

import torch

from nemo_occ.megatron.model_access import mtp_disabled


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
