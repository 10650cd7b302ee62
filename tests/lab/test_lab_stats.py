"""nemo_occ.lab.study.stats against answers worked out by hand (closed forms of the t distribution with 2
degrees of freedom, Spearman's rank formula, the Benjamini-Hochberg steps) or by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nemo_occ.lab.study import stats


def _t2_quantile(p: float) -> float:
    """Quantile of Student's t with 2 degrees of freedom: (2p − 1) / sqrt(2p(1 − p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def test_paired_difference_matches_the_t_distribution_with_two_degrees_of_freedom():
    # differences 1, 2, 4: mean 7/3, sd sqrt(7/3), t = sqrt(7), df 2; for df 2, p = 1 − t / sqrt(2 + t²)
    got = stats.paired({0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0}, {0: 0.0, 1: 0.0, 2: 0.0, 4: 1.0})
    assert got["seeds"] == [0, 1, 2] and got["dropped_seeds"] == [3, 4]  # unpaired seeds are listed
    assert got["diffs"] == [1.0, 2.0, 4.0] and got["n"] == 3 and got["df"] == 2
    assert got["mean"] == pytest.approx(7 / 3) and got["sd"] == pytest.approx(math.sqrt(7 / 3))
    assert got["t"] == pytest.approx(math.sqrt(7))
    assert got["p"] == pytest.approx(1 - math.sqrt(7) / 3)
    half = _t2_quantile(0.975) * math.sqrt(7 / 3) / math.sqrt(3)
    assert got["ci"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    assert got["dz"] == pytest.approx((7 / 3) / math.sqrt(7 / 3))
    assert got["mde"] == pytest.approx(got["mde_dz"] * math.sqrt(7 / 3))
    assert "ttest_rel" in got["test"]


def test_paired_without_variation_or_pairs_gives_no_p_and_says_why():
    same = stats.paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})
    assert same["p"] is None and same["mean"] == pytest.approx(0.5) and "same difference" in same["note"]
    one = stats.paired({0: 1.0, 1: float("nan")}, {0: 0.0, 1: 0.0})
    assert one["p"] is None and one["dropped_seeds"] == [1] and "no test" in one["note"]


def test_one_sample_tests_the_values_against_the_null_and_keeps_their_own_mean():
    got = stats.one_sample({0: 1.5, 1: 2.5, 2: 4.5}, null=0.5)  # values − null = 1, 2, 4 as above
    assert got["mean"] == pytest.approx(7 / 3 + 0.5) and got["p"] == pytest.approx(1 - math.sqrt(7) / 3)
    half = _t2_quantile(0.975) * math.sqrt(7 / 3) / math.sqrt(3)
    assert got["ci"] == pytest.approx([7 / 3 + 0.5 - half, 7 / 3 + 0.5 + half])  # interval of the values
    assert "ttest_1samp" in got["test"]


def test_mde_has_80_percent_power_by_simulation_and_the_normal_limit_for_many_seeds():
    from scipy.stats import ttest_1samp

    n = 5
    d = stats.mde_dz(n)
    rng = np.random.default_rng(0)
    draws = rng.normal(d, 1.0, size=(200_000, n))
    power = float((ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05).mean())
    assert power == pytest.approx(0.80, abs=0.005)  # Monte Carlo sd ≈ 0.0009
    # many units: d → (z_{0.975} + z_{0.80}) / √n
    assert stats.mde_dz(10_000) == pytest.approx((1.959963985 + 0.841621234) / 100, rel=2e-3)
    assert stats.mde_dz(3) > stats.mde_dz(5) > stats.mde_dz(10)  # fewer seeds, larger MDE
    assert stats.mde_dz(1) is None


def test_dz_interval_is_dual_to_the_t_test_and_normal_for_many_units():
    from scipy.stats import t

    # at t = t_{0.975, n−1} the test's p is exactly 0.05, so the interval's lower end is exactly 0
    lo, hi = stats.dz_interval(float(t.ppf(0.975, 4)), 5)
    assert lo == pytest.approx(0.0, abs=1e-7) and hi > 0
    lo, hi = stats.dz_interval(0.0, 6)  # nct(−λ) mirrors nct(λ): symmetric around 0
    assert lo == pytest.approx(-hi)
    # a negative t (scipy's nct.cdf is NaN far in its lower tail): the ends solve the defining equations,
    # read through P(T ≤ t | λ) = P(T ≥ −t | −λ)
    from scipy.stats import nct

    for t_stat, n in ((-7.0, 5), (-5.5, 3), (-4.5, 2), (-2.0, 5)):
        lo, hi = stats.dz_interval(t_stat, n)
        assert nct.sf(-t_stat, n - 1, -lo * math.sqrt(n)) == pytest.approx(0.975)
        assert nct.sf(-t_stat, n - 1, -hi * math.sqrt(n)) == pytest.approx(0.025)
    n, dz = 2000, 0.3  # large n: dz ± 1.96·sqrt(1/n + dz²/(2n))
    lo, hi = stats.dz_interval(dz * math.sqrt(n), n)
    half = 1.959964 * math.sqrt(1 / n + dz**2 / (2 * n))
    assert (lo, hi) == pytest.approx((dz - half, dz + half), abs=2e-3)


def test_benjamini_hochberg_adjusts_as_worked_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): ×4/1, ×4/2, ×4/3, ×4/4 = 0.02, 0.02, 0.04, 0.04 (monotone)
    got = stats.adjust_pvalues({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": None})
    assert got == pytest.approx({"a": 0.02, "b": 0.04, "c": 0.04, "d": 0.02, "e": None})
    # the step-up: a larger p can lower a smaller one's adjusted value
    assert stats.adjust_pvalues({"a": 0.04, "b": 0.041})["a"] == pytest.approx(0.041)


def test_correlations_are_taken_within_checkpoints_and_summarised_over_seeds():
    # within every checkpoint ρ is known from 1 − 6Σd²/(n(n² − 1)) with n = 4 (denominator 60):
    # y ranks [1,2,3,4] → 1; [1,2,4,3] → 0.8; [2,1,4,3] → 0.6; [4,3,2,1] → −1
    ranks = {1.0: [1, 2, 3, 4], 0.8: [1, 2, 4, 3], 0.6: [2, 1, 4, 3], -1.0: [4, 3, 2, 1]}
    plan = {0: (1.0, 0.8), 1: (0.6, 1.0), 2: (0.8, -1.0)}  # seed → ρ at its two checkpoints
    recs = []
    for seed, rhos in plan.items():
        for k, rho in enumerate(rhos):
            for x, y in zip([1, 2, 3, 4], ranks[rho], strict=True):
                # checkpoint k sits higher in x and lower in y: pooled, the drift reverses the sign
                recs.append({"seed": seed, "step": 10 * (k + 1), "a": x + 100 * k, "b": y - 100 * k})
    recs.append({"seed": 0, "step": 30, "a": 1.0, "b": 2.0})  # a checkpoint of one point: no ρ
    got = stats.clustered_spearman(recs, "a", "b")
    assert [c["rho"] for c in got["clusters"]] == pytest.approx([1.0, 0.8, 0.6, 1.0, 0.8, -1.0])
    assert got["clusters_undefined"] == 1
    assert got["per_unit"] == pytest.approx({"0": 0.9, "1": 0.8, "2": -0.1})
    across = got["across_units"]
    assert across["mean"] == pytest.approx(1.6 / 3) and across["n"] == 3
    # over seeds: values 0.9, 0.8, −0.1, a one-sample t with 2 degrees of freedom
    sd = float(np.std([0.9, 0.8, -0.1], ddof=1))
    tt = (1.6 / 3) / (sd / math.sqrt(3))
    assert across["p"] == pytest.approx(1 - tt / math.sqrt(2 + tt * tt))
    assert got["pooled"]["rho"] < -0.5 and got["pooled"]["n"] == 25  # drift, the labelled secondary


def test_per_seed_means_skip_missing_values():
    recs = [{"seed": 1, "v": 2.0}, {"seed": 1, "v": 4.0}, {"seed": 0, "v": None}, {"seed": 0, "v": 1.0}]
    assert stats.per_seed(recs, lambda r: r["v"]) == {0: 1.0, 1: 3.0}
