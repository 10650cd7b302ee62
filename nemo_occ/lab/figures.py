"""Figures to hold next to the OCC paper's (arXiv 2605.28184): one function per figure.

Every ``fig*`` function takes plain records (the per-step rows of a run's ``metrics.jsonl``, or the
per-minibatch records of ``nemo_occ.lab.study.probe``), writes one PNG atomically and returns its path. A
record that lacks a key a figure needs raises :class:`FigureDataError` naming the run, the key and the
figure; nothing is written then. Drawn by ``nemo-occ demo`` (one seed) and ``nemo-occ study`` (seeds, sweeps and fixed-checkpoint
probes) through :func:`regime_figures`.

- :func:`fig2_dynamics`  — paper Fig. 2 at the probed checkpoints: (a) the cross-fitted alignment of
  g_RL and g_MTP over the main model next to the proxy cosine ĉ / sqrt(Σδ_RL² · v̂²); (b) v² (cross-fitted
  when the records have it); (c) v̂² split into the MTP head's own change and the static head gap. (The
  paper's Eq. 10 terms are not drawn: under OCC ½λ²v̂² = λĉ/(2λ+) by Eq. 13, an identity, not a finding.)
- :func:`fig4_lambda`    — paper Fig. 4: λ applied and λ from each update's own statistics, every seed's
  raw per-step value; the fraction of seeds whose λ is < 0 at each step.
- :func:`fig6_reward`    — paper Fig. 6: training reward, held-out accuracy and MTP agreement per run label.
- :func:`fig8_fidelity`  — paper Fig. 8: log-log proxy vs exact, Spearman ρ within checkpoints.
- :func:`fig_lambda_agreement` — λ next to the MTP head's top-1 agreement (the draft-acceptance proxy).
- :func:`regime_figures` — the set of the above that the demo and the study both draw for their runs.

Every figure says in its caption how many units each curve or point summarises, what the unit of
replication is (the seed; a probe's minibatches are not independent of their checkpoint's) and what
its band or bars are. Noisy training curves are a *centred* mean over ``window`` steps (:func:`centred_mean`,
shorter at the ends, so it neither lags nor invents a start-up trend) with the raw mean faint. Each run
label has its own colour and its own marker in every figure (:func:`assign_styles`; the five regimes
always the same), so that coinciding lines stay apart. Correlations are
:func:`nemo_occ.lab.study.stats.clustered_spearman`: within each checkpoint, summarised over seeds.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "KEYS",
    "FigureDataError",
    "assign_styles",
    "centred_mean",
    "fig2_dynamics",
    "fig4_lambda",
    "fig6_reward",
    "fig8_fidelity",
    "fig_lambda_agreement",
    "regime_figures",
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
}
# Keys of one probe record (nemo_occ.lab.study.probe): per-token proxies next to the exact statistics.
# c, v2 are same-sample (g_RL and g_MTP of one minibatch); c_cross, v2_cross (optional) cross-fitted
# between two halves of it, the estimate without each sequence's covariance with itself (docs/design.md,
# 'What each number measures').
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

# (colour, line style, marker): the five regimes always the first five, other labels the rest in order.
# 19 labels get 19 different colours and 19 different markers; beyond that they repeat.
_REGIME_STYLES = {
    "none": ("#7f7f7f", "-", "o"),
    "detach": ("#1f77b4", "--", "s"),
    "ce": ("#d62728", "-.", "^"),
    "policy": ("#2ca02c", ":", "D"),
    "occ": ("#ff7f0e", "-", "v"),
}
_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#000000", "#000080", "#800000", "#008080",
            "#ff00ff", "#808000", "#4b0082", "#a0522d", "#daa520")  # fmt: skip
_MARKERS = ("P", "X", "*", "h", "<", ">", "p", "d", "H", "8", (4, 1, 0), (6, 1, 0), (7, 0, 0), (8, 1, 0))
_LINES = ("--", "-.", ":", "-")


def assign_styles(labels: Sequence[str]) -> dict[str, tuple]:
    """(colour, line style, marker) per label: a regime's name gets its fixed style, every other label the
    next unused colour and marker in order, so no two of up to 19 labels share either."""
    out = {label: _REGIME_STYLES[label] for label in labels if label in _REGIME_STYLES}
    others = [label for label in dict.fromkeys(labels) if label not in _REGIME_STYLES]
    for i, label in enumerate(others):
        out[label] = (_COLOURS[i % len(_COLOURS)], _LINES[i % len(_LINES)], _MARKERS[i % len(_MARKERS)])
    return out


def _styles(labels: Sequence[str], styles: Mapping[str, tuple] | None) -> Mapping[str, tuple]:
    if styles is None:
        return assign_styles(labels)
    missing = [label for label in labels if label not in styles]
    if missing:
        raise ValueError(f"styles has no entry for {missing}; pass assign_styles() of every label drawn")
    return styles


# the demo's in-training probes (nemo_occ.core.fidelity.ProbeHistory, every demo.fidelity_every steps):
# record key -> metric; the cross-fitted ones are optional (older runs lack them)
_TRAINING_PROBE = {"c": "train/mtp/fidelity/c_same_sample_1", "v2": "train/mtp/fidelity/v2_same_sample_1",
                   "rl_norm2": "train/mtp/fidelity/rl_norm2_same_sample",
                   "c_hat": "train/mtp/fidelity/c_hat_per_token_1",
                   "v2_hat": "train/mtp/fidelity/v2_hat_per_token_1"}  # fmt: skip
_TRAINING_PROBE_CROSS = {"c_cross": "train/mtp/fidelity/c_cross_fit_1",
                         "v2_cross": "train/mtp/fidelity/v2_cross_fit_1",
                         "rl_norm2_cross": "train/mtp/fidelity/rl_norm2_cross_fit"}  # fmt: skip


def training_probes(rows: Sequence[dict]) -> list[dict]:
    """The run's in-training probes as probe records: per-token proxies and exact statistics of the probed
    update (cross-fitted ones too when the row has them), and, when the row has them, v̂²'s readings and
    head gap per token (the step's updates' mean, ``train/mtp/<p>/v2_hat_vs_main_old_1`` ... over
    ``train/mtp/<p>/valid_tokens_1``). No Σδ_RL², so no proxy cosine."""
    out = []
    for r in rows:
        if not all(r.get(k) is not None for k in _TRAINING_PROBE.values()):
            continue
        rec = {"step": r["step"], **{name: float(r[k]) for name, k in _TRAINING_PROBE.items()}}
        rec.update({name: float(r[k]) for name, k in _TRAINING_PROBE_CROSS.items() if r.get(k) is not None})
        pre = "train/mtp/occ" if r.get("train/mtp/occ/valid_tokens_1") is not None else "train/mtp/proxy"
        n, main = r.get(f"{pre}/valid_tokens_1"), r.get(f"{pre}/v2_hat_vs_main_old_1")
        own, share = r.get(f"{pre}/v2_hat_vs_own_old_1"), r.get(f"{pre}/head_gap_share_1")
        if n and main is not None and own is not None and share is not None:
            rec.update(v2_hat_main=main / n, v2_hat_own=own / n, head_gap=share * main / n)
        out.append(rec)
    return out


def exact_keys(recs: Sequence[dict]) -> tuple[str, str, str]:
    """(c key, v² key, how to name them): the cross-fitted statistics when every record has them, else the
    same-sample ones, named so."""
    if recs and all(r.get("c_cross") is not None and r.get("v2_cross") is not None for r in recs):
        return "c_cross", "v2_cross", "cross-fitted"
    return "c", "v2", "same-sample"


class FigureDataError(ValueError):
    """The records lack what a figure needs; the message names the run, the key and the figure."""


# -- helpers ---------------------------------------------------------------------------------------------


def spearman_ci(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> dict | None:
    """{"rho", "low", "high", "n"}: ``scipy.stats.spearmanr`` with a Fisher-z interval, or None when
    undefined (n < 4 or a constant series). Non-finite pairs are dropped first. The interval assumes
    independent points: use it within one cluster, never over pooled probes."""
    from nemo_occ.core.fidelity import spearman_interval

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    got = spearman_interval(x[ok], y[ok], confidence)
    if got is None:
        return None
    return {"rho": got[0], "low": got[1], "high": got[2], "n": int(ok.sum())}


def centred_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Mean over the ``window`` values centred on each point (``window // 2`` either side; fewer at the
    ends), NaNs ignored. Unlike a trailing mean it does not lag a trend by window/2 steps."""
    v = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    half = window // 2
    out = np.full(v.shape, np.nan)
    for i in range(v.size):
        part = v[max(0, i - half) : i + half + 1]
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


def _seed_counts(runs: Mapping[str, Sequence]) -> str:
    """'n = 5 seeds per run' or, when they differ, 'n seeds: a 5, b 1'."""
    counts = {label: len(seeds) for label, seeds in runs.items()}
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        return f"n = {n} seed{'s' if n != 1 else ''} per run"
    return "n seeds: " + ", ".join(f"{label} {n}" for label, n in counts.items())


def _figure(ncols: int, nrows: int = 1, width: float = 4.6, height: float = 3.6, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.9), squeeze=False, **kw)


def _save(fig, path: Path, caption: str) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from nemo_occ.atomic_io import atomic_write

    path = Path(path)
    for ax in fig.axes:  # long titles of neighbouring panels must not run into each other
        ax.title.set_fontsize(min(ax.title.get_fontsize(), 9))
        width = int(ax.get_position().width * fig.get_figwidth() * 13)  # characters at 9 pt
        ax.set_title(textwrap.fill(ax.get_title(), max(30, width)))
        if ax.get_xscale() == "log":  # minor tick labels of a narrow log range overprint each other
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.text(0.01, 0.01, caption, fontsize=7.5, ha="left", va="bottom", wrap=True)
    lines = max(1, math.ceil(len(caption) / 170))
    fig.tight_layout(rect=(0, min(0.4, 0.05 * lines + 0.03), 1, 1))
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    finally:
        plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _curve(ax, steps, seeds_values, style, label, window, band: bool = False) -> None:
    """Mean over seeds of each seed's centred mean (bold), the raw mean faint, and, with ``band`` and more
    than one seed, the seeds' min–max of the centred curves."""
    color, ls, marker = style
    ax.plot(steps, seeds_values.mean(axis=0), color=color, alpha=0.2, lw=0.8)
    sm = np.array([centred_mean(s, window) for s in seeds_values])
    every = max(1, len(steps) // 8)
    ax.plot(steps, sm.mean(axis=0), color=color, ls=ls, marker=marker, markevery=every, ms=4, lw=1.6,
            label=label)  # fmt: skip
    if band and len(seeds_values) > 1:
        ax.fill_between(steps, sm.min(axis=0), sm.max(axis=0), color=color, alpha=0.15, lw=0)


# -- figures ---------------------------------------------------------------------------------------------


def fig6_reward(
    runs: Mapping[str, Sequence[Sequence[dict]]],
    path: Path,
    *,
    caption: str,
    window: int = 9,
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """Paper Fig. 6: training reward per run label (e.g. regime), the seeds' min–max of the centred-mean
    curves shaded; middle, held-out avg@k accuracy, mean over seeds with min–max bars; right, when every run
    logged it, the MTP head's top-1 agreement with the sampled token (what drafting acceptance follows)."""
    figure = "Fig. 6 (training reward)"
    _check_runs(runs, figure)
    styles = _styles(list(runs), styles)
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
        style = styles[label]
        steps, table = _aligned(seeds, keys[label][0])
        _curve(axes[0, 0], steps, table, style, f"{label} (n={len(seeds)})", window, band=True)
        steps, table = _aligned(seeds, keys[label][1])
        mean = table.mean(axis=0)
        offset = (i - (n - 1) / 2) * 0.6  # small x offset: points of equal value stay distinguishable
        axes[0, 1].errorbar(steps + offset, mean, yerr=np.maximum(0.0, [mean - table.min(axis=0), table.max(axis=0) - mean]),
                            color=style[0], ls=style[1], marker=style[2], ms=4, capsize=2, label=label)  # fmt: skip
        if agreement:
            rows = [r for s in seeds for r in s]
            steps, table = _aligned(seeds, _key(rows, "agreement", label, figure))
            _curve(axes[0, 2], steps, table, style, label, window, band=True)
    axes[0, 0].set(xlabel="RL step", ylabel="training reward (fraction correct)",
                   title=f"training reward (centred mean of {window} steps; band: min–max over seeds)")  # fmt: skip
    axes[0, 1].set(xlabel="RL step", ylabel="held-out accuracy avg@k (fraction)",
                   title="held-out accuracy (mean over seeds; bars: min–max over seeds)")  # fmt: skip
    if agreement:
        axes[0, 2].set(xlabel="RL step", ylabel="MTP top-1 agreement (fraction)",
                       title=f"MTP agreement with the sampled token (centred mean of {window}; band: min–max)")  # fmt: skip
    for ax in axes[0]:
        ax.legend(fontsize=7)
    note = (f"{_seed_counts(runs)} (unit of replication: the seed). Bold: mean over seeds of each seed's "
            f"centred mean of {window} steps; faint: the raw mean over seeds; bands and bars: min–max over "
            "seeds (descriptive, not a confidence interval; a single seed has none).")  # fmt: skip
    return _save(fig, path, f"{caption} {note}")


def fig4_lambda(
    runs: Mapping[str, Sequence[Sequence[dict]]],
    path: Path,
    *,
    caption: str,
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """Paper Fig. 4, unsmoothed: λ applied (mean over each step's updates) and λ from the update's own
    statistics (Eq. 13 on the step's last update), each seed's per-step value (thin) and their mean over
    seeds (bold); right, the fraction of seeds whose λ from statistics is < 0 at each step. y axes symlog:
    λ spans orders of magnitude and signs."""
    figure = "Fig. 4 (λ over training)"
    _check_runs(runs, figure)
    styles = _styles(list(runs), styles)
    fig, axes = _figure(3)
    for label, seeds in runs.items():
        color, ls, marker = styles[label]
        rows = [r for s in seeds for r in s]
        k_app, k_stats = (
            _key(rows, "lambda_applied", label, figure),
            _key(rows, "lambda_stats", label, figure),
        )
        for ax, key in ((axes[0, 0], k_app), (axes[0, 1], k_stats)):
            steps, table = _aligned(seeds, key)
            every = max(1, len(steps) // 8)
            if len(seeds) > 1:
                for row in table:
                    ax.plot(steps, row, color=color, lw=0.6, alpha=0.35)
            ax.plot(steps, table.mean(axis=0), color=color, ls=ls, marker=marker, markevery=every, ms=4, lw=1.6,
                    label=f"{label} (n={len(seeds)})")  # fmt: skip
        neg = (table < 0).astype(float)
        axes[0, 2].plot(steps, neg.mean(axis=0), color=color, ls=ls, marker=marker, markevery=every, ms=4,
                        lw=1.2, label=f"{label}: λ < 0 on {float(neg.mean()):.0%} of (seed, step)")  # fmt: skip
    for ax in axes[0, :2]:
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.axhline(0, color="k", lw=0.5)
    axes[0, 0].set(xlabel="RL step", ylabel="λ applied (dimensionless)",
                   title="λ applied (per step; thin: each seed, bold: mean)")  # fmt: skip
    axes[0, 1].set(xlabel="RL step", ylabel="λ = λ+·ĉ/(v̂²+ε) (dimensionless)",
                   title="λ from the update's own statistics (per step)")  # fmt: skip
    axes[0, 2].set(xlabel="RL step", ylabel="fraction of seeds with λ < 0", ylim=(-0.02, 1.02),
                   title="how often the statistics say λ < 0 (per step)")  # fmt: skip
    for ax in axes[0]:
        ax.legend(fontsize=7)
    note = (f"{_seed_counts(runs)} (unit: the seed). Raw per-step values, no smoothing; no interval is drawn "
            "(the thin lines are the seeds themselves).")  # fmt: skip
    return _save(fig, path, f"{caption} {note}")


def fig_lambda_agreement(
    runs: Mapping[str, Sequence[Sequence[dict]]],
    path: Path,
    *,
    caption: str,
    window: int = 9,
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """λ next to the MTP head's top-1 agreement with the sampled token (the draft-acceptance proxy).

    Top: λ from each update's own statistics (under OCC the λ it then applies; under fixed-coefficient
    regimes the λ OCC would have picked), raw per step, mean over seeds. Bottom: MTP top-1 agreement,
    centred mean. Shared x axis."""
    figure = "λ vs MTP agreement"
    _check_runs(runs, figure)
    styles = _styles(list(runs), styles)
    fig, axes = _figure(1, 2, width=8.0, height=2.9, sharex=True)
    for label, seeds in runs.items():
        style = styles[label]
        rows = [r for s in seeds for r in s]
        k_lam, k_agr = _key(rows, "lambda_stats", label, figure), _key(rows, "agreement", label, figure)
        steps, table = _aligned(seeds, k_lam)
        _curve(axes[0, 0], steps, table, style, f"{label} (n={len(seeds)})", 1, band=True)
        steps, table = _aligned(seeds, k_agr)
        _curve(axes[1, 0], steps, table, style, label, window, band=True)
    axes[0, 0].set_yscale("symlog", linthresh=1e-2)
    axes[0, 0].axhline(0, color="k", lw=0.5)
    axes[0, 0].set(ylabel="λ from statistics (dimensionless)",
                   title="λ (Eq. 13, raw per step) and MTP agreement (centred mean)")  # fmt: skip
    axes[1, 0].set(xlabel="RL step", ylabel="MTP top-1 agreement (fraction)")
    axes[0, 0].legend(fontsize=7)
    note = (f"{_seed_counts(runs)} (unit: the seed). Top: mean over seeds of the raw per-step λ; bottom: mean "
            f"over seeds of each seed's centred mean of {window} steps; bands: min–max over seeds "
            "(descriptive, not a confidence interval).")  # fmt: skip
    return _save(fig, path, f"{caption} {note}")


def _probe_arrays(recs: Sequence[dict]) -> dict[str, np.ndarray]:
    # d_rl2 (Σδ_RL² per token) is optional: without it there is no proxy cosine (NaN, not drawn)
    keys = (*PROBE_KEYS, "c_cross", "v2_cross")
    a = {k: np.array([float(r[k]) if r.get(k) is not None else np.nan for r in recs]) for k in keys}
    with np.errstate(divide="ignore", invalid="ignore"):
        # the alignment over the minibatch's own (same-sample, always positive) norms: its sign is c's
        a["cos"] = a["c"] / np.sqrt(a["rl_norm2"] * a["v2"])
        a["cos_cross"] = a["c_cross"] / np.sqrt(a["rl_norm2"] * a["v2"])
        a["cos_hat"] = a["c_hat"] / np.sqrt(a["d_rl2"] * a["v2_hat"])
    return a


def fig2_dynamics(
    probes: Mapping[str, Sequence[dict]],
    path: Path,
    *,
    caption: str,
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """Paper Fig. 2 at the probed checkpoints (records pooled over the probed minibatches and seeds of each
    checkpoint: (a) mean, bars ±1 sd; (b, c) median, bars the interquartile range).

    (a) the exact alignment c / sqrt(||g_RL||²·v²) over the main model's parameters, with c cross-fitted
    when every record has ``c_cross`` (else same-sample, so named), the norms the minibatch's own (solid),
    and the proxy cosine ĉ / sqrt(Σδ_RL²·v̂²) (dashed, hollow markers; only for records with ``d_rl2``);
    (b) v² = ||g_MTP||² over the main model (cross-fitted when present: it can be ≤ 0, symlog axis);
    (c) v̂² per token (δ_MTP against the main head's old log-prob) split into the MTP head's own change
    Σ(log π_θ(MTP) − log π_old(MTP))² and the static head gap Σ(log π_old(MTP) − log π_old(main))².
    The paper's Fig. 2d (Eq. 10's first- and second-order terms) is left out: under OCC the second is
    the first divided by 2λ+ (Eq. 13), so the panel would plot an identity."""
    # long on purpose: one figure's panels, drawn in reading order
    figure = "Fig. 2 (coefficient components)"
    _check_probes(probes, figure, keys=tuple(k for k in PROBE_KEYS if k != "d_rl2"))
    styles = _styles(list(probes), styles)
    _, _, exact = exact_keys([r for recs in probes.values() for r in recs])
    cos_key, v2_key = ("cos_cross", "v2_cross") if exact == "cross-fitted" else ("cos", "v2")
    fig, axes = _figure(3, width=4.6)
    n = len(probes)
    all_steps = np.unique([float(r["step"]) for recs in probes.values() for r in recs])
    shift = max(float(np.ptp(all_steps)) * 0.012, 0.02)  # x offsets keep equal points apart
    for i, (label, recs) in enumerate(probes.items()):
        color, _, marker = styles[label]
        a = _probe_arrays(recs)
        steps = np.unique(a["step"])
        for j, (key, ax, hollow, lstyle, name, centre) in enumerate((
            (cos_key, axes[0, 0], False, "-", f"exact ({exact})", "mean"),
            ("cos_hat", axes[0, 0], True, "--", "proxy", "mean"),
            (v2_key, axes[0, 1], False, "-", None, "median"),
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
                else:  # the interquartile range
                    q1, med, q3 = np.percentile(v, [25, 50, 75])
                    centre_v.append(med), low.append(max(0.0, med - q1)), high.append(max(0.0, q3 - med))
            x = steps + (i - (n - 1) / 2) * shift * 3 + (j % 3) * shift
            ax.errorbar(x, centre_v, yerr=[low, high], color=color, ls=lstyle, marker=marker, ms=5, capsize=2,
                        mfc="none" if hollow else color, label=f"{label} {name}" if name else label)  # fmt: skip
    axes[0, 0].axhline(0, color="k", lw=0.5)
    axes[0, 0].set(xlabel="RL step (checkpoint)", ylabel="cosine (dimensionless)",
                   title=f"(a) alignment of g_RL, g_MTP: exact ({exact}) vs proxy (mean ± 1 sd)")  # fmt: skip
    axes[0, 1].set(xlabel="RL step (checkpoint)", ylabel="v² = ||g_MTP||² (loss-gradient norm²)",
                   title=f"(b) v² over the main model, {exact} (median, IQR)")  # fmt: skip
    if exact == "cross-fitted":
        positive = [abs(v) for recs in probes.values() for r in recs if (v := r.get("v2_cross"))]
        axes[0, 1].set_yscale("symlog", linthresh=float(np.percentile(positive, 10)) if positive else 1e-6)
    else:
        axes[0, 1].set_yscale("log")
    axes[0, 2].set(xlabel="RL step (checkpoint)", ylabel="per token (nats²)",
                   title="(c) v̂²: own change, head gap (median, IQR)", yscale="log")  # fmt: skip
    for ax in axes[0]:
        ax.legend(fontsize=6)
    note = ("Per checkpoint, every probed minibatch of every seed pooled: " + _probe_counts(probes)
        + ". The unit of replication is the seed; bars (±1 sd, IQR) describe the minibatches' spread, they "
        "are not confidence intervals. (a)'s exact cosine divides c by the minibatch's own norms. The paper's "
        "Fig. 2d (Eq. 10's terms) is not drawn: under OCC ½λ²v̂² = λĉ/(2λ+), an identity.")  # fmt: skip
    return _save(fig, path, f"{caption} {note}")


def _probe_counts(probes: Mapping[str, Sequence[dict]]) -> str:
    """'occ 96 minibatches from 5 seed(s) at 3 checkpoint(s); ...' (records without a seed: one)."""
    counts = {label: (len(recs), len({r.get("seed") for r in recs}), len({r["step"] for r in recs}))
              for label, recs in probes.items()}  # fmt: skip
    return "; ".join(
        f"{label} {m} minibatches from {s} seed(s) at {k} step(s)" for label, (m, s, k) in counts.items()
    )


def _rho_text(got: dict) -> str:
    """'ρ̄ = 0.12 [−0.05, 0.30] over 5 seeds (15 clusters)', or why there is none."""
    across = got["across_units"]
    k = len(got["clusters"])
    if across["mean"] is None:
        return f"ρ undefined ({k} clusters with a defined ρ)"
    if across["ci"] is None:
        return f"ρ̄ = {across['mean']:.2f}, {across['n']} seed: no interval ({k} clusters)"
    lo, hi = across["ci"]
    return f"ρ̄ = {across['mean']:.2f} [{lo:.2f}, {hi:.2f}] over {across['n']} seeds ({k} clusters)"


def fig8_fidelity(
    probes: Mapping[str, Sequence[dict]],
    path: Path,
    *,
    caption: str,
    cluster: str | None = "step",
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """Paper Fig. 8: each point one probed minibatch. Left |ĉ|/n vs |c| (log-log; filled: same sign,
    hollow: opposite sign), right |v̂²|/n vs |v²| (log-log; hollow: v² ≤ 0, possible cross-fitted). c, v²
    cross-fitted when every record has them (:func:`exact_keys`), else same-sample, so named.

    Legends: per run label, Spearman ρ within each cluster (records of one ``seed`` at one ``cluster``
    value, e.g. a checkpoint's step; ``cluster=None``: the seed's whole run), averaged per seed, then the
    mean over seeds with its 95% t interval (:func:`nemo_occ.lab.study.stats.clustered_spearman`). Titles:
    ρ pooled over every point of every run label, the secondary (drift and clustering; no interval)."""
    from nemo_occ.lab.study.stats import clustered_spearman

    figure = "Fig. 8 (proxy vs exact)"
    _check_probes(probes, figure, keys=("c", "v2", "c_hat", "v2_hat"))
    styles = _styles(list(probes), styles)
    c_key, v2_key, exact = exact_keys([r for recs in probes.values() for r in recs])
    fig, axes = _figure(2, width=5.4, height=4.4)
    pooled: list[dict] = []
    for label, recs in probes.items():
        color, _, marker = styles[label]
        recs = [{"seed": 0, **r} for r in recs]  # records without a seed: one unit
        pooled += [{**r, "seed": (label, r["seed"])} for r in recs]
        for ax, px, ex in ((axes[0, 0], "c_hat", c_key), (axes[0, 1], "v2_hat", v2_key)):
            x, y = np.array([float(r[px]) for r in recs]), np.array([float(r[ex]) for r in recs])
            same = (np.sign(x) == np.sign(y)) & (y != 0)
            got = clustered_spearman(recs, px, ex, cluster=cluster)
            ax.scatter(np.abs(x[same]), np.abs(y[same]), color=color, marker=marker, s=14,
                       label=f"{label}: {_rho_text(got)}")  # fmt: skip
            ax.scatter(np.abs(x[~same]), np.abs(y[~same]), facecolors="none", edgecolors=color, marker=marker,
                       s=14)  # fmt: skip

    def pooled_text(px, ex):
        got = clustered_spearman(pooled, px, ex, cluster=cluster)["pooled"]
        return "undefined" if got is None else f"{got['rho']:.2f} (n={got['n']} points)"

    where = f"within one checkpoint ({cluster})" if cluster else "within one run"
    over = "checkpoints" if cluster else "steps"
    names = ", ".join(probes)
    axes[0, 0].set(xscale="log", yscale="log", xlabel="|ĉ| / n = |Σ δ_RL·δ_MTP| / tokens (nats²)",
                   ylabel=f"|c| ({exact}) = |<g_RL, g_MTP>| over the main model",
                   title=f"alignment (hollow: opposite signs). Secondary, pooled over {names}, seeds and "
                         f"{over}: ρ = {pooled_text('c_hat', c_key)}")  # fmt: skip
    axes[0, 1].set(xscale="log", yscale="log", xlabel="v̂² / n = Σ δ_MTP² / tokens (nats²)",
                   ylabel=f"|v²| ({exact}) = ||g_MTP||² over the main model",
                   title=f"variance (hollow: v² ≤ 0). Secondary, pooled over {names}, seeds and {over}: "
                         f"ρ = {pooled_text('v2_hat', v2_key)}")  # fmt: skip
    for ax in axes[0]:
        ax.legend(fontsize=6)
    note = (f"One point per probed minibatch ({_probe_counts(probes)}). Legend: Spearman ρ {where}, averaged over a seed's clusters, then "
            "the mean over seeds with its 95% t interval (unit of replication: the seed; the points of one "
            "run are not independent). Titles: ρ over all points pooled, which mixes drift between "
            f"{over} in and has no valid interval. Exact statistics {exact}.")  # fmt: skip
    return _save(fig, path, f"{caption} {note}")


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
    styles: Mapping[str, tuple] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The figures of a set of runs, each label's runs one per seed (``runs[label][seed]`` = metric rows):

    - ``fig6_reward.png`` of the labels named like the five regimes (Fig. 6, with MTP agreement);
    - ``fig4_lambda.png`` of the labels whose regime is ``occ`` (Fig. 4);
    - ``fig_lambda_agreement.png`` of ``occ``, ``policy``, ``ce`` (λ next to MTP agreement);
    - ``fig2_dynamics.png`` and ``fig8_fidelity.png`` from ``probes`` (fixed-checkpoint probe records per
      label, each with its ``seed``) when given, with Fig. 2 from the runs' own probes instead when not;
    - ``fig8_training_probes.png``: Fig. 8 from the runs' own probes (:func:`training_probes`) of the labels
      named like regimes (a sweep's dozen labels would hide each other), ρ within each seed's run.

    ``caption(what, labels, source)`` writes a figure's caption; ``source`` says where its seeds come from
    ("runs", "probes" or "training_probes"); the figure adds what its lines, bands and n are.
    ``regime_of`` maps a label to its regime (default: the label); ``probe_note`` is added after "fixed-
    checkpoint probes" (e.g. how many minibatches each); ``styles`` (default :func:`assign_styles` of every
    label) gives each label its colour and marker in every figure. Returns the file names drawn and, for each
    figure that could not be drawn for lack of data (:class:`FigureDataError`), why: its file is then
    absent, an earlier one of that name removed. Any other error propagates."""
    # long on purpose: the list of figures a study or demo draws, each with why it could not be drawn
    from nemo_occ.core.regimes import REGIMES, get_regime

    regime_of = dict(regime_of or {label: label for label in runs})
    styles = styles or assign_styles([*runs, *(probes or {})])
    drawn: list[str] = []
    failed: dict[str, str] = {}

    def draw(name, fn, *args, what, labels, source="runs", **kw):
        try:
            fn(*args, Path(out_dir) / name, caption=caption(what, list(labels), source), styles=styles, **kw)
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
        draw("fig4_lambda.png", fig4_lambda, occ, what="λ over training (paper Fig. 4), OCC runs", labels=occ)
    if agr := pick(("occ", "policy", "ce")):
        draw("fig_lambda_agreement.png", fig_lambda_agreement, agr,
             what="λ from the update's statistics (applied under occ; what OCC would pick under policy/ce) "
                  "next to MTP top-1 agreement", labels=agr)  # fmt: skip
    own = {}
    for label, seeds in runs.items():
        recs = [{**r, "seed": i} for i, rows in enumerate(seeds) for r in training_probes(rows)]
        if recs and get_regime(regime_of[label]).trunk_gradient:  # else g_MTP over the main model is 0
            own[label] = recs
    if probes:
        draw("fig2_dynamics.png", fig2_dynamics, probes,
             what=f"Coefficient components (paper Fig. 2) at fixed-checkpoint probes{probe_note}",
             labels=probes, source="probes")  # fmt: skip
        draw("fig8_fidelity.png", fig8_fidelity, probes,
             what=f"Proxy vs exact (paper Fig. 8), fixed-checkpoint probes{probe_note}, all checkpoints and "
                  "seeds", labels=probes, source="probes")  # fmt: skip
    elif own:
        draw("fig2_dynamics.png", fig2_dynamics, own,
             what="Coefficient components (paper Fig. 2) from the runs' own probes (one probed update per "
                  "probed step; no proxy cosine: it needs Σδ_RL²; v̂² parts are the step's updates' mean)",
             labels=own, source="training_probes")  # fmt: skip
    if own_core := {label: recs for label, recs in own.items() if label in REGIMES}:
        draw("fig8_training_probes.png", fig8_fidelity, own_core,
             what="Proxy vs exact (paper Fig. 8) from the runs' own probes (the last update of every probed "
                  "step), ρ within each seed's run (across its steps: drift included)", labels=own_core,
             source="training_probes", cluster=None)  # fmt: skip
    return drawn, failed
