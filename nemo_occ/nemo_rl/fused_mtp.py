"""The fused MTP log-prob path under NeMo-RL: the MTP term's gradient per token, built from the micro-batch.

The MTP term of :class:`nemo_occ.nemo_rl.loss.OCCLossFn` is Σ_k λ_k · L_k with L_k = Σ_t w_t · l(log p_k,t)
(``nemo_occ.core.losses``): once the micro-batch's advantages, old log-probs, masks, global counts and
λ_k are known, dL/d log p_k,t is a function of log p_k,t alone, so the log-prob kernel can take the
gradient chunk by chunk while it computes the log-probs (``chunked_logprobs.fused_token_loss``: three
GEMMs per chunk instead of four, no [T, V/TP] tensor kept). :func:`fused_mtp_term` builds that function
in the loss post-processor, before the MTP log-probs are computed; the loss then adds the carrier
(``ModelLogProbs.mtp_carrier``, stored under :data:`MTP_CARRIER_KEY`) and reads the log-probs detached.

Where the gradient cannot be known in forward, or the fused mapping is not verified, the unfused path
runs, with a one-line warning naming the reason (once per reason and process): a probe pass (it
differentiates other losses), λ from the same micro-batch (``occ.timing: microbatch``), GSPO's sequence
ratio, old log-probs of the current forward (``force_on_policy_ratio``), an fp16 loss scaler (the loss
scale changes between steps), packed sequences and context parallelism (not covered by a test yet).

Letters: B sequences, S tokens per sequence (the loss's width is S-1), L the model's sequence length.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from nemo_occ.core.losses import token_loss_grad, token_loss_weights
from nemo_occ.megatron.head_logprobs import FusedMTPTerm
from nemo_occ.nemo_rl.mtp_batch import read_mtp_old_logprobs

__all__ = ["MTP_CARRIER_KEY", "fused_mtp_term"]

MTP_CARRIER_KEY = "nemo_occ_mtp_carrier"  # data_dict key of the fused path's gradient carrier (a scalar 0)

_WARNED: set[str] = set()


def _fall_back(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"nemo-occ: MTP log-probs take the unfused path (4 GEMMs per chunk): {reason}", stacklevel=3
        )
    return None


def fused_mtp_term(
    loss_fn: Any,
    data: Mapping[str, Any],
    global_valid_seqs: Any,
    global_valid_toks: Any,
    *,
    fp16: bool,
    packed: bool,
    cp_size: int,
) -> FusedMTPTerm | None:
    """The MTP term's per-token gradient for ``chunked_logprobs.fused_token_loss``, or None (unfused path).

    ``loss_fn`` is the :class:`~nemo_occ.nemo_rl.loss.OCCLossFn` NeMo-RL will call on this micro-batch
    with ``data`` and the global counts; what it will compute is mirrored here: the mask
    ``token_mask[:, 1:] · sample_mask`` and each depth's validity, the old log-probs the ratio uses,
    ``advantages[:, 1:]``, λ_k (``MTPObjective.coefficients``, the λ of the update being trained). The
    incoming gradient scale is 1: NeMo-RL's own ``num_microbatches / cp`` and Megatron's ``cp /
    num_microbatches`` cancel, and the bf16/fp32 optimizers' loss scale is 1 (checked in backward).
    """
    cfg = loss_fn.nemo_occ_cfg
    spec = cfg.regime_spec
    if not spec.has_mtp_term:
        return None
    if getattr(loss_fn, "_probe", None) is not None:
        return None  # a probe pass differentiates another loss (by design, not worth a warning)
    if spec.calibrated and cfg.occ.timing != "lagged":
        return _fall_back(f"occ.timing '{cfg.occ.timing}' gives λ only after the micro-batch's loss")
    policy_cfg = loss_fn.policy_cfg
    if spec.uses_policy_loss and policy_cfg.importance_ratio != "token":
        return _fall_back("GSPO's sequence ratio couples the tokens of a sequence")
    if spec.uses_policy_loss and getattr(loss_fn.main_loss, "force_on_policy_ratio", False):
        return _fall_back("force_on_policy_ratio takes the old log-probs from the same forward")
    if fp16:
        return _fall_back("fp16's loss scale is not known when the weight gradient is written")
    if packed:
        return _fall_back("packed sequences (THD) are not covered by the fused path's tests yet")
    if cp_size > 1:
        return _fall_back("context parallelism is not covered by the fused path's tests yet")

    K = cfg.num_depths
    width = data["input_ids"].shape[1] - 1  # S-1, the loss's width
    mask = (data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)).bool()  # [B, S-1]
    advantages = data["advantages"][:, 1:]  # [B, S-1]
    olds = read_mtp_old_logprobs(data, K, width, required=cfg.old_logprobs == "mtp")
    if cfg.old_logprobs != "mtp":
        olds = [data["prev_logprobs"][:, 1:]] * K
    coefs = loss_fn.objective.coefficients()
    objective = spec.objective

    def prepare(depth: int, valid: torch.Tensor):
        valid = (
            valid[:, :width]
            if valid.shape[1] >= width
            else torch.nn.functional.pad(valid, (0, width - valid.shape[1]))
        )
        weights = token_loss_weights(
            objective,
            mask & valid.to(mask.device),
            policy_cfg.aggregation,
            coefs[depth - 1],
            global_valid_tokens=global_valid_toks,
            global_valid_seqs=global_valid_seqs,
        )  # [B, S-1]
        old = olds[depth - 1]

        def grad(b: torch.Tensor, j: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
            inside = j < width  # the model may see a longer (padded) sequence than the loss
            jc = j.clamp(max=width - 1)
            w = torch.where(inside, weights[b, jc], torch.zeros((), device=weights.device))
            return token_loss_grad(objective, logprobs, old[b, jc], advantages[b, jc], w, policy_cfg)

        return grad

    return FusedMTPTerm(prepare=prepare, grad_scale=1.0)
