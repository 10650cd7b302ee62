"""The study's statistics: every test, interval and power figure the report states.

The unit of replication is the seed. Every regime of a seed shares its warm start, data order and
sampling seeds, so a variant is compared with the paper's baseline ``detach`` *paired by seed*:

- test: the paired t-test on the per-seed differences, two-sided (``scipy.stats.ttest_rel``); a
  one-sample quantity (a fraction of steps, a mean correlation) gets ``scipy.stats.ttest_1samp`` over
  seeds;
- effect size: the mean difference with its 95% t interval over seeds (``TtestResult.confidence_interval``),
  and the standardized mean difference d_z = mean / sd of the differences with its 95% interval from
  the noncentral t distribution (``scipy.stats.nct``, inverted for its noncentrality with
  ``scipy.optimize.brentq``): t = d_z·√n is noncentral-t with n − 1 degrees of freedom;
- power: the minimal detectable effect (MDE), the d_z the two-sided test at level α detects with
  probability 0.8 (``nct`` power solved by ``brentq``); in outcome units it is d_z times the sd of the
  observed differences, so it is itself an estimate;
- multiplicity: Benjamini-Hochberg over every test the report makes (``scipy.stats.false_discovery_control``),
  the adjusted p beside the raw one. A claim counts as shown only on its adjusted p.

Correlations between a proxy and its exact statistic are computed *within* a cluster (one run's
checkpoint: one seed, one step), averaged over a seed's clusters, and summarised over seeds with a t
interval: the seeds are the independent unit, the minibatches of one checkpoint are not. The Spearman ρ
pooled over every point is kept as a labelled secondary: it mixes drift between checkpoints into the
minibatch-level tracking and its points are clustered, so it gets no interval.

Nothing here draws random numbers: the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "ALPHA",
    "CONFIDENCE",
    "POWER",
    "adjust_pvalues",
    "clustered_spearman",
    "dz_interval",
    "mde_dz",
    "one_sample",
    "paired",
    "per_seed",
    "seeds_needed",
]

ALPHA = 0.05  # two-sided level of every test, and the MDE's
POWER = 0.80  # the power at which the MDE is stated
CONFIDENCE = 0.95  # every interval
MULTIPLICITY = (
    "Benjamini-Hochberg (scipy.stats.false_discovery_control, method='bh') over every test in the report"
)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _float(x) -> float | None:
    return float(x) if _finite(x) else None


def mde_dz(n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest standardized effect d_z a two-sided one-sample (or paired) t-test of ``n`` units
    detects at level ``alpha`` with probability ``power``: the root in d of
    P(|T| > t_{1−α/2, n−1}) = power with T ~ noncentral t(n − 1, d·√n). None for n < 2."""
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    if n < 2:
        return None
    df, crit = n - 1, float(t.ppf(1 - alpha / 2, n - 1))

    def gap(d: float) -> float:
        ncp = d * math.sqrt(n)
        # the far tail is negligible where scipy returns NaN for it (large λ)
        far = float(nct.cdf(-crit, df, ncp))
        return float(nct.sf(crit, df, ncp)) + (far if math.isfinite(far) else 0.0) - power

    hi = 1.0
    while gap(hi) < 0:  # power rises with d; n = 2 needs d ≈ 6
        hi *= 2
    return float(brentq(gap, 0.0, hi, xtol=1e-10))


def dz_interval(t_stat: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The ``confidence`` interval of d_z from the observed t of a one-sample (or paired) test of ``n``
    units: the noncentralities λ with P(T ≤ t | λ) = 1 − a/2 and a/2 (T ~ nct(n − 1, λ)), divided by √n.
    None for n < 2, and where scipy's noncentral t cannot be evaluated (|t| in the thousands: differences
    nearly constant over seeds)."""
    from scipy.optimize import brentq
    from scipy.stats import nct

    if n < 2 or not math.isfinite(t_stat):
        return None
    if t_stat < 0:  # scipy's nct.cdf is NaN far in the lower tail: use T(−λ) = −T(λ) and mirror
        mirrored = dz_interval(-t_stat, n, confidence)
        return None if mirrored is None else (-mirrored[1], -mirrored[0])
    df, a = n - 1, 1 - confidence

    def root(target: float) -> float | None:
        def f(ncp: float) -> float:
            return float(nct.cdf(t_stat, df, ncp)) - target

        lo, hi = t_stat - 1.0, t_stat + 1.0  # the cdf falls as λ rises: widen until it brackets the target
        for _ in range(60):
            flo, fhi = f(lo), f(hi)
            if not (math.isfinite(flo) and math.isfinite(fhi)):
                return None
            if flo >= 0 >= fhi:
                try:
                    return float(brentq(f, lo, hi, xtol=1e-10))
                except ValueError:  # a NaN inside the bracket
                    return None
            lo, hi = (lo - 2 * (hi - lo), hi) if flo < 0 else (lo, hi + 2 * (hi - lo))
        return None

    low, high = root(1 - a / 2), root(a / 2)
    if low is None or high is None:
        return None
    return low / math.sqrt(n), high / math.sqrt(n)


def _summary(d: np.ndarray, run_test: Callable, test: str) -> dict:
    """Mean, sd, t, p, both intervals and the MDE of differences ``d`` tested by ``run_test()`` (a TtestResult)."""
    n = int(d.size)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    out = {"test": test, "n": n, "mean": mean, "sd": sd, "t": None, "df": n - 1, "p": None, "ci": None,
           "dz": None, "dz_ci": None, "mde_dz": mde_dz(n), "mde": None, "note": None}  # fmt: skip
    if sd == 0:
        out["note"] = "every seed gives the same difference: the t-test is undefined"
        return out
    result = run_test()
    ci = result.confidence_interval(CONFIDENCE)
    out.update(t=float(result.statistic), p=float(result.pvalue), ci=[float(ci.low), float(ci.high)],
               dz=mean / sd, dz_ci=_list(dz_interval(float(result.statistic), n)))  # fmt: skip
    out["mde"] = out["mde_dz"] * sd
    return out


def _list(x) -> list | None:
    return None if x is None else list(x)


def _empty(test: str, n: int, note: str) -> dict:
    return {"test": test, "n": n, "mean": None, "sd": None, "t": None, "df": None, "p": None, "ci": None,
            "dz": None, "dz_ci": None, "mde_dz": mde_dz(n), "mde": None, "note": note}  # fmt: skip


PAIRED_TEST = "paired t-test over seeds, two-sided (scipy.stats.ttest_rel)"
ONE_SAMPLE_TEST = "one-sample t-test over seeds, two-sided (scipy.stats.ttest_1samp)"


def paired(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> dict:
    """``a − b`` paired by seed (module docstring). Seeds where either side is missing or not finite are
    dropped and listed (``dropped_seeds``). Keys: ``test``, ``seeds``, ``dropped_seeds``, ``diffs``, ``n``,
    ``mean``, ``sd``, ``t``, ``df``, ``p``, ``ci`` (95% t interval of the mean difference), ``dz``, ``dz_ci``,
    ``mde_dz`` (at α = 0.05, power 0.8), ``mde`` (= mde_dz · sd), ``note`` (why a field is None)."""
    from scipy.stats import ttest_rel

    seeds = sorted(s for s in set(a) & set(b) if _finite(a[s]) and _finite(b[s]))
    dropped = sorted((set(a) | set(b)) - set(seeds))
    base = {"seeds": seeds, "dropped_seeds": dropped, "diffs": [float(a[s]) - float(b[s]) for s in seeds]}
    if len(seeds) < 2:
        return {**base, **_empty(PAIRED_TEST, len(seeds), f"{len(seeds)} paired seed(s): no test")}
    x, y = np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)
    return {**base, **_summary(x - y, lambda: ttest_rel(x, y), PAIRED_TEST)}


def one_sample(values: Mapping[int, float | None], null: float = 0.0) -> dict:
    """The per-seed ``values`` minus ``null``, tested against 0 over seeds: :func:`paired`'s keys, with
    ``mean`` and ``ci`` of the values themselves (not minus ``null``) and ``null``."""
    from scipy.stats import ttest_1samp

    seeds = sorted(s for s, v in values.items() if _finite(v))
    base = {"seeds": seeds, "dropped_seeds": sorted(set(values) - set(seeds)), "null": null,
            "values": [float(values[s]) for s in seeds]}  # fmt: skip
    if len(seeds) < 2:
        return {**base, **_empty(ONE_SAMPLE_TEST, len(seeds), f"{len(seeds)} seed(s): no test")}
    v = np.array(base["values"])
    out = {**base, **_summary(v - null, lambda: ttest_1samp(v, null), ONE_SAMPLE_TEST)}
    out["mean"] += null  # ttest_1samp's interval is already that of the values' mean
    return out


def adjust_pvalues(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Benjamini-Hochberg adjusted p of every test (``scipy.stats.false_discovery_control``); a test without
    a p (None) stays None and does not count towards the number of tests."""
    from scipy.stats import false_discovery_control

    keys = [k for k, p in pvalues.items() if _finite(p)]
    out: dict[str, float | None] = {k: None for k in pvalues}
    if keys:
        adj = false_discovery_control([pvalues[k] for k in keys], method="bh")
        out.update({k: float(p) for k, p in zip(keys, adj, strict=True)})
    return out


def clustered_spearman(
    records: Sequence[Mapping],
    x: str,
    y: str,
    *,
    unit: str = "seed",
    cluster: str | None = "step",
    min_points: int = 4,
) -> dict:
    """Spearman ρ(x, y) within each cluster (records sharing ``unit`` and ``cluster``; ``cluster=None``:
    the whole unit), the mean of a unit's clusters, and over units :func:`one_sample` (mean ρ, its t
    interval clipped to [−1, 1], p against ρ = 0). ``pooled`` is ρ over every point, the labelled secondary (no interval).
    A cluster with fewer than ``min_points`` finite pairs or a constant series has no ρ and is counted in
    ``clusters_undefined``."""
    from scipy.stats import spearmanr

    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in records:
        if _finite(r.get(x)) and _finite(r.get(y)):
            key = (r[unit], r[cluster] if cluster else None)
            groups.setdefault(key, []).append((float(r[x]), float(r[y])))
    clusters, undefined = [], 0
    for (u, c), pts in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        a = np.array(pts)
        if len(pts) < min_points or np.ptp(a[:, 0]) == 0 or np.ptp(a[:, 1]) == 0:
            undefined += 1
            continue
        clusters.append(
            {unit: u, "cluster": c, "n": len(pts), "rho": float(spearmanr(a[:, 0], a[:, 1]).statistic)}
        )
    per_unit: dict = {}
    for cl in clusters:
        per_unit.setdefault(cl[unit], []).append(cl["rho"])
    unit_means = {u: float(np.mean(v)) for u, v in per_unit.items()}
    pts = [p for v in groups.values() for p in v]
    pooled = None
    if len(pts) >= min_points:
        a = np.array(pts)
        if np.ptp(a[:, 0]) > 0 and np.ptp(a[:, 1]) > 0:
            pooled = {"rho": float(spearmanr(a[:, 0], a[:, 1]).statistic), "n": len(pts)}
    across = one_sample(unit_means)
    if across["ci"] is not None:  # a t interval of a mean of correlations can pass ±1, which ρ cannot
        across["ci"] = [max(-1.0, across["ci"][0]), min(1.0, across["ci"][1])]
    return {
        "x": x,
        "y": y,
        "cluster": f"one {unit}" + (f" at one {cluster}" if cluster else ""),
        "clusters": clusters,
        "clusters_undefined": undefined,
        "per_unit": {str(u): v for u, v in sorted(unit_means.items())},
        "across_units": across,
        "pooled": pooled,
    }


def per_seed(
    records: Sequence[Mapping], value: Callable[[Mapping], float | None], unit: str = "seed"
) -> dict:
    """The mean of ``value(record)`` over each seed's records (non-finite values skipped)."""
    out: dict = {}
    for r in records:
        v = value(r)
        if _finite(v):
            out.setdefault(r[unit], []).append(float(v))
    return {u: float(np.mean(v)) for u, v in sorted(out.items())}


def seeds_needed(
    dz: float | None, alpha: float = ALPHA, power: float = POWER, max_n: int = 1000
) -> int | None:
    """The fewest seeds whose paired test detects a true effect of size ``dz`` at ``alpha`` with ``power``
    (:func:`mde_dz` ≤ |dz|); None when ``dz`` is None or 0 or more than ``max_n`` would be needed."""
    if dz is None or not math.isfinite(dz) or dz == 0 or mde_dz(max_n, alpha, power) > abs(dz):
        return None
    lo, hi = 2, max_n  # mde_dz falls as n grows: bisect for the first n that reaches |dz|
    while lo < hi:
        mid = (lo + hi) // 2
        if mde_dz(mid, alpha, power) <= abs(dz):
            hi = mid
        else:
            lo = mid + 1
    return lo
