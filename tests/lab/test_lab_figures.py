"""nemo_occ.lab.figures: every figure is drawn from small synthetic records, a missing key is named, the
correlation/smoothing helpers agree with values worked out by hand, and what a reader needs is on the figure
(n, unit, interval, pooled or not, one colour and marker per run)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from nemo_occ.lab import figures as F

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(seed: int, steps: int = 12, occ: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    pre = "train/mtp/occ" if occ else "train/mtp/proxy"
    rows = [{"step": 0, "eval/accuracy": 0.3}]
    for t in range(1, steps + 1):
        lam = float(rng.normal(0.2, 0.3))
        rows.append({
            "step": t,
            "reward/mean": 0.3 + 0.04 * t + 0.02 * float(rng.normal()),
            "train/mtp/accuracy_1": 0.6 + 0.01 * t,
            f"{pre}/lambda_applied_1": lam,
            f"{pre}/lambda_1": lam + 0.01,
            **({"eval/accuracy": 0.3 + 0.03 * t} if t % 4 == 0 else {}),
        })  # fmt: skip
    return rows


def _probes(seed: int, n: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = float(rng.normal(1.0, 0.5))
        out.append({
            "step": 4 * (1 + i % 3), "c": c, "v2": float(rng.uniform(1, 5)), "rl_norm2": 4.0,
            "c_hat": c * 0.01 + float(rng.normal(0, 0.002)), "v2_hat": float(rng.uniform(0.1, 0.5)),
            "d_rl2": 0.02, "v2_hat_main": 0.3, "v2_hat_own": 0.01, "head_gap": 0.28,
        })  # fmt: skip
    return out


@pytest.fixture
def runs():
    return {"occ": [_rows(0), _rows(1)], "policy": [_rows(2, occ=False), _rows(3, occ=False)]}


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_every_figure_is_drawn_from_synthetic_records(tmp_path, runs):
    probes = {"occ": _probes(0), "policy": _probes(1)}
    written = [
        F.fig6_reward(runs, tmp_path / "f6.png", caption="run x, config y"),
        F.fig4_lambda({"occ": runs["occ"]}, tmp_path / "f4.png", caption="run x"),
        F.fig_lambda_agreement(runs, tmp_path / "fa.png", caption="run x"),
        F.fig2_dynamics(probes, tmp_path / "f2.png", caption="run x"),
        F.fig8_fidelity(probes, tmp_path / "f8.png", caption="run x"),
    ]
    for path in written:
        assert path.exists() and _is_png(path), path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f2.png", "f4.png", "f6.png", "f8.png", "fa.png"]


def test_fig2_without_the_proxy_cosine_input_still_draws(tmp_path, runs):
    probes = {"occ": [{k: v for k, v in r.items() if k != "d_rl2"} for r in _probes(0)]}
    assert _is_png(F.fig2_dynamics(probes, tmp_path / "f2.png", caption="x"))


def test_a_missing_key_is_named_and_nothing_is_written(tmp_path, runs):
    for rows in runs["occ"]:
        for r in rows:
            r.pop("train/mtp/occ/lambda_1", None)
    with pytest.raises(
        F.FigureDataError, match=r"run 'occ'.*'train/mtp/occ/lambda_1' or 'train/mtp/proxy/lambda_1'"
    ):
        F.fig4_lambda({"occ": runs["occ"]}, tmp_path / "f4.png", caption="x")
    probes = {"policy": _probes(1)}
    del probes["policy"][3]["v2_hat_own"]
    with pytest.raises(F.FigureDataError, match=r"probe record 3 of run 'policy' lacks \['v2_hat_own'\]"):
        F.fig2_dynamics(probes, tmp_path / "f2.png", caption="x")
    with pytest.raises(F.FigureDataError, match="no runs given"):
        F.fig6_reward({}, tmp_path / "f6.png", caption="x")
    assert list(tmp_path.iterdir()) == []


def test_spearman_ci_matches_values_worked_out_by_hand():
    # ranks of y = [5, 6, 7, 8, 7] are [1, 2, 3.5, 5, 3.5]; against x's [1..5]: Σdxdy = 8, Σdx² = 10,
    # Σdy² = 9.5, so ρ = 8/sqrt(95). Interval: tanh(atanh ρ ± 1.96·sqrt((1 + ρ²/2)/(n − 3))).
    got = F.spearman_ci([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    rho = 8 / math.sqrt(95)
    se = math.sqrt((1 + rho**2 / 2) / 2)
    assert got["n"] == 5
    assert got["rho"] == pytest.approx(rho, abs=1e-12)
    assert got["low"] == pytest.approx(math.tanh(math.atanh(rho) - 1.959963984540054 * se), abs=1e-9)
    assert got["high"] == pytest.approx(math.tanh(math.atanh(rho) + 1.959963984540054 * se), abs=1e-9)
    # a monotone but non-linear relation has ρ = 1 exactly; reversed, −1
    x = list(range(1, 11))
    assert F.spearman_ci(x, [math.exp(v) for v in x])["rho"] == pytest.approx(1.0)
    assert F.spearman_ci(x, [-(v**3) for v in x])["rho"] == pytest.approx(-1.0)
    # undefined: a constant series, too few points; non-finite pairs are dropped
    assert F.spearman_ci([1, 2, 3, 4], [2, 2, 2, 2]) is None
    assert F.spearman_ci([1, 2, 3], [1, 2, 3]) is None
    assert F.spearman_ci([1, 2, 3, 4, 5, 6], [1, 2, float("nan"), 4, 5, 3])["n"] == 5


def test_centred_mean_averages_both_sides_shrinks_at_the_ends_and_skips_nans():
    np.testing.assert_allclose(F.centred_mean([1, 2, 3, 4, 5], 3), [1.5, 2.0, 3.0, 4.0, 4.5])
    np.testing.assert_allclose(F.centred_mean([1, float("nan"), 3, 5], 3), [1.0, 2.0, 4.0, 4.0])
    # a straight line keeps its values inside (a trailing mean would lag it by half a window)
    np.testing.assert_allclose(F.centred_mean(list(range(10)), 5)[2:-2], range(2, 8))
    np.testing.assert_allclose(F.centred_mean([4, 8], 1), [4.0, 8.0])
    with pytest.raises(ValueError, match="window"):
        F.centred_mean([1.0], 0)


def _with_training_probe(rows: list[dict], pre: str) -> list[dict]:
    """The rows with an in-training probe at every 4th step (the keys ``training_probes`` reads)."""
    out, pre = [], f"train/mtp/{pre}"
    for r in rows:
        if r["step"] and r["step"] % 4 == 0:
            r = {**r, "train/mtp/fidelity/c_same_sample_1": 0.5, "train/mtp/fidelity/v2_same_sample_1": 2.0,
                 "train/mtp/fidelity/rl_norm2_same_sample": 4.0,
                 "train/mtp/fidelity/c_hat_per_token_1": 0.01 * r["step"], "train/mtp/fidelity/v2_hat_per_token_1": 0.2,
                 f"{pre}/valid_tokens_1": 10.0, f"{pre}/v2_hat_vs_main_old_1": 5.0,
                 f"{pre}/v2_hat_vs_own_old_1": 1.0, f"{pre}/head_gap_share_1": 0.6}  # fmt: skip
        out.append(r)
    return out


def test_regime_figures_draws_what_the_runs_hold_and_says_why_not_the_rest(tmp_path):
    runs = {
        "occ": [_with_training_probe(_rows(0), "occ")],
        "policy": [_with_training_probe(_rows(2, occ=False), "proxy")],
        "occ_lp2": [_rows(4)],  # a sweep variant of regime occ: in Fig. 4, not in Fig. 6
        "none": [
            [
                {
                    k: v
                    for k, v in r.items()
                    if not k.startswith(("lambda", "train/mtp/occ/", "train/mtp/proxy/"))
                }
                for r in _rows(5)
            ]
        ],  # fmt: skip
    }
    asked = []

    def caption(what, labels, source):
        asked.append((what.split(" (")[0], labels, source))
        return what

    regime_of = {"occ": "occ", "policy": "policy", "occ_lp2": "occ", "none": "none"}
    drawn, failed = F.regime_figures(tmp_path, runs, caption=caption, regime_of=regime_of)
    assert drawn == ["fig6_reward.png", "fig4_lambda.png", "fig_lambda_agreement.png", "fig2_dynamics.png",
                     "fig8_training_probes.png"] and failed == {}  # fmt: skip
    assert all(_is_png(tmp_path / name) for name in drawn)
    labels = {what: (ls, src) for what, ls, src in asked}
    assert labels["Training reward, held-out accuracy and MTP agreement per regime"] == (
        ["none", "policy", "occ"],
        "runs",
    )
    assert labels["λ over training"] == (["occ", "occ_lp2"], "runs")
    assert labels["Coefficient components"] == (["occ", "policy"], "training_probes")
    # with fixed-checkpoint probes, Fig. 2 and Fig. 8 come from them; a run without λ leaves Fig. 4 out,
    # with the reason, and writes nothing for it
    for p in tmp_path.iterdir():
        p.unlink()
    runs["occ"] = [[{k: v for k, v in r.items() if "lambda" not in k} for r in runs["occ"][0]]]
    drawn, failed = F.regime_figures(tmp_path, {k: runs[k] for k in ("occ", "policy")}, caption=caption,
                                     probes={"occ": _probes(0), "policy": _probes(1)})  # fmt: skip
    assert drawn == ["fig6_reward.png", "fig2_dynamics.png", "fig8_fidelity.png", "fig8_training_probes.png"]
    assert set(failed) == {"fig4_lambda.png", "fig_lambda_agreement.png"}
    assert "'occ'" in failed["fig4_lambda.png"] and "lambda" in failed["fig4_lambda.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(drawn)


@pytest.fixture
def drawn(monkeypatch):
    """The figures as drawn, not saved: path name -> (matplotlib figure, caption)."""
    import matplotlib.pyplot as plt

    got = {}

    def keep(fig, path, caption):
        got[path.name] = (fig, caption)
        return path

    monkeypatch.setattr(F, "_save", keep)
    yield got
    for fig, _ in got.values():
        plt.close(fig)


def test_styles_are_fixed_per_regime_and_distinct_for_up_to_19_labels():
    a, b = F.assign_styles(["occ", "policy", "ce"]), F.assign_styles(["ce", "occ_lp2", "policy", "occ"])
    assert all(a[r] == b[r] for r in ("occ", "policy", "ce"))  # the order of the labels does not matter
    labels = ["none", "detach", "ce", "policy", "occ"] + [f"v{i}" for i in range(14)]
    styles = F.assign_styles(labels)
    assert len({s[0] for s in styles.values()}) == 19 and len({s[2] for s in styles.values()}) == 19
    with pytest.raises(ValueError, match="no entry"):
        F.fig6_reward({"occ": [_rows(0)]}, Path("x.png"), caption="x", styles={"ce": styles["ce"]})


def test_fig4_draws_each_steps_lambda_unsmoothed(drawn, runs):
    F.fig4_lambda({"occ": runs["occ"]}, Path("f4.png"), caption="x")
    fig, caption = drawn["f4.png"]
    (mean,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "occ (n=2)"]
    want = [np.mean([r["train/mtp/occ/lambda_applied_1"] for r in (s[t], s2[t])]) for s, s2 in [runs["occ"]]
            for t in range(1, 13)]  # fmt: skip
    np.testing.assert_allclose(mean.get_ydata(), want)  # no smoothing: the first steps keep their values
    assert len(fig.axes[0].get_lines()) >= 3  # each seed's own line beside the mean
    assert "n = 2 seeds" in caption and "unit" in caption and "no smoothing" in caption


def test_fig8_legends_rho_within_checkpoints_over_seeds_and_titles_say_what_is_pooled(drawn):
    from scipy.stats import spearmanr

    recs = {label: [{**r, "seed": s} for s in range(3) for r in _probes(10 * j + s, 12)]
            for j, label in enumerate(("occ", "policy"))}  # fmt: skip
    F.fig8_fidelity(recs, Path("f8.png"), caption="x")
    fig, caption = drawn["f8.png"]
    # the independent route: scipy within every (seed, step), the mean per seed, the mean over seeds
    per_seed = [np.mean([spearmanr([r["c_hat"] for r in recs["occ"] if (r["seed"], r["step"]) == (s, k)],
                                   [r["c"] for r in recs["occ"] if (r["seed"], r["step"]) == (s, k)]).statistic
                         for k in (4, 8, 12)]) for s in range(3)]  # fmt: skip
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert (
        legend[0].startswith(f"occ: ρ̄ = {np.mean(per_seed):.2f} [")
        and "over 3 seeds (9 clusters of seed × checkpoint)" in legend[0]
    )
    title = fig.axes[0].get_title().replace("\n", " ")
    assert "pooled over occ, policy, seeds and checkpoints" in title and "n=72 points" in title
    assert "same-sample" in fig.axes[0].get_ylabel()  # no c_cross in these records: named for what it is
    for r in recs["occ"] + recs["policy"]:
        r.update(c_cross=-r["c"], v2_cross=r["v2"])
    F.fig8_fidelity(recs, Path("f8.png"), caption="x")
    fig, caption = drawn["f8.png"]
    assert (
        "cross-fitted" in fig.axes[0].get_ylabel()
        and "ρ̄ = -" in fig.axes[0].get_legend().get_texts()[0].get_text()
    )
    assert "unit of replication: the seed" in caption and "95% t interval" in caption


def test_every_figure_states_n_the_unit_and_its_interval(drawn, runs):
    probes = {"occ": [{**r, "seed": 0} for r in _probes(0)]}
    F.fig6_reward(runs, Path("f6.png"), caption="x")
    F.fig4_lambda({"occ": runs["occ"]}, Path("f4.png"), caption="x")
    F.fig_lambda_agreement(runs, Path("fa.png"), caption="x")
    F.fig2_dynamics(probes, Path("f2.png"), caption="x")
    F.fig8_fidelity(probes, Path("f8.png"), caption="x")
    for name, (_, caption) in drawn.items():
        assert caption.startswith("x "), name  # the caller's caption first
        assert ("n = " in caption or "seed(s)" in caption) and "unit" in caption, name
        assert "interval" in caption, name  # what the band/bars are, or that there is none
    titles = " ".join(ax.get_title() for ax in drawn["f2.png"][0].axes)
    assert "Eq. 10" not in titles and "order" not in titles  # the identity (paper Fig. 2d) is gone


def test_regime_figures_give_a_label_one_colour_and_marker_in_every_figure(drawn):
    regime_of = {"policy": "policy", "occ": "occ", "ce": "ce", "occ_lp2": "occ", "occ_lp5": "occ"}
    runs = {r: [_with_training_probe(_rows(i, occ=regime_of[r] == "occ"), "occ" if regime_of[r] == "occ" else "proxy")]
            for i, r in enumerate(regime_of)}  # fmt: skip
    # another order than the runs', and sweep labels that have no fixed style of their own
    probes = {
        "occ_lp5": _probes(3),
        "occ": _probes(0),
        "ce": _probes(1),
        "occ_lp2": _probes(4),
        "policy": _probes(2),
    }
    F.regime_figures(
        Path("."), runs, caption=lambda what, labels, source: what, probes=probes, regime_of=regime_of
    )
    from matplotlib.colors import to_hex

    seen: dict[str, set] = {}
    for fig, _ in drawn.values():  # every legend entry of every panel: the label's colour there
        for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
            for text, handle in zip(legend.get_texts() if legend else [], legend.legend_handles if legend else [],
                                    strict=True):  # fmt: skip
                label = text.get_text().split(" ")[0].rstrip(":")
                colour = handle.get_color() if hasattr(handle, "get_color") else handle.get_facecolor()[0]
                if label in regime_of:
                    seen.setdefault(label, set()).add(to_hex(colour))
    assert set(seen) == set(regime_of) and all(len(v) == 1 for v in seen.values()), seen
    assert len({next(iter(v)) for v in seen.values()}) == 5  # and no two labels share one


def _final_reward(rows: list[dict]) -> float:
    """Mean reward of the last 5 of 12 steps, worked out apart from the figures' own helper."""
    return float(np.mean([r["reward/mean"] for r in rows if r["step"] >= 8]))


def test_fig6_bottom_row_is_each_seeds_final_minus_detach_paired_by_seed_with_a_t_interval(drawn):
    from scipy import stats as st

    # detach at seeds 0-3, occ at seeds 1 and 3 only (a sweep at fewer seeds): pairs follow the seed, not the order
    det, occ = {s: _rows(10 + s) for s in range(4)}, {1: _rows(21), 3: _rows(23)}
    F.fig6_reward({"detach": det, "occ": occ}, Path("f6.png"), caption="x")
    fig, caption = drawn["f6.png"]
    diffs = [_final_reward(occ[s]) - _final_reward(det[s]) for s in (1, 3)]
    bottom = fig.axes[3]  # the grid is 2 x 3, row by row: the final reward's panel
    np.testing.assert_allclose(sorted(bottom.collections[0].get_offsets()[:, 1]), sorted(diffs))
    half = st.t.ppf(0.975, 1) * np.std(diffs, ddof=1) / math.sqrt(2)
    (bar,) = bottom.containers
    assert bar.lines[0].get_ydata()[0] == pytest.approx(np.mean(diffs))
    np.testing.assert_allclose(
        bar.lines[2][0].get_segments()[0][:, 1], [np.mean(diffs) - half, np.mean(diffs) + half]
    )
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["occ\n(n=2)"]
    assert sorted(t.get_text() for t in bottom.texts) == ["1", "3"]  # each point says which seed it is
    # one legend for the figure, below the panels; none inside a panel to cover the data
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["detach (n=4)", "occ (n=2)"]
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert "minus detach on the same seed" in caption and "95% t interval" in caption


def test_fig6_of_one_seed_says_so_and_draws_no_interval(drawn):
    F.fig6_reward({"detach": [_rows(0)], "occ": [_rows(1)]}, Path("f6.png"), caption="x")
    fig, caption = drawn["f6.png"]
    assert (
        "over seeds" not in " ".join(ax.get_title() for ax in fig.axes)
        and "one seed" in fig.axes[0].get_title()
    )
    assert all(not ax.containers for ax in fig.axes[3:]) and "one seed, so no interval" in caption


def test_fig2_reduces_each_seeds_minibatches_to_one_value_before_summarising_over_seeds(drawn):
    from scipy import stats as st

    def rec(seed, c, v2):  # unit norms: the exact cosine is c itself
        return {"seed": seed, "step": 5, "c": c, "v2": 1.0, "rl_norm2": 1.0, "c_cross": c, "v2_cross": v2,
                "c_hat": 0.1, "v2_hat": 1.0, "d_rl2": 0.02, "v2_hat_main": 1.0, "v2_hat_own": 0.1, "head_gap": 0.8}  # fmt: skip

    # seed 0 has ten minibatches near +0.5, seed 1 two at −0.5: pooled, the mean would be +1/3
    recs = [rec(0, 0.5 + d, 2.0 + d) for d in (-0.1, 0.1) * 5] + [rec(1, -0.5, 7.0), rec(1, -0.5, 9.0)]
    F.fig2_dynamics({"occ": recs}, Path("f2.png"), caption="x")
    fig, caption = drawn["f2.png"]
    (exact,) = [c for c in fig.axes[0].containers if c.get_label() == "occ exact (cross-fitted)"]
    assert exact.lines[0].get_ydata()[0] == pytest.approx(0.0)  # the mean of the seeds' means
    half = st.t.ppf(0.975, 1) * np.std([0.5, -0.5], ddof=1) / math.sqrt(2)
    np.testing.assert_allclose(exact.lines[2][0].get_segments()[0][:, 1], [-half, half])
    np.testing.assert_allclose(sorted(fig.axes[0].collections[0].get_offsets()[:, 1]), [-0.5, 0.5])
    (v2,) = fig.axes[1].containers  # the median of the seeds' medians: seed 0's 2.0 and seed 1's 8.0
    assert v2.lines[0].get_ydata()[0] == pytest.approx(5.0)
    assert "minibatches per seed, step 5: 0: 10, 1: 2" in caption and "95% t interval over seeds" in caption
    legend = [t.get_text() for t in fig.axes[5].get_legend().get_texts()]
    assert legend[0] == "occ" and any("proxy" in t for t in legend)
    # without Σδ_RL² there is no proxy cosine: nothing drawn, nothing in the legend or the title says one is
    F.fig2_dynamics({"occ": [{k: v for k, v in r.items() if k != "d_rl2"} for r in _probes(0)]}, Path("f2.png"),
                    caption="x")  # fmt: skip
    fig, caption = drawn["f2.png"]
    assert not any("proxy" in t.get_text() for t in fig.axes[5].get_legend().get_texts())
    assert "proxy" not in fig.axes[0].get_title() and len(fig.axes[0].containers) == 1
    assert "No interval: one seed" in caption


def test_symlog_axis_labels_zero_and_the_decades_beyond_its_linear_part():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    values = [-0.05, -0.002, 0.003, 0.02, 0.4, 3.0, 0.001, 0.0015, 0.004, 0.006]
    ax.plot(range(len(values)), values)
    F._symlog(ax, values)
    linthresh = float(np.percentile(np.abs(values), 10))
    ticks = ax.yaxis.get_major_locator()()
    plt.close(fig)
    # nothing labelled inside (0, 5·linthresh): the labels of 0 and ±linthresh ran into each other
    assert 0.0 in ticks and all(t == 0 or abs(t) >= 5 * linthresh for t in ticks)
    assert {-0.1, 0.01, 0.1, 1.0, 10.0} <= {round(t, 12) for t in ticks}


def test_fig4_summarises_each_seed_and_draws_one_panel_for_one_seed(drawn, runs):
    F.fig4_lambda({"occ": runs["occ"]}, Path("f4.png"), caption="x")
    fig, _ = drawn["f4.png"]
    # (c): each seed's fraction of steps whose λ from statistics is < 0
    want = sorted(np.mean([r["train/mtp/occ/lambda_1"] < 0 for r in rows if "train/mtp/occ/lambda_1" in r])
                  for rows in runs["occ"])  # fmt: skip
    np.testing.assert_allclose(sorted(fig.axes[2].collections[0].get_offsets()[:, 1]), want)
    (bar,) = fig.axes[2].containers  # a fraction's t interval is drawn inside [0, 1]
    low, high = bar.lines[2][0].get_segments()[0][:, 1]
    assert 0.0 <= low <= high <= 1.0
    want = sorted(
        np.median([r["train/mtp/occ/lambda_applied_1"] for r in rows if r["step"]]) for rows in runs["occ"]
    )
    np.testing.assert_allclose(sorted(fig.axes[1].collections[0].get_offsets()[:, 1]), want)
    F.fig4_lambda({"occ": runs["occ"][:1]}, Path("f4.png"), caption="x")
    fig, caption = drawn["f4.png"]
    rows = runs["occ"][0]
    lam = [r["train/mtp/occ/lambda_applied_1"] for r in rows if r["step"]]
    neg = np.mean([r["train/mtp/occ/lambda_1"] < 0 for r in rows if r["step"]])
    assert len(fig.axes) == 1 and "one seed, so no interval" in caption
    assert (
        fig.legends[0].get_texts()[0].get_text()
        == f"occ: median λ {np.median(lam):.3g}, λ < 0 on {neg:.0%} of steps"
    )


def test_the_colours_a_studys_controls_take_first_are_far_apart():
    from matplotlib.colors import to_rgb

    styles = F.assign_styles(
        ["detach", "ce", "ce_coef1", "ce_matched", "ce_coef1_clipsep", "occ_oldmtp", "occ_probed"]
    )
    others = [
        to_rgb(styles[k][0])
        for k in ("ce_coef1", "ce_matched", "ce_coef1_clipsep", "occ_oldmtp", "occ_probed")
    ]
    gaps = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(others) for b in others[i + 1 :]]
    assert min(gaps) > 0.4  # purple next to pink (0.32 apart) read as one colour


def test_lambda_axes_are_symlog_only_where_lambda_spans_decades_and_say_so(drawn, runs):
    F.fig4_lambda({"occ": runs["occ"]}, Path("f4.png"), caption="x")  # λ ~ N(0.2, 0.3): past ±0.1
    ax = drawn["f4.png"][0].axes[0]
    assert ax.get_yscale() == "symlog" and "symlog axis, linear within ±0.01" in ax.get_ylabel()
    small = [
        [{**r, **{k: v / 100 for k, v in r.items() if "lambda" in k}} for r in rows] for rows in runs["occ"]
    ]
    F.fig4_lambda({"occ": small}, Path("f4.png"), caption="x")
    ax = drawn["f4.png"][0].axes[0]
    assert ax.get_yscale() == "linear" and "symlog" not in ax.get_ylabel()


def test_fig8_of_one_seed_gives_that_runs_rho_without_an_interval(drawn):
    from scipy.stats import spearmanr

    recs = {"occ": _probes(5, 12)}
    F.fig8_fidelity(recs, Path("f8.png"), caption="x", cluster=None)
    fig, caption = drawn["f8.png"]
    rho = spearmanr([r["c_hat"] for r in recs["occ"]], [r["c"] for r in recs["occ"]]).statistic
    assert (
        fig.axes[0].get_legend().get_texts()[0].get_text()
        == f"occ: ρ = {rho:.2f}, one seed: no interval (1 run(s))"
    )
    assert "one seed: no interval" in caption and "signed values" in caption


def test_fig2_does_not_join_two_checkpoints_with_a_line(drawn):
    recs = [{**r, "seed": s} for s in range(2) for r in _probes(s) if r["step"] in (4, 8)]
    F.fig2_dynamics({"occ": recs}, Path("f2.png"), caption="x")
    fig, caption = drawn["f2.png"]
    assert all(c.lines[0].get_linestyle() == "None" for ax in fig.axes[:5] for c in ax.containers)
    assert "Points are not joined" in caption
    F.fig2_dynamics({"occ": [{**r, "seed": 0} for r in _probes(0)]}, Path("f2.png"), caption="x")  # 3 steps
    F.fig2_dynamics({"occ": [{**r, "seed": 0, "step": r["step"] + i % 2} for i, r in enumerate(_probes(0, 24))]},
                    Path("f2.png"), caption="x", step_kind="probed step")  # fmt: skip
    fig, caption = drawn["f2.png"]  # six probed steps: a line
    assert fig.axes[0].containers[0].lines[0].get_linestyle() == "-" and "not joined" not in caption
    assert fig.axes[0].get_xlabel() == "RL step (probed step)"


def test_line_end_labels_are_pushed_apart_and_stay_beside_the_panel():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_ylim(0.0, 1.0)
    F._label_ends(ax, [(0.98, str(i), "k") for i in range(10)] + [(0.1, "low", "k")])
    ys = sorted(t.xy[1] for t in ax.texts)
    plt.close(fig)
    assert len(ys) == 11 and min(np.diff(ys)) >= 0.035 - 1e-9 and 0.0 <= ys[0] and ys[-1] <= 1.0
    assert ys[0] == pytest.approx(0.1)  # a label with room keeps its place


def test_narrow_log_axes_are_labelled_with_plain_numbers(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [0.2, 0.9, 2.5])
    ax.set_yscale("log")
    F._save(fig, tmp_path / "x.png", "x")
    fmt, ticks = ax.yaxis.get_major_formatter(), ax.yaxis.get_major_locator().tick_values(0.2, 2.5)
    assert [fmt(t) for t in ticks if 0.2 <= t <= 2.5] == ["0.2", "0.5", "1", "2"]


def test_fig6_names_the_k_of_avg_at_k(drawn, runs):
    F.fig6_reward(runs, Path("f6.png"), caption="x", eval_k=4)
    assert "avg@4" in drawn["f6.png"][0].axes[1].get_ylabel()
