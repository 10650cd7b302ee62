"""The study's report (nemo_occ.lab.study.report): per-run numbers, the test family with its adjusted p, each
claim's verdict, the within-checkpoint probe statistics, what was dropped, and summary.md, against answers
worked out by hand (t with 2 degrees of freedom, Benjamini-Hochberg by hand)."""

from __future__ import annotations

import math

import pytest

from nemo_occ.lab.study import report as R
from nemo_occ.lab.study import stats


def _t2_p(diffs: list[float]) -> float:
    """Two-sided p of a one-sample t over three values (2 degrees of freedom): 1 − t / sqrt(2 + t²)."""
    n = len(diffs)
    assert n == 3
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    t = abs(m / (sd / math.sqrt(n)))
    return 1 - t / math.sqrt(2 + t * t)


def _metrics(eval_final, reward=0.5, agreement=0.8, lam=1.0) -> dict:
    return {"eval_final": eval_final, "reward_final": reward, "agreement_final": agreement,
            "lambda_positive": lam}  # fmt: skip


def _runs(eval_diffs, agreement_diffs, seeds=(0, 1, 2)) -> dict:
    """detach and occ over ``seeds``: occ − detach differs by the given amounts on eval and agreement and not
    at all on reward (no test: every seed the same difference); λ > 0 on every step of every seed (no test)."""
    base = [0.30, 0.20, 0.40]
    return {
        "detach": {s: _metrics(base[i], agreement=0.5) for i, s in enumerate(seeds)},
        "occ": {
            s: _metrics(base[i] + eval_diffs[i], agreement=0.5 + agreement_diffs[i])
            for i, s in enumerate(seeds)
        },
    }


def test_run_metrics_reads_the_tail_and_the_sign_of_lambda():
    rows = [{"step": 0, "eval/accuracy": 0.2}]
    for t in range(1, 11):
        rows.append(
            {"step": t, "reward/mean": t / 10, "train/mtp/accuracy_1": 0.5, "train/mtp/occ/lambda_1": t - 3.0}
        )
    rows[-1]["eval/accuracy"] = 0.9
    m = R.run_metrics(rows, steps=10)
    assert m["reward_final"] == pytest.approx((0.6 + 0.7 + 0.8 + 0.9 + 1.0) / 5)  # tail = max(5, 10/5)
    assert m["eval_start"] == 0.2 and m["eval_final"] == 0.9 and m["agreement_final"] == 0.5
    assert m["lambda_positive"] == pytest.approx(0.7)  # −2, −1, 0 are not positive; 1..7 are
    assert m["lambda_median"] == pytest.approx(2.5)  # median of −2..7
    assert m["mtp_share_median"] is None and m["clipped_mean"] is None  # not logged: not invented
    rows[3].update({"update/mtp_share": 0.1, "update/clipped": 1.0})
    rows[4].update({"update/mtp_share": 0.5, "update/clipped": 0.0})
    rows[5].update({"update/mtp_share": 0.2, "update/clipped": 0.5})
    m = R.run_metrics(rows, steps=10)
    assert m["mtp_share_median"] == pytest.approx(0.2) and m["clipped_mean"] == pytest.approx(0.5)


def test_every_test_is_adjusted_over_the_whole_family_by_benjamini_hochberg():
    # eval diffs 1, 2, 4 (×0.01): p_e = 1 − √7/3; agreement diffs 1, 1.5, 2 (×0.01): t = 3√3. Reward and λ
    # have no variation: no p, so not counted. BH over m = 2: the smaller p doubles, the larger stays.
    got = R.analyse(_runs([0.01, 0.02, 0.04], [0.01, 0.015, 0.02]), {}, {})
    p_e, p_a = _t2_p([1, 2, 4]), _t2_p([1, 1.5, 2])
    assert p_a < 0.05 < p_e
    tests = got["tests"]
    assert tests["eval_final: occ − detach"]["p"] == pytest.approx(p_e)
    assert tests["agreement_final: occ − detach"]["p"] == pytest.approx(p_a)
    assert tests["agreement_final: occ − detach"]["p_adjusted"] == pytest.approx(2 * p_a)
    assert tests["eval_final: occ − detach"]["p_adjusted"] == pytest.approx(p_e)
    assert tests["reward_final: occ − detach"]["p"] is None and got["family_size"] == 2
    claims = {c["key"]: c for c in got["claims"]}
    occ = claims["occ_eval"]
    assert occ["verdict"] == "not shown" and occ["p_adjusted"] == pytest.approx(p_e)
    assert f"adjusted p = {p_e:.2g}" in occ["why"] and "seeds" in occ["settle"]
    assert occ["mean"] == pytest.approx(7 / 300) and occ["figure"] == "fig6_reward.png"
    assert claims["occ_vs_policy"]["verdict"] == "not tested"  # no policy run
    assert (
        claims["occ_reward"]["verdict"] == "not tested" and "same difference" in claims["occ_reward"]["why"]
    )


def test_a_claim_is_shown_only_on_its_adjusted_p_and_in_its_direction():
    steady = [0.01, 0.015, 0.02]  # alone in the family: adjusted = raw = p of t = 3√3 ≈ 0.035
    got = R.analyse(_runs(steady, [0.0, 0.0, 0.0]), {}, {})
    assert {c["key"]: c["verdict"] for c in got["claims"]}["occ_eval"] == "shown"
    got = R.analyse(_runs([-d for d in steady], [0.0, 0.0, 0.0]), {}, {})
    occ = {c["key"]: c for c in got["claims"]}["occ_eval"]
    assert occ["verdict"] == "contradicted" and "opposite direction" in occ["why"]
    # the same effect next to a second test with the same p: BH keeps both at p ≈ 0.035 (shown); with a
    # weaker second test (p ≈ 0.118) the first doubles to ≈ 0.07: not shown any more
    got = R.analyse(_runs(steady, [0.01, 0.02, 0.04]), {}, {})
    occ = {c["key"]: c for c in got["claims"]}["occ_eval"]
    assert occ["p_adjusted"] == pytest.approx(2 * _t2_p([1, 1.5, 2])) and occ["verdict"] == "not shown"


def _probe_records(seeds=(0, 1, 2), steps=(10, 20)) -> list[dict]:
    """Within every (seed, step) ĉ ranks c perfectly (ρ = 1) but c_cross in reverse (ρ = −1); the
    alignment c_cross / sqrt(rl_norm2 · v2) of seed s is 0.1·(s + 1) on every record."""
    out = []
    for s in seeds:
        for k in steps:
            for i in range(5):
                out.append({"seed": s, "step": k, "c_hat": float(i), "c": float(i), "c_cross": 0.1 * (s + 1) * 2 - 0.001 * i,
                            "v2": 4.0, "rl_norm2": 1.0, "v2_hat": float(i), "v2_cross": float(i) + 1,
                            "d_rl2": 1.0})  # fmt: skip
    return out


def test_probe_statistics_use_the_cross_fitted_exact_statistics_within_checkpoints():
    recs = _probe_records()
    p = R.probe_statistics(recs)
    assert p["exact"] == "cross-fitted"
    assert [c["rho"] for c in p["rho_c"]["clusters"]] == pytest.approx([-1.0] * 6)  # against c_cross
    assert [c["rho"] for c in p["rho_c_same_sample"]["clusters"]] == pytest.approx(
        [1.0] * 6
    )  # labelled apart
    assert p["rho_v2"]["across_units"]["mean"] == pytest.approx(1.0)
    # alignment per seed: c_cross / sqrt(1 · 4) averaged over the seed's records = 0.1·(s + 1) − 0.001
    assert p["alignment"]["values"] == pytest.approx([0.099, 0.199, 0.299])
    assert p["alignment"]["n"] == 3 and p["alignment"]["p"] == pytest.approx(_t2_p([0.099, 0.199, 0.299]))
    # without c_cross, the same-sample statistics, named so
    same = R.probe_statistics(
        [{k: v for k, v in r.items() if k not in ("c_cross", "v2_cross")} for r in recs]
    )
    assert same["exact"] == "same-sample" and "rho_c_same_sample" not in same
    assert same["rho_c"]["across_units"]["mean"] == pytest.approx(1.0)


def test_probe_claims_enter_the_family_and_read_the_cross_fitted_correlation():
    got = R.analyse({}, {"occ": _probe_records()}, {})
    assert {"alignment: occ", "rho_c: occ", "rho_v2: occ"} <= set(got["tests"])
    claims = {c["key"]: c for c in got["claims"]}
    # ρ(ĉ, c_cross) = −1 in every cluster: no variation over seeds, so no test (not a silent NaN)
    assert claims["proxy_c"]["verdict"] == "not tested" and "same difference" in claims["proxy_c"]["why"]
    assert claims["aligned_occ"]["p"] == pytest.approx(_t2_p([0.099, 0.199, 0.299]))


def test_dropped_lists_unfinished_skipped_and_missing_seeds():
    from nemo_occ.lab.study.plan import Job, Variant

    occ = Variant("occ", "occ")
    jobs = [Job(1, "train", occ, 0), Job(1, "train", occ, 1), Job(3, "probe", occ, 0, 4)]
    done = {jobs[0]: True, jobs[1]: False, jobs[2]: False}
    got = R._dropped(
        jobs, done, {"occ": [0, 1], "ce": [0]}, {"occ": {0: {}}}, {jobs[2].label: "no checkpoint"}
    )
    assert got["unfinished"] == ["occ seed 1: training", "occ seed 0: probe at step 4"]
    assert got["skipped"] == {"occ seed 0: probe at step 4": "no checkpoint"}
    assert got["missing_seeds"] == {"occ": [1], "ce": [0]}


def test_figure_captions_name_each_variants_seeds_when_they_differ():
    pairs = [("occ", 0), ("occ", 1), ("occ", 2), ("occ_lp2", 0), ("policy", 2), ("policy", 0)]
    assert R.seeds_text(["occ", "occ_lp2"], pairs) == "seeds occ [0, 1, 2], occ_lp2 [0]"
    # one list when the drawn variants agree; variants without a finished run are left out
    assert R.seeds_text(["occ", "missing"], pairs) == "seeds [0, 1, 2]"
    assert R.seeds_text(["policy", "occ_lp2"], [p for p in pairs if p != ("policy", 2)]) == "seeds [0]"


def test_seeds_needed_inverts_the_mde():
    assert stats.seeds_needed(stats.mde_dz(10)) == 10
    assert stats.seeds_needed(-stats.mde_dz(7) * 1.0001) == 7  # the sign does not matter
    assert stats.seeds_needed(0.0) is None and stats.seeds_needed(None) is None


def _summary(result: dict) -> dict:
    """The fields summary_markdown reads beside analyse's (as build_study_report fills them)."""
    return {
        "command": "nemo-occ study", "commit": "abc", "versions": {},
        "config": {"steps": 3, "prompts_per_step": 2, "samples_per_prompt": 2, "minibatches": 1, "task": {},
                   "model": {}, "coef": 0.1, "lambda_plus": 1.0, "old_logprobs": "main"},
        "probe": {"minibatches": 2, "steps": [3], "regimes": ["occ"]},
        "statistics": {"baseline": "detach", "unit": "seed", "paired_test": stats.PAIRED_TEST,
                       "one_sample_test": stats.ONE_SAMPLE_TEST, "multiplicity": stats.MULTIPLICITY,
                       "family_size": result["family_size"], "alpha": 0.05, "intervals": "t", "mde": "nct",
                       "correlations": "within", "outcomes": R.OUTCOMES},
        **result, "variants": {}, "confounds": {}, "matched": None,
        "warm_start": {"seeds": {"0": {"steps": 80, "gate": "within", "pass_rate": 0.4}}, "range": {}},
        "figures": ["fig6_reward.png"], "figures_not_drawn": {},
        "dropped": {"unfinished": ["ce seed 1: training"], "skipped": {}, "missing_seeds": {"ce": [1]}},
    }  # fmt: skip


def test_summary_md_puts_each_claim_beside_its_adjusted_p_and_says_why_it_is_not_shown():
    # eval p ≈ 0.035 is the smaller of two: BH doubles it to ≈ 0.07, so the claim is not shown
    result = R.analyse(_runs([0.01, 0.015, 0.02], [0.01, 0.02, 0.04]), {}, {})
    md = R.summary_markdown(_summary(result))
    p_e = _t2_p([1, 1.5, 2])
    row = next(line for line in md.splitlines() if line.startswith("| OCC raises held-out accuracy"))
    assert f"| {p_e:.2g} | {2 * p_e:.2g} | **not shown** |" in row
    assert "`eval_final: occ − detach` (paired t)" in row
    assert "### Not reproduced here, and why" in md and "What would settle it: about" in md
    assert "Benjamini-Hochberg" in md and "(2 tests)" in md
    assert "- unfinished: ce seed 1: training" in md and "- ce: no finished run for seeds [1]" in md
    assert R.summary_markdown(_summary(result)) == md  # no clock inside


@pytest.mark.slow
def test_a_rebuilt_report_is_byte_identical_and_keeps_clocks_in_provenance(tmp_path):
    import contextlib
    import io
    import json

    from nemo_occ.cli import main

    argv = ["study", "--quick", "--steps", "2", "--seeds", "0", "1", "--probe-minibatches", "2",
            "--probe-checkpoints", "1", "--no-progress", "--only", "detach", "occ", "--out", str(tmp_path / "o")]  # fmt: skip
    out = tmp_path / "o"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
        first = {n: (out / n).read_bytes() for n in ("summary.json", "summary.md")}
        prov = json.loads((out / "provenance.json").read_text())
        assert main([*argv, "--report-only"]) == 0
    assert {n: (out / n).read_bytes() for n in first} == first
    assert json.loads((out / "provenance.json").read_text())["report"] != prov["report"]  # its own clock
    text = first["summary.json"].decode()
    assert all(k not in text for k in ('"wall_s"', '"started"', '"load_average"')), "a clock in summary.json"
    summary = json.loads(text)
    assert summary["comparisons"]["occ − detach"]["eval_final"]["seeds"] == [0, 1]
    assert "eval_final: occ − detach" in summary["tests"] and summary["probes"]["occ"]["seeds"] == [0, 1]
    assert set(prov["run_wall_s"]) == {"detach", "occ"}


def test_a_claims_confounds_quote_its_variants_measured_share_and_clipping():
    runs = _runs([0.01, 0.02, 0.04], [0.0, 0.0, 0.0])
    for s, (share, clip) in enumerate([(0.01, 0.0), (0.03, 0.5), (0.02, 1.0)]):
        runs["occ"][s].update(mtp_share_median=share, clipped_mean=clip)
        runs["detach"][s].update(mtp_share_median=0.0, clipped_mean=None)
    occ = {c["key"]: c for c in R.analyse(runs, {}, {})["claims"]}["occ_eval"]
    assert occ["measured"] == "occ MTP share 0.02, clip fired on 50% of updates; detach MTP share 0"


def test_summary_md_sets_the_matched_coefficients_source_beside_the_measured_shares():
    s = _summary(R.analyse({}, {}, {}))
    share = {"mean": 0.1, "sd": None, "min": 0.1, "max": 0.1, "n": 1}
    none = {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    for name, mean in (("occ", 0.03), ("ce_matched", 0.1)):
        s["variants"][name] = {"settings": name, "seeds": {}, "mtp_share_median": {**share, "mean": mean},
                               "clipped_mean": none, **{k: none for k in R.PER_RUN if k != "mtp_share_median"}}  # fmt: skip
    s["matched"] = {"ce_matched": {"coef": 0.145, "occ_share": 0.11, "ce_share_per_coef": 0.77, "ce_coef": 0.1,
                                   "runs": ["ce/seed0", "occ/seed0"]}}  # fmt: skip
    md = R.summary_markdown(s)
    assert (
        "ce_matched: coef 0.145 = 0.1 × occ's mean MTP share over all steps 0.1100 / ce's at coef 0.1 (0.0770), "
        "from 2 runs. In the table above (per-run medians, mean over seeds): ce_matched 0.1000, occ 0.0300."
    ) in md


def test_the_committed_study_adjusts_every_p_by_benjamini_hochberg_over_its_whole_family():
    """docs/study/summary.json: every test's adjusted p is BH over all of the report's p-values, recomputed
    here with scipy from the raw ones; no claim is called shown on an adjusted p ≥ 0.05."""
    import json
    from pathlib import Path

    from scipy.stats import false_discovery_control

    s = json.loads((Path(__file__).resolve().parents[2] / "docs" / "study" / "summary.json").read_text())
    tests = {k: t for k, t in s["tests"].items() if t["p"] is not None}
    assert len(tests) == s["statistics"]["family_size"]
    adjusted = false_discovery_control([t["p"] for t in tests.values()], method="bh")
    assert [t["p_adjusted"] for t in tests.values()] == pytest.approx(list(adjusted))
    for claim in s["claims"]:
        if claim["verdict"] == "shown":
            assert claim["p_adjusted"] < 0.05
        assert claim.get("p_adjusted") is None or claim["p_adjusted"] == pytest.approx(
            s["tests"][claim["test_key"]]["p_adjusted"]
        )


def test_a_sweep_figures_caption_names_each_run_and_the_coefficient_ce_matched_ran_at():
    from nemo_occ.lab.study.plan import MATCHED, Variant

    matched = Variant(MATCHED, "ce", {"coef": None}, kind="control")
    assert "coef=0.145" in R._described(matched, {"matched": {MATCHED: {"coef": 0.145}}})
    assert R._described(matched, {"matched": None}) == matched.describe()
    clipsep = Variant("x", "ce", {"coef": 1.0}, demo_overrides={"rl": {"clip_scope": "separate"}})
    assert R._described(clipsep, {}) == "ce (coef=1.0, rl.clip_scope=separate)"
    probed = Variant("occ_probed", "occ", {"occ": {"estimator": "probed"}})
    assert (
        R._described(probed, {})
        == "occ (occ.estimator=probed): λ from the cross-fitted exact probes instead of the proxies"
    )
    note = R._probe_note({"steps": [22, 45], "minibatches": 16})
    assert "at steps 22 and 45" in note and "16 minibatches planned per seed and checkpoint" in note
