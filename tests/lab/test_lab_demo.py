"""The CPU demo end to end (`nemo-occ demo --quick`), its verifier and its checkpoints (reruns and
resume: test_demo_rerun.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from nemo_occ.cli import main
from nemo_occ.core.metrics import logged_name
from nemo_occ.lab.demo.checkpoint import load_checkpoint, save_checkpoint
from nemo_occ.lab.demo.output import DemoOutputError
from nemo_occ.lab.demo.task import EOS, AdditionTask

REGIMES = ["none", "detach", "ce", "policy", "occ"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    import contextlib
    import io

    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--quick", "--out", str(out), "--no-progress", "--fidelity-every", "2"])
    assert torch.get_num_threads() == threads  # demo.threads (default 1) holds only while the demo runs
    return out, rc, buf.getvalue()


@pytest.mark.slow
def test_quick_demo_writes_every_artifact(quick_run):
    out, rc, stdout = quick_run
    assert rc == 0
    # the demo leaves the process as it found it: CPU patches undone, no process group left behind
    from nemo_occ.lab import cpu_compat

    assert not cpu_compat.is_enabled() and not torch.distributed.is_initialized()
    assert stdout.strip().splitlines()[-1].startswith(f"Results are in {out.resolve()}")
    for regime in REGIMES:
        rows = _rows(out / regime / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(0, 5)), regime  # step 0 = eval before RL
        for r in rows[1:]:
            for key in ("reward/mean", "train/mtp/accuracy_1"):
                assert key in r and 0.0 <= r[key] <= 1.0, (regime, key)
        evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        assert len(evals) == 3 and all(0.0 <= e <= 1.0 for e in evals)  # steps 0, 2, 4
        assert list((out / regime / "tb").glob("events.out.tfevents.*")), regime
        assert (out / regime / "checkpoint.pt").exists()
    occ_rows = _rows(out / "occ" / "metrics.jsonl")[1:]
    updated = [r for r in occ_rows if r["updates"] > 0]
    assert updated, "the quick run must perform at least one OCC update"
    for r in updated:
        for key in (
            "train/mtp/occ/lambda_1",
            "train/mtp/occ/c_hat_1",
            "train/mtp/occ/v2_hat_1",
            "train/mtp/occ/first_order_1",
            "train/mtp/occ/second_order_1",
        ):
            assert key in r and math.isfinite(r[key]), key
    # the first update of every step runs at θ = θ_old and must not set λ: with 2 updates per step,
    # one of the two refreshes λ (refreshed: share of the step's updates), with 1 update none does
    assert all(r["train/mtp/occ/refreshed"] == 0.5 for r in updated if r["updates"] == 2)
    assert all(r["train/mtp/occ/refreshed"] == 0.0 for r in updated if r["updates"] == 1)
    assert any(r["updates"] == 2 for r in updated)
    for prev, r in zip(updated, updated[1:], strict=False):  # a step's updates apply the λ the last one left
        if r["step"] == prev["step"] + 1:
            assert r["train/mtp/occ/lambda_applied_1"] == pytest.approx(prev["train/mtp/occ/lambda_1"])

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["regimes"]) == set(REGIMES)
    assert summary["step_time_ratio_occ_over_detach"] > 0
    for regime, entry in summary["regimes"].items():
        rows = _rows(out / regime / "metrics.jsonl")
        assert entry["eval_accuracy_final"] == [r["eval/accuracy"] for r in rows if "eval/accuracy" in r][-1]
    md = (out / "summary.md").read_text()
    assert all(f"| {r} |" in md for r in REGIMES)
    # the paper-style figures of nemo_occ.lab.figures, every one drawn (none is left out for lack of data)
    figures = ["fig6_reward.png", "fig4_lambda.png", "fig_lambda_agreement.png", "fig2_dynamics.png",
               "fig8_training_probes.png"]  # fmt: skip
    assert summary["plots"] == figures and "plots_not_drawn" not in summary
    for name in figures:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


@pytest.mark.slow
def test_quick_demo_names_its_mtp_metrics_as_nemo_rl_logs_them(quick_run):
    """One name, one meaning: every MTP metric of the demo's rows is a name docs/nemo_rl.md documents for
    the NeMo-RL path (depth written <d>, train/mtp/proxy/* as its train/mtp/occ/* row), none is left bare."""
    from tests.nemo_rl.test_nemo_rl_metric_names import _documented

    documented = set(_documented())
    out, _, _ = quick_run
    for regime in REGIMES:
        for r in _rows(out / regime / "metrics.jsonl"):
            bare = [k for k in r if k.startswith(("mtp/", "occ/", "proxy/", "fidelity/"))]
            assert not bare, (regime, bare)
            for key in (k for k in r if k.startswith("train/")):
                name = re.sub(r"_1$", "_<d>", key).replace("/proxy/", "/occ/")
                assert name in documented, (regime, key)


@pytest.mark.slow
def test_quick_demo_fidelity_pairs_proxy_with_exact(quick_run):
    out, _, _ = quick_run
    rows = _rows(out / "occ" / "metrics.jsonl")
    pairs = [r for r in rows if "train/mtp/fidelity/c_same_sample_1" in r]
    assert [r["step"] for r in pairs] == [2, 4]
    for n, r in enumerate(pairs, start=1):
        assert (
            r["train/mtp/fidelity/v2_same_sample_1"] > 0.0
            and r["train/mtp/fidelity/mtp_params_v2_same_sample_1"] > 0.0
        )
        # cross-fitted and, the optimizer having stepped before the probed update, Adam's metric
        assert r["train/mtp/fidelity/c_cross_fit_1"] != r["train/mtp/fidelity/c_same_sample_1"]
        assert (
            r["train/mtp/fidelity/precond_available"] == 1.0
            and "train/mtp/fidelity/c_cross_fit_precond_1" in r
        )
        # the probe is recorded next to the probed update's own proxies: the step's last update, whose ĉ is
        # the step's ĉ summed over its updates (the row's mean times the count), as the first update runs at
        # θ = θ_old where δ_RL ≡ 0 and so ĉ = 0
        assert r["train/mtp/fidelity/probes"] == n
        assert r["train/mtp/fidelity/c_hat_1"] == pytest.approx(r["train/mtp/occ/c_hat_1"] * r["updates"])
        # both updates of a step apply the λ the previous step left (lagged timing; the first one keeps λ)
        share = abs(r["train/mtp/occ/lambda_applied_1"]) * math.sqrt(
            r["train/mtp/fidelity/v2_same_sample_1"] / r["train/mtp/fidelity/rl_norm2_same_sample"]
        )
        assert r["train/mtp/fidelity/update_share_1"] == pytest.approx(share)
        assert r["train/mtp/fidelity/trusted_1"] == 0.0  # two probes cannot show anything
        # both readings of δ_MTP every update (the demo has the MTP heads' own old log-probs)
        assert (
            r["train/mtp/occ/v2_hat_vs_main_old_1"] == r["train/mtp/occ/v2_hat_1"]
            and r["train/mtp/occ/v2_hat_vs_own_old_1"] > 0
        )
        assert 0.0 <= r["train/mtp/occ/head_gap_share_1"]
    # the detach regime's MTP gradient lives only on MTP parameters: over the main model (the paper's
    # definition) its c and v² are zero whatever the data, over mtp.* its v² is not
    for r in _rows(out / "detach" / "metrics.jsonl"):
        if "train/mtp/fidelity/c_same_sample_1" in r:
            for kind in ("same_sample", "cross_fit"):
                assert (
                    r[f"train/mtp/fidelity/c_{kind}_1"] == 0.0 and r[f"train/mtp/fidelity/v2_{kind}_1"] == 0.0
                )
            assert r["train/mtp/fidelity/mtp_params_v2_same_sample_1"] > 0.0
    # the summary quotes the run's own fidelity metrics at its last probe
    fid = json.loads((out / "summary.json").read_text())["regimes"]["occ"]["fidelity"]
    assert fid["probes"] == pairs[-1]["train/mtp/fidelity/probes"] == 2
    assert fid["depths"]["1"]["trusted"] == pairs[-1]["train/mtp/fidelity/trusted_1"]
    assert (out / "fig8_training_probes.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_quick_demo_logs_clip_firing_mtp_share_and_the_gradient_cosines(quick_run):
    out, _, _ = quick_run
    rows = {r: _rows(out / r / "metrics.jsonl")[1:] for r in REGIMES}
    for regime, steps in rows.items():
        for r in steps:
            # the fraction of the step's updates whose gradient norm exceeded the clip (2 updates per step)
            assert r["update/clipped"] in (0.0, 0.5, 1.0), regime
            share = r["update/mtp_share"]
            if regime in ("none", "detach"):  # no MTP term, or one that never reaches the main model
                assert share == 0.0 and r.get("update/mtp_cos") is None, regime
            else:  # a fixed coefficient 0.1 > 0 on a loss with a gradient: a non-zero share
                assert share > 0.0 or regime == "occ", regime
    for regime in ("ce", "policy", "occ"):
        probed = [r for r in rows[regime] if "train/mtp/fidelity/c_same_sample_1" in r]
        assert probed, regime
        for r in probed:
            # cos(g_RL, g_MTP) by its definition from the probe's own c, v², ||g_RL||²
            c, v2, rl2 = (
                r[f"train/mtp/fidelity/{k}"]
                for k in ("c_same_sample_1", "v2_same_sample_1", "rl_norm2_same_sample")
            )
            assert r["train/mtp/fidelity/cos_same_sample_1"] == pytest.approx(c / math.sqrt(v2 * rl2))
            # undefined (None) when the probed minibatch holds a single group: no two halves
            assert r["exact/half_batch_cos"] is None or -1.0 <= r["exact/half_batch_cos"] <= 1.0
    assert any(r.get("exact/half_batch_cos") is not None for g in REGIMES for r in rows[g])
    # the summary's conditions are the run's own metrics: the clip-firing share is the mean over steps
    cond = json.loads((out / "summary.json").read_text())["regimes"]["policy"]["conditions"]
    clipped = [r["update/clipped"] for r in rows["policy"]]
    assert cond["clip_fired_share"] == pytest.approx(sum(clipped) / len(clipped))
    assert cond["mtp_agreement_1_step1"] == rows["policy"][0]["train/mtp/accuracy_1"]


@pytest.mark.slow
def test_quick_demo_says_it_is_a_smoke_run_and_warns_about_no_target(quick_run):
    from nemo_occ.lab.demo.config import QUICK

    out, _, stdout = quick_run
    steps = QUICK["warm_start"]["steps"]
    assert f"warm start: {steps} SFT steps" in stdout and "smoke run: no targets" in stdout
    assert "OUTSIDE" not in stdout and "NOT met" not in stdout  # nothing it cannot reach by design
    summary = json.loads((out / "summary.json").read_text())
    w = summary["warm_start"]
    assert w["warm_start/steps"] == steps and w["warm_start/gate"] == "none"
    assert "smoke run: no targets" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("pass_rate", "agreements", "verdict"),
    [
        (0.45, [0.85], "within"),
        (0.3, [0.8], "within"),  # both ends of the range count
        (0.6, [0.9, 0.8], "within"),
        (0.45, [0.79], "outside"),  # the drafter is not there
        (0.45, [0.9, 0.7], "outside"),  # every depth must agree often enough
        (0.29, [0.95], "outside"),  # the policy has too little to start from
        (0.61, [0.95], "outside"),  # too little room to improve
    ],
)
def test_warm_start_verdict_follows_the_targets(pass_rate, agreements, verdict):
    from nemo_occ.lab.demo.config import WarmStartConfig
    from nemo_occ.lab.demo.warmstart import gate

    cfg = WarmStartConfig(pass_rate=(0.3, 0.6), mtp_agreement=0.8)
    assert gate(cfg, pass_rate, agreements) == verdict


def test_warm_start_without_targets_measures_and_judges_nothing():
    from nemo_occ.lab.demo.config import WarmStartConfig
    from nemo_occ.lab.demo.warmstart import gate, gate_message

    cfg = WarmStartConfig(pass_rate=None, mtp_agreement=None)
    assert gate(cfg, 0.0, [0.0]) == "none"
    line = gate_message({"warm_start/steps": 80, "warm_start/pass_rate": 0.0,
                         "warm_start/mtp_agreement_1": 0.1, "warm_start/gate": "none"}, cfg)  # fmt: skip
    assert "no targets" in line and "OUTSIDE" not in line
    # one target kept: judged on it alone
    assert gate(WarmStartConfig(pass_rate=None, mtp_agreement=0.8), 0.99, [0.85]) == "within"
    assert gate(WarmStartConfig(pass_rate=(0.3, 0.6), mtp_agreement=None), 0.45, [0.0]) == "within"


def test_warm_start_trains_a_fixed_number_of_steps_whatever_it_measures(tmp_path):
    """The protocol is the step count: no measurement stops it (one machine's kernels must not shorten it)."""
    from nemo_occ.lab.cpu_compat import cpu_compat
    from nemo_occ.lab.demo.config import load_demo_config
    from nemo_occ.lab.demo.warmstart import warm_start
    from nemo_occ.lab.parallel import model_parallel

    cfg, _ = load_demo_config(quick=True, overrides={"warm_start": {"steps": 7, "pass_rate": [0.0, 1.0],
                                                                     "mtp_agreement": 0.0}})  # fmt: skip
    calls = []

    class Count:
        def update(self, n):
            calls.append(n)

    with cpu_compat(), model_parallel(tensor_parallel=1):
        _, metrics = warm_start(cfg, tmp_path / "w.pt", progress=Count())
    assert sum(calls) == 7 and metrics["warm_start/steps"] == 7
    assert metrics["warm_start/gate"] == "within"  # a target met at once stops nothing


def test_warm_start_gate_range_must_be_ordered():
    from nemo_occ.lab.demo.config import WarmStartConfig

    with pytest.raises(ValueError, match="pass_rate"):
        WarmStartConfig(pass_rate=(0.6, 0.3))


def test_demo_rejects_bad_config(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("demo:\n  rl:\n    stepz: 3\n")
    assert main(["demo", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "demo.rl.stepz: unknown key" in capsys.readouterr().err
    assert main(["demo", "--regimes", "occ", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown regime" in capsys.readouterr().err


# -- the task's verifier, written independently of the task's own digit code ---------------------


def test_addition_verifier_accepts_exactly_the_right_answer():
    task = AdditionTask(digits=3)
    ops = torch.tensor([[999, 1], [123, 456], [0, 0], [500, 499]])
    expected = []
    for a, b in ops.tolist():
        s = str(a + b).zfill(4)[::-1]  # least-significant digit first, 4 digits
        expected.append([int(ch) for ch in s] + [EOS])
    responses = torch.tensor(expected)
    assert task.rewards(ops, responses).tolist() == [1.0, 1.0, 1.0, 1.0]
    wrong = responses.clone()
    wrong[1, 0] = (wrong[1, 0] + 1) % 10
    wrong[2, -1] = 0  # no EOS
    assert task.rewards(ops, wrong).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert task.render(task.sequences(ops[1:2])[0]) == "123+456=9750"


def test_training_problems_never_hit_the_heldout_set():
    task = AdditionTask(digits=2)
    held = {tuple(x) for x in task.eval_operands(200, seed=0).tolist()}
    assert len(held) > 50
    train = task.sample_operands(20_000, torch.Generator().manual_seed(3))
    assert not held & {tuple(x) for x in train.tolist()}


def _probe_rows(last_update_c_hat: list[float], probed: list[tuple[float, float, float, float, float]]):
    """metrics.jsonl rows of a 4-update run probed at every step, as the trainer writes them: the row's
    train/mtp/occ/* keys are the step's LAST update, train/mtp/fidelity/* come from a ProbeHistory fed the
    PROBED update."""
    from nemo_occ.core.diagnostics import ExactStatistics, GradientStatistics
    from nemo_occ.core.fidelity import ProbeHistory

    history = ProbeHistory(num_depths=1, window=4, min_windows=2)
    rows = [{"step": 0, "eval/accuracy": 0.5}]
    for step, (last_c_hat, (c_hat, v2_hat, tokens, c, v2)) in enumerate(
        zip(last_update_c_hat, probed, strict=True), 1
    ):
        same = GradientStatistics(c=[c + 1.0], v2=[v2 + 1.0], rl_norm2=4.0)  # + a same-sample term
        exact = ExactStatistics(same, GradientStatistics(c=[c], v2=[v2], rl_norm2=3.0))
        row = {"step": step, "reward/mean": 0.5, "train/mtp/accuracy_1": 0.5}
        row.update(
            {
                "train/mtp/occ/c_hat_1": last_c_hat,
                "train/mtp/occ/v2_hat_1": 1.0,
                "train/mtp/occ/lambda_1": 0.1,
            }
        )
        probe = history.record(c_hat=[c_hat], v2_hat=[v2_hat], tokens=[tokens], lambdas=[0.1], exact=exact)
        row.update({logged_name(k): v for k, v in probe.items()})  # as the trainer's step_row names them
        rows.append(row)
    return rows, history


def test_summary_quotes_the_cores_fidelity_of_the_probed_update():
    from scipy.stats import spearmanr

    from nemo_occ.lab.demo.report import summarize, summary_markdown

    # per-token proxies rank like the exact statistics; the summed ones (token counts vary) and the
    # last update's do not
    tokens = [40.0, 10.0, 80.0, 20.0, 60.0, 30.0, 50.0, 70.0]
    c = [-0.3, 0.4, -0.1, 0.6, 0.3, 0.5, -0.2, 0.1]
    v2 = [1.0, 3.0, 2.0, 6.0, 4.0, 5.0, 7.0, 8.0]
    per_token_c_hat = [-0.03, 0.04, -0.01, 0.06, 0.03, 0.05, -0.02, 0.01]  # c's signs and ranks
    per_token_v2_hat = [
        0.1,
        0.3,
        0.2,
        0.5,
        0.4,
        0.6,
        0.8,
        0.7,
    ]  # ρ = 1 in the first window, 0.8 in the second
    probed = [(pc * n, pv * n, n, ci, vi) for pc, pv, n, ci, vi in
              zip(per_token_c_hat, per_token_v2_hat, tokens, c, v2, strict=True)]  # fmt: skip
    last_update = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    rows, history = _probe_rows(last_update, probed)
    run = {"metrics": rows, "wall_time_s": 1.0, "step_time_s": 0.1}
    fid = summarize({"occ": run})["regimes"]["occ"]["fidelity"]

    assert fid["probes"] == 8
    e = fid["depths"]["1"]
    assert e["spearman_c"] == pytest.approx(1.0)  # scipy on the per-token pairs: ranks identical
    within = [spearmanr(per_token_v2_hat[w], v2[w]).statistic for w in (slice(0, 4), slice(4, 8))]
    assert e["spearman_v2"] == pytest.approx(sum(within) / 2) and e["windows"] == 2
    assert spearmanr([p[0] for p in probed], c).statistic < 0.9  # the summed proxies would rank otherwise
    assert e["spearman_v2_low"] < e["spearman_v2"] < e["spearman_v2_high"]
    # |λ|·sqrt(v²/||g_RL||²) per probe (same-sample: v² + 1), median of eight = mean of the 4th and 5th
    assert e["trusted"] == 1.0
    assert e["update_share_median"] == pytest.approx(0.1 * (math.sqrt(5 / 4) + math.sqrt(6 / 4)) / 2)
    # one definition: every running statistic is the one the run's ProbeHistory computed
    assert {f"fidelity/{k}_1": v for k, v in e.items() if k != "update_share_median"} == {
        k: v for k, v in history.metrics().items() if k != "fidelity/probes"
    }
    md = summary_markdown(summarize({"occ": run}), "# h")
    assert f"| occ | 1 | 8 | 1.00 [{e['spearman_c_low']:.2f}, 1.00] |" in md and "| yes |" in md

    # detach: c ≡ 0 over the main model, so ρ is undefined, not a number, and the verdict is no
    rows, _ = _probe_rows(last_update, [(pc, pv, n, 0.0, 0.0) for pc, pv, n, _, _ in probed])
    fid = summarize({"detach": {**run, "metrics": rows}})["regimes"]["detach"]["fidelity"]
    assert "spearman_c" not in fid["depths"]["1"] and fid["depths"]["1"]["trusted"] == 0.0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    cfg = {"a": 1}
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)}, cfg)

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)}, cfg)
    monkeypatch.undo()
    state = load_checkpoint(path, cfg)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    with pytest.raises(DemoOutputError, match="another configuration"):
        load_checkpoint(path, {"a": 2})


def test_response_mask_scores_exactly_the_response_tokens():
    task = AdditionTask(digits=2)
    mask = task.response_mask(3)
    seq = task.sequences(torch.tensor([[12, 34]]))[0]  # BOS 1 2 + 3 4 = r0 r1 r2 EOS
    assert mask.shape == (3, len(seq) - 1)
    for j in range(len(seq) - 1):  # index j scores tok[j+1]
        is_response = j + 1 >= 1 + 2 + 1 + 2 + 1  # after BOS, a, '+', b, '='
        assert bool(mask[0, j]) == is_response, j
    assert int(mask[0].sum()) == 3 + 1  # the sum's 3 digits and EOS


def test_clip_scope_separate_keeps_a_large_mtp_gradient_from_scaling_the_main_one():
    """global: one norm over all (Megatron's), so a large mtp.* gradient scales the main model's down;
    separate: each part by its own norm."""
    from nemo_occ.lab.demo.trainer import clip_gradients

    def model():
        m = torch.nn.Module()
        m.decoder = torch.nn.Linear(1, 1, bias=False)
        m.mtp = torch.nn.Linear(1, 1, bias=False)
        m.decoder.weight.grad = torch.tensor([[0.6]])
        m.mtp.weight.grad = torch.tensor([[8.0]])
        return m

    g = model()
    norm = clip_gradients(g, 1.0, "global")
    assert float(norm) == pytest.approx((0.6**2 + 8.0**2) ** 0.5)
    assert float(g.decoder.weight.grad) == pytest.approx(0.6 / float(norm), rel=1e-5)  # crowded out
    s = model()
    norm = clip_gradients(s, 1.0, "separate")
    assert float(norm) == pytest.approx(0.6)  # the main model's own norm, under the clip
    assert float(s.decoder.weight.grad) == pytest.approx(0.6)  # untouched
    assert float(s.mtp.weight.grad) == pytest.approx(1.0, rel=1e-5)  # clipped by its own norm
