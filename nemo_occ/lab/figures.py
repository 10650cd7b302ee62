"""Figures to hold next to the OCC paper's (arXiv 2605.28184): one function per figure.

Every ``fig*`` function takes plain records (the per-step rows of a run's ``metrics.jsonl``, or the
per-minibatch records of ``nemo_occ.lab.study.probe``), writes one PNG atomically and returns its path. A
record that lacks a key a figure needs raises :class:`FigureDataError` naming the run, the key and the
figure; nothing is written then. Drawn by ``nemo-occ demo`` (one seed) and ``nemo-occ study`` (seeds, sweeps and fixed-checkpoint
probes) through :func:`regime_figures`.

- :func:`fig2_dynamics`  — paper Fig. 2: (a) cos(g_RL, g_MTP) over the main model's parameters next to
  the proxy cosine ĉ / sqrt(Σδ_RL² · v̂²); (b) exact v²; (c) v̂² split into the MTP head's own change and
  the static head gap; (d) the Eq. 10 terms λĉ (first order) and ½λ²v̂² (second order) over training.
- :func:`fig4_lambda`    — paper Fig. 4: λ applied, λ from each update's own statistics, fraction < 0.
- :func:`fig6_reward`    — paper Fig. 6: training reward per regime, seeds shaded (min–max over seeds).
- :func:`fig8_fidelity`  — paper Fig. 8: log-log proxy vs exact, Spearman ρ with its 95% interval.
- :func:`fig_lambda_agreement` — λ next to the MTP head's top-1 agreement (the draft-acceptance proxy).
- :func:`regime_figures` — the set of the above that the demo and the study both draw for their runs.

Correlations: :func:`spearman_ci` = ``scipy.stats.spearmanr`` with a Fisher-z interval (the
Bonett-Wright standard error, ``nemo_occ.core.fidelity.spearman_interval``). Noisy curves are a trailing
mean over ``window`` steps with the raw series faint; each label has its own colour, line style and
marker so that coinciding lines stay visible.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "KEYS",
    "FigureDataError",
    "fig2_dynamics",
    "fig4_lambda",
    "fig6_reward",
    "fig8_fidelity",
    "fig_lambda_agreement",
    "regime_figures",
    "smooth",
    "spearman_ci",
    "training_probes",
]

# Metric names read from training rows, in one place: the MTP metrics as NeMo-RL logs them
# (nemo_occ.core.metrics.logged_name). A tuple lists accepted names, first match wins (train/mtp/occ/...
# under OCC, train/mtp/proxy/... when only monitored).
KEYS: dict[str, tuple[str, ...]] = {
    "reward": ("reward/mean",),
    "eval": ("eval/accuracy",),
    "agreement": ("train/mtp/accuracy_1",),
    "lambda_applied": ("train/mtp/occ/lambda_applied_1", "train/mtp/proxy/lambda_applied_1"),
    # λ after the step's last update: Eq. 13 on that update's own statistics (what OCC applies next)
    "lambda_stats": ("train/mtp/occ/lambda_1", "train/mtp/proxy/lambda_1"),
    "first_order": ("train/mtp/occ/first_order_1", "train/mtp/proxy/first_order_1"),
    "second_order": ("train/mtp/occ/second_order_1", "train/mtp/proxy/second_order_1"),
}
# Keys of one probe record (nemo_occ.lab.study.probe): per-token proxies next to the exact statistics.
PROBE_KEYS = (
    "step",
    "c",
    "v2",
    "rl_norm2",
    "c_hat",
    "v2_hat",
    "d_rl2",
    "v2_hat_main",
    "v2_hat_own",
    "head_gap",
)

_STYLES = [
    ("#d62728", "-", "o"),
    ("#1f77b4", "--", "s"),
    ("#2ca02c", "-.", "^"),
    ("#9467bd", ":", "D"),
    ("#ff7f0e", "-", "v"),
    ("#8c564b", "--", "P"),
    ("#e377c2", "-.", "X"),
    ("#7f7f7f", ":", "*"),
    ("#17becf", "-", "h"),
    ("#bcbd22", "--", "<"),
]


# the demo's in-training probes (nemo_occ.core.fidelity.ProbeHistory, every demo.fidelity_every steps)
_TRAINING_PROBE = {"c": "train/mtp/fidelity/c_same_sample_1", "v2": "train/mtp/fidelity/v2_same_sample_1",
                   "rl_norm2": "train/mtp/fidelity/rl_norm2_same_sample",
                   "c_hat": "train/mtp/fidelity/c_hat_per_token_1",
                   "v2_hat": "train/mtp/fidelity/v2_hat_per_token_1"}  # fmt: skip


def training_probes(rows: Sequence[dict]) -> list[dict]:
    """The run's in-training probes as probe records: per-token proxies and exact statistics of the probed
    update, and, when the row has them, v̂²'s readings and head gap per token (the step's updates' mean,
    ``train/mtp/<p>/v2_hat_vs_main_old_1`` ... over ``train/mtp/<p>/valid_tokens_1``). No Σδ_RL², so no
    proxy cosine."""
    out = []
    for r in rows:
        if not all(r.get(k) is not None for k in _TRAINING_PROBE.values()):
            continue
        rec = {"step": r["step"], **{name: float(r[k]) for name, k in _TRAINING_PROBE.items()}}
        pre = "train/mtp/occ" if r.get("train/mtp/occ/valid_tokens_1") is not None else "train/mtp/proxy"
        n, main = r.get(f"{pre}/valid_tokens_1"), r.get(f"{pre}/v2_hat_vs_main_old_1")
        own, share = r.get(f"{pre}/v2_hat_vs_own_old_1"), r.get(f"{pre}/head_gap_share_1")
        if n and main is not None and own is not None and share is not None:
            rec.update(v2_hat_main=main / n, v2_hat_own=own / n, head_gap=share * main / n)
        out.append(rec)
    return out


class FigureDataError(ValueError):
    """The records lack what a figure needs; the message names the run, the key and the figure."""


# -- helpers ---------------------------------------------------------------------------------------------


def spearman_ci(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> dict | None:
    """{"rho", "low", "high", "n"}: ``scipy.stats.spearmanr`` with a Fisher-z interval, or None when
    undefined (n < 4 or a constant series). Non-finite pairs are dropped first."""
    from nemo_occ.core.fidelity import spearman_interval

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    got = spearman_interval(x[ok], y[ok], confidence)
    if got is None:
        return None
    return {"rho": got[0], "low": got[1], "high": got[2], "n": int(ok.sum())}


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), NaNs ignored."""
    v = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = np.full(v.shape, np.nan)
    for i in range(v.size):
        part = v[max(0, i - window + 1) : i + 1]
        part = part[np.isfinite(part)]
        if part.size:
            out[i] = part.mean()
    return out


def _key(rows: Sequence[dict], name: str, run: str, figure: str) -> str:
    """The first of ``KEYS[name]`` that some row of ``run`` holds a value for."""
    for key in KEYS[name]:
        if any(r.get(key) is not None for r in rows):
            return key
    raise FigureDataError(
        f"{figure}: run '{run}' has no value for {' or '.join(repr(k) for k in KEYS[name])} in any of its "
        f"{len(rows)} rows"
    )


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def _aligned(seeds: Sequence[Sequence[dict]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, [seeds, steps]) over the steps every seed logged ``key`` at."""
    series = [_series(rows, key) for rows in seeds]
    common = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
    table = np.array(
        [[dict(zip(s[0].tolist(), s[1].tolist(), strict=True))[x] for x in common] for s in series]
    )
    return np.array(common, dtype=float), table.reshape(len(series), len(common))


def _check_runs(runs: Mapping, figure: str) -> None:
    if not runs:
        raise FigureDataError(f"{figure}: no runs given")
    for label, seeds in runs.items():
        if not seeds or any(not rows for rows in seeds):
            raise FigureDataError(f"{figure}: run '{label}' has a seed without any rows")


def _check_probes(probes: Mapping[str, Sequence[dict]], figure: str, keys=PROBE_KEYS) -> None:
    if not probes:
        raise FigureDataError(f"{figure}: no probe records given")
    for label, recs in probes.items():
        if not recs:
            raise FigureDataError(f"{figure}: run '{label}' has no probe records")
        for i, rec in enumerate(recs):
            missing = [k for k in keys if rec.get(k) is None]
            if missing:
                raise FigureDataError(f"{figure}: probe record {i} of run '{label}' lacks {missing}")


def _figure(ncols: int, nrows: int = 1, width: float = 4.6, height: float = 3.6, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.7), squeeze=False, **kw)


def _save(fig, path: Path, caption: str) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from nemo_occ.atomic_io import atomic_write

    path = Path(path)
    for ax in fig.axes:  # long titles of neighbouring panels must not run into each other
        ax.title.set_fontsize(min(ax.title.get_fontsize(), 9))
        if ax.get_xscale() == "log":  # minor tick labels of a narrow log range overprint each other
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.text(0.01, 0.01, caption, fontsize=7.5, ha="left", va="bottom", wrap=True)
    lines = max(1, math.ceil(len(caption) / 170))
    fig.tight_layout(rect=(0, min(0.35, 0.05 * lines + 0.03), 1, 1))
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _curve(ax, steps, seeds_values, style, label, window, band: str | None = None) -> None:
    """Mean over seeds smoothed (bold), raw mean faint, and the seeds' min–max of the smoothed curves."""
    color, ls, marker = style
    raw = seeds_values.mean(axis=0)
    ax.plot(steps, raw, color=color, alpha=0.2, lw=0.8)
    sm = np.array([smooth(s, window) for s in seeds_values])
    every = max(1, len(steps) // 8)
    ax.plot(steps, sm.mean(axis=0), color=color, ls=ls, marker=marker, markevery=every, ms=4, lw=1.6,
            label=label)  # fmt: skip
    if band == "minmax" and len(seeds_values) > 1:
        ax.fill_between(steps, sm.min(axis=0), sm.max(axis=0), color=color, alpha=0.15, lw=0)


# -- figures ---------------------------------------------------------------------------------------------


def fig6_reward(
    runs: Mapping[str, Sequence[Sequence[dict]]], path: Path, *, caption: str, window: int = 10
) -> Path:
    """Paper Fig. 6: training reward per run label (e.g. regime), seeds' min–max of the smoothed curves
    shaded; middle, held-out avg@k accuracy, mean over seeds with min–max bars; right, when every run
    logged it, the MTP head's top-1 agreement with the sampled token (what drafting acceptance follows)."""
    figure = "Fig. 6 (training reward)"
    _check_runs(runs, figure)
    keys = {label: (_key([r for s in seeds for r in s], "reward", label, figure),
                    _key([r for s in seeds for r in s], "eval", label, figure))
            for label, seeds in runs.items()}  # fmt: skip
    agreement = all(
        any(r.get(k) is not None for s in seeds for r in s for k in KEYS["agreement"])
        for seeds in runs.values()
    )
    fig, axes = _figure(3 if agreement else 2)
    n = len(runs)
    for i, (label, seeds) in enumerate(runs.items()):
        style = _STYLES[i % len(_STYLES)]
        steps, table = _aligned(seeds, keys[label][0])
        _curve(axes[0, 0], steps, table, style, f"{label} (n={len(seeds)})", window, band="minmax")
        steps, table = _aligned(seeds, keys[label][1])
        mean = table.mean(axis=0)
        offset = (i - (n - 1) / 2) * 0.6  # small x offset: points of equal value stay distinguishable
        axes[0, 1].errorbar(steps + offset, mean, yerr=[mean - table.min(axis=0), table.max(axis=0) - mean],
                            color=style[0], ls=style[1], marker=style[2], ms=4, capsize=2, label=label)  # fmt: skip
        if agreement:
            rows = [r for s in seeds for r in s]
            steps, table = _aligned(seeds, _key(rows, "agreement", label, figure))
            _curve(axes[0, 2], steps, table, style, label, window, band="minmax")
    band = "; band: seeds' min–max" if any(len(seeds) > 1 for seeds in runs.values()) else ""
    axes[0, 0].set(xlabel="RL step", ylabel="training reward (fraction correct)",
                   title=f"training reward (trailing mean of {window} steps{band})")  # fmt: skip
    axes[0, 1].set(xlabel="RL step", ylabel="held-out accuracy avg@k (fraction)",
                   title="held-out accuracy (mean over seeds; bars: min–max)")  # fmt: skip
    if agreement:
        axes[0, 2].set(xlabel="RL step", ylabel="MTP top-1 agreement (fraction)",
                       title=f"MTP agreement with the sampled token (trailing mean of {window})")  # fmt: skip
    for ax in axes[0]:
        ax.legend(fontsize=7)
    return _save(fig, path, caption)


def fig4_lambda(
    runs: Mapping[str, Sequence[Sequence[dict]]], path: Path, *, caption: str, window: int = 10
) -> Path:
    """Paper Fig. 4: λ applied (mean over each step's updates), λ from the update's own statistics
    (Eq. 13 on the step's last update), and the fraction of steps whose λ from statistics is < 0
    (trailing ``window`` steps, mean over seeds). y axes symlog: λ spans orders of magnitude and signs."""
    figure = "Fig. 4 (λ over training)"
    _check_runs(runs, figure)
    fig, axes = _figure(3)
    for i, (label, seeds) in enumerate(runs.items()):
        style = _STYLES[i % len(_STYLES)]
        rows = [r for s in seeds for r in s]
        k_app, k_stats = (
            _key(rows, "lambda_applied", label, figure),
            _key(rows, "lambda_stats", label, figure),
        )
        steps, table = _aligned(seeds, k_app)
        _curve(axes[0, 0], steps, table, style, label, window, band="minmax")
        steps, table = _aligned(seeds, k_stats)
        _curve(axes[0, 1], steps, table, style, label, window, band="minmax")
        neg = (table < 0).astype(float)
        frac = float(neg.mean())
        _curve(axes[0, 2], steps, neg, style, f"{label}: {frac:.0%} of all steps", window)
    for ax in axes[0, :2]:
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.axhline(0, color="k", lw=0.5)
    axes[0, 0].set(xlabel="RL step", ylabel="λ applied (dimensionless)",
                   title="λ applied (mean over the step's updates)")  # fmt: skip
    axes[0, 1].set(xlabel="RL step", ylabel="λ = λ+·ĉ/(v̂²+ε) (dimensionless)",
                   title="λ from the update's own statistics")  # fmt: skip
    axes[0, 2].set(xlabel="RL step", ylabel=f"fraction of steps with λ < 0 (last {window})", ylim=(-0.02, 1.02),
                   title="how often the statistics say λ < 0")  # fmt: skip
    for ax in axes[0]:
        ax.legend(fontsize=7)
    return _save(fig, path, caption)


def fig_lambda_agreement(
    runs: Mapping[str, Sequence[Sequence[dict]]], path: Path, *, caption: str, window: int = 10
) -> Path:
    """λ next to the MTP head's top-1 agreement with the sampled token (the draft-acceptance proxy).

    Top: λ from each update's own statistics (under OCC the λ it then applies; under fixed-coefficient
    regimes the λ OCC would have picked). Bottom: MTP top-1 agreement. Shared x axis."""
    figure = "λ vs MTP agreement"
    _check_runs(runs, figure)
    fig, axes = _figure(1, 2, width=8.0, height=2.9, sharex=True)
    for i, (label, seeds) in enumerate(runs.items()):
        style = _STYLES[i % len(_STYLES)]
        rows = [r for s in seeds for r in s]
        k_lam, k_agr = _key(rows, "lambda_stats", label, figure), _key(rows, "agreement", label, figure)
        steps, table = _aligned(seeds, k_lam)
        _curve(axes[0, 0], steps, table, style, label, window, band="minmax")
        steps, table = _aligned(seeds, k_agr)
        _curve(axes[1, 0], steps, table, style, label, window, band="minmax")
    axes[0, 0].set_yscale("symlog", linthresh=1e-2)
    axes[0, 0].axhline(0, color="k", lw=0.5)
    axes[0, 0].set(ylabel="λ from statistics (dimensionless)", title="λ (Eq. 13) and MTP agreement")
    axes[1, 0].set(xlabel="RL step", ylabel="MTP top-1 agreement (fraction)")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path, caption)


def _probe_arrays(recs: Sequence[dict]) -> dict[str, np.ndarray]:
    # d_rl2 (Σδ_RL² per token) is optional: without it there is no proxy cosine (NaN, not drawn)
    a = {k: np.array([float(r[k]) if r.get(k) is not None else np.nan for r in recs]) for k in PROBE_KEYS}
    with np.errstate(divide="ignore", invalid="ignore"):
        a["cos"] = a["c"] / np.sqrt(a["rl_norm2"] * a["v2"])
        a["cos_hat"] = a["c_hat"] / np.sqrt(a["d_rl2"] * a["v2_hat"])
    return a


def fig2_dynamics(
    probes: Mapping[str, Sequence[dict]],
    training: Mapping[str, Sequence[Sequence[dict]]],
    path: Path,
    *,
    caption: str,
    window: int = 10,
) -> Path:
    """Paper Fig. 2 from fixed-checkpoint probes (a-c, pooled over the probe minibatches and seeds at each
    checkpoint: (a) mean, bars ±1 sd; (b, c) log axes: median, bars the interquartile range) and from the
    training rows (d: mean over seeds, trailing mean).

    (a) cos(g_RL, g_MTP) = c / sqrt(||g_RL||²·v²) over the main model's parameters (solid) and the proxy
    cosine ĉ / sqrt(Σδ_RL²·v̂²) (dashed, hollow markers; only for records with ``d_rl2``); (b) v² = ||g_MTP||² over the main model;
    (c) v̂² per token (δ_MTP against the main head's old log-prob) split into the MTP head's own change
    Σ(log π_θ(MTP) − log π_old(MTP))² and the static head gap Σ(log π_old(MTP) − log π_old(main))²;
    (d) first-order λĉ (solid) and second-order ½λ²v̂² (dashed) terms of Eq. 10."""
    # long on purpose: one figure's panels, drawn in reading order
    figure = "Fig. 2 (coefficient components)"
    _check_probes(probes, figure, keys=tuple(k for k in PROBE_KEYS if k != "d_rl2"))
    _check_runs(training, figure)
    fig, axes = _figure(4, width=4.4)
    n = len(probes)
    all_steps = np.unique([float(r["step"]) for recs in probes.values() for r in recs])
    shift = max(float(np.ptp(all_steps)) * 0.012, 0.02)  # x offsets keep equal points apart
    for i, (label, recs) in enumerate(probes.items()):
        color, _, marker = _STYLES[i % len(_STYLES)]
        a = _probe_arrays(recs)
        steps = np.unique(a["step"])
        for j, (key, ax, hollow, lstyle, name, centre) in enumerate((
            ("cos", axes[0, 0], False, "-", "exact", "mean"),
            ("cos_hat", axes[0, 0], True, "--", "proxy", "mean"),
            ("v2", axes[0, 1], False, "-", None, "median"),
            ("v2_hat_main", axes[0, 2], False, "-", "v̂² (vs main old)", "median"),
            ("v2_hat_own", axes[0, 2], True, "--", "own change", "median"),
            ("head_gap", axes[0, 2], True, ":", "head gap", "median"),
        )):  # fmt: skip
            centre_v, low, high = [], [], []
            for s in steps:
                v = a[key][(a["step"] == s) & np.isfinite(a[key])]
                if not v.size:
                    centre_v.append(np.nan), low.append(0.0), high.append(0.0)
                elif centre == "mean":  # ±1 sd
                    m, sd = _mean_sd(v)
                    centre_v.append(m), low.append(sd), high.append(sd)
                else:  # log axes: median with the interquartile range
                    q1, med, q3 = np.percentile(v, [25, 50, 75])
                    centre_v.append(med), low.append(med - q1), high.append(q3 - med)
            x = steps + (i - (n - 1) / 2) * shift * 3 + (j % 3) * shift
            ax.errorbar(x, centre_v, yerr=[low, high], color=color, ls=lstyle, marker=marker, ms=5, capsize=2,
                        mfc="none" if hollow else color, label=f"{label} {name}" if name else label)  # fmt: skip
    for i, (label, seeds) in enumerate(training.items()):
        style = _STYLES[i % len(_STYLES)]
        rows = [r for s in seeds for r in s]
        k1, k2 = _key(rows, "first_order", label, figure), _key(rows, "second_order", label, figure)
        steps, table = _aligned(seeds, k1)
        _curve(axes[0, 3], steps, table, (style[0], "-", style[2]), f"{label} λĉ", window)
        steps, table = _aligned(seeds, k2)
        _curve(axes[0, 3], steps, table, (style[0], ":", style[2]), f"{label} ½λ²v̂²", window)
    axes[0, 0].axhline(0, color="k", lw=0.5)
    axes[0, 0].set(xlabel="RL step (checkpoint)", ylabel="cosine (dimensionless)",
                   title="(a) cos(g_RL, g_MTP): exact vs proxy")  # fmt: skip
    axes[0, 1].set(xlabel="RL step (checkpoint)", ylabel="v² = ||g_MTP||² (loss-gradient norm²)",
                   title="(b) v² over the main model (median, IQR)", yscale="log")  # fmt: skip
    axes[0, 2].set(xlabel="RL step (checkpoint)", ylabel="per token (nats²)",
                   title="(c) v̂²: own change, head gap (median, IQR)", yscale="log")  # fmt: skip
    axes[0, 3].set(xlabel="RL step", ylabel="Eq. 10 term (nats², summed over tokens)",
                   title="(d) first vs second order", yscale="symlog")  # fmt: skip
    axes[0, 3].set_yscale("symlog", linthresh=1e-4)
    for ax in axes[0]:
        ax.legend(fontsize=6)
    return _save(fig, path, caption)


def fig8_fidelity(probes: Mapping[str, Sequence[dict]], path: Path, *, caption: str) -> Path:
    """Paper Fig. 8: each point one probed minibatch. Left |ĉ|/n vs |c| (log-log; filled: same sign,
    hollow: opposite sign), right v̂²/n vs v² (log-log). Legends: Spearman ρ [95% Fisher-z interval] of
    the signed values (left) and of v̂², v² (right), per run label and pooled over all run labels' points (in the titles)."""
    figure = "Fig. 8 (proxy vs exact)"
    _check_probes(probes, figure, keys=("c", "v2", "c_hat", "v2_hat"))
    fig, axes = _figure(2, width=5.2, height=4.2)
    pooled: dict[str, list] = {"c_hat": [], "c": [], "v2_hat": [], "v2": []}

    def fmt(ci):
        return (
            "ρ undefined"
            if ci is None
            else f"ρ={ci['rho']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}], n={ci['n']}"
        )

    for i, (label, recs) in enumerate(probes.items()):
        color, _, marker = _STYLES[i % len(_STYLES)]
        a = {k: np.array([float(r[k]) for r in recs]) for k in pooled}
        for k in pooled:
            pooled[k] += a[k].tolist()
        same = np.sign(a["c_hat"]) == np.sign(a["c"])
        ax = axes[0, 0]
        ax.scatter(np.abs(a["c_hat"][same]), np.abs(a["c"][same]), color=color, marker=marker, s=14,
                   label=f"{label}: {fmt(spearman_ci(a['c_hat'], a['c']))}")  # fmt: skip
        ax.scatter(np.abs(a["c_hat"][~same]), np.abs(a["c"][~same]), facecolors="none", edgecolors=color,
                   marker=marker, s=14)  # fmt: skip
        axes[0, 1].scatter(a["v2_hat"], a["v2"], color=color, marker=marker, s=14,
                           label=f"{label}: {fmt(spearman_ci(a['v2_hat'], a['v2']))}")  # fmt: skip
    axes[0, 0].set(xscale="log", yscale="log", xlabel="|ĉ| / n = |Σ δ_RL·δ_MTP| / tokens (nats²)",
                   ylabel="|c| = |<g_RL, g_MTP>| over the main model (grad. units²)",
                   title=f"alignment; all runs pooled {fmt(spearman_ci(pooled['c_hat'], pooled['c']))}")  # fmt: skip
    axes[0, 1].set(xscale="log", yscale="log", xlabel="v̂² / n = Σ δ_MTP² / tokens (nats²)",
                   ylabel="v² = ||g_MTP||² over the main model (grad. units²)",
                   title=f"variance; all runs pooled {fmt(spearman_ci(pooled['v2_hat'], pooled['v2']))}")  # fmt: skip
    for ax in axes[0]:
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    return _save(fig, path, caption)


# the files regime_figures may write, in its order (the demo's output folder lists them as its own)
FIGURE_FILES = (
    "fig6_reward.png",
    "fig4_lambda.png",
    "fig_lambda_agreement.png",
    "fig2_dynamics.png",
    "fig8_fidelity.png",
    "fig8_training_probes.png",
)


def regime_figures(
    out_dir: Path,
    runs: Mapping[str, Sequence[Sequence[dict]]],
    *,
    caption: Callable[[str, list[str], str], str],
    regime_of: Mapping[str, str] | None = None,
    probes: Mapping[str, Sequence[dict]] | None = None,
    probe_note: str = "",
) -> tuple[list[str], dict[str, str]]:
    """The figures of a set of runs, each label's runs one per seed (``runs[label][seed]`` = metric rows):

    - ``fig6_reward.png`` of the labels named like the five regimes (Fig. 6, with MTP agreement);
    - ``fig4_lambda.png`` of the labels whose regime is ``occ`` (Fig. 4);
    - ``fig_lambda_agreement.png`` of ``occ``, ``policy``, ``ce`` (λ next to MTP agreement);
    - ``fig2_dynamics.png`` and ``fig8_fidelity.png`` from ``probes`` (fixed-checkpoint probe records per
      label) when given, with Fig. 2 from the runs' own probes instead when not;
    - ``fig8_training_probes.png``: Fig. 8 from the runs' own probes (:func:`training_probes`).

    ``caption(what, labels, source)`` writes a figure's caption; ``source`` says where its seeds come from
    ("runs", "probes", "probes+runs" (Fig. 2: probes in a-c, training rows in d) or "training_probes").
    ``regime_of`` maps a label to its regime (default: the label); ``probe_note`` is added after "fixed-
    checkpoint probes" (e.g. how many minibatches each). Returns the file names drawn and, for each figure
    that could not be drawn for lack of data (:class:`FigureDataError`), why: its file is then absent,
    an earlier one of that name removed. Any other error propagates."""
    # long on purpose: the list of figures a study or demo draws, each with why it could not be drawn
    from nemo_occ.core.regimes import REGIMES, get_regime

    regime_of = dict(regime_of or {label: label for label in runs})
    drawn: list[str] = []
    failed: dict[str, str] = {}

    def draw(name, fn, *args, what, labels, source="runs"):
        try:
            fn(*args, Path(out_dir) / name, caption=caption(what, list(labels), source))
            drawn.append(name)
        except FigureDataError as err:  # missing metrics; anything else is a bug and propagates
            failed[name] = str(err)
            (Path(out_dir) / name).unlink(missing_ok=True)  # an earlier report's figure would mislead

    def pick(labels):
        return {label: runs[label] for label in labels if label in runs}

    if core := pick(REGIMES):
        draw(
            "fig6_reward.png",
            fig6_reward,
            core,
            what="Training reward per regime (paper Fig. 6)",
            labels=core,
        )
    if occ := pick([label for label in runs if regime_of[label] == "occ"]):
        band = "; band: seeds' min–max" if any(len(seeds) > 1 for seeds in occ.values()) else ""
        draw("fig4_lambda.png", fig4_lambda, occ, what=f"λ over training (paper Fig. 4), OCC runs{band}",
             labels=occ)  # fmt: skip
    if agr := pick(("occ", "policy", "ce")):
        draw("fig_lambda_agreement.png", fig_lambda_agreement, agr,
             what="λ from the update's statistics (applied under occ; what OCC would pick under policy/ce) "
                  "next to MTP top-1 agreement", labels=agr)  # fmt: skip
    own = {}
    for label, seeds in runs.items():
        recs = [r for rows in seeds for r in training_probes(rows)]
        if recs and get_regime(regime_of[label]).trunk_gradient:  # else g_MTP over the main model is 0
            own[label] = recs
    if probes:
        draw("fig2_dynamics.png", fig2_dynamics, probes, pick(probes),
             what=f"Coefficient components (paper Fig. 2): a-c fixed-checkpoint probes{probe_note} (pooled over "
                  "minibatches and seeds; a: mean ± 1 sd, b-c: median and interquartile range); d training rows",
             labels=probes, source="probes+runs")  # fmt: skip
        draw("fig8_fidelity.png", fig8_fidelity, probes,
             what=f"Proxy vs exact (paper Fig. 8), fixed-checkpoint probes{probe_note}, one point per probed "
                  "minibatch, all checkpoints and seeds", labels=probes, source="probes")  # fmt: skip
    elif own:
        draw("fig2_dynamics.png", fig2_dynamics, own, pick(own),
             what="Coefficient components (paper Fig. 2) from the runs' own probes (a-c: at each probed step; "
                  "a: mean ± 1 sd over seeds, no proxy cosine (needs Σδ_RL²), b-c: median and interquartile "
                  "range over seeds; v̂² parts are the step's updates' mean); d training rows",
             labels=own, source="training_probes")  # fmt: skip
    if own:
        draw("fig8_training_probes.png", fig8_fidelity, own,
             what="Proxy vs exact (paper Fig. 8) from the runs' own probes (the last update of every probed "
                  "step), all seeds", labels=own, source="training_probes")  # fmt: skip
    return drawn, failed
