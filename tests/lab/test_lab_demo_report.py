"""The demo's report (nemo_occ.lab.demo.report): its conditions read the metrics under the names the runs log
them, cross-fitted beside same-sample, and its figure captions say that one seed has no interval."""

from __future__ import annotations

import pytest

from nemo_occ.lab.demo import report as D


def test_conditions_read_the_logged_cosines_cross_fitted_beside_same_sample():
    rows = [{"step": 1, "reward/mean": 0.25, "train/mtp/accuracy_1": 0.7}]
    for t, (same, cross) in enumerate([(0.1, -0.2), (0.3, 0.0), (0.2, -0.1), (0.4, None)], start=2):
        rows.append({"step": t, "train/mtp/fidelity/cos_same_sample_1": same, "train/mtp/fidelity/c_cross_fit_1": 1.0,
                     "train/mtp/fidelity/cos_cross_fit_1": cross})  # fmt: skip
    c = D.conditions_summary(rows)
    assert c["cos_rl_mtp_1_median"] == pytest.approx(0.25) and c[
        "cos_rl_mtp_1_cross_fit_median"
    ] == pytest.approx(-0.1)
    summary = {"regimes": {"occ": {"eval_accuracy_start": 0.1, "eval_accuracy_final": 0.2, "reward_final_mean5": 0.3,
                                   "mtp_accuracy_1_final_mean5": 0.7, "step_time_s": 1.0, "wall_time_s": 3.0,
                                   "conditions": c}}}  # fmt: skip
    md = D.summary_markdown(summary, "# h")
    assert "| cos(g_RL, g_MTP) cross-fitted | same-sample |" in md
    # cross-fitted first, with the probes it is defined at (the fourth's cross-fitted square was <= 0)
    assert "| -0.10 (3 of 4) | 0.25 |" in md


def test_demo_captions_say_one_seed_has_no_interval(monkeypatch, tmp_path):
    import nemo_occ.lab.figures as F

    asked = []

    def regime_figures(out_dir, runs, *, caption, eval_k):
        asked.append((caption("Training reward", list(runs), "runs"), eval_k))
        return [], {}

    monkeypatch.setattr(F, "regime_figures", regime_figures)
    D.plot({"occ": {"metrics": [{"step": 1}]}}, tmp_path, "setting s", 4)
    assert asked == [("Training reward. setting s; one seed per regime (occ): no interval across seeds.", 4)]
