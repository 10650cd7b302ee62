"""Can the OCC proxies be trusted on this run? Metrics that answer it from the exact probes.

OCC sets λ_k = λ+ · ĉ_k / (v̂²_k + ε) from log-prob proxies of c_k = <g_RL, g_MTP,k> and
v²_k = ||g_MTP,k||² (Eq. 11-13 of the OCC paper). Every ``fidelity.every`` RL steps one optimizer update
is probed (``nemo_occ.core.diagnostics``): its exact statistics same-sample, cross-fitted and in Adam's
preconditioned metric. :class:`ProbeHistory` keeps, per probe and depth, the update's per-token proxies
ĉ/n and v̂²/n next to them. Per-token proxies are the ones compared: the exact statistics are gradients
of token-mean losses, while the summed proxies also grow with the update's token count.

What ĉ is, to first order: δ_RL,t ≈ u_t·Δθ and δ_MTP,t ≈ w_t·Δθ (u_t, w_t the two heads' per-token
log-prob gradients, Δθ the steps taken since θ_old, Adam's preconditioning included), so
ĉ ≈ Σ_t (u_t·Δθ)(w_t·Δθ): how the heads co-move along the update, not <g_RL, g_MTP>. Whether it
ranks and signs like the alignment it stands in for is an empirical question, which the verdict
answers per run.

The verdict, ``trusted_k`` (:func:`trust_verdict`), against the cross-fitted statistics c_x, v²_x in
``fidelity.metric`` (Euclidean or preconditioned). It is **1 when all of these hold, 0 otherwise**
(including too few probes to tell):

1. at least ``min_windows`` complete windows of ``window`` consecutive probes;
2. rank agreement: the mean over windows of Spearman's ρ(ĉ/n, c_x) computed *within* each window has a
   95% interval above 0, and so has the same for ρ(v̂²/n, v²_x);
3. sign agreement: ĉ's sign agrees with c_x's more often than the base rate (the agreement independent
   series with the same sign frequencies would have), with a 95% interval of the excess above 0; when
   c_x has one sign in every probe that share cannot exceed its base rate, and the rule is instead that
   ĉ has that sign in every probe.

Why each part. The same-sample c contains each sequence's covariance with itself, which ĉ can track
while the expected alignment is zero (the study: cosine 0.109 on the same tokens, 0.027 across
halves): the verdict reads only cross-fitted statistics. Pooled over training, ρ mixes each
checkpoint's agreement with both series' drift (Simpson's paradox: the study's pooled ρ(ĉ, c) was
negative while ρ within a checkpoint was ≈ 0): ρ is computed within windows short enough not to drift.
Successive probes of one run are not independent: the interval is a percentile bootstrap that
resamples whole windows (blocks of consecutive probes; :func:`block_bootstrap`), never single probes,
so it is as wide as the number of windows warrants. λ takes ĉ's sign, so a proxy that ranks well but
is shifted to one sign (the study's ``ce`` runs: ĉ > 0 where the exact cosine was −0.09 to −0.32)
must fail: agreement is judged against its base rate. The rule asks nothing of λ's scale (λ+ absorbs
it). Spearman's ρ is ``scipy.stats.spearmanr``; the bootstrap is numpy with a fixed seed, so the
verdict is a deterministic function of the history.

Also reported per probe: both proxies (summed and per token), the four exact statistics
(``nemo_occ.core.diagnostics.ExactStatistics.metrics``) and ``update_share_k`` = |λ_k|·||g_MTP,k|| /
||g_RL|| (same-sample: the minibatch's own gradients): how far the MTP term can move the main model's
update relative to the RL gradient.

:class:`HeadGap` measures a separate question, every update: with ``old_logprobs: main`` (the
reference code's reading) δ_MTP = log π_θ(MTP) − log π_old(main) contains the static gap between the
MTP head's and the main head's log-probs of the same token. It reports v̂² under both readings of
δ_MTP (against the main head's old log-prob and against the MTP head's own) and the share of the
first that the static gap alone accounts for, Σ (log π_old(MTP) − log π_old(main))² / v̂²(main). On the
study's runs it was about 99%: under ``old_logprobs: main`` v̂² measures the head gap, not the heads'
change.

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from nemo_occ.core.diagnostics import ExactStatistics
from nemo_occ.core.distributed import all_reduce_sum_, collective_device
from nemo_occ.core.losses import check_logprob_inputs
from nemo_occ.core.metrics import UpdateStatistics

__all__ = [
    "HeadGap",
    "ProbeHistory",
    "Verdict",
    "block_bootstrap",
    "probed_update",
    "refresh_lambda_from_probe",
    "sign_agreement",
    "spearman_interval",
    "trust_verdict",
    "windows_of",
]

_Z95 = 1.959963984540054  # two-sided 95% normal quantile


def probed_update(num_updates: int) -> int:
    """Which optimizer update of a probed RL step is probed: the second, or the only one.

    The step's first update runs at θ = θ_old, where δ_RL ≡ 0 and so ĉ = 0 whatever c is: probing it
    would pair every exact c with a zero proxy.
    """
    if num_updates < 1:
        raise ValueError(f"a step has at least one update, got {num_updates}")
    return min(1, num_updates - 1)


def spearman_interval(
    x: Sequence[float], y: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """(ρ, low, high): Spearman's ρ (``scipy.stats.spearmanr``) with a Fisher-z interval.

    z = atanh(ρ) is taken as normal with standard error sqrt((1 + ρ²/2) / (n − 3)), the variance that
    Bonett & Wright (2000, Psychometrika 65:23) give for Spearman's ρ; the interval is
    tanh(z ± q·se), q the two-sided normal quantile of ``confidence``. None when n < 4 or either
    series is constant (ρ is then undefined).
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 4 or np.ptp(np.asarray(x, dtype=float)) == 0 or np.ptp(np.asarray(y, dtype=float)) == 0:
        return None
    from scipy.stats import norm, spearmanr

    rho = float(spearmanr(x, y).statistic)
    if not math.isfinite(rho):
        return None
    q = _Z95 if confidence == 0.95 else float(norm.ppf(0.5 + confidence / 2))
    se = math.sqrt((1.0 + rho * rho / 2.0) / (n - 3))
    z = math.atanh(max(-1.0 + 1e-15, min(1.0 - 1e-15, rho)))  # ρ = ±1 gives an interval of width ~0
    return rho, math.tanh(z - q * se), math.tanh(z + q * se)


def sign_agreement(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """(agreement, base rate): the share of pairs with sign(x) = sign(y), and the share that
    independent series with the same sign frequencies would give, Σ_s P(sign x = s)·P(sign y = s).
    None for empty series."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if not len(x):
        return None
    sx, sy = np.sign(np.asarray(x, dtype=float)), np.sign(np.asarray(y, dtype=float))
    agreement = float(np.mean(sx == sy))
    base = float(sum(np.mean(sx == s) * np.mean(sy == s) for s in (-1.0, 0.0, 1.0)))
    return agreement, base


@dataclass(frozen=True)
class Verdict:
    """The trust verdict of one depth and its parts (module docstring); None where undefined yet."""

    trusted: bool
    windows: int
    rho_c: tuple[float, float, float] | None  # mean within-window ρ(ĉ, c_x), 95% low, high
    rho_v2: tuple[float, float, float] | None
    sign_agreement: float | None
    sign_base_rate: float | None
    sign_excess_low: float | None  # lower 95% bound of agreement − base rate
    sign_ok: bool = False  # part 3 of the rule


def windows_of(n: int, window: int) -> list[slice]:
    """Consecutive non-overlapping windows of ``window`` probes (a trailing partial one is left out)."""
    return [slice(i, i + window) for i in range(0, n - window + 1, window)]


def block_bootstrap(
    blocks: np.ndarray, statistic, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of ``statistic(blocks[idx])`` over resamples of whole blocks with replacement.

    ``blocks``: [W, ...] one row per block (the independent unit); ``statistic`` maps a [R, W, ...]
    array of resampled blocks to [R] values. Deterministic (numpy generator seeded with ``seed``).
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(blocks), size=(resamples, len(blocks)))
    values = statistic(blocks[idx])
    q = (1 - confidence) / 2
    low, high = np.quantile(values, [q, 1 - q])
    return float(low), float(high)


def _window_rhos(x: np.ndarray, y: np.ndarray, windows: list[slice]) -> np.ndarray:
    """Spearman ρ(x, y) within each window; NaN where a window's series is constant."""
    from scipy.stats import spearmanr

    out = []
    for w in windows:
        a, b = x[w], y[w]
        out.append(float(spearmanr(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else math.nan)
    return np.array(out)


def _rank_agreement(x, y, windows, confidence) -> tuple[float, float, float] | None:
    rhos = _window_rhos(np.asarray(x, float), np.asarray(y, float), windows)
    rhos = rhos[np.isfinite(rhos)]
    if len(rhos) < 2:
        return None
    low, high = block_bootstrap(rhos, lambda r: r.mean(axis=1), confidence=confidence)
    return float(rhos.mean()), low, high


def _sign_counts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[agree, n, x<0, x=0, x>0, y<0, y=0, y>0] of one window's probes."""
    sx, sy = np.sign(x), np.sign(y)
    return np.array(
        [
            np.sum(sx == sy),
            len(x),
            *(np.sum(sx == s) for s in (-1, 0, 1)),
            *(np.sum(sy == s) for s in (-1, 0, 1)),
        ],
        dtype=float,
    )


def _sign_excess(counts: np.ndarray) -> np.ndarray:
    """agreement − base rate of pooled counts [..., 8] -> [...]."""
    n = counts[..., 1]
    base = sum(counts[..., 2 + i] * counts[..., 5 + i] for i in range(3)) / n**2
    return counts[..., 0] / n - base


def trust_verdict(
    c_hat: Sequence[float],
    c: Sequence[float],
    v2_hat: Sequence[float],
    v2: Sequence[float],
    *,
    window: int,
    min_windows: int,
    confidence: float = 0.95,
) -> Verdict:
    """The verdict of the module docstring for one depth's probe history (oldest first).

    ``c``, ``v2``: the cross-fitted exact statistics (pass anything else only to study the rule).
    """
    n = len(c_hat)
    if not (len(c) == len(v2_hat) == len(v2) == n):
        raise ValueError("the four series of a probe history must have the same length")
    if window < 4 or min_windows < 2:
        raise ValueError(f"window must be >= 4 and min_windows >= 2, got {window}, {min_windows}")
    windows = windows_of(n, window)
    x, y = np.asarray(c_hat, float), np.asarray(c, float)
    rho_c = _rank_agreement(x, y, windows, confidence) if windows else None
    rho_v2 = _rank_agreement(v2_hat, v2, windows, confidence) if windows else None
    agreement = base = excess_low = None
    sign_ok = False
    if n:
        agreement, base = sign_agreement(x, y)
        if windows:
            counts = np.stack([_sign_counts(x[w], y[w]) for w in windows])  # [W, 8]
            excess_low = block_bootstrap(
                counts, lambda r: _sign_excess(r.sum(axis=1)), confidence=confidence
            )[0]
            constant = len(set(np.sign(y[: windows[-1].stop]).tolist())) == 1
            sign_ok = agreement == 1.0 if constant else excess_low > 0
    trusted = (
        len(windows) >= min_windows
        and rho_c is not None
        and rho_v2 is not None
        and rho_c[1] > 0
        and rho_v2[1] > 0
        and sign_ok
    )
    return Verdict(bool(trusted), len(windows), rho_c, rho_v2, agreement, base, excess_low, bool(sign_ok))


# columns of a probe record, per depth
_COLUMNS = ("c_hat", "v2_hat", "c_same", "v2_same", "c_x", "v2_x", "c_x_precond", "v2_x_precond")


class ProbeHistory:
    """The probes so far and the trust metrics over them (module docstring); checkpointed with the run.

    ``record`` adds one probe (call it after the probed update's ``close_update``, with that update's
    proxies, the λ it applied and its exact statistics) and returns the probe's metrics together with
    the running ones. The history is identical on every rank when the inputs are (they are reduced).
    """

    def __init__(
        self,
        num_depths: int,
        *,
        window: int = 6,
        min_windows: int = 3,
        metric: Literal["euclidean", "preconditioned"] = "euclidean",
    ):
        if num_depths < 1:
            raise ValueError(f"num_depths must be >= 1, got {num_depths}")
        if window < 4 or min_windows < 2:
            raise ValueError(f"window must be >= 4 and min_windows >= 2, got {window}, {min_windows}")
        if metric not in ("euclidean", "preconditioned"):
            raise ValueError(f"metric must be 'euclidean' or 'preconditioned', got {metric!r}")
        self.num_depths = num_depths
        self.window, self.min_windows, self.metric = window, min_windows, metric
        # per probe: per depth the _COLUMNS (preconditioned None when there was no optimizer state yet)
        self.records: list[list[list[float | None]]] = []

    @classmethod
    def from_config(cls, num_depths: int, cfg) -> ProbeHistory:
        """From a :class:`nemo_occ.core.config.FidelityConfig`."""
        return cls(num_depths, window=cfg.window, min_windows=cfg.min_windows, metric=cfg.metric)

    def record(
        self,
        *,
        c_hat: Sequence[float],
        v2_hat: Sequence[float],
        tokens: Sequence[float],
        lambdas: Sequence[float],
        exact: ExactStatistics,
        prefix: str = "fidelity",
    ) -> dict[str, float]:
        """Add one probe; returns ``{prefix}/...`` metrics of this probe and of all probes so far.

        ``c_hat``, ``v2_hat``: the update's summed proxies per depth; ``tokens``: its valid tokens per
        depth; ``lambdas``: the λ it applied. A probe whose update had a depth without valid tokens is
        not recorded (warning): its per-token proxies do not exist.
        """
        K = self.num_depths
        for name, seq in (("c_hat", c_hat), ("v2_hat", v2_hat), ("tokens", tokens), ("lambdas", lambdas)):
            if len(seq) != K:
                raise ValueError(f"{name} has {len(seq)} entries but there are {K} MTP depth(s)")
            if not all(math.isfinite(float(v)) for v in seq):
                raise ValueError(f"{name} has a NaN/Inf entry: {list(seq)}")
        if not isinstance(exact, ExactStatistics):
            raise TypeError(
                f"exact must be ExactStatistics (cross_fitted_statistics), got {type(exact).__name__}"
            )
        if len(exact.same_sample.c) != K:
            raise ValueError(
                f"the exact statistics have {len(exact.same_sample.c)} depth(s) but there are {K}"
            )
        if any(float(n) <= 0 for n in tokens):
            warnings.warn(
                "a probed update had an MTP depth without valid tokens: probe not recorded", stacklevel=2
            )
            return {}
        same, cross, pre = exact.same_sample, exact.cross_fit, exact.cross_fit_precond
        row = [[float(c_hat[k]) / float(tokens[k]), float(v2_hat[k]) / float(tokens[k]), same.c[k], same.v2[k],
                cross.c[k], cross.v2[k], pre.c[k] if pre else None, pre.v2[k] if pre else None]
               for k in range(K)]  # fmt: skip
        self.records.append(row)
        out = exact.metrics(prefix)
        for k in range(K):
            d = k + 1
            out[f"{prefix}/c_hat_{d}"] = float(c_hat[k])
            out[f"{prefix}/v2_hat_{d}"] = float(v2_hat[k])
            out[f"{prefix}/c_hat_per_token_{d}"] = row[k][0]
            out[f"{prefix}/v2_hat_per_token_{d}"] = row[k][1]
            if same.rl_norm2 > 0:
                out[f"{prefix}/update_share_{d}"] = abs(float(lambdas[k])) * math.sqrt(
                    same.v2[k] / same.rl_norm2
                )
        out.update(self.metrics(prefix))
        return out

    def record_update(self, update: UpdateStatistics, exact: ExactStatistics) -> dict[str, float]:
        """:meth:`record` with the proxies of the probed update as ``MTPObjective.close_update`` returned them."""
        return self.record(
            c_hat=[s.c_hat for s in update.depths],
            v2_hat=[s.v2_hat for s in update.depths],
            tokens=[s.tokens for s in update.depths],
            lambdas=[s.lambda_applied for s in update.depths],
            exact=exact,
        )

    def verdicts(self) -> list[Verdict]:
        """Per depth, :func:`trust_verdict` over the probes in ``metric`` (probes without it left out)."""
        cols = (4, 5) if self.metric == "euclidean" else (6, 7)
        out = []
        for k in range(self.num_depths):
            rows = [r[k] for r in self.records if r[k][cols[0]] is not None]
            out.append(
                trust_verdict(
                    [r[0] for r in rows],
                    [r[cols[0]] for r in rows],
                    [r[1] for r in rows],
                    [r[cols[1]] for r in rows],
                    window=self.window,
                    min_windows=self.min_windows,
                )  # fmt: skip
            )
        return out

    def metrics(self, prefix: str = "fidelity") -> dict[str, float]:
        """Running metrics over all probes so far; a statistic that is undefined yet is left out."""
        out: dict[str, float] = {f"{prefix}/probes": float(len(self.records))}
        for d, v in enumerate(self.verdicts(), start=1):
            out[f"{prefix}/windows_{d}"] = float(v.windows)
            for name, rho in (("c", v.rho_c), ("v2", v.rho_v2)):
                if rho is not None:
                    out[f"{prefix}/spearman_{name}_{d}"] = rho[0]
                    out[f"{prefix}/spearman_{name}_low_{d}"] = rho[1]
                    out[f"{prefix}/spearman_{name}_high_{d}"] = rho[2]
            if v.sign_agreement is not None:
                out[f"{prefix}/sign_agreement_c_{d}"] = v.sign_agreement
                out[f"{prefix}/sign_base_rate_c_{d}"] = v.sign_base_rate
            if v.sign_excess_low is not None:
                out[f"{prefix}/sign_excess_low_c_{d}"] = v.sign_excess_low
            out[f"{prefix}/trusted_{d}"] = float(v.trusted)
        return out

    def latest(self, metric: str | None = None) -> list[tuple[float, float]] | None:
        """Per depth (c_x, v²_x) of the last probe in ``metric`` (default: the history's), or None when there
        is none or it lacks that metric: what ``occ.estimator: probed`` sets λ from."""
        if not self.records:
            return None
        cols = (4, 5) if (metric or self.metric) == "euclidean" else (6, 7)
        row = self.records[-1]
        if row[0][cols[0]] is None:
            return None
        return [(r[cols[0]], r[cols[1]]) for r in row]

    def state_dict(self) -> dict:
        """The probes recorded so far, as lists (for the OCC checkpoint; :meth:`load_state_dict` reads it)."""
        return {
            "num_depths": self.num_depths,
            "columns": list(_COLUMNS),
            "records": [[list(r) for r in rec] for rec in self.records],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; checked before anything is replaced.

        A history saved before the cross-fitted statistics existed (4 columns per depth, the same-sample
        c only) cannot feed the verdict: it is dropped with a warning and the verdict starts over.
        """
        if "records" not in state or "num_depths" not in state:
            raise ValueError("not a ProbeHistory state: it needs 'num_depths' and 'records'")
        if int(state["num_depths"]) != self.num_depths:
            raise ValueError(
                f"the checkpoint's probe history has {state['num_depths']} MTP depth(s) but this run has "
                f"{self.num_depths}; set nemo_occ.num_depths to match the checkpoint"
            )
        if "columns" not in state and state["records"]:
            warnings.warn(
                f"the checkpoint's {len(state['records'])} probe(s) predate the cross-fitted statistics; the trust "
                "verdict starts over from the next probe",
                stacklevel=2,
            )
            self.records = []
            return
        records = [[[None if v is None else float(v) for v in r] for r in rec] for rec in state["records"]]
        width = len(_COLUMNS)
        for rec in records:
            if len(rec) != self.num_depths or any(
                len(r) != width
                or any(v is None for v in r[:6])
                or not all(v is None or math.isfinite(v) for v in r)
                or (r[6] is None) != (r[7] is None)
                for r in rec
            ):
                raise ValueError("the checkpoint's probe history is malformed (corrupt or from another run)")
        self.records = records


def refresh_lambda_from_probe(calibrator, exact: ExactStatistics, metric: str) -> bool:
    """``occ.estimator: probed``: set the calibrator's λ from this probe's cross-fitted statistics in
    ``metric`` (:meth:`nemo_occ.core.calibration.OCCCalibrator.refresh_from_probe`). Returns whether λ
    was set; without the metric (no optimizer state for ``preconditioned``) λ is kept, with a warning."""
    stats = exact.cross_fit_in(metric)
    if stats is None:
        warnings.warn(f"no {metric} statistics at this probe ({exact.precond_note}): λ is kept", stacklevel=2)
        return False
    calibrator.refresh_from_probe(stats.c, stats.v2)
    return True


class HeadGap:
    """v̂² under both readings of δ_MTP and the static head gap's share (module docstring), per update.

    Per depth it sums, over valid tokens, [(lp − old_main)², (lp − old_mtp)², (old_mtp − old_main)², 1],
    lp the MTP head's current log-prob; :meth:`finish` reduces over the data-parallel group; the
    update's :class:`nemo_occ.core.metrics.DepthStatistics` carry the sums into the metrics.
    """

    def __init__(self, num_depths: int):
        self.num_depths = num_depths
        self._sums = torch.zeros(num_depths, 4, dtype=torch.float64)

    def statistics(
        self,
        mtp_logprobs: Sequence[torch.Tensor],  # K x [B, S]
        old_logprobs: torch.Tensor,  # [B, S] the main head's
        mtp_old_logprobs: Sequence[torch.Tensor],  # K x [B, S] each MTP head's own
        masks: Sequence[torch.Tensor],  # K x [B, S] valid for the depth
    ) -> torch.Tensor:
        """[K, 4] sums of one micro-batch (not accumulated; raises before any state moves)."""
        rows = []
        for lp, old_mtp, mask in zip(mtp_logprobs, mtp_old_logprobs, masks, strict=True):
            m = check_logprob_inputs(
                mask, ("mtp_logprobs", lp), ("old_logprobs", old_logprobs), ("mtp_old_logprobs", old_mtp)
            )
            with torch.no_grad():
                f64 = torch.float64
                cur, main, own = (t.detach().to(f64)[m] for t in (lp, old_logprobs, old_mtp))
                rows.append(
                    torch.stack(
                        [((cur - main) ** 2).sum(), ((cur - own) ** 2).sum(), ((own - main) ** 2).sum(),
                         torch.tensor(float(cur.numel()), dtype=f64, device=cur.device)]
                    ).cpu()
                )  # fmt: skip
        return torch.stack(rows)

    def add(self, stats: torch.Tensor) -> None:
        """Add one micro-batch's [K, 4] sums (:meth:`statistics`) to the open update's."""
        self._sums += stats

    def discard(self) -> None:
        """Drop the sums of an update that will not be finished (local; no collective)."""
        self._sums.zero_()

    def finish(self, group=None) -> list[tuple[float, float, float]]:
        """Reduce over ``group`` (a collective when distributed), reset, and return per depth the update's
        (v̂² vs the main head's old log-prob, v̂² vs the MTP head's own, static gap) sums."""
        sums = self._sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = all_reduce_sum_(sums.to(collective_device(group)), group).cpu()
        self._sums.zero_()
        return [(vs_main, vs_own, gap) for vs_main, vs_own, gap, _ in sums.tolist()]
