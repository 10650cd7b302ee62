"""Brute-force references for the megatron MTP tests (owned by the megatron-layer tests).

The MTP chain is re-run by hand from the model's own sub-modules with explicit shifts, full logits,
``F.log_softmax`` and explicit loops over positions; nothing here uses nemo_occ's alignment,
capture or chunked log-prob code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_left_rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """out[:, i] = x[:, i + d], 0 past the end (what megatron's repeated roll_tensor(-1) gives)."""
    out = torch.zeros_like(x)
    out[:, : x.shape[1] - d] = x[:, d:]
    return out


def reference_logprobs(gpt, input_ids: torch.Tensor, position_ids: torch.Tensor, num_depths: int):
    """Return (main [B, S-1], mtp list of K [B, S-1], mtp valid list) from full logits, loops.

    Single-rank model (TP=1), unpacked rows; learned absolute positions; causal default mask.
    """
    from nemo_occ.megatron.mtp_logprobs import forward_main_logits

    captured = {}
    handle = gpt.decoder.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
    try:
        logits = forward_main_logits(gpt, input_ids, position_ids)  # [B, S, V]
    finally:
        handle.remove()
    batch, seq = input_ids.shape
    main_logp = F.log_softmax(logits.float(), dim=-1)
    main = torch.zeros(batch, seq - 1)
    for b in range(batch):
        for j in range(seq - 1):
            main[b, j] = main_logp[b, j, input_ids[b, j + 1]]

    weight = (
        gpt.output_layer.weight
        if not gpt.share_embeddings_and_output_weights
        else gpt.embedding.word_embeddings.weight
    )
    hidden = captured["h"]  # [S, B, H] decoder output after the final norm
    mtp, valid = [], []
    for d in range(1, num_depths + 1):
        layer = gpt.mtp.layers[d - 1]
        emb = gpt.embedding(
            input_ids=shift_left_rows(input_ids, d), position_ids=shift_left_rows(position_ids, d)
        )  # [S, B, H]: embedding of tok[i + d] at position i
        x = torch.cat([layer.enorm(emb), layer.hnorm(hidden)], dim=-1)
        x, _ = layer.eh_proj(x)
        # megatron-core 0.20 renamed the MTP layer's block `transformer_layer` -> `mtp_model_layer`.
        block = getattr(layer, "mtp_model_layer", None) or layer.transformer_layer
        x, _ = block(x, attention_mask=None)
        hidden = layer.final_layernorm(x)
        logp = F.log_softmax((hidden @ weight.t()).float(), dim=-1)  # [S, B, V]
        aligned = torch.zeros(batch, seq - 1)
        ok = torch.zeros(batch, seq - 1, dtype=torch.bool)
        for b in range(batch):
            for i in range(seq):
                j = i + d  # main-head index that scores the same token tok[i + 1 + d]
                if i + 1 + d < seq:
                    aligned[b, j] = logp[i, b, input_ids[b, i + 1 + d]]
                    ok[b, j] = True
        mtp.append(aligned)
        valid.append(ok)
    return main, mtp, valid
