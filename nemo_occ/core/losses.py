"""Clipped policy-gradient losses shared by the main head and the MTP heads, and the MTP cross-entropy.

PPO/GRPO clipped surrogate (Schulman et al. 2017), per valid token t of sequence i::

    r_t   = exp(log π(y_t) - log π_old(y_t))                          (token ratio)
    l_t   = max(-A_t · r_t, -A_t · clip(r_t, 1 - ε_low, 1 + ε_high))   (DAPO: asymmetric ε)
    l_t   = min(l_t, -c · A_t)          where A_t < 0 and dual clip c is set

GSPO (Zheng et al. 2025) replaces r_t by the sequence ratio s_i = exp(mean_t(log π - log π_old)),
shared by all tokens of sequence i; with seq-mean-token-mean aggregation this has exactly GSPO's
value and gradient.

Aggregation uses *global* denominators supplied by the caller (valid tokens or valid sequences of
the whole global batch, summed over micro-batches and data-parallel ranks), so summing the returned
losses over micro-batches and ranks gives the exact full-batch mean — the convention of NeMo-RL and
torchtitan. Metrics are divided the same way, so they are summable too.

The log-ratio is clamped to ±20 before ``exp`` (``MAX_LOG_RATIO``): r_t, and GSPO's s_i, lie in
[e^-20, e^20] ≈ [2e-9, 4.9e8], and beyond the clamp the gradient is zero. This only departs from the
unclamped loss for tokens the clip does not already silence: with A < 0 and r > e^20 (no dual clip)
the token's loss is capped at |A|·e^20 and its gradient is 0 instead of |A|·r, and with A > 0 and
r < e^-20 its gradient is 0 instead of below 2e-9·|A|. The MTP ratio against the main head's old
log-prob can be far from 1, which is why a clamp is needed at all.

Precision: the ratio, the per-token loss and the sums are computed in at least float32 whatever the
log-probs' dtype (fp16's exp overflows above 11, and on a clipped token backward then gives 0·inf =
NaN), so fp16/bf16 log-probs give the float32 result on their values and a float32 loss; their
gradient is the float32 one rounded to the input dtype (±inf in fp16 where it exceeds 65504).

Simplifications: no KL-to-reference term and no importance-sampling correction here; in NeMo-RL the
main head keeps NeMo-RL's own loss and only the MTP term comes from this module.

Letters: B sequences, S token positions.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the config imports the regimes, which import these losses
    from nemo_occ.core.loss_config import PolicyLossConfig

__all__ = [
    "MAX_LOG_RATIO",
    "clipped_policy_loss",
    "cross_entropy_loss",
    "valid_counts",
    "check_logprob_inputs",
    "token_loss_weights",
    "token_loss_grad",
]

# |log r| beyond this is clamped before exp() (see the module docstring): it keeps r finite in float32
# (exp overflows at ~88) for the MTP ratio against the main head's old log-prob.
MAX_LOG_RATIO = 20.0

Number = float | int | torch.Tensor


def valid_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid tokens, sequences with at least one valid token) of a [B, S] mask, as float tensors."""
    m = mask.bool()
    return m.sum().to(torch.float32), m.any(dim=-1).sum().to(torch.float32)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The inputs' promoted dtype, at least float32 (fp16/bf16 log-probs are upcast, float64 kept)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _denominator(value: Number, name: str, local_count: int = 0) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        v = float(value.detach())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
    else:
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(value).__name__}")
    if not (math.isfinite(v) and v >= 0.0):
        # inf would silently turn the loss into 0, NaN into NaN
        raise ValueError(f"{name} must be a finite, non-negative count of the global batch, got {v}")
    if v < local_count:
        # e.g. global_valid_seqs left at its default 0 under seq_mean_token_mean: dividing by 1 would
        # silently turn the mean into a sum.
        raise ValueError(
            f"{name}={v:g} is smaller than this micro-batch's own count ({local_count}); pass the count "
            "of the whole global batch (summed over micro-batches and data-parallel ranks)"
        )
    # An empty global batch contributes nothing: every summand is 0, so any positive divisor works.
    if v == 0.0:
        return 1.0
    return value.reshape(()) if isinstance(value, torch.Tensor) else value  # [1] would make the loss [1]


def check_logprob_inputs(mask: torch.Tensor, *named: tuple[str, torch.Tensor | None]) -> torch.Tensor:
    """Validate [B, S] tensors against ``mask``; return the boolean mask.

    Raises ValueError on a shape mismatch, and on NaN/Inf at a valid position (masked positions may
    hold anything: padding is often -inf or garbage and is never read).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, S], got shape {tuple(mask.shape)}")
    m = mask.bool()
    for name, t in named:
        if t is None:
            continue
        if t.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but mask has {tuple(mask.shape)}; they must match"
            )
        if not bool(torch.isfinite(t.detach()[m]).all()):
            bad = int((~torch.isfinite(t.detach()[m])).sum())
            raise ValueError(
                f"{name} has {bad} NaN/Inf value(s) at valid (mask=1) positions; fix the forward pass or mask them out"
            )
    return m


def _broadcast_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError(f"advantages [B] has B={advantages.shape[0]} but mask has B={mask.shape[0]}")
        return advantages[:, None].expand_as(mask)
    if advantages.shape != mask.shape:
        raise ValueError(
            f"advantages must be [B] or [B, S] like mask {tuple(mask.shape)}, got {tuple(advantages.shape)}"
        )
    return advantages


def _aggregate(
    per_token: torch.Tensor,
    m: torch.Tensor,
    aggregation: str,
    global_valid_tokens: Number,
    global_valid_seqs: Number,
) -> torch.Tensor:
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))
    if aggregation == "token_mean":
        return per_token.sum() / _denominator(global_valid_tokens, "global_valid_tokens", int(m.sum()))
    # seq_mean_token_mean: each sequence's mean over its own valid tokens, then mean over sequences.
    n = m.sum(dim=-1)  # [B]
    seq_mean = per_token.sum(dim=-1) / n.clamp(min=1)
    return seq_mean.sum() / _denominator(global_valid_seqs, "global_valid_seqs", int((n > 0).sum()))


def _surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ratio r_t, per-token loss l_t, dual-clipped) of the module docstring's surrogate, elementwise."""
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    low, high = 1.0 - cfg.ratio_clip_low, 1.0 + cfg.ratio_clip_high
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
    dual = torch.zeros(per_token.shape, dtype=torch.bool, device=per_token.device)
    if cfg.ratio_clip_c is not None:
        cap = -adv * cfg.ratio_clip_c
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    return ratio, per_token, dual


# Over 60 lines on purpose: checks, ratio, clip, dual clip, aggregation and metrics are one formula read
# top to bottom; its pieces share the masked tensors and would only be split into arguments of each other.
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    global_valid_tokens: Number,
    global_valid_seqs: Number = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (to minimise) of one micro-batch; see the module docstring.

    Args:
        logprobs: [B, S] current log π(y_t) (with gradient).
        old_logprobs: [B, S] log π_old(y_t) (no gradient is taken through it).
        advantages: [B] or [B, S].
        mask: [B, S] 1 where the token is trained on.
        global_valid_tokens / global_valid_seqs: denominators of the whole global batch.

    Returns ``(loss, metrics)``; ``loss`` is this micro-batch's share of the global-batch mean, in
    float32 (float64 for float64 inputs), with |log r| clamped to ``MAX_LOG_RATIO`` (module docstring).
    """
    # long on purpose: one formula (ratio, clip, dual clip, aggregation) read top-down against NeMo-RL's
    # ClippedPGLossFn; split, the aggregation would drift from the ratio it divides
    m = check_logprob_inputs(mask, ("logprobs", logprobs), ("old_logprobs", old_logprobs))
    adv = _broadcast_advantages(advantages, mask)
    if not bool(torch.isfinite(adv[m]).all()):
        raise ValueError("advantages have NaN/Inf at valid positions; check the reward normalisation")
    # checked up front, also where this aggregation does not divide by them (the metrics always divide
    # by global_valid_tokens)
    _denominator(global_valid_tokens, "global_valid_tokens", int(m.sum()))
    _denominator(global_valid_seqs, "global_valid_seqs")
    dtype = _compute_dtype(logprobs, old_logprobs)  # >= float32: see the module docstring
    zeros = torch.zeros(mask.shape, dtype=dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zeros)  # [B, S]
    adv = torch.where(m, adv.to(dtype), zeros)

    if cfg.importance_ratio == "sequence":
        n = m.sum(dim=-1, keepdim=True).clamp(min=1)
        seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / n  # [B, 1]
        log_ratio = seq_log_ratio.expand_as(log_ratio)
    ratio, per_token, dual = _surrogate(log_ratio, adv, cfg)  # [B, S] each
    dual = dual & m
    low, high = 1.0 - cfg.ratio_clip_low, 1.0 + cfg.ratio_clip_high

    loss = _aggregate(per_token, m, cfg.aggregation, global_valid_tokens, global_valid_seqs)

    with torch.no_grad():
        n_tok = _denominator(global_valid_tokens, "global_valid_tokens")
        r = ratio.detach()
        clipped = m & (((adv > 0) & (r > high)) | ((adv < 0) & (r < low)))
        metrics = {
            "loss": loss.detach(),
            "clip_fraction": clipped.sum() / n_tok,
            "ratio_mean": torch.where(m, r, zeros).sum() / n_tok,
            # k3 estimator of KL(π_old || π) over the sampled tokens
            "kl_old": torch.where(m, (r - 1.0) - log_ratio.detach(), zeros).sum() / n_tok,
        }
        if cfg.ratio_clip_c is not None:
            metrics["dual_clip_fraction"] = dual.sum() / n_tok
    return loss, metrics


def cross_entropy_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, *, global_valid_tokens: Number
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood of the sampled tokens: -Σ_valid log π(y_t) / global_valid_tokens.

    Summed in at least float32 (an fp16 sum over a batch's tokens overflows).
    """
    m = check_logprob_inputs(mask, ("logprobs", logprobs))
    lp = logprobs.to(_compute_dtype(logprobs))
    nll = torch.where(m, -lp, torch.zeros_like(lp))
    loss = nll.sum() / _denominator(global_valid_tokens, "global_valid_tokens", int(m.sum()))
    return loss, {"loss": loss.detach()}


# -- the per-token gradient, for callers that fuse it into the log-prob computation ----------------------
# A loss of the form L = Σ_t w_t · l(log π_t) has dL/d log π_t = w_t · l'(log π_t): known token by token
# as soon as log π_t is, without the other tokens. That holds for the cross-entropy and for the clipped
# surrogate with a token ratio, under either aggregation (w_t = 1 / G_tok, or 1 / (n_i · G_seq)); it does
# not hold for GSPO's sequence ratio, whose gradient needs every token of the sequence.


def token_loss_weights(
    objective: str,
    mask: torch.Tensor,
    aggregation: str,
    coef: float,
    *,
    global_valid_tokens: Number,
    global_valid_seqs: Number = 0,
) -> torch.Tensor:
    """w_t [B, S] float32 such that coef · loss = Σ_t w_t · l_t, 0 where ``mask`` is 0 (no host sync).

    ``objective`` ``"ce"`` (:func:`cross_entropy_loss`, always a token mean) or ``"policy"``
    (:func:`clipped_policy_loss` with ``aggregation``). The denominators are the same global counts.
    """
    m = mask.bool()
    coef_t = torch.tensor(float(coef), dtype=torch.float32, device=mask.device)
    if objective == "ce" or aggregation == "token_mean":
        scale = coef_t / _as_tensor(global_valid_tokens, mask.device)
        return torch.where(m, scale, torch.zeros((), device=mask.device))
    n = m.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)  # [B, 1]
    scale = coef_t / _as_tensor(global_valid_seqs, mask.device) / n  # [B, 1]
    return torch.where(m, scale.expand_as(m), torch.zeros((), device=mask.device))


def _as_tensor(count: Number, device) -> torch.Tensor:
    """A global count as a float32 scalar on ``device``; 0 (an empty global batch) becomes 1 as in the losses."""
    value = torch.as_tensor(count, dtype=torch.float32, device=device).reshape(())
    return torch.where(value > 0, value, torch.ones_like(value))


def token_loss_grad(
    objective: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor | None,
    weights: torch.Tensor,
    cfg: PolicyLossConfig | None = None,
) -> torch.Tensor:
    """w_t · dl_t / d log π_t, elementwise (any shape), float32: the gradient the loss sends each log-prob.

    ``objective`` ``"ce"``: l = -log π. ``"policy"``: the clipped surrogate l_t of
    :func:`clipped_policy_loss` with the token ratio r_t = exp(log π_t - log π_old,t), differentiated by
    autograd through the same elementwise function, so ties between the clipped and unclipped branch and
    the ±``MAX_LOG_RATIO`` clamp get the gradient the loss gets. ``weights`` from
    :func:`token_loss_weights`; tokens with weight 0 get 0 whatever their inputs. No host sync; no
    validation (the loss itself validates the same inputs).
    """
    active = weights != 0
    if objective == "ce":
        return torch.where(active, -weights, torch.zeros_like(weights)).to(torch.float32)
    if objective != "policy" or cfg is None or cfg.importance_ratio != "token":
        raise ValueError(
            "token_loss_grad needs objective 'ce' or 'policy' with a token ratio (GSPO's sequence ratio "
            "couples the tokens of a sequence)"
        )
    dtype = _compute_dtype(logprobs, old_logprobs)
    zeros = torch.zeros(weights.shape, dtype=dtype, device=weights.device)
    lp = logprobs.detach().to(dtype).requires_grad_(True)
    with torch.enable_grad():
        log_ratio = torch.where(active, lp - old_logprobs.detach().to(dtype), zeros)
        adv = torch.where(active, advantages.to(dtype), zeros)
        _, per_token, _ = _surrogate(log_ratio, adv, cfg)
        (grad,) = torch.autograd.grad(per_token, lp, grad_outputs=weights.to(dtype))
    return grad.to(torch.float32)
