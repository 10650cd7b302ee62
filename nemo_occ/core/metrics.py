"""The metrics contract: what one optimizer update reports, and how a step's updates become logged metrics.

Every path that trains with an :class:`nemo_occ.core.objective.MTPObjective` (the NeMo-RL worker and
the CPU demo) closes each optimizer update with ``MTPObjective.close_update`` and gets an
:class:`UpdateStatistics`: per MTP depth d the OCC proxies of Eq. 12 of the OCC paper over the update's
valid tokens, ĉ_d = Σ δ_RL·δ_MTP,d and v̂²_d = Σ δ_MTP,d², their token count n_d, the λ_d the update's
MTP loss was scaled by and the λ_d in effect after it. At the end of an RL step :func:`step_metrics`
reduces the step's updates (and the step's draft-acceptance counts, :func:`acceptance_counts`) into the
logged metrics, so a name means the same quantity, reduced the same way, on every path:

Keys per MTP depth d, and how a step's updates combine (applied: not skipped by the optimizer):

- ``<p>/lambda_<d>``: λ_d after the step's last update, which the next update uses. **Last update.**
- ``<p>/lambda_applied_<d>``: λ_d the update's MTP loss was scaled by. Mean over applied updates.
- ``<p>/c_hat_<d>``, ``<p>/v2_hat_<d>``: ĉ_d, v̂²_d (Eq. 12); ``<p>/c_hat_mean_<d>``,
  ``<p>/v2_hat_mean_<d>``: the same per valid token (0 without tokens); ``<p>/first_order_<d>`` =
  λ_applied·ĉ_d and ``<p>/second_order_<d>`` = ½·λ_applied²·v̂²_d, Eq. 10's gain and cost with unit
  prefactors; ``<p>/valid_tokens_<d>`` = n_d; ``<p>/no_valid_tokens_<d>`` = 1 when n_d = 0; when the
  head gap is measured (``nemo_occ.core.fidelity.HeadGap``) ``<p>/v2_hat_vs_main_old_<d>``,
  ``<p>/v2_hat_vs_own_old_<d>`` and ``<p>/head_gap_share_<d>``. Each: mean over applied updates.
- ``<p>/refreshed``, ``<p>/skipped``: 1 for an update that set λ / that the optimizer skipped. Share
  of all updates.
- ``accuracy_<d>``: Σ hits / Σ tokens of :func:`acceptance_counts` over the step's training forwards
  (loss-masked tokens with a depth-d target; Megatron's ``mtp_<d>_acceptance_rate`` / 100).

``<p>`` is ``occ`` when λ is calibrated from these statistics (regime ``occ``) and ``proxy`` when the
proxies are only monitored (``detach``/``ce``/``policy`` with ``monitor_proxies``): there ``lambda_<d>``
is the λ OCC would pick and ``lambda_applied_<d>`` the fixed ``coef``. An applied update is one the
optimizer applied (``skipped`` False); a skipped update's statistics were discarded. The keys are
relative: NeMo-RL logs them under ``train/mtp/`` (docs/nemo_rl.md, section 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["DepthStatistics", "UpdateStatistics", "acceptance_counts", "step_metrics"]


@dataclass(frozen=True)
class DepthStatistics:
    """One MTP depth's OCC statistics of one closed optimizer update (module docstring).

    ``c_hat``, ``v2_hat``, ``tokens`` are sums over the update's valid tokens on every data-parallel
    rank; they are 0 for a skipped update. The three head-gap sums are set only when the MTP heads'
    own old log-probs were given (``nemo_occ.core.fidelity.HeadGap``).
    """

    c_hat: float  # ĉ = Σ δ_RL · δ_MTP (Eq. 12)
    v2_hat: float  # v̂² = Σ δ_MTP² (Eq. 12)
    tokens: float  # n, the valid tokens both sums cover
    lambda_applied: float  # λ the update's MTP loss was scaled by
    lambda_next: float  # λ in effect after the update: the next update's (lagged timing)
    v2_hat_vs_main_old: float | None = None  # Σ (log π_MTP − log π_old,main)²
    v2_hat_vs_own_old: float | None = None  # Σ (log π_MTP − log π_old,MTP)²
    static_gap: float | None = None  # Σ (log π_old,MTP − log π_old,main)²


@dataclass(frozen=True)
class UpdateStatistics:
    """What closing one optimizer update reports: its statistics per depth (depth 1 first), how it ended."""

    depths: tuple[DepthStatistics, ...]
    refreshed: bool  # it set a new λ (False at θ = θ_old, and when skipped)
    skipped: bool  # the optimizer did not apply it: its statistics were discarded, λ kept
    calibrated: bool = True  # λ comes from these statistics (regime occ); False: proxies only monitored

    @property
    def prefix(self) -> str:
        """Namespace of its metrics: ``occ``, or ``proxy`` when the statistics only monitor a fixed λ."""
        return "occ" if self.calibrated else "proxy"


def acceptance_counts(correct: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """[K, 2] float64 (arg-max hits, tokens) per depth: ``correct[k]`` and ``masks[k]`` are [B, S] bool,
    depth k+1's arg-max equals the sampled token, and the token is in the loss and has a depth-k+1 target.

    Summed over a step's training forwards (and the data-parallel ranks) they give ``accuracy_<d>`` in
    :func:`step_metrics`, Megatron's ``mtp_<d>_acceptance_rate`` / 100.
    """
    if len(correct) != len(masks):
        raise ValueError(
            f"got {len(correct)} arg-max tensors for {len(masks)} depth masks; pass one per depth"
        )
    rows = []
    for k, (hit, mask) in enumerate(zip(correct, masks, strict=True)):
        if hit.shape != mask.shape:
            raise ValueError(
                f"depth {k + 1}: arg-max hits {tuple(hit.shape)} and mask {tuple(mask.shape)} differ"
            )
        m = mask.bool()
        rows.append(torch.stack([(hit.bool() & m).sum(), m.sum()]).to(torch.float64))
    return torch.stack(rows)


def step_metrics(
    updates: Sequence[UpdateStatistics], acceptance: torch.Tensor | None = None
) -> dict[str, float]:
    """The logged metrics of one RL step from its updates, in order, and its [K, 2] acceptance counts.

    Each metric is reduced as the module docstring's table says; a metric no update reports is left
    out (the statistics when every update was skipped, the head gap when it was not measured).
    """
    out: dict[str, float] = {}
    if updates:
        pre = updates[-1].prefix
        applied = [u for u in updates if not u.skipped]
        for k, last in enumerate(updates[-1].depths):
            d = k + 1
            out[f"{pre}/lambda_{d}"] = last.lambda_next
            per_update = [_depth_metrics(u.depths[k]) for u in applied]
            for name in dict.fromkeys(name for m in per_update for name in m):  # in order, each once
                values = [m[name] for m in per_update if name in m]
                out[f"{pre}/{name}_{d}"] = sum(values) / len(values)
        out[f"{pre}/refreshed"] = sum(u.refreshed for u in updates) / len(updates)
        out[f"{pre}/skipped"] = sum(u.skipped for u in updates) / len(updates)
    if acceptance is not None:
        hits, tokens = acceptance.to(torch.float64).cpu().unbind(-1)
        accuracy = (hits / tokens.clamp(min=1)).tolist()  # Megatron's clamp: 0 when nothing was valid
        out.update({f"accuracy_{d}": value for d, value in enumerate(accuracy, start=1)})
    return out


def _depth_metrics(s: DepthStatistics) -> dict[str, float]:
    """One applied update's per-depth values, before the mean over the step."""
    n = s.tokens
    out = {
        "lambda_applied": s.lambda_applied,
        "c_hat": s.c_hat,
        "v2_hat": s.v2_hat,
        "c_hat_mean": s.c_hat / n if n > 0 else 0.0,
        "v2_hat_mean": s.v2_hat / n if n > 0 else 0.0,
        "first_order": s.lambda_applied * s.c_hat,
        "second_order": 0.5 * s.lambda_applied**2 * s.v2_hat,
        "valid_tokens": n,
        "no_valid_tokens": float(n <= 0),
    }
    if s.v2_hat_vs_main_old is not None:
        out["v2_hat_vs_main_old"] = s.v2_hat_vs_main_old
        out["v2_hat_vs_own_old"] = s.v2_hat_vs_own_old
        if s.v2_hat_vs_main_old > 0:
            out["head_gap_share"] = s.static_gap / s.v2_hat_vs_main_old
    return out
