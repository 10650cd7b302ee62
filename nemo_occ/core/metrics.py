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
relative: NeMo-RL logs them under ``train/mtp/`` (docs/nemo_rl.md, section 4), and so does the CPU demo
(:func:`logged_name`).

How each metric reduces is one rule, :func:`metric_rule` (a :class:`MetricRule` per relative key), read by
every path: the NeMo-RL loss names each summable metric's global denominator from it
(``OCCLossFn.metric_normalizations``), :func:`step_metrics` reduces the updates by it, and the CPU demo
reduces its per-update rows by it. NeMo-RL's contract for a loss's metrics: each micro-batch's value is
already divided by a global denominator and the values are summed downstream (keys ending ``_min`` /
``_max`` excepted, which are reduced by min / max).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Denominator",
    "DepthStatistics",
    "MetricRule",
    "Reduce",
    "UpdateStatistics",
    "acceptance_counts",
    "logged_name",
    "loss_metric_names",
    "metric_prefix",
    "metric_rule",
    "reduce_values",
    "step_metrics",
]


class Reduce(enum.Enum):
    """How a metric's values over one RL step (its micro-batches and optimizer updates) become one value."""

    SUM = "sum"  # a loss's micro-batch value pre-divided by its update's global denominator: Σ over the
    # update's micro-batches is the update's batch mean, and the step logs the mean of its updates' means
    MEAN = "mean"  # mean over the step's applied updates (a skipped update's statistics were discarded)
    SHARE = "share"  # a 0/1 flag per update: mean over all the step's updates
    LAST = "last"  # the step's last update
    RATIO = "ratio"  # Σ numerators / Σ denominators over the step (draft acceptance: hits / tokens)
    MIN = "min"  # smallest value (NeMo-RL reduces keys ending _min so and does not sum them)
    MAX = "max"  # largest value (keys ending _max)


class Denominator(enum.Enum):
    """The global count a ``Reduce.SUM`` metric is divided by; the values are NeMo-RL's ``MetricNormalizer``'s."""

    TOKENS = "tokens"  # global_valid_toks
    SEQUENCES = "sequences"  # global_valid_seqs
    NONE = "none"  # not divided by a global count


@dataclass(frozen=True)
class MetricRule:
    """How one metric reduces over a step, and for a summed loss metric the denominator it carries."""

    reduce: Reduce
    denominator: Denominator = Denominator.NONE


_DEPTH = re.compile(r"_\d+$")


def metric_rule(key: str, *, loss_per_sequence: bool = False) -> MetricRule:
    """The one reduction rule for a relative metric key (``mtp/loss_1``, ``occ/lambda_1``, ``accuracy_1``, ...).

    - ``mtp/*`` (the loss's per-micro-batch metrics): ``Reduce.SUM``, divided by the global valid tokens,
      except ``mtp/loss_<d>`` and ``mtp/loss_scaled``, divided by the global valid sequences when the MTP
      term is a sequence-level policy loss (``loss_per_sequence``);
    - ``occ/*``, ``proxy/*`` (the calibrator's per-update statistics): λ_d ``Reduce.LAST``, the
      ``refreshed`` / ``skipped`` flags ``Reduce.SHARE``, the rest ``Reduce.MEAN``;
    - ``accuracy_<d>``: ``Reduce.RATIO`` (Σ hits / Σ tokens, :func:`acceptance_counts`);
    - ``fidelity/*`` (the probe's running statistics): ``Reduce.LAST``;
    - keys ending ``_min`` / ``_max``: ``Reduce.MIN`` / ``Reduce.MAX``; any other key (a caller's own
      per-update metric): ``Reduce.MEAN``.
    """
    base = _DEPTH.sub("", key)
    if base.endswith("_min"):
        return MetricRule(Reduce.MIN)
    if base.endswith("_max"):
        return MetricRule(Reduce.MAX)
    if base.startswith("mtp/"):
        per_seq = loss_per_sequence and base in ("mtp/loss", "mtp/loss_scaled")
        return MetricRule(Reduce.SUM, Denominator.SEQUENCES if per_seq else Denominator.TOKENS)
    if base.startswith(("occ/", "proxy/")):
        name = base.partition("/")[2]
        if name == "lambda":
            return MetricRule(Reduce.LAST)
        return MetricRule(Reduce.SHARE if name in ("refreshed", "skipped") else Reduce.MEAN)
    if base == "accuracy":
        return MetricRule(Reduce.RATIO)
    if base.startswith("fidelity/"):
        return MetricRule(Reduce.LAST)
    return MetricRule(Reduce.MEAN)


def logged_name(key: str) -> str:
    """The name a relative metric key is logged under, on every path: NeMo-RL's ``grpo_train`` logs a loss
    metric ``k`` (``mtp/*``) as ``train/k`` and the worker's ``mtp_metrics`` (``occ/*``, ``proxy/*``,
    ``accuracy_<d>``, ``fidelity/*``) as ``train/mtp/k``; the CPU demo names its rows the same way. Any
    other key (a caller's own metric, e.g. the demo's ``reward/mean``) is returned as it is."""
    if key.startswith("mtp/"):
        return f"train/{key}"
    if key.startswith(("occ/", "proxy/", "fidelity/")) or re.fullmatch(r"accuracy_\d+", key):
        return f"train/mtp/{key}"
    return key


def loss_metric_names(num_depths: int) -> list[str]:
    """The summable metrics a loss with an MTP term reports per micro-batch: ``mtp/loss_scaled`` and per
    depth ``mtp/loss_<d>``, ``mtp/clip_fraction_<d>`` (policy-loss regimes), ``mtp/valid_fraction_<d>``."""
    names = ["mtp/loss_scaled"]
    for d in range(1, num_depths + 1):
        names += [f"mtp/loss_{d}", f"mtp/clip_fraction_{d}", f"mtp/valid_fraction_{d}"]
    return names


def reduce_values(values: Sequence[float], rule: MetricRule) -> float:
    """One step's value of a metric from its values in order (per update, or per micro-batch for SUM)."""
    if not values:
        raise ValueError("no values to reduce")
    if rule.reduce in (Reduce.SUM, Reduce.MEAN, Reduce.SHARE):
        # SUM: per-update values are each update's micro-batch sums, so the step's value is their mean
        return sum(values) / len(values)
    if rule.reduce is Reduce.LAST:
        return values[-1]
    if rule.reduce is Reduce.MIN:
        return min(values)
    if rule.reduce is Reduce.MAX:
        return max(values)
    raise ValueError(f"{rule.reduce.value} needs numerators and denominators, not values")


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
        """Namespace of its metrics (:func:`metric_prefix`)."""
        return metric_prefix(self.calibrated)


def metric_prefix(calibrated: bool) -> str:
    """Namespace of the OCC statistics' metrics: ``occ`` when they set λ, ``proxy`` when they only monitor
    a fixed λ (``RegimeSpec.calibrated``)."""
    return "occ" if calibrated else "proxy"


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
        for k in range(len(updates[-1].depths)):
            d = k + 1
            key = f"{pre}/lambda_{d}"
            out[key] = reduce_values([u.depths[k].lambda_next for u in updates], metric_rule(key))
            per_update = [_depth_metrics(u.depths[k]) for u in applied]
            for name in dict.fromkeys(name for m in per_update for name in m):  # in order, each once
                key = f"{pre}/{name}_{d}"  # Reduce.MEAN: over the applied updates only
                out[key] = reduce_values([m[name] for m in per_update if name in m], metric_rule(key))
        for flag in ("refreshed", "skipped"):
            key = f"{pre}/{flag}"
            out[key] = reduce_values([float(getattr(u, flag)) for u in updates], metric_rule(key))
    if acceptance is not None:  # Reduce.RATIO
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
