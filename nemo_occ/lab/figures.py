"""Figures to hold next to the OCC paper's (arXiv 2605.28184): one function per figure.

Every ``fig*`` function takes plain records (the per-step rows of a run's ``metrics.jsonl``, or the
per-minibatch records of ``nemo_occ.lab.study.probe``), writes one PNG atomically and returns its path. A
record that lacks a key a figure needs raises :class:`FigureDataError` naming the run, the key and the
figure; nothing is written then. Drawn by ``nemo-occ demo`` (one seed) and ``nemo-occ study`` (seeds, sweeps and fixed-checkpoint
probes) through :func:`regime_figures`.

- :func:`fig2_dynamics`  — paper Fig. 2 at the probed checkpoints: (a) the cross-fitted alignment of
  g_RL and g_MTP over the main model next to the proxy cosine ĉ / sqrt(Σδ_RL² · v̂²); (b) v² (cross-fitted
  when the records have it); (c) v̂² per token and its parts, (d) the MTP head's own change and (e) the
  static head gap. Each seed's minibatches are reduced to one value first. (The paper's Eq. 10 terms are
  not drawn: under OCC ½λ²v̂² = λĉ/(2λ+) by Eq. 13, an identity, not a finding.)
- :func:`fig4_lambda`    — paper Fig. 4: λ applied per step, every seed's raw value and their median; each
  seed's median λ and its fraction of steps with λ < 0.
- :func:`fig6_reward`    — paper Fig. 6: training reward, held-out accuracy and MTP agreement per run label
  and, below, each label's final value minus ``detach``'s on the same seed (what the study's tests test).
- :func:`fig8_fidelity`  — paper Fig. 8: log-log proxy vs exact, Spearman ρ within checkpoints.
- :func:`fig_lambda_agreement` — λ next to the MTP head's top-1 agreement (the draft-acceptance proxy).
- :func:`regime_figures` — the set of the above that the demo and the study both draw for their runs.

Every figure says in its caption how many units each curve or point summarises, what the unit of
replication is (the seed; a probe's minibatches are not independent of their checkpoint's) and what
its bars are: a 95% t interval over seeds where one is drawn, and "one seed" where there can be none.
Spreads over seeds are shown as the seeds themselves (thin lines, small points), not as bands. Noisy
training curves are a *centred* mean over ``window`` steps (:func:`centred_mean`, shorter at the ends, so
it neither lags nor invents a start-up trend). Each run label has its own colour and its own marker in
every figure (:func:`assign_styles`; the five regimes always the same), so that coinciding lines stay
apart; legends sit below the panels or in a panel of their own, never over data. Correlations are
:func:`nemo_occ.lab.study.stats.clustered_spearman`: within each checkpoint, summarised over seeds.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections import Counter
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
# ordered so that the first few, which a study's controls take, are far apart from each other and the regimes'
_COLOURS = ("#9467bd", "#000000", "#bcbd22", "#8c564b", "#ff00ff", "#17becf", "#e377c2", "#000080", "#800000",
            "#008080", "#808000", "#4b0082", "#a0522d", "#daa520")  # fmt: skip
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
    for label, seeds in _runs(runs).items():
        if not seeds or any(not rows for rows in seeds.values()):
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

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)


def _legend_below(fig, axes) -> None:
    """One legend for the whole figure, below its panels, so that none covers data: every entry of
    ``axes``, each label once, in order (:func:`_save` makes room for it above the caption)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        ncol = max(1, min(len(entries), int(fig.get_figwidth() / 2.6)))
        fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=ncol, fontsize=7.5,
                   frameon=False)  # fmt: skip


def _save(fig, path: Path, caption: str) -> Path:
    """Titles wrapped to their panel, the caption (and a legend of :func:`_legend_below`) below the
    panels, the PNG written atomically."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from nemo_occ.atomic_io import atomic_write

    path = Path(path)
    for ax in fig.axes:  # long titles of neighbouring panels must not run into each other
        ax.title.set_fontsize(min(ax.title.get_fontsize(), 9))
        width = int(ax.get_position().width * fig.get_figwidth() * 13)  # characters at 9 pt
        ax.set_title("\n".join(textwrap.fill(line, max(30, width)) for line in ax.get_title().split("\n")))
        for axis, scale, lim in (
            (ax.xaxis, ax.get_xscale(), ax.get_xlim()),
            (ax.yaxis, ax.get_yscale(), ax.get_ylim()),
        ):
            if scale != "log":
                continue
            if lim[0] > 0 and math.log10(lim[1] / lim[0]) < 1.5:  # a decade or so: label 1, 2, 5 plainly
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())  # minor labels of a narrow range overprint each other
    lines = textwrap.wrap(caption, int(fig.get_figwidth() * 17))  # characters per line at 7.5 pt
    caption_in = 0.13 * len(lines) + 0.12  # inches
    legend_in = 0.0
    if fig.legends:
        legend = fig.legends[0]
        rows = math.ceil(len(legend.get_texts()) / legend._ncols)
        legend_in = 0.2 * rows + 0.1
    fig.set_figheight(fig.get_figheight() + caption_in + legend_in)
    height = fig.get_figheight()
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7.5, ha="left", va="bottom")
    if fig.legends:
        fig.legends[0].set_bbox_to_anchor((0.5, caption_in / height), transform=fig.transFigure)
    fig.tight_layout(rect=(0, (caption_in + legend_in) / height, 1, 1))
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    finally:
        plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def _over(n: int) -> str:
    """'mean over 5 seeds' or 'one seed'."""
    return f"mean over {n} seeds" if n > 1 else "one seed"


def _symlog(ax, values) -> str:
    """A symlog y axis whose linear part spans the smallest tenth of |values| and is wide enough that the
    labels of 0 and ±linthresh do not run into each other. Returns the words for the axis label."""
    from matplotlib.ticker import FixedLocator

    mags = np.abs(np.asarray([v for v in values if np.isfinite(v) and v != 0], dtype=float))
    linthresh = float(np.percentile(mags, 10)) if mags.size else 1e-6
    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
    # labelled ticks: 0 and the decades from 10·linthresh out, on the signs the values take
    lo, hi = math.floor(math.log10(linthresh)) + 1, math.ceil(math.log10(mags.max())) if mags.size else 0
    decades = [10.0**e for e in range(lo, hi + 1)]
    signs = {1.0 for v in values if v > 0} | {-1.0 for v in values if v < 0}
    ax.yaxis.set_major_locator(FixedLocator(sorted([0.0, *(s * d for s in signs for d in decades)])))
    return f"\n(symlog axis, linear within ±{linthresh:.1g})"


def _curve(ax, steps, seeds_values, style, label, window, each_seed: bool = False) -> None:
    """Mean over seeds of each seed's centred mean (bold) and faint, the raw mean over seeds or, with
    ``each_seed`` and several seeds, each seed's centred mean."""
    color, ls, marker = style
    sm = np.array([centred_mean(s, window) for s in seeds_values])
    for row in sm if each_seed and len(sm) > 1 else [seeds_values.mean(axis=0)]:
        ax.plot(steps, row, color=color, alpha=0.35 if each_seed else 0.2, lw=0.6 if each_seed else 0.8)
    every = max(1, len(steps) // 8)
    ax.plot(steps, sm.mean(axis=0), color=color, ls=ls, marker=marker, markevery=every, ms=4, lw=1.6,
            label=label)  # fmt: skip


def _label_ends(ax, ends: Sequence[tuple[float, str, str]], gap: float = 0.035) -> None:
    """Right of the panel, each line's label at its last value (``ends``: value, text, colour), pushed
    apart symmetrically, within the panel's height, so that no two overprint."""
    if not ends:
        return
    lo, hi = ax.get_ylim()
    ends = sorted(ends)
    y = [(value - lo) / (hi - lo) for value, _, _ in ends]
    n = len(y)
    for _ in range(500):  # neighbours closer than the gap move apart about their midpoint, then stay inside
        moved = False
        for i in range(1, n):
            if y[i] - y[i - 1] < gap - 1e-9:
                mid = (y[i] + y[i - 1]) / 2
                y[i - 1], y[i] = mid - gap / 2, mid + gap / 2
                moved = True
        y = [min(max(v, i * gap), 1 - (n - 1 - i) * gap) for i, v in enumerate(y)]
        if not moved:
            break
    for (_, text, color), yy in zip(ends, y, strict=True):
        ax.annotate(text, (1.0, yy), xycoords="axes fraction", xytext=(3, 0), textcoords="offset points",
                    fontsize=6, color=color, va="center", annotation_clip=False)  # fmt: skip


def _runs(runs: Mapping) -> dict[str, dict]:
    """{label: {seed: rows}}: a label's seeds as given (a mapping seed -> rows) or numbered in order."""
    return {label: dict(seeds) if isinstance(seeds, Mapping) else dict(enumerate(seeds))
            for label, seeds in runs.items()}  # fmt: skip


def final_tail(steps: int) -> int:
    """How many last RL steps a run's final reward and MTP agreement average over: max(5, steps // 5)."""
    return max(5, steps // 5)


def _final(rows: Sequence[dict], key: str, tail: bool) -> float | None:
    """A run's final ``key``: its mean over the last :func:`final_tail` steps (``tail``) or its last value."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not pts:
        return None
    if not tail:
        return float(pts[-1][1])
    last = max(r["step"] for r in rows)
    return float(np.mean([v for s, v in pts if s > last - final_tail(last)]))


def _strip(ax, i: int, values: Mapping, style, summary: dict | None, bounds=(-np.inf, np.inf)) -> None:
    """One run label's per-seed values (``values``: seed -> value) at x = i, small points each labelled with
    its seed, and right of them ``summary``'s mean with its 95% interval (``stats.paired``/``one_sample``
    keys; none without an interval), the interval clipped to ``bounds``."""
    color, _, marker = style
    seeds, v = list(values), np.asarray(list(values.values()), dtype=float)
    x = i + (np.linspace(-0.25, 0.2, v.size) if v.size > 1 else np.zeros(v.size))
    single = v.size == 1  # nothing to summarise: the one value is the point, drawn as the summary would be
    ax.scatter(x, v, color=color, marker=marker, s=36 if single else 18, alpha=1.0 if single else 0.6, lw=0)
    if not single:
        for xs, ys, seed in zip(x, v, seeds, strict=True):
            ax.annotate(str(seed), (xs, ys), xytext=(0, 3), textcoords="offset points", fontsize=5.5,
                        ha="center", va="bottom", color=color)  # fmt: skip
    if summary is not None and summary.get("ci") is not None:
        lo, hi = max(summary["ci"][0], bounds[0]), min(summary["ci"][1], bounds[1])
        m = summary["mean"]
        ax.errorbar([i + 0.36], [m], yerr=[[m - lo], [hi - m]], color=color, marker=marker, ms=6, capsize=3)


def _strip_axis(ax, labels: Sequence[str], counts: Sequence[int]) -> None:
    ax.set_xticks(range(len(labels)), [f"{label}\n(n={n})" for label, n in zip(labels, counts, strict=True)],
                  fontsize=7, rotation=15)  # fmt: skip
    ax.set_xlim(-0.6, len(labels) - 0.3)
    ax.margins(y=0.12)  # room for the seed numbers above the points


# said wherever a figure draws a 95% interval over seeds
_UNADJUSTED = (
    "unadjusted for the number of comparisons (the study's claims table gives Benjamini-Hochberg-adjusted p)"
)


# -- figures ---------------------------------------------------------------------------------------------


def fig6_reward(
    runs: Mapping[str, Sequence[Sequence[dict]] | Mapping[object, Sequence[dict]]],
    path: Path,
    *,
    caption: str,
    window: int = 9,
    baseline: str = "detach",
    eval_k: int | None = None,
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """Paper Fig. 6. Top, per run label (``runs[label]``: its seeds' rows, a list or a mapping seed -> rows):
    training reward, held-out avg@k accuracy and, when every run logged it, the MTP head's top-1 agreement
    with the sampled token (what drafting acceptance follows), each the mean over seeds. Bottom, when
    ``baseline`` is among the labels: each other label's final value minus the baseline's on the same seed
    (reward and agreement: the mean of the last :func:`final_tail` steps; accuracy: the last evaluation),
    one point per seed, with the mean difference and its 95% t interval over seeds
    (:func:`nemo_occ.lab.study.stats.paired`, the study's test)."""
    # long on purpose: one figure's panels, drawn in reading order
    from nemo_occ.lab.study.stats import paired

    figure = "Fig. 6 (training reward)"
    _check_runs(runs, figure)
    runs = _runs(runs)
    styles = _styles(list(runs), styles)
    keys = {label: {name: _key([r for s in seeds.values() for r in s], name, label, figure)
                    for name in ("reward", "eval")} for label, seeds in runs.items()}  # fmt: skip
    agreement = all(
        any(r.get(k) is not None for s in seeds.values() for r in s for k in KEYS["agreement"])
        for seeds in runs.values()
    )
    if agreement:
        for label, seeds in runs.items():
            keys[label]["agreement"] = _key(
                [r for s in seeds.values() for r in s], "agreement", label, figure
            )
    outcomes = [("reward", True), ("eval", False)] + ([("agreement", True)] if agreement else [])
    others = [label for label in runs if label != baseline]
    paired_row = baseline in runs and bool(others)
    fig, axes = _figure(len(outcomes), 2 if paired_row else 1)
    n = max(len(seeds) for seeds in runs.values())
    for i, (label, seeds) in enumerate(runs.items()):
        style = styles[label]
        for col, (name, _) in enumerate(outcomes):
            steps, table = _aligned(list(seeds.values()), keys[label][name])
            if name == "eval":  # a few evaluations: points, offset a little so equal values stay apart
                offset = (i - (len(runs) - 1) / 2) * 0.15
                axes[0, col].plot(steps + offset, table.mean(axis=0), color=style[0], ls=style[1],
                                  marker=style[2], ms=4, label=f"{label} (n={len(seeds)})")  # fmt: skip
            else:
                _curve(axes[0, col], steps, table, style, f"{label} (n={len(seeds)})", window)
    names = {"reward": "training reward (fraction correct)", "eval": f"held-out accuracy avg@{eval_k or 'k'} (fraction)",
             "agreement": "MTP top-1 agreement (fraction)"}  # fmt: skip
    titles = {"reward": f"training reward ({_over(n)}; centred mean of {window} steps)",
              "eval": f"held-out accuracy ({_over(n)})",
              "agreement": f"MTP agreement with the sampled token ({_over(n)}; centred mean of {window})"}  # fmt: skip
    for col, (name, _) in enumerate(outcomes):
        axes[0, col].set(xlabel="RL step", ylabel=names[name], title=titles[name])
    if paired_row:
        tail = final_tail(max(r["step"] for s in runs[baseline].values() for r in s))
        for col, (name, tailed) in enumerate(outcomes):
            ax = axes[1, col]
            base = {s: _final(rows, keys[baseline][name], tailed) for s, rows in runs[baseline].items()}
            counts = []
            for i, label in enumerate(others):
                got = paired(
                    {s: _final(rows, keys[label][name], tailed) for s, rows in runs[label].items()}, base
                )
                _strip(ax, i, dict(zip(got["seeds"], got["diffs"], strict=True)), styles[label], got)
                counts.append(got["n"])
            ax.axhline(0, color="k", lw=0.5)
            _strip_axis(ax, others, counts)
            when = f"mean of the last {tail} steps" if tailed else "last evaluation"
            ax.set(
                ylabel=f"{names[name].split(' (')[0]} minus {baseline}'s",
                title=f"final {names[name].split(' (')[0]} minus {baseline}'s, paired by seed ({when})",
            )
    _legend_below(fig, axes[0])
    if n > 1:
        note = (f"{_seed_counts(runs)} (unit of replication: the seed). Top (no interval): bold, the mean over "
                f"seeds of each seed's centred mean of {window} steps (fewer steps at either end); faint, the raw "
                "mean over seeds. Lines that coincide hide each other.")  # fmt: skip
    else:
        note = (f"{_seed_counts(runs)} (unit of replication: the seed). Top: bold, the centred mean of {window} "
                "steps; faint, the raw values. Lines that coincide hide each other.")  # fmt: skip
    if paired_row and n > 1:
        note += (f" Bottom: each run minus {baseline} on the same seed (points: the seeds), the comparison the "
                 "study's paired t-tests make; bars: the mean difference and its 95% t interval over seeds, "
                 f"{_UNADJUSTED}. The seeds start at different levels, so the top row's means hide their spread.")  # fmt: skip
    elif paired_row:
        note += f" Bottom: each run minus {baseline} on the same seed; one seed, so no interval."
    else:
        note += " No interval is drawn."
    return _save(fig, path, f"{caption} {note}")


def _lambda_scale(ax, values, linthresh: float = 1e-2) -> str:
    """λ's y axis: symlog, linear within ±``linthresh``, where |λ| reaches past 10·linthresh (λ spans
    orders of magnitude and both signs), else linear. Returns the words for the axis label."""
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    ax.axhline(0, color="k", lw=0.5)
    if not v.size or v.max() <= 10 * linthresh:
        return ""
    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.5)
    return f"\n(symlog axis, linear within ±{linthresh:g})"


def _lambda_panels(
    ax,
    runs,
    key_name: str,
    styles,
    figure: str,
    labels: Mapping[str, str] | None = None,
    each_seed: bool = True,
) -> str:
    """λ (``KEYS[key_name]``) per step: with ``each_seed``, each seed thin; the median over seeds bold
    (legend: ``labels`` or 'label (n=...)'). Returns :func:`_lambda_scale`'s words for the axis label."""
    drawn = []
    for label, seeds in runs.items():
        color, ls, marker = styles[label]
        rows = [r for s in seeds.values() for r in s]
        steps, table = _aligned(list(seeds.values()), _key(rows, key_name, label, figure))
        if len(seeds) > 1 and each_seed:
            for row in table:
                ax.plot(steps, row, color=color, lw=0.6, alpha=0.35)
            drawn.extend(table.ravel())
        ax.plot(steps, np.median(table, axis=0), color=color, ls=ls, marker=marker,
                markevery=max(1, len(steps) // 8), ms=4, lw=1.6,
                label=labels[label] if labels else f"{label} (n={len(seeds)})")  # fmt: skip
        drawn.extend(np.median(table, axis=0))
    return _lambda_scale(ax, drawn)


def fig4_lambda(
    runs: Mapping[str, Sequence[Sequence[dict]] | Mapping[object, Sequence[dict]]],
    path: Path,
    *,
    caption: str,
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """Paper Fig. 4, unsmoothed. (a) λ applied (mean over each step's updates), each seed's per-step value
    (thin) and the median over seeds (bold). With several seeds: (b) each seed's median λ applied over its
    run; (c) each seed's fraction of steps whose λ from the update's own statistics (Eq. 13 on the step's
    last update, the λ OCC applies in the next step) is < 0, with the mean over seeds and its 95% t interval. With one
    seed, (a) alone, its legend giving those two numbers. λ axes are symlog: λ spans orders of magnitude and
    both signs."""
    from nemo_occ.lab.study.stats import one_sample

    figure = "Fig. 4 (λ over training)"
    _check_runs(runs, figure)
    runs = _runs(runs)
    styles = _styles(list(runs), styles)
    n = max(len(seeds) for seeds in runs.values())
    medians, negative = {}, {}
    for label, seeds in runs.items():
        rows = [r for s in seeds.values() for r in s]
        k_app, k_stats = (
            _key(rows, "lambda_applied", label, figure),
            _key(rows, "lambda_stats", label, figure),
        )
        medians[label] = {s: float(np.median(_series(r, k_app)[1])) for s, r in seeds.items()}
        negative[label] = {s: float(np.mean(_series(r, k_stats)[1] < 0)) for s, r in seeds.items()}
    fig, axes = _figure(3) if n > 1 else _figure(1, width=8.0)
    labels = None if n > 1 else {label: f"{label}: median λ {next(iter(medians[label].values())):.3g}, λ < 0 on "
                                        f"{next(iter(negative[label].values())):.0%} of steps" for label in runs}  # fmt: skip
    scale = _lambda_panels(axes[0, 0], runs, "lambda_applied", styles, figure, labels)
    axes[0, 0].set(xlabel="RL step", ylabel=f"λ applied{scale}",
                   title="(a) λ applied per step (thin: each seed; bold: median over seeds)" if n > 1
                         else "λ applied per step (one seed)")  # fmt: skip
    if n > 1:
        for i, label in enumerate(runs):
            m = list(medians[label].values())
            _strip(axes[0, 1], i, medians[label], styles[label], None)
            axes[0, 1].plot([i + 0.3, i + 0.42], [np.median(m)] * 2, color=styles[label][0], lw=2.5)
            _strip(
                axes[0, 2], i, negative[label], styles[label], one_sample(negative[label]), bounds=(0.0, 1.0)
            )
        scale = _lambda_scale(axes[0, 1], [v for m in medians.values() for v in m.values()])
        axes[0, 1].set(ylabel=f"median λ applied over the run{scale}",
                       title="(b) each seed's median λ applied (dash: median over seeds)")  # fmt: skip
        axes[0, 2].axhline(0.5, color="k", lw=0.5, ls=":")  # λ < 0 as often as > 0
        axes[0, 2].set(ylabel="fraction of steps with λ < 0 (dotted: half)", ylim=(-0.03, 1.03),
                       title="(c) how often each seed's statistics say λ < 0 (bar: mean, 95% t interval)")  # fmt: skip
        for ax in axes[0, 1:]:
            _strip_axis(ax, list(runs), [len(seeds) for seeds in runs.values()])
    _legend_below(fig, [axes[0, 0]])
    if n > 1:
        note = (f"{_seed_counts(runs)} (unit of replication: the seed). Raw per-step values, no smoothing; (a) "
                "and (b) have no interval (the thin lines and small points are the seeds themselves, numbered in "
                "(b) and (c)); (c)'s bars are 95% t intervals over seeds, clipped to [0, 1], " + _UNADJUSTED + ". A λ that changes "
                "only at probes (occ_probed's) holds each value for several steps, so its fractions move in "
                "coarser steps.")  # fmt: skip
    else:
        note = (f"{_seed_counts(runs)} (unit of replication: the seed). Raw per-step values, no smoothing; one "
                "seed, so no interval. The legend's fraction counts λ from each step's statistics.")  # fmt: skip
    note += (" λ from a step's statistics (Eq. 13 on its last update) is the λ OCC applies in the next step, "
             "so a curve of it would be this curve one step earlier; it is not drawn.")  # fmt: skip
    return _save(fig, path, f"{caption} {note}")


def fig_lambda_agreement(
    runs: Mapping[str, Sequence[Sequence[dict]] | Mapping[object, Sequence[dict]]],
    path: Path,
    *,
    caption: str,
    window: int = 9,
    styles: Mapping[str, tuple] | None = None,
) -> Path:
    """λ next to the MTP head's top-1 agreement with the sampled token (the draft-acceptance proxy).

    Top: λ from each update's own statistics (under OCC the λ it then applies; under fixed-coefficient
    regimes the λ OCC would have picked), raw per step, each seed thin and the median over seeds bold.
    Bottom: MTP top-1 agreement, mean over seeds of each seed's centred mean. Shared x axis."""
    figure = "λ vs MTP agreement"
    _check_runs(runs, figure)
    runs = _runs(runs)
    styles = _styles(list(runs), styles)
    fig, axes = _figure(1, 2, width=8.0, height=2.9, sharex=True)
    scale = _lambda_panels(axes[0, 0], runs, "lambda_stats", styles, figure, each_seed=False)
    ends: list[tuple[float, str, str]] = []  # each seed's last centred value, its number, its colour
    for label, seeds in runs.items():
        rows = [r for s in seeds.values() for r in s]
        steps, table = _aligned(list(seeds.values()), _key(rows, "agreement", label, figure))
        _curve(axes[1, 0], steps, table, styles[label], label, window, each_seed=True)
        if len(seeds) > 1:
            ends += [
                (centred_mean(row, window)[-1], str(seed), styles[label][0])
                for seed, row in zip(seeds, table, strict=True)
            ]
    n = max(len(seeds) for seeds in runs.values())
    axes[0, 0].set(ylabel=f"λ from statistics{scale}",
                   title="λ (Eq. 13, raw per step; median over seeds) and MTP agreement (centred mean of "
                         f"{window} steps; bold: mean over seeds, thin: each seed)" if n > 1 else
                         f"λ (Eq. 13, raw per step) and MTP agreement (centred mean of {window} steps); one seed")  # fmt: skip
    axes[1, 0].set(xlabel="RL step", ylabel="MTP top-1 agreement (fraction)")
    _label_ends(axes[1, 0], ends)
    _legend_below(fig, [axes[0, 0]])
    note = f"{_seed_counts(runs)} (unit of replication: the seed). " + (
        "No interval is drawn. Top: the median over seeds only (each OCC seed's λ is in fig4_lambda); bottom: "
        "thin, each seed's centred mean, numbered at its end."
        if n > 1
        else "One seed: no interval. Bottom: faint, the raw per-step values."
    )
    return _save(fig, path, f"{caption} {note}")


def _probe_arrays(recs: Sequence[dict]) -> dict[str, np.ndarray]:
    # d_rl2 (Σδ_RL² per token) is optional: without it there is no proxy cosine (NaN, not drawn)
    keys = (*PROBE_KEYS, "c_cross", "v2_cross")
    a = {k: np.array([float(r[k]) if r.get(k) is not None else np.nan for r in recs]) for k in keys}
    a["seed"] = np.array([r.get("seed", 0) for r in recs], dtype=object)
    with np.errstate(divide="ignore", invalid="ignore"):
        # the alignment over the minibatch's own (same-sample, always positive) norms: its sign is c's
        a["cos"] = a["c"] / np.sqrt(a["rl_norm2"] * a["v2"])
        a["cos_cross"] = a["c_cross"] / np.sqrt(a["rl_norm2"] * a["v2"])
        a["cos_hat"] = a["c_hat"] / np.sqrt(a["d_rl2"] * a["v2_hat"])
    return a


def _by_seed(a: dict[str, np.ndarray], key: str, step: float, centre) -> list[float]:
    """Each seed's ``centre`` (np.mean or np.median) of ``key`` over its minibatches at ``step``."""
    out = []
    for seed in dict.fromkeys(a["seed"][a["step"] == step].tolist()):
        v = a[key][(a["step"] == step) & (a["seed"] == seed) & np.isfinite(a[key])]
        if v.size:
            out.append(float(centre(v)))
    return out


def _fig2_legend(ax, probes, styles, *, proxy: bool, seeds: int, exact: str, joined: bool) -> None:
    """Fig. 2's legend in its own panel: one entry per run label, then what fill, line and points mean."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=styles[label][0], marker=styles[label][2], ms=6, label=label) for label in probes
    ]
    if proxy:
        line, dashed = ("-", "--") if joined else ("none", "none")
        handles += [Line2D([], [], color="k", ls=line, marker="o", ms=5,
                           label=f"(a) filled{', solid' if joined else ''}: exact ({exact})"),
                    Line2D([], [], color="k", ls=dashed, marker="o", mfc="none", ms=5,
                           label=f"(a) hollow{', dashed' if joined else ''}: proxy")]  # fmt: skip
    if seeds > 1:
        handles.append(
            Line2D(
                [], [], color="k", marker="o", ls="none", ms=3, alpha=0.35, label="small points: each seed"
            )
        )
    ax.axis("off")
    ax.legend(handles=handles, loc="center", fontsize=8, frameon=False)


def fig2_dynamics(
    probes: Mapping[str, Sequence[dict]],
    path: Path,
    *,
    caption: str,
    styles: Mapping[str, tuple] | None = None,
    step_kind: str = "checkpoint",
) -> Path:
    """Paper Fig. 2 at the probed checkpoints (``step_kind`` names the x axis's steps). Each seed's minibatches at a checkpoint are first reduced to
    one value (alignment: their mean; the squared norms: their median), since the seed is the unit of
    replication. With several seeds, those values are small points and the bold line is (a) their mean
    with its 95% t interval over seeds, (b-e) their median (no interval); with one seed, the line is it.

    (a) the exact alignment c / sqrt(||g_RL||²·v²) over the main model's parameters, with c cross-fitted
    when every record has ``c_cross`` (else same-sample, so named), the norms the minibatch's own (filled,
    solid), and the proxy cosine ĉ / sqrt(Σδ_RL²·v̂²) (hollow, dashed; only where records have ``d_rl2``);
    (b) v² = ||g_MTP||² over the main model (cross-fitted when present: it can be ≤ 0, symlog axis);
    (c) v̂² per token (δ_MTP against the main head's old log-prob), and its two parts: (d) the MTP head's own
    change Σ(log π_θ(MTP) − log π_old(MTP))² and (e) the static head gap Σ(log π_old(MTP) − log π_old(main))².
    The paper's Fig. 2d (Eq. 10's first- and second-order terms) is left out: under OCC the second is
    the first divided by 2λ+ (Eq. 13), so the panel would plot an identity."""
    # long on purpose: one figure's panels, drawn in reading order
    from nemo_occ.lab.study.stats import one_sample

    figure = "Fig. 2 (coefficient components)"
    _check_probes(probes, figure, keys=tuple(k for k in PROBE_KEYS if k != "d_rl2"))
    styles = _styles(list(probes), styles)
    _, _, exact = exact_keys([r for recs in probes.values() for r in recs])
    cos_key, v2_key = ("cos_cross", "v2_cross") if exact == "cross-fitted" else ("cos", "v2")
    fig, grid = _figure(3, 2, width=4.6, height=3.2)
    axes = grid.ravel()
    seeds = max(len({r.get("seed", 0) for r in recs}) for recs in probes.values())
    all_steps = np.unique([float(r["step"]) for recs in probes.values() for r in recs])
    # a few checkpoints: one slot each on the x axis, nothing drawn between them; many probed steps: the
    # steps themselves, joined. Run labels sit side by side within a slot (offsets in x units), so their
    # points stay apart without landing on another probe's step.
    categorical = len(all_steps) <= 3
    gap = 1.0 if categorical else float(np.diff(all_steps).min())
    slot = gap * (0.6 if categorical else 0.5) / max(1, len(probes))
    position = {s: (float(i) if categorical else s) for i, s in enumerate(all_steps)}
    panels = (  # key, panel, hollow, line, legend suffix, reduction within a seed
        (cos_key, 0, False, "-", f" exact ({exact})", np.mean),
        ("cos_hat", 0, True, "--", " proxy", np.mean),
        (v2_key, 1, False, "-", "", np.median),
        ("v2_hat_main", 2, False, "-", "", np.median),
        ("v2_hat_own", 3, False, "-", "", np.median),
        ("head_gap", 4, False, "-", "", np.median),
    )
    drawn: dict[int, list[float]] = {}  # panel -> the values drawn there (its axis scale follows them)
    series: set[str] = set()  # the keys drawn (the proxy cosine only where records have Σδ_RL²)
    for i, (label, recs) in enumerate(probes.items()):
        color, _, marker = styles[label]
        a = _probe_arrays(recs)
        steps = np.unique(a["step"])
        for j, (key, k, hollow, lstyle, suffix, reduce) in enumerate(panels):
            per = [_by_seed(a, key, s, reduce) for s in steps]
            if not any(per):
                continue  # e.g. no proxy cosine without Σδ_RL²: nothing to draw, nothing in the legend
            x = np.array([position[s] for s in steps]) + (i - (len(probes) - 1) / 2 + (j % 2) * 0.3) * slot
            ax, face = axes[k], "none" if hollow else color
            centre, low, high = [], [], []
            for xs, v in zip(x, per, strict=True):
                if len(v) > 1:  # the seeds themselves, hollow like their series where it is hollow
                    ax.scatter([xs - 0.35 * slot] * len(v), v, marker=marker, s=10, alpha=0.45, facecolors=face, edgecolors=color,
                               lw=0.6)  # fmt: skip
                got = one_sample(dict(enumerate(v))) if reduce is np.mean and len(v) > 1 else None
                if got is not None and got["ci"] is not None:
                    centre.append(got["mean"])
                    low.append(got["mean"] - got["ci"][0])
                    high.append(got["ci"][1] - got["mean"])
                else:
                    centre.append(float(reduce(v)) if v else np.nan)
                    low.append(0.0)
                    high.append(0.0)
            ax.errorbar(x, centre, yerr=[low, high], color=color, ls="none" if categorical else lstyle,
                        marker=marker, ms=5, capsize=3, mfc=face,
                        label=f"{label}{suffix}")  # fmt: skip
            drawn.setdefault(k, []).extend(v for vs in per for v in vs)
            series.add(key)
    how = {"mean": f"bold: mean of {seeds} seeds' means, 95% t interval" if seeds > 1 else "one seed",
           "median": f"bold: median of {seeds} seeds' medians" if seeds > 1 else "one seed"}  # fmt: skip
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set(ylabel="cosine (dimensionless)",
                title=f"(a) alignment of g_RL and g_MTP, exact ({exact})"
                      f"{' and proxy' if 'cos_hat' in series else ''}\n{how['mean']}")  # fmt: skip
    axes[1].set(title=f"(b) v² over the main model, {exact}\n{how['median']}")
    for k, what in ((2, "(c) v̂² = Σδ_MTP² per token, δ_MTP = log π_θ(MTP) − log π_old(main)"),
                    (3, "(d) of which the MTP head's own change"),
                    (4, "(e) of which the static head gap (MTP vs main head, both old)")):  # fmt: skip
        axes[k].set(ylabel="per token (nats²)", title=f"{what}\n{how['median']}")
    scale = {}
    for k in range(1, 5):
        if any(v <= 0 for v in drawn.get(k, [])):  # a cross-fitted v² can be ≤ 0
            scale[k] = _symlog(axes[k], drawn.get(k, []))
        else:
            axes[k].set_yscale("log")
            scale[k] = ""
    v2_name = "cross-fitted v² ≈ ||g_MTP||²" if exact == "cross-fitted" else "v² = ||g_MTP||²"
    axes[1].set_ylabel(
        v2_name + (scale[1] or ("\n(log axis: every value here > 0)" if exact == "cross-fitted" else ""))
    )
    for k in range(2, 5):
        axes[k].set_ylabel("per token (nats²)" + scale[k])
    for ax in axes[:5]:
        if categorical:
            ax.set_xticks([position[s] for s in all_steps], [f"step {s:g}" for s in all_steps])
            ax.set_xlim(-0.6, len(all_steps) - 0.4)
            ax.set_xlabel(step_kind)
        else:
            ax.set_xlabel(f"RL step ({step_kind})")
    _fig2_legend(
        axes[5], probes, styles, proxy="cos_hat" in series, seeds=seeds, exact=exact, joined=not categorical
    )
    offset = ((len(probes) - 1) / 2 + 0.3) * slot
    note = (
        f"Probed: {_probe_counts(probes)}. The unit of replication is the seed"
        + ("; each seed's minibatches are reduced to one value before anything is summarised over seeds"
           if seeds > 1 else "")
        + ". (a)'s exact cosine divides the cross-fitted c by the minibatch's own (same-sample) norms, so it is "
        "defined at every probe and has c's sign"
        + ("; its proxy cosine is ĉ / sqrt(Σδ_RL² · v̂²)" if "cos_hat" in series else "")
        + ". The paper's Fig. 2d (Eq. 10's terms) is not drawn: under OCC ½λ²v̂² = λĉ/(2λ+), an identity. (d) "
        "and (e) need not add up to (c): their cross term is not drawn. "
        + ("Points are not joined: nothing was measured between the checkpoints. " if categorical else "")
        + f"Run labels are set side by side, up to ±{offset:.2g} "
        + ("of a checkpoint's slot" if categorical else "steps") + " off their step"
        + ("; each seed's points sit just left of their run's summary. " if seeds > 1 else ". ")
        + ("No interval: one seed." if seeds == 1 else
           f"(a)'s bars: 95% t interval over seeds, {_UNADJUSTED}; (b-e) have no interval.")
    )  # fmt: skip
    return _save(fig, path, f"{caption} {note}")


def _probe_counts(probes: Mapping[str, Sequence[dict]]) -> str:
    """'occ 106 minibatches at 2 step(s) from 5 seed(s) (per seed 0: 32, 1: 9, ...)' per label (records
    without a seed: one)."""
    parts = []
    for label, recs in probes.items():
        per = Counter(r.get("seed", 0) for r in recs)
        steps = sorted({r["step"] for r in recs})
        text = f"{label} {len(recs)} minibatches at {len(steps)} step(s) from {len(per)} seed(s)"
        if len(per) > 1:
            by = Counter((r.get("seed", 0), r["step"]) for r in recs)
            each = "+".join(f"step {t}" for t in steps) if len(steps) <= 3 else "all steps"
            text += (
                f" (minibatches per seed, {each}: "
                + ", ".join(
                    f"{s}: " + ("+".join(str(by[(s, t)]) for t in steps) if len(steps) <= 3 else str(m))
                    for s, m in sorted(per.items())
                )
                + ")"
            )
        parts.append(text)
    return "; ".join(parts)


def _rho_text(got: dict, cluster: str | None) -> str:
    """'ρ̄ = 0.12 [−0.05, 0.30] over 5 seeds (10 clusters of seed × checkpoint)', the one seed's ρ without an
    interval, or why there is none; clusters too small for a ρ are counted apart."""
    across = got["across_units"]
    k, skipped = len(got["clusters"]), got["clusters_undefined"]
    clusters = (
        f"{k} clusters of seed × {'checkpoint' if cluster == 'step' else cluster}"
        if cluster
        else f"{k} run(s)"
    )
    if skipped:
        clusters += f"; {skipped} with < 4 points or a constant series left out"
    if across["mean"] is None and len(got["per_unit"]) == 1:
        return f"ρ = {next(iter(got['per_unit'].values())):.2f}, one seed: no interval ({clusters})"
    if across["mean"] is None:
        return f"ρ undefined (no cluster with a defined ρ; {clusters})"
    if across["ci"] is None:
        return f"ρ̄ = {across['mean']:.2f}, no interval ({across['n']} seeds; {clusters})"
    lo, hi = across["ci"]
    return f"ρ̄ = {across['mean']:.2f} [{lo:.2f}, {hi:.2f}] over {across['n']} seeds ({clusters})"


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
    fig, axes = _figure(2, width=5.4, height=5.4)
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
                       label=f"{label}: {_rho_text(got, cluster)}")  # fmt: skip
            ax.scatter(np.abs(x[~same]), np.abs(y[~same]), facecolors="none", edgecolors=color, marker=marker,
                       s=14)  # fmt: skip

    def pooled_text(px, ex):
        got = clustered_spearman(pooled, px, ex, cluster=cluster)["pooled"]
        return "undefined" if got is None else f"{got['rho']:.2f} (n={got['n']} points)"

    where = (
        f"within each cluster (one seed's minibatches at one {'checkpoint' if cluster == 'step' else cluster})"
        if cluster
        else "within each seed's run"
    )
    over = "checkpoints" if cluster else "steps"
    names = ", ".join(probes)
    axes[0, 0].set(xscale="log", yscale="log", xlabel="|ĉ| / n = |Σ δ_RL·δ_MTP| / tokens (nats²)",
                   ylabel=f"|c| ({exact}) = |<g_RL, g_MTP>| over the main model",
                   title=f"alignment (hollow: opposite signs). Secondary, pooled over {names}, seeds and "
                         f"{over}: ρ (signed) = {pooled_text('c_hat', c_key)}")  # fmt: skip
    axes[0, 1].set(xscale="log", yscale="log", xlabel="v̂² / n = Σ δ_MTP² / tokens (nats²)",
                   ylabel=f"|v²| ({exact}) = ||g_MTP||² over the main model",
                   title=f"variance (hollow: v² ≤ 0). Secondary, pooled over {names}, seeds and {over}: "
                         f"ρ (signed) = {pooled_text('v2_hat', v2_key)}")  # fmt: skip
    for ax in axes[0]:  # below the panel, its ρ per run label: inside, it would cover points
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    seeds = max(len({r.get("seed", 0) for r in recs}) for recs in probes.values())
    note = (f"One point per probed minibatch ({_probe_counts(probes)}). Every ρ is Spearman's of the signed "
            "values; the axes show magnitudes, hollow where the signs differ. Legend: ρ " + where
            + (", averaged over a seed's clusters" if cluster else "")
            + (f", then the mean over seeds with its 95% t interval, {_UNADJUSTED}" if seeds > 1 else "; one seed: no interval")
            + " (unit of replication: the seed; the points of one run are not independent). Titles: ρ over "
            + (f"all points pooled, which mixes in drift between {over} and has no valid interval."
               if cluster else "all points of every run pooled, which mixes runs and has no valid interval.")
            + f" Exact statistics {exact}. δ_RL: a token's main-head log-prob change, current minus old; δ_MTP:"
            " the MTP head's current log-prob minus the old log-prob it is read against (old_logprobs).")  # fmt: skip
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
    eval_k: int | None = None,
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

    runs = _runs(runs)
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
            what="Training reward, held-out accuracy and MTP agreement per regime (paper Fig. 6)",
            labels=core,
            eval_k=eval_k,
        )
    if occ := pick([label for label in runs if regime_of[label] == "occ"]):
        draw("fig4_lambda.png", fig4_lambda, occ, what="λ over training (paper Fig. 4), OCC runs", labels=occ)
    if agr := pick(("occ", "policy", "ce")):
        draw("fig_lambda_agreement.png", fig_lambda_agreement, agr,
             what="λ from the update's statistics (applied under occ; what OCC would pick under policy/ce) "
                  "next to MTP top-1 agreement", labels=agr)  # fmt: skip
    own = {}
    for label, seeds in runs.items():
        recs = [{**r, "seed": i} for i, rows in seeds.items() for r in training_probes(rows)]
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
             labels=own, source="training_probes", step_kind="probed step")  # fmt: skip
    if own_core := {label: recs for label, recs in own.items() if label in REGIMES}:
        draw("fig8_training_probes.png", fig8_fidelity, own_core,
             what="Proxy vs exact (paper Fig. 8) from the runs' own probes (the last update of every probed "
                  "step), ρ within each seed's run (across its steps: drift included)", labels=own_core,
             source="training_probes", cluster=None)  # fmt: skip
    return drawn, failed
