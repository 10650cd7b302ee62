"""`nemo-occ study`: its plan and order, its statistics against hand-worked values, and one tiny study
end to end (probes, shared warm start, resume, a changed configuration refused)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil

import pytest
import torch

from nemo_occ.cli import main
from nemo_occ.lab.study.plan import build_plan, probe_steps, variants


def _plan(**kw):
    args = dict(seeds=[0, 1, 2], sweep_seeds=[0], coef=0.1, lambda_plus=1.0, old_logprobs="main", steps=90,
                checkpoints=3)  # fmt: skip
    args.update(kw)
    return build_plan(**args)


def test_plan_runs_the_core_comparison_first_then_the_controls_probes_and_sweeps():
    jobs = _plan()
    core = [(j.variant.name, j.seed) for j in jobs if j.tier == 1]
    assert core == [(r, s) for s in (0, 1, 2) for r in ("detach", "occ", "policy", "ce")]
    assert [j.tier for j in jobs] == sorted(j.tier for j in jobs)  # priority order
    controls = ["ce_coef1", "ce_matched", "ce_coef1_clipsep", "occ_oldmtp", "occ_probed"]
    assert [(j.variant.name, j.seed) for j in jobs if j.tier == 2] == [(v, s) for s in (0, 1, 2) for v in controls]
    by_name = {j.variant.name: j.variant for j in jobs}
    assert by_name["ce_matched"].overrides == {"coef": None}  # measured by the study
    assert by_name["ce_coef1_clipsep"].overrides == {"coef": 1.0}
    assert by_name["ce_coef1_clipsep"].demo_overrides == {"rl": {"clip_scope": "separate"}}
    probes = [(j.variant.name, j.seed, j.step) for j in jobs if j.kind == "probe"]
    order = [(r, k) for k in (90, 60, 30) for r in ("occ", "policy", "ce")]  # last checkpoint first
    assert probes == [(r, s, k) for s in (0, 1, 2) for r, k in order]
    assert {j.tier for j in jobs if j.kind == "probe"} == {3}
    sweep = {j.variant.name: j.variant.overrides for j in jobs if j.tier == 4}
    assert sweep == {
        "none": {}, "policy_oldmtp": {"old_logprobs": "mtp"},
        "policy_coef0.2": {"coef": 0.2}, "policy_coef0.5": {"coef": 0.5}, "policy_coef1": {"coef": 1.0},
        "occ_lp0.1": {"occ": {"lambda_plus": 0.1}}, "occ_lp0.5": {"occ": {"lambda_plus": 0.5}},
        "occ_lp2": {"occ": {"lambda_plus": 2.0}},
    }  # fmt: skip
    assert all(j.seed == 0 for j in jobs if j.tier == 4)  # the sweep seeds
    # a base coefficient of 0.5 is the core run: the sweep adds 0.1 instead of 0.5
    names = [v.name for v in variants(0.5, 1.0)]
    assert "policy_coef0.1" in names and "policy_coef0.5" not in names
    # configured old_logprobs: mtp → the other reading is main
    assert {j.variant.name for j in _plan(old_logprobs="mtp") if j.tier >= 2} >= {"policy_oldmain", "occ_oldmain"}
    with pytest.raises(ValueError, match="sweep seeds"):
        _plan(sweep_seeds=[7])


def test_matched_ce_coefficient_scales_ces_share_to_occs():
    from nemo_occ.lab.study.plan import matched_coefficient

    # CE at 0.1 moved the main model by 0.4·||g_RL|| on average (4 per unit coefficient); OCC by 0.05
    rec = matched_coefficient([0.04, 0.06, float("nan")], [0.3, 0.5], 0.1)
    assert rec["coef"] == pytest.approx(0.05 / 4.0)
    assert rec["occ_share"] == pytest.approx(0.05) and rec["ce_share_per_coef"] == pytest.approx(4.0)
    assert rec["steps"] == {"occ": 2, "ce": 2}  # the NaN step is not counted
    assert matched_coefficient([1 / 3], [1.0], 1.0)["coef"] == 0.333  # 3 significant digits
    with pytest.raises(ValueError, match="no finite"):
        matched_coefficient([float("nan")], [0.3], 0.1)
    with pytest.raises(ValueError, match="no positive"):
        matched_coefficient([0.0], [0.3], 0.1)


def test_variant_config_applies_demo_overrides_and_refuses_an_unmeasured_coefficient():
    from nemo_occ.lab.demo.config import load_demo_config
    from nemo_occ.lab.study.plan import variant_config

    cfg, occ = load_demo_config(quick=True)
    by_name = {v.name: v for v in variants(0.1, 1.0)}
    rcfg, rocc = variant_config(cfg, occ, by_name["ce_coef1_clipsep"], 3, 2)
    assert rcfg.rl.clip_scope == "separate" and rocc.coef == 1.0 and rcfg.seed == 3
    assert variant_config(cfg, occ, by_name["ce_coef1"], 3, 2)[0].rl.clip_scope == "global"
    with pytest.raises(ValueError, match="not measured yet"):
        variant_config(cfg, occ, by_name["ce_matched"], 3, 2)


def test_probe_steps_are_spread_evenly_and_end_at_the_last_step():
    assert probe_steps(200, 3) == [67, 133, 200]
    assert probe_steps(4, 2) == [2, 4]
    assert probe_steps(5, 1) == [5]
    with pytest.raises(ValueError, match="checkpoints"):
        probe_steps(2, 3)


def _cli(*argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["study", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0", "0"], "name each seed once"),
        (["--jobs", "0"], "--jobs 0: give at least 1"),
        (["--seeds", "0", "--sweep-seeds", "3"], "each must be one of --seeds"),
        (["--only", "bogus"], "choose from detach, occ, policy, ce"),
        (["--probe-checkpoints", "0"], "--probe-checkpoints >= 1"),
        (["--quick", "--probe-checkpoints", "9"], "exceeds the 4 RL steps"),
    ],
)
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    rc, _, err = _cli(*argv, "--out", str(tmp_path / "o"))
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


TINY = ["--quick", "--steps", "2", "--seeds", "0", "--probe-minibatches", "2", "--probe-checkpoints", "1",
        "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    rc, stdout, err = _cli(*TINY, "--only", "detach", "occ", "--out", str(out))
    return out, rc, stdout, err


@pytest.mark.slow
def test_tiny_study_trains_probes_and_reports(tiny):
    out, rc, stdout, err = tiny
    assert rc == 0, err
    assert "3 jobs, 0 already done, 3 to run" in err  # none and occ training, the occ probe
    rec = json.loads((out / "probes" / "occ" / "seed0" / "step2.json").read_text())
    assert rec["step"] == 2 and 1 <= len(rec["records"]) <= 2
    for r in rec["records"]:
        for key in (
            "c",
            "v2",
            "rl_norm2",
            "c_cross",
            "v2_cross",
            "rl_norm2_cross",
            "c_hat",
            "v2_hat",
            "d_rl2",
            "v2_hat_main",
            "v2_hat_own",
            "head_gap",
        ):
            assert math.isfinite(r[key]), key
        assert r["v2"] > 0 and r["rl_norm2"] > 0 and r["step"] == 2
    snap = torch.load(out / "probes" / "occ" / "seed0" / "step2.pt", weights_only=True)
    assert snap["step"] == 2 and "model" in snap and "optimizer" in snap
    # the warm start of seed 0 is built once and shared (hard links: one file)
    shared = out / "warmstart" / "seed0.pt"
    for variant in ("detach", "occ"):
        assert os.path.samefile(shared, out / "runs" / variant / "seed0" / "warmstart.pt"), variant
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"detach", "occ"} and summary["dropped"]["unfinished"] == []
    assert summary["probes"]["occ"]["records"] == len(rec["records"])
    # the figures every run set gets; no sweep panel (none of the sweeps' variants ran)
    figures = ["fig6_reward.png", "fig4_lambda.png", "fig_lambda_agreement.png", "fig2_dynamics.png",
               "fig8_fidelity.png", "fig8_training_probes.png"]  # fmt: skip
    assert summary["figures"] == figures and summary["figures_not_drawn"] == {}
    assert all((out / name).exists() for name in figures)
    assert "## Per variant" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_tiny_study_rerun_skips_finished_jobs_and_refuses_another_config(tiny):
    out, rc, _, _ = tiny
    assert rc == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoint.pt")}
    rc, _, err = _cli(*TINY, "--only", "detach", "occ", "--out", str(out))
    assert rc == 0 and "3 jobs, 3 already done, 0 to run" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoint.pt")} == before
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, _, err = _cli(*[a if a != "2" else "3" for a in TINY[:3]], *TINY[3:], "--out", str(out))
    assert rc == 2 and "another configuration" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_training_probes_are_read_off_the_rows_that_hold_a_probe():
    from nemo_occ.lab.figures import training_probes

    probe = {"train/mtp/fidelity/c_same_sample_1": 0.5, "train/mtp/fidelity/v2_same_sample_1": 2.0,
                 "train/mtp/fidelity/rl_norm2_same_sample": 4.0,
             "train/mtp/fidelity/c_hat_per_token_1": 0.01, "train/mtp/fidelity/v2_hat_per_token_1": 0.2}  # fmt: skip
    rows = [
        {"step": 1, "reward/mean": 0.1},
        {"step": 2, **probe},
        {"step": 3, "train/mtp/fidelity/c_same_sample_1": 1.0},
    ]
    assert training_probes(rows) == [
        {"step": 2, "c": 0.5, "v2": 2.0, "rl_norm2": 4.0, "c_hat": 0.01, "v2_hat": 0.2}
    ]
    # with the head-gap sums of the step: per token, the gap = share × v̂²(vs main old)
    gap = {"train/mtp/proxy/valid_tokens_1": 10.0, "train/mtp/proxy/v2_hat_vs_main_old_1": 5.0,
           "train/mtp/proxy/v2_hat_vs_own_old_1": 1.0, "train/mtp/proxy/head_gap_share_1": 0.6}  # fmt: skip
    (rec,) = training_probes([{"step": 3, **probe, **gap}])
    assert (rec["v2_hat_main"], rec["v2_hat_own"], rec["head_gap"]) == pytest.approx((0.5, 0.1, 0.3))


def test_a_second_study_in_the_same_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out / ".study.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running study holds it
    try:
        rc, _, err = _cli(*TINY, "--only", "detach", "--out", str(out))
    finally:
        os.close(fd)
    assert rc == 2 and "another nemo-occ study is running in it" in err
    assert [p.name for p in out.iterdir()] == [".study.lock"]  # nothing written


@pytest.mark.slow
def test_a_foreign_run_folder_is_refused_before_anything_in_out_is_written(tiny, tmp_path):
    out, rc, _, _ = tiny
    assert rc == 0
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # a checkpoint of another run (detach's) in occ's folder: a folder assembled by hand
    shutil.copyfile(copy / "runs" / "detach" / "seed0" / "detach" / "checkpoint.pt",
                    copy / "runs" / "occ" / "seed0" / "occ" / "checkpoint.pt")  # fmt: skip
    snapshot = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    rc, _, err = _cli(*TINY, "--only", "detach", "occ", "--out", str(copy))
    assert rc == 2 and "another configuration than its folder's run.json" in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == snapshot  # study.json included


@pytest.mark.slow
def test_jobs_in_parallel_give_the_same_numbers_as_one_at_a_time(tmp_path):
    """Each job is its own process with one torch thread: results do not depend on --jobs or on the order
    jobs finish (what makes a rerun's tables identical)."""
    rows = {}
    for n in (1, 2):
        out = tmp_path / f"jobs{n}"
        rc, _, err = _cli(*TINY, "--seeds", "0", "1", "--probe-minibatches", "0", "--only", "occ", "ce",
                          "ce_matched", "--jobs", str(n), "--out", str(out))  # fmt: skip
        assert rc == 0, err
        rows[n] = {
            str(p.relative_to(out)): [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                                      for line in p.read_text().splitlines()]  # fmt: skip
            for p in sorted((out / "runs").rglob("metrics.jsonl"))
        }
        rows[n]["matched"] = json.loads((out / "matched.json").read_text())
    assert len(rows[1]) == 2 * 3 + 1  # occ, ce, ce_matched for seeds 0 and 1, and the matched record
    assert rows[1] == rows[2]


def test_max_minutes_starts_no_job_its_kind_says_would_end_past_the_bound():
    import time

    from nemo_occ.lab.study.run import _Runner

    r = _Runner(None, None, None, None, None, 2, 1.0, False, print)
    r.t0 = time.perf_counter() - 20  # 20 s in
    assert r._fits("probe")  # no probe has finished: nothing says it would not fit
    r.spent["train"] = [30.0]
    assert r._fits("train")  # 20 s + 30 s <= 60 s
    r.spent["train"] = [30.0, 60.0]
    assert not r._fits("train")  # 20 s + the mean 45 s > 60 s
    r.spent["train"] = [10.0, 50.0]
    assert r._fits("train")  # 20 s + 30 s
    assert _Runner(None, None, None, None, None, 2, None, False, print)._fits("train")  # no bound
