"""Cross-fitted and same-sample exact statistics (``nemo_occ.core.diagnostics.cross_fitted_statistics``)
and Adam's preconditioned metric (``nemo_occ.core.preconditioner``), against references written
differently: flattened gradients from ``.backward()`` into ``.grad`` combined by hand; a synthetic case
whose same-sample term is known exactly; a Monte-Carlo check of unbiasedness; Adam's state read by
hand from ``optimizer.state_dict()``.

Letters: B sequences, S token positions, K MTP depths, D parameter elements.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_occ.core.config import PolicyLossConfig
from nemo_occ.core.diagnostics import (
    PreconditionerShard,
    ProbeParameter,
    cross_fitted_statistics,
    exact_cross_fitted_statistics,
    exact_gradient_statistics,
    split_halves,
)
from nemo_occ.core.losses import clipped_policy_loss
from nemo_occ.core.preconditioner import NO_STATE_YET, adam_preconditioner
from tests._refs import TinyMTPModel, flat_grad_by_backward


def _half_losses(K=2, B=5, seed=3, model=None):
    """A tiny model (or ``model``) and, per half (rows split_halves picks), RL and MTP losses over the minibatch's
    token count, so that half A's loss + half B's = the minibatch loss."""
    model = model or TinyMTPModel(V=9, H=5, K=K, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 9, (B, 8), generator=gen)
    main, mtp, masks = model(ids)
    old = main.detach() + 0.3 * torch.randn(main.shape, generator=gen, dtype=main.dtype)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.rand(main.shape, generator=gen) > 0.25  # [B, S-1] ragged sequences
    n = int(mask.sum())
    cfg = PolicyLossConfig()
    in_a = torch.tensor(split_halves(mask.sum(1).tolist()))

    def losses(rows):
        m = mask & rows[:, None]
        rl = clipped_policy_loss(main, old, adv, m, cfg, global_valid_tokens=n)[0]
        return rl, [clipped_policy_loss(lp, old, adv, m & mk, cfg, global_valid_tokens=n)[0]
                    for lp, mk in zip(mtp, masks, strict=True)]  # fmt: skip

    shares = (float(mask[in_a].sum()) / n, float(mask[~in_a].sum()) / n)
    return model, losses(in_a), losses(~in_a), losses(torch.ones(B, dtype=torch.bool)), shares


def _dot(a, b):
    return float((a * b).sum())


def test_split_halves_is_balanced_and_deterministic():
    assert split_halves([5, 1, 1, 1, 1, 1]) == [True, False, False, False, False, False]
    assert split_halves([3, 3, 2, 2]) == [True, False, True, False]  # 3|3, then the tie goes to A, then B
    assert split_halves([1, 2, 3]) == [False, False, True]  # 3 to A, then 2 and 1 to B
    with pytest.raises(ValueError, match="two sequences"):
        split_halves([4, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        split_halves([1, float("nan"), 2])


def test_cross_fitted_and_same_sample_match_flattened_backward_gradients():
    model, (rl_a, mtp_a), (rl_b, mtp_b), (rl, mtp), shares = _half_losses()
    params = list(model.parameters())
    stats = exact_cross_fitted_statistics((rl_a, rl_b), (mtp_a, mtp_b), params, shares=shares)
    # same-sample: the minibatch's own gradients, by the existing one-pass probe
    whole = exact_gradient_statistics(rl, mtp, params)
    torch.testing.assert_close(torch.tensor(stats.same_sample.c), torch.tensor(whole.c))
    torch.testing.assert_close(torch.tensor(stats.same_sample.v2), torch.tensor(whole.v2))
    torch.testing.assert_close(torch.tensor(stats.same_sample.rl_norm2), torch.tensor(whole.rl_norm2))
    # cross-fitted: each half's gradient scaled to a mean over its own tokens, dotted by hand
    ga = flat_grad_by_backward(rl_a, params) / shares[0]
    gb = flat_grad_by_backward(rl_b, params) / shares[1]
    assert shares[0] != shares[1] and abs(shares[0] - 0.5) < 0.2
    torch.testing.assert_close(torch.tensor(stats.cross_fit.rl_norm2), torch.tensor(_dot(ga, gb)))
    for k in range(2):
        ma = flat_grad_by_backward(mtp_a[k], params) / shares[0]
        mb = flat_grad_by_backward(mtp_b[k], params) / shares[1]
        expected_c = (_dot(ga, mb) + _dot(gb, ma)) / 2
        assert abs(expected_c) > 1e-6
        torch.testing.assert_close(torch.tensor(stats.cross_fit.c[k]), torch.tensor(expected_c))
        torch.testing.assert_close(torch.tensor(stats.cross_fit.v2[k]), torch.tensor(_dot(ma, mb)))
    metrics = stats.metrics("fidelity")
    assert metrics["fidelity/precond_available"] == 0.0
    assert metrics["fidelity/c_cross_fit_1"] == stats.cross_fit.c[0]
    assert metrics["fidelity/c_same_sample_2"] == stats.same_sample.c[1]
    assert "fidelity/c_1" not in metrics  # no unqualified name to mix up


def _synthetic(mu, nu, noise_a, noise_b):
    """Gradients of one parameter [D] per half: g_RL^h = w_h μ + Σ_h e, g_MTP^h = w_h ν + Σ_h e (the same
    noise e in both: each sequence's covariance with itself), for halves with equal shares ½."""
    rl = [[0.5 * mu + noise_a.sum(0)], [0.5 * mu + noise_b.sum(0)]]
    mtp = [[[0.5 * nu + noise_a.sum(0)]], [[0.5 * nu + noise_b.sum(0)]]]
    return rl, mtp


def test_cross_fitting_removes_a_known_same_sample_term():
    """μ ⊥ ν (true c = 0); half A's noise lies in its own coordinates, half B's in others, both
    orthogonal to μ and ν, so the same-sample term is exactly ||ē_A + ē_B||² and the cross terms vanish."""
    D = 8
    mu = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    nu = torch.tensor([0, 2.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    noise_a = torch.zeros(3, D, dtype=torch.float64)
    noise_a[:, 2:5] = torch.tensor([[1.0, 0.5, -0.2], [0.3, 0.1, 0.4], [-0.1, 0.2, 0.3]])
    noise_b = torch.zeros(3, D, dtype=torch.float64)
    noise_b[:, 5:8] = torch.tensor([[0.2, -0.4, 0.6], [0.5, 0.5, 0.1], [0.0, 0.3, -0.2]])
    param = ProbeParameter(torch.zeros(D, dtype=torch.float64))
    rl, mtp = _synthetic(mu, nu, noise_a, noise_b)
    stats = cross_fitted_statistics(rl, mtp, [param])
    same_sample_term = float((noise_a.sum(0) + noise_b.sum(0)).square().sum())
    assert same_sample_term > 1.0
    torch.testing.assert_close(torch.tensor(stats.same_sample.c[0]), torch.tensor(same_sample_term))
    assert stats.cross_fit.c[0] == pytest.approx(0.0, abs=1e-12)  # <μ, ν> = 0
    assert stats.cross_fit.v2[0] == pytest.approx(float(nu @ nu), rel=1e-12)  # ||ν||², no noise
    assert stats.cross_fit.rl_norm2 == pytest.approx(float(mu @ mu), rel=1e-12)


def test_cross_fitted_c_is_unbiased_where_the_same_sample_c_is_not():
    """Random per-sequence gradients with E g_RL = μ, E g_MTP = ν, <μ, ν> = 0.3, and a per-sequence
    noise shared by both (covariance σ²·I): E c_same = <μ, ν> + D σ²/n, E c_x = <μ, ν>."""
    D, n, draws, sigma = 6, 8, 4000, 0.5
    gen = torch.Generator().manual_seed(0)
    mu = torch.zeros(D, dtype=torch.float64)
    nu = torch.zeros(D, dtype=torch.float64)
    mu[0], nu[0], nu[1] = 1.0, 0.3, 1.0
    param = ProbeParameter(torch.zeros(D, dtype=torch.float64))
    same, cross = [], []
    for _ in range(draws):
        e = sigma * torch.randn(n, D, generator=gen, dtype=torch.float64)
        rl = [[(mu + e[: n // 2]).sum(0) / n], [(mu + e[n // 2 :]).sum(0) / n]]
        mtp = [[[(nu + e[: n // 2]).sum(0) / n]], [[(nu + e[n // 2 :]).sum(0) / n]]]
        stats = cross_fitted_statistics(rl, mtp, [param])
        same.append(stats.same_sample.c[0])
        cross.append(stats.cross_fit.c[0])
    same_t, cross_t = torch.tensor(same), torch.tensor(cross)
    se_same, se_cross = same_t.std() / math.sqrt(draws), cross_t.std() / math.sqrt(draws)
    assert abs(float(cross_t.mean()) - 0.3) < 4 * float(se_cross)
    expected_same = 0.3 + D * sigma**2 / n  # 0.4875
    assert abs(float(same_t.mean()) - expected_same) < 4 * float(se_same)
    assert float(same_t.mean()) - 0.3 > 8 * float(se_same)  # the bias is there to remove


def _adam_after_steps(model, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (4, 8), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        main, mtp, _ = model(ids)
        (-(main.sum() + sum(m.sum() for m in mtp))).backward()
        opt.step()
    return opt


def test_preconditioned_statistics_use_adams_bias_corrected_second_moment_and_leave_it_unchanged():
    model = TinyMTPModel(V=9, H=5, K=2, seed=3)
    params = list(model.parameters())
    opt = _adam_after_steps(model, 3)
    _, (rl_a, mtp_a), (rl_b, mtp_b), _, shares = _half_losses(model=model)
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    probe = [ProbeParameter(p) for p in params]
    shards, note = adam_preconditioner(opt, probe)
    assert note == "Adam's second moment"
    # the reference: P read off the state dict by hand (its parameter ids follow model.parameters())
    state = opt.state_dict()["state"]
    inverse = torch.cat([
        1.0 / ((state[i]["exp_avg_sq"] / (1 - 0.99 ** float(state[i]["step"]))).sqrt() + 1e-6).reshape(-1)
        for i in range(len(params))
    ])  # fmt: skip
    p2 = params
    stats = exact_cross_fitted_statistics(
        (rl_a, rl_b), (mtp_a, mtp_b), p2, shares=shares,
        preconditioner=[PreconditionerShard(s.start, s.stop, s.inverse, 1) for s in shards],
    )  # fmt: skip
    ga = flat_grad_by_backward(rl_a, p2) / shares[0]
    gb = flat_grad_by_backward(rl_b, p2) / shares[1]
    ma = flat_grad_by_backward(mtp_a[0], p2) / shares[0]
    mb = flat_grad_by_backward(mtp_b[0], p2) / shares[1]
    torch.testing.assert_close(
        torch.tensor(stats.cross_fit_precond.c[0]),
        torch.tensor((_dot(ga * inverse, mb) + _dot(gb * inverse, ma)) / 2),
    )
    torch.testing.assert_close(
        torch.tensor(stats.cross_fit_precond.v2[0]), torch.tensor(_dot(ma * inverse, mb))
    )
    g, m = ga * shares[0] + gb * shares[1], ma * shares[0] + mb * shares[1]
    torch.testing.assert_close(
        torch.tensor(stats.same_sample_precond.c[0]), torch.tensor(_dot(g * inverse, m))
    )
    assert stats.cross_fit_precond.c[0] != pytest.approx(stats.cross_fit.c[0], rel=1e-3)
    assert stats.metrics()["fidelity/precond_available"] == 1.0
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(before[k], after[k]) for k in before)  # read, never changed


def test_no_preconditioner_before_the_first_step_or_without_a_second_moment():
    model = TinyMTPModel(V=9, H=5, K=1, seed=0)
    probe = [ProbeParameter(p) for p in model.parameters()]
    assert adam_preconditioner(torch.optim.Adam(model.parameters()), probe) == (None, NO_STATE_YET)
    shards, note = adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), probe)
    assert shards is None and "no second moment" in note


def test_partial_optimizer_state_raises():
    D = 4
    params = [ProbeParameter(torch.zeros(D, dtype=torch.float64)) for _ in range(2)]
    g = [torch.ones(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)]
    rl = [list(g), list(g)]
    mtp = [[list(g)], [list(g)]]
    half_shard = [PreconditionerShard(0, 2, torch.ones(2, dtype=torch.float64)), None]
    with pytest.raises(ValueError, match="covers 2 of 8"):
        cross_fitted_statistics([list(x) for x in rl], [[list(x) for x in h] for h in mtp], params,
                                preconditioner=half_shard)  # fmt: skip
    with pytest.raises(ValueError, match="share"):
        cross_fitted_statistics(rl, mtp, params, shares=(0.0, 1.0))
