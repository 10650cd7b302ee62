"""Proxy-trust metrics: Spearman ρ and its interval against the closed-form rank formula and a
hand-written Fisher z, sign agreement against a loop, the probe history's per-probe metrics and its
checkpoint, and the static head gap of v̂² against a per-token loop. The trust verdict itself is
tested on synthetic histories in test_core_trust_verdict.py.

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from nemo_occ.core.config import NemoOCCConfig, OCCConfig
from nemo_occ.core.diagnostics import ExactStatistics, GradientStatistics
from nemo_occ.core.fidelity import HeadGap, ProbeHistory, probed_update, sign_agreement, spearman_interval
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.objective import MTPObjective
from tests._refs import close_metrics, rand_batch


def test_spearman_and_interval_match_the_rank_formula_and_fisher_z():
    x = [0.3, -1.2, 2.5, 0.9, 4.1, -0.4, 1.7, 3.3]
    y = [1.0, -0.5, 1.9, 2.2, 3.0, -1.1, 0.1, 5.0]
    n = len(x)
    rank = lambda v: [sorted(v).index(a) + 1 for a in v]  # noqa: E731 - no ties here
    d2 = sum((a - b) ** 2 for a, b in zip(rank(x), rank(y), strict=True))
    rho_ref = 1 - 6 * d2 / (n * (n * n - 1))
    rho, low, high = spearman_interval(x, y)
    assert rho == pytest.approx(rho_ref, rel=1e-12)
    q = statistics.NormalDist().inv_cdf(0.975)
    half = q * math.sqrt((1 + rho_ref**2 / 2) / (n - 3))
    z = 0.5 * math.log((1 + rho_ref) / (1 - rho_ref))
    assert low == pytest.approx(math.tanh(z - half), rel=1e-12)
    assert high == pytest.approx(math.tanh(z + half), rel=1e-12)
    assert low < rho < high
    _, low90, high90 = spearman_interval(x, y, confidence=0.9)
    assert low < low90 < high90 < high


def test_spearman_undefined_cases():
    assert spearman_interval([1, 2, 3], [1, 2, 3]) is None  # n < 4
    assert spearman_interval([1, 1, 1, 1], [1, 2, 3, 4]) is None  # constant
    rho, low, high = spearman_interval([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert rho == pytest.approx(1.0) and high == pytest.approx(1.0) and low > 0.5
    with pytest.raises(ValueError, match="same length"):
        spearman_interval([1, 2, 3, 4], [1, 2, 3])


def test_sign_agreement_matches_a_loop():
    x = [1.0, -2.0, 0.5, -0.1, 3.0, 0.0]
    y = [2.0, 1.0, 0.3, -4.0, -1.0, 0.0]
    agree = sum((a > 0) == (b > 0) and (a < 0) == (b < 0) for a, b in zip(x, y, strict=True)) / len(x)
    base = 0.0
    for s in (-1, 0, 1):
        px = sum((a > 0) - (a < 0) == s for a in x) / len(x)
        py = sum((b > 0) - (b < 0) == s for b in y) / len(y)
        base += px * py
    assert sign_agreement(x, y) == pytest.approx((agree, base))
    assert sign_agreement([], []) is None


def _exact(c, v2, rl2=4.0, mtp_v2=None):
    """Same-sample (c, v2) and cross-fitted (c/2, v2/2) statistics of one depth."""
    mtp = [] if mtp_v2 is None else [mtp_v2]
    return ExactStatistics(
        GradientStatistics(c=[c], v2=[v2], rl_norm2=rl2, mtp_v2=mtp),
        GradientStatistics(c=[c / 2], v2=[v2 / 2], rl_norm2=rl2 / 2, mtp_v2=mtp),
    )


def _feed(history, pairs, tokens=10.0, lam=0.5):
    out = {}
    for (c_hat, c), (v2_hat, v2) in pairs:
        out = history.record(
            c_hat=[c_hat], v2_hat=[v2_hat], tokens=[tokens], lambdas=[lam], exact=_exact(c, v2)
        )
    return out


def test_probe_metrics_per_token_and_update_share():
    history = ProbeHistory(num_depths=1)
    out = history.record(
        c_hat=[6.0], v2_hat=[20.0], tokens=[4.0], lambdas=[-0.5], exact=_exact(0.3, 9.0, rl2=4.0, mtp_v2=2.0)
    )
    assert out["fidelity/c_hat_per_token_1"] == 1.5 and out["fidelity/v2_hat_per_token_1"] == 5.0
    assert out["fidelity/c_same_sample_1"] == 0.3 and out["fidelity/v2_same_sample_1"] == 9.0
    assert out["fidelity/c_cross_fit_1"] == 0.15 and out["fidelity/v2_cross_fit_1"] == 4.5
    assert out["fidelity/mtp_params_v2_same_sample_1"] == 2.0
    assert out["fidelity/precond_available"] == 0.0 and "fidelity/c_cross_fit_precond_1" not in out
    assert out["fidelity/update_share_1"] == pytest.approx(0.5 * 3.0 / 2.0)  # |λ|·||g_MTP|| / ||g_RL||
    with pytest.warns(UserWarning, match="without valid tokens"):
        assert (
            history.record(c_hat=[1.0], v2_hat=[1.0], tokens=[0.0], lambdas=[0.1], exact=_exact(1, 1)) == {}
        )
    assert len(history.records) == 1
    with pytest.raises(ValueError, match="NaN"):
        history.record(c_hat=[math.nan], v2_hat=[1.0], tokens=[1.0], lambdas=[0.1], exact=_exact(1, 1))
    with pytest.raises(ValueError, match="1 MTP depth"):
        history.record(c_hat=[1.0, 2.0], v2_hat=[1.0], tokens=[1.0], lambdas=[0.1], exact=_exact(1, 1))
    with pytest.raises(TypeError, match="ExactStatistics"):  # the same-sample statistics alone
        history.record(c_hat=[1.0], v2_hat=[1.0], tokens=[1.0], lambdas=[0.1], exact=_exact(1, 1).same_sample)


def test_history_survives_a_checkpoint_and_rejects_a_foreign_one():
    history = ProbeHistory(num_depths=1)
    _feed(history, [((a, a + 0.1), (b, b * 2)) for a, b in [(1, 2), (-1, 3), (2, 1), (0.5, 4), (3, 5)]])
    restored = ProbeHistory(num_depths=1)
    restored.load_state_dict(history.state_dict())
    assert restored.metrics() == history.metrics()
    with pytest.raises(ValueError, match="this run has 2"):
        ProbeHistory(num_depths=2).load_state_dict(history.state_dict())
    bad = history.state_dict()
    bad["records"][0][0][1] = math.inf
    with pytest.raises(ValueError, match="malformed"):
        restored.load_state_dict(bad)
    assert restored.metrics() == history.metrics()  # a rejected state leaves the history as it was


def test_head_gap_matches_a_token_loop_through_the_objective():
    new, old, mtp, adv, mask = rand_batch(seed=4)
    mtp_old = (
        old + 1.5 + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=old.dtype)
    )
    obj = MTPObjective(NemoOCCConfig(regime="occ", occ=OCCConfig()))
    n = int(mask.sum())
    obj(TokenInputs(main_logprobs=new, old_logprobs=old, advantages=adv, mask=mask, mtp_logprobs=[mtp],
        mtp_old_logprobs=[mtp_old], global_valid_tokens=n, global_valid_seqs=mask.shape[0]))  # fmt: skip
    metrics = close_metrics(obj)
    vs_main = vs_own = gap = 0.0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                vs_main += float(mtp[i, t] - old[i, t]) ** 2
                vs_own += float(mtp[i, t] - mtp_old[i, t]) ** 2
                gap += float(mtp_old[i, t] - old[i, t]) ** 2
    assert metrics["occ/v2_hat_vs_main_old_1"] == pytest.approx(vs_main, rel=1e-12)
    assert metrics["occ/v2_hat_vs_own_old_1"] == pytest.approx(vs_own, rel=1e-12)
    assert metrics["occ/head_gap_share_1"] == pytest.approx(gap / vs_main, rel=1e-12)
    assert metrics["occ/v2_hat_1"] == pytest.approx(vs_main, rel=1e-12)  # old_logprobs: main (default)


def test_head_gap_absent_without_own_old_logprobs_and_untouched_by_a_raising_call():
    new, old, mtp, adv, mask = rand_batch(seed=5)
    obj = MTPObjective(NemoOCCConfig(regime="policy"))
    kw = dict(advantages=adv, mask=mask, global_valid_tokens=int(mask.sum()), global_valid_seqs=8)
    obj(TokenInputs(main_logprobs=new, old_logprobs=old, mtp_logprobs=[mtp], **kw))
    assert not any("head_gap" in k for k in close_metrics(obj))
    bad = old.clone()
    bad[mask] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        obj(
            TokenInputs(main_logprobs=new, old_logprobs=old, mtp_logprobs=[mtp], mtp_old_logprobs=[bad], **kw)
        )
    assert not bool(obj.head_gap._sums.any())
    gap = HeadGap(1)
    with pytest.raises(ValueError, match="shape"):
        gap.statistics([mtp], old, [old[:, :3]], [mask])


def test_the_probed_update_is_the_first_with_a_nonzero_rl_change():
    """The first update of a step runs at θ = θ_old (ĉ = 0): the second is probed, or the only one."""
    assert [probed_update(n) for n in (1, 2, 4)] == [0, 1, 1]
    with pytest.raises(ValueError, match="at least one"):
        probed_update(0)
