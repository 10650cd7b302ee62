"""MTPObjective: the MTP term Σ_k λ_k L_MTP,k per regime, which λ each update uses, and invariance
to the micro-batch split, against loop references (tests/_refs.py) and a tiny model.

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nemo_occ.core.config import REGIMES, NemoOCCConfig, OCCConfig, PolicyLossConfig
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.losses import clipped_policy_loss
from nemo_occ.core.objective import MTPObjective
from nemo_occ.core.regimes import get_regime
from tests._refs import (
    TinyMTPModel,
    close_metrics,
    count_valid,
    loop_lambda,
    loop_policy_loss,
    loss_kwargs,
    rand_batch,
)

POLICY = PolicyLossConfig(ratio_clip_low=0.2, ratio_clip_high=0.28)
AGGREGATIONS = {
    "token_mean": PolicyLossConfig(aggregation="token_mean"),
    "seq_mean_token_mean": PolicyLossConfig(aggregation="seq_mean_token_mean"),
    "gspo": PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence"),
}


def _f(x, y):
    """Two scalars (floats or 0-d tensors) equal at float64 default tolerances."""

    def t(v):
        return torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float64)

    torch.testing.assert_close(t(x), t(y))


def _call(obj, main, old, adv, mask, mtp, **extra):
    n_tok, n_seq = count_valid(mask)
    return obj(
        TokenInputs(
            main_logprobs=main,
            old_logprobs=old,
            advantages=adv,
            mask=mask,
            mtp_logprobs=mtp,
            global_valid_tokens=n_tok,
            global_valid_seqs=n_seq,
            **extra,
        )
    )


# ---------------------------------------------------------------------------------------------
# the MTP term is λ times the unscaled loss


@pytest.mark.parametrize("regime", ["detach", "ce", "policy"])
def test_fixed_coefficient_scales_the_unscaled_loss_and_its_gradient(regime):
    main, old, mtp, adv, mask = rand_batch(seed=50)
    obj = MTPObjective(NemoOCCConfig(regime=regime, coef=0.37), POLICY)
    lp = mtp.clone().requires_grad_(True)
    main_lp = main.clone().requires_grad_(True)
    total, metrics = _call(obj, main_lp, old, adv, mask, [lp])
    g_total, g_main = torch.autograd.grad(total, [lp, main_lp], allow_unused=True)
    n_tok, n_seq = count_valid(mask)
    lp2 = mtp.clone().requires_grad_(True)
    unscaled, _ = get_regime(regime).depth_loss(
        lp2, old, adv, mask, POLICY, global_valid_tokens=n_tok, global_valid_seqs=n_seq
    )
    (g_unscaled,) = torch.autograd.grad(unscaled, lp2)
    # a reference that does not go through the code: loop policy loss, or the plain mean NLL
    lp3 = mtp.clone().requires_grad_(True)
    if regime == "policy":
        ref = loop_policy_loss(lp3, old, adv, mask, **loss_kwargs(POLICY, mask))
    else:
        ref = -sum(lp3[i, t] for i in range(8) for t in range(lp3.shape[1]) if mask[i, t]) / n_tok
    (g_ref,) = torch.autograd.grad(ref, lp3)
    torch.testing.assert_close(total, 0.37 * unscaled)
    torch.testing.assert_close(total, 0.37 * ref)
    torch.testing.assert_close(g_total, 0.37 * g_unscaled)
    torch.testing.assert_close(g_total, 0.37 * g_ref)
    assert g_main is None or bool((g_main == 0).all())  # λ carries no gradient into the main head
    _f(metrics["mtp/loss_1"], ref)


def test_occ_lagged_lambda_comes_from_the_previous_update():
    """Update u+1 uses λ from update u's data (two micro-batches), brute-forced; update u used the
    initial λ; the λ itself carries no gradient."""
    cfg = NemoOCCConfig(regime="occ", occ=OCCConfig(lambda_plus=0.9, eps=1e-6, initial_lambda=0.2))
    obj = MTPObjective(cfg, POLICY)
    u = rand_batch(seed=51)
    v = rand_batch(seed=52)
    main, old, mtp, adv, mask = u
    n_tok, n_seq = count_valid(mask)
    kw = dict(global_valid_tokens=n_tok, global_valid_seqs=n_seq)
    ref_u = loop_policy_loss(mtp, old, adv, mask, **loss_kwargs(POLICY, mask))
    total_u = 0.0
    for sl in (slice(0, 5), slice(5, 8)):
        t, _ = obj(
            TokenInputs(
                main_logprobs=main[sl],
                old_logprobs=old[sl],
                advantages=adv[sl],
                mask=mask[sl],
                mtp_logprobs=[mtp[sl]],
                **kw,
            )
        )
        total_u += t
    torch.testing.assert_close(total_u, 0.2 * ref_u)
    metrics = close_metrics(obj)
    lam_u = loop_lambda(main, old, mtp, mask, lambda_plus=0.9, eps=1e-6)
    assert abs(lam_u) > 1e-3
    _f(metrics["occ/lambda_1"], lam_u)
    _f(metrics["occ/lambda_applied_1"], 0.2)

    main, old, mtp, adv, mask = v
    lp = mtp.clone().requires_grad_(True)
    total_v, _ = _call(obj, main, old, adv, mask, [lp])
    (g,) = torch.autograd.grad(total_v, lp)
    lp_ref = mtp.clone().requires_grad_(True)
    ref_v = loop_policy_loss(lp_ref, old, adv, mask, **loss_kwargs(POLICY, mask))
    (g_ref,) = torch.autograd.grad(ref_v, lp_ref)
    torch.testing.assert_close(total_v, lam_u * ref_v)
    torch.testing.assert_close(g, lam_u * g_ref)
    m2 = close_metrics(obj)
    _f(m2["occ/lambda_applied_1"], lam_u)
    _f(m2["occ/lambda_1"], loop_lambda(main, old, mtp, mask, lambda_plus=0.9, eps=1e-6))


def test_occ_microbatch_timing_uses_each_micro_batch_local_lambda():
    cfg = NemoOCCConfig(regime="occ", occ=OCCConfig(timing="microbatch", initial_lambda=5.0))
    obj = MTPObjective(cfg, POLICY)
    main, old, mtp, adv, mask = rand_batch(seed=53)
    n_tok, n_seq = count_valid(mask)
    kw = dict(global_valid_tokens=n_tok, global_valid_seqs=n_seq)
    used = []
    for sl in (slice(0, 3), slice(3, 8)):
        lp = mtp[sl].clone().requires_grad_(True)
        t, _ = obj(
            TokenInputs(
                main_logprobs=main[sl],
                old_logprobs=old[sl],
                advantages=adv[sl],
                mask=mask[sl],
                mtp_logprobs=[lp],
                **kw,
            )
        )
        (g,) = torch.autograd.grad(t, lp)
        lam = loop_lambda(main[sl], old[sl], mtp[sl], mask[sl])
        used.append(lam)
        lp_ref = mtp[sl].clone().requires_grad_(True)
        ref_kw = loss_kwargs(POLICY, mask) | {}
        ref = loop_policy_loss(lp_ref, old[sl], adv[sl], mask[sl], **ref_kw)
        (g_ref,) = torch.autograd.grad(ref, lp_ref)
        torch.testing.assert_close(t, lam * ref)
        torch.testing.assert_close(g, lam * g_ref)
    assert abs(used[0] - used[1]) > 1e-3  # the two micro-batches really use different λ
    m = close_metrics(obj)
    _f(m["occ/lambda_applied_1"], sum(used) / 2)


def test_two_depths_with_own_masks_and_own_old_logprobs():
    cfg = NemoOCCConfig(regime="policy", coef=0.5, num_depths=2, old_logprobs="mtp")
    obj = MTPObjective(cfg, POLICY)
    main, old, mtp, adv, mask = rand_batch(seed=54)
    gen = torch.Generator().manual_seed(5)
    mtp2 = old + 0.4 * torch.randn(old.shape, generator=gen, dtype=old.dtype)
    olds = [old + 0.2 * torch.randn(old.shape, generator=gen, dtype=old.dtype) for _ in range(2)]
    # depth masks as the model gives them (not subsets of the main mask: the objective must AND them)
    m1 = torch.ones_like(mask)
    m1[:, 0] = False
    m2 = m1.clone()
    m2[:, 1] = False
    with pytest.raises(ValueError, match="old_logprobs"):
        _call(obj, main, old, adv, mask, [mtp, mtp2], mtp_masks=[m1, m2])
    total, metrics = _call(obj, main, old, adv, mask, [mtp, mtp2], mtp_masks=[m1, m2], mtp_old_logprobs=olds)
    n_tok, n_seq = count_valid(mask)  # the main head's denominators
    kw = loss_kwargs(POLICY, mask)
    r1 = loop_policy_loss(mtp, olds[0], adv, mask & m1, **kw)
    r2 = loop_policy_loss(mtp2, olds[1], adv, mask & m2, **kw)
    torch.testing.assert_close(total, 0.5 * r1 + 0.5 * r2)
    _f(metrics["mtp/loss_2"], r2)
    proxies = close_metrics(obj)
    _f(proxies["proxy/lambda_2"], loop_lambda(main, old, mtp2, mask & m2, mtp_old=olds[1]))
    _f(proxies["proxy/lambda_applied_2"], 0.5)


def test_monitored_proxies_under_a_fixed_regime():
    main, old, mtp, adv, mask = rand_batch(seed=55)
    obj = MTPObjective(NemoOCCConfig(regime="policy", coef=0.1), POLICY)
    _call(obj, main, old, adv, mask, [mtp])
    m = close_metrics(obj)
    c = sum(
        (float(main[i, t]) - float(old[i, t])) * (float(mtp[i, t]) - float(old[i, t]))
        for i in range(8)
        for t in range(mask.shape[1])
        if mask[i, t]
    )
    _f(m["proxy/lambda_1"], loop_lambda(main, old, mtp, mask))
    _f(m["proxy/lambda_applied_1"], 0.1)
    _f(m["proxy/first_order_1"], 0.1 * c)
    assert not any(k.startswith("occ/") for k in m)
    quiet = MTPObjective(NemoOCCConfig(regime="policy", monitor_proxies=False), POLICY)
    _call(quiet, main, old, adv, mask, [mtp])
    assert close_metrics(quiet) == {}


@pytest.mark.parametrize("regime", ["occ", "policy"])
def test_a_skipped_update_reports_lambda_only_and_drops_its_head_gap_sums(regime):
    """With the MTP heads' own old log-probs (head-gap sums) and, for policy, monitored proxies."""
    main, old, mtp, adv, mask = rand_batch(seed=56)
    mtp_old = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2), dtype=old.dtype)
    obj = MTPObjective(NemoOCCConfig(regime=regime, coef=0.1, monitor_proxies=True), POLICY)
    _call(obj, main, old, adv, mask, [mtp], mtp_old_logprobs=[mtp_old])
    pre = "occ" if regime == "occ" else "proxy"
    assert close_metrics(obj, skipped=True) == {
        f"{pre}/lambda_1": 0.0, f"{pre}/refreshed": 0.0, f"{pre}/skipped": 1.0
    }  # fmt: skip
    _call(obj, main, old, adv, mask, [mtp])  # without own old log-probs: no head-gap sums added
    m = close_metrics(obj)
    assert m[f"{pre}/skipped"] == 0.0 and m[f"{pre}/v2_hat_vs_own_old_1"] == 0.0  # the skipped sums are gone


@pytest.mark.parametrize("old_logprobs", ["main", "mtp"])
def test_unscaled_losses_use_the_old_logprob_the_config_names(old_logprobs):
    """What the probes differentiate: each depth's loss before λ, with the ratio's old log-prob chosen by
    nemo_occ.old_logprobs (the main head's, or each MTP head's own), checked against the loop reference."""
    main, old, mtp, adv, mask = rand_batch(seed=61)
    mtp_old = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3), dtype=old.dtype)
    obj = MTPObjective(NemoOCCConfig(regime="occ", old_logprobs=old_logprobs), POLICY)
    n_tok, n_seq = count_valid(mask)
    (loss,) = obj.unscaled_losses(
        TokenInputs(mtp_logprobs=[mtp], old_logprobs=old, advantages=adv, mask=mask, mtp_old_logprobs=[mtp_old],
        global_valid_tokens=n_tok, global_valid_seqs=n_seq))  # fmt: skip
    ratio_old = mtp_old if old_logprobs == "mtp" else old
    _f(loss, loop_policy_loss(mtp, ratio_old, adv, mask, **loss_kwargs(POLICY, mask)))
    assert obj.close_update().depths[0].tokens == 0  # no state moved: nothing was accumulated


def test_regime_none_adds_nothing():
    main, old, mtp, adv, mask = rand_batch(seed=56)
    obj = MTPObjective(NemoOCCConfig(regime="none"), POLICY)
    total, metrics = _call(obj, main, old, adv, mask, [mtp])
    assert float(total) == 0.0 and metrics == {}
    assert obj.coefficients() == [0.0]
    assert close_metrics(obj) == {}


def test_every_regime_name_resolves_and_unknown_names_raise():
    for name in REGIMES:
        assert get_regime(name).name == name
    with pytest.raises(ValueError, match="unknown MTP regime 'occ2'.*none, detach, ce, policy, occ"):
        get_regime("occ2")


def test_regimes_match_the_paper_table():
    """The OCC paper's regime table (arXiv 2605.28184): which regimes send MTP gradient into the trunk and which calibrate."""
    trunk = {n: get_regime(n).trunk_gradient for n in REGIMES}
    assert trunk == {"none": False, "detach": False, "ce": True, "policy": True, "occ": True}
    assert [n for n in REGIMES if get_regime(n).calibrated] == ["occ"]
    assert {n: get_regime(n).objective for n in REGIMES} == {
        "none": "none",
        "detach": "ce",
        "ce": "ce",
        "policy": "policy",
        "occ": "policy",
    }


def test_wrong_depth_count_raises():
    main, old, mtp, adv, mask = rand_batch(seed=57)
    obj = MTPObjective(NemoOCCConfig(regime="occ", num_depths=2), POLICY)
    with pytest.raises(ValueError, match="num_depths"):
        _call(obj, main, old, adv, mask, [mtp])


@pytest.mark.parametrize("regime", ["ce", "policy", "occ"])
def test_masked_nan_and_neg_inf_leave_term_gradient_and_lambda_finite(regime):
    cfg = NemoOCCConfig(regime=regime, occ=OCCConfig(initial_lambda=0.5))
    policy_cfg = AGGREGATIONS["gspo"]
    main, old, mtp, adv, mask = rand_batch(seed=61)
    pad = ~mask
    assert bool(pad.any())
    m2, o2, t2 = main.clone(), old.clone(), mtp.clone()
    m2[pad], o2[pad], t2[pad] = float("nan"), float("-inf"), float("-inf")
    t2[pad & (torch.arange(mask.shape[1]) % 2 == 0)] = float("nan")
    dirty, clean = MTPObjective(cfg, policy_cfg), MTPObjective(cfg, policy_cfg)
    lp = t2.clone().requires_grad_(True)
    total, _ = _call(dirty, m2, o2, adv, mask, [lp])
    (g,) = torch.autograd.grad(total, lp)
    ref, _ = _call(clean, main, old, adv, mask, [mtp])
    assert bool(torch.isfinite(g).all()) and bool((g[pad] == 0).all())
    torch.testing.assert_close(total.detach(), ref)
    a, b = close_metrics(dirty), close_metrics(clean)
    assert a == b and all(v == v for v in a.values())  # no NaN among the metrics


def test_no_valid_token_gives_zero_term_zero_gradient_and_flags_it():
    cfg = NemoOCCConfig(regime="occ", occ=OCCConfig(initial_lambda=0.5))
    obj = MTPObjective(cfg, AGGREGATIONS["seq_mean_token_mean"])
    main, old, mtp, adv, mask = rand_batch(seed=62)
    empty = torch.zeros_like(mask)
    lp = mtp.clone().requires_grad_(True)
    total, _ = obj(
        TokenInputs(
            main_logprobs=main,
            old_logprobs=old,
            advantages=adv,
            mask=empty,
            mtp_logprobs=[lp],
            global_valid_tokens=0,
            global_valid_seqs=0,
        )
    )
    (g,) = torch.autograd.grad(total, lp)
    assert float(total.detach()) == 0.0 and bool((g == 0).all())
    m = close_metrics(obj)
    assert m["occ/no_valid_tokens_1"] == 1 and m["occ/lambda_1"] == 0.0
    assert obj.coefficients() == [0.0]


# ---------------------------------------------------------------------------------------------
# micro-batch invariance on a tiny model: one micro-batch of 8 == eight of 1


def _tiny_batch(seed):
    model = TinyMTPModel(V=13, H=6, K=1, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (8, 7), generator=gen)
    with torch.no_grad():
        main, _, _ = model(ids)
    old = main + 0.4 * torch.randn(main.shape, generator=gen, dtype=main.dtype)  # an earlier policy
    adv = torch.randn(8, generator=gen, dtype=torch.float64)
    lengths = torch.randint(2, 7, (8,), generator=gen)
    mask = torch.arange(6)[None, :] < lengths[:, None]  # [B, S-1]
    return model, ids, old, adv, mask


def _run_update(obj, model, ids, old, adv, mask, policy_cfg, splits):
    """One optimizer update: main loss + MTP term per micro-batch, backward into .grad."""
    n_tok, n_seq = count_valid(mask)
    for p in model.parameters():
        p.grad = None
    total = 0.0
    for sl in splits:
        main, mtp, mtp_masks = model(ids[sl])
        main_loss, _ = clipped_policy_loss(
            main, old[sl], adv[sl], mask[sl], policy_cfg, global_valid_tokens=n_tok, global_valid_seqs=n_seq
        )
        mtp_term, _ = obj(
            TokenInputs(
                main_logprobs=main,
                old_logprobs=old[sl],
                advantages=adv[sl],
                mask=mask[sl],
                mtp_logprobs=mtp,
                mtp_masks=mtp_masks,
                global_valid_tokens=n_tok,
                global_valid_seqs=n_seq,
            )
        )
        (main_loss + mtp_term).backward()
        total += float(mtp_term.detach())
    grads = [p.grad.clone() for p in model.parameters()]
    return total, grads, close_metrics(obj)


@pytest.mark.parametrize("agg", list(AGGREGATIONS))
@pytest.mark.parametrize("regime", ["policy", "occ"])
def test_one_micro_batch_of_8_equals_eight_of_1(regime, agg):
    policy_cfg = AGGREGATIONS[agg]
    cfg = NemoOCCConfig(regime=regime, coef=0.3) if regime == "policy" else NemoOCCConfig(regime=regime)
    results = {}
    for name, splits in {"1x8": [slice(0, 8)], "8x1": [slice(i, i + 1) for i in range(8)]}.items():
        obj = MTPObjective(cfg, policy_cfg)
        model, ids, old, adv, mask = _tiny_batch(seed=60)
        # update 1 sets λ (occ starts at λ=0), update 2 applies it
        first = _run_update(obj, model, ids, old, adv, mask, policy_cfg, splits)
        second = _run_update(obj, model, ids, old, adv, mask, policy_cfg, splits)
        results[name] = (first, second)
    (f1, s1), (f8, s8) = results["1x8"], results["8x1"]
    for a, b in ((f1, f8), (s1, s8)):
        _f(a[0], b[0])
        for g1, g8 in zip(a[1], b[1], strict=True):
            torch.testing.assert_close(g1, g8)
        key = "occ/lambda_1" if regime == "occ" else "proxy/lambda_1"
        _f(a[2][key], b[2][key])
    # λ against the loop over the full batch
    model, ids, old, adv, mask = _tiny_batch(seed=60)
    with torch.no_grad():
        main, mtp, mtp_masks = model(ids)
    lam = loop_lambda(main, old, mtp[0], mask & mtp_masks[0])
    key = "occ/lambda_1" if regime == "occ" else "proxy/lambda_1"
    _f(f1[2][key], lam)
    if regime == "occ":
        assert abs(lam) > 1e-3 and abs(s1[0]) > 1e-6  # the MTP term of update 2 is really on
        _f(s1[2]["occ/lambda_applied_1"], lam)


# ---------------------------------------------------------------------------------------------
# checkpointing


def test_state_dict_round_trip_continues_exactly():
    cfg = NemoOCCConfig(regime="occ", occ=OCCConfig(lambda_plus=1.3))
    a = MTPObjective(cfg, POLICY)
    main, old, mtp, adv, mask = rand_batch(seed=58)
    _call(a, main, old, adv, mask, [mtp])
    close_metrics(a)
    _call(a, main[:4], old[:4], adv[:4], mask[:4], [mtp[:4]])  # mid-update
    b = MTPObjective(cfg, POLICY)
    b.load_state_dict(a.state_dict())
    assert b.coefficients() == a.coefficients()
    nxt = rand_batch(seed=59)
    ta, _ = _call(a, *nxt[:2], nxt[3], nxt[4], [nxt[2]])
    tb, _ = _call(b, *nxt[:2], nxt[3], nxt[4], [nxt[2]])
    torch.testing.assert_close(ta, tb)
    assert close_metrics(a) == close_metrics(b)
    assert a.coefficients() == b.coefficients()
    with pytest.raises(ValueError, match="regime 'occ'"):
        MTPObjective(NemoOCCConfig(regime="policy"), POLICY).load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------
# bad input: a raising call leaves every piece of state unchanged


def _same_state(a, b) -> bool:
    """Nested state dicts equal, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _bad_inputs(regime):
    """(name, keyword overrides of one micro-batch call) that must raise; K = 2 depths."""
    main, old, mtp, adv, mask = rand_batch(seed=70)
    nan_adv = adv.clone()
    nan_adv[0] = float("nan")  # row 0 has a valid token in every depth (rand_batch keeps >= 1)
    nan_mtp = mtp.clone()
    nan_mtp[0, 0] = float("nan")
    n_tok, n_seq = count_valid(mask)
    cases = {
        "nan_mtp_logprob": dict(mtp_logprobs=[mtp, nan_mtp]),
        "inf_global_valid_tokens": dict(global_valid_tokens=float("inf")),
        "nan_global_valid_tokens": dict(global_valid_tokens=float("nan")),
        "global_valid_tokens_below_local": dict(global_valid_tokens=n_tok - 1),
        "one_mtp_mask_for_two_depths": dict(mtp_masks=[mask]),
        "three_mtp_masks_for_two_depths": dict(mtp_masks=[mask, mask, mask]),
        "mtp_mask_of_shape_S": dict(mtp_masks=[mask, mask[0]]),
        "one_mtp_old_logprobs_for_two_depths": dict(mtp_old_logprobs=[old]),
    }
    if get_regime(regime).uses_policy_loss:
        cases["nan_advantage"] = dict(advantages=nan_adv)
        cases["inf_global_valid_seqs"] = dict(global_valid_seqs=float("inf"))
    return cases


@pytest.mark.parametrize("timing", ["lagged", "microbatch"])
@pytest.mark.parametrize("regime", ["detach", "ce", "policy", "occ"])
def test_a_raising_call_leaves_every_piece_of_state_unchanged(regime, timing):
    """Validate first, then move state: after a micro-batch that raises, the state dict and the next
    update's λ and metrics are those of a twin objective that never saw the bad micro-batch."""
    with warnings.catch_warnings():  # detach/ce warn that old_logprobs only matters to the proxies
        warnings.simplefilter("ignore")
        cfg = NemoOCCConfig(
            regime=regime, num_depths=2, old_logprobs="mtp", occ=OCCConfig(timing=timing, initial_lambda=0.3)
        )
    main, old, mtp, adv, mask = rand_batch(seed=70)
    gen = torch.Generator().manual_seed(71)
    mtp2 = old + 0.3 * torch.randn(old.shape, generator=gen, dtype=old.dtype)
    good = dict(
        main_logprobs=main,
        old_logprobs=old,
        advantages=adv,
        mask=mask,
        mtp_logprobs=[mtp, mtp2],
        mtp_old_logprobs=[old, old],
        global_valid_tokens=count_valid(mask)[0],
        global_valid_seqs=count_valid(mask)[1],
    )
    obj, twin = (
        MTPObjective(cfg, AGGREGATIONS["seq_mean_token_mean"]),
        MTPObjective(cfg, AGGREGATIONS["seq_mean_token_mean"]),
    )
    for o in (obj, twin):  # some state already: one closed update and one pending micro-batch
        o(TokenInputs(**good))
        close_metrics(o)
        o(TokenInputs(**good))
    for name, bad in _bad_inputs(regime).items():
        before = obj.state_dict()
        with pytest.raises(ValueError):
            obj(TokenInputs(**(good | bad)))
        assert _same_state(obj.state_dict(), before), name
    assert obj.coefficients() == twin.coefficients()
    assert close_metrics(obj) == close_metrics(twin)
    assert obj.coefficients() == twin.coefficients()


def test_an_overflowing_microbatch_lambda_raises_before_any_state_moves():
    cfg = NemoOCCConfig(regime="occ", occ=OCCConfig(timing="microbatch", lambda_plus=1e308))
    obj = MTPObjective(cfg, POLICY)
    main, old, mtp, adv, mask = rand_batch(seed=74)
    before = obj.state_dict()
    with pytest.raises(ValueError, match="λ overflowed"):
        _call(obj, main, old, adv, mask, [mtp])
    assert _same_state(obj.state_dict(), before)


@pytest.mark.parametrize("monitor", [True, False])
@pytest.mark.parametrize("regime", REGIMES)
def test_mtp_masks_with_the_wrong_number_of_entries_raise_in_every_regime(regime, monitor):
    main, old, mtp, adv, mask = rand_batch(seed=72)
    obj = MTPObjective(NemoOCCConfig(regime=regime, num_depths=2, monitor_proxies=monitor), POLICY)
    for masks in ([mask], [mask, mask, mask]):
        with pytest.raises(
            ValueError, match=rf"mtp_masks has {len(masks)} entries but there are 2 MTP depth"
        ):
            _call(obj, main, old, adv, mask, [mtp, mtp], mtp_masks=masks)
    with pytest.raises(ValueError, match=r"mtp_masks\[1\] has shape \(7,\)"):  # would broadcast
        _call(obj, main, old, adv, mask, [mtp, mtp], mtp_masks=[mask, mask[0]])
    _call(obj, main, old, adv, mask, [mtp, mtp], mtp_masks=[mask, mask])  # the right count passes


def test_negative_lambda_applies_lambda_times_the_loss_not_the_loss_of_lambda_times_advantages():
    """The documented sign convention (docs/library.md, config ``timing``): the MTP term is λ·L(A), Eq. 2 of the
    paper; the reference code's L(λ·A) agrees for λ >= 0 and differs for λ < 0, where clipping acts
    on the other side."""
    cfg = NemoOCCConfig(regime="occ", occ=OCCConfig(timing="microbatch"))
    main, old, mtp, adv, mask = rand_batch(seed=73)
    main = old - (main - old)  # δ_RL mirrored: ĉ < 0, so the signed λ is negative
    lam = loop_lambda(main, old, mtp, mask)
    assert lam < -0.05
    total, _ = _call(MTPObjective(cfg, POLICY), main, old, adv, mask, [mtp])
    kw = loss_kwargs(POLICY, mask)
    eq2 = lam * loop_policy_loss(mtp, old, adv, mask, **kw)
    reference_code = loop_policy_loss(mtp, old, lam * adv, mask, **kw)
    torch.testing.assert_close(total, eq2)
    assert abs(float(eq2) - float(reference_code)) > 1e-3  # the two conventions really differ here
    # and agree for λ >= 0 (here λ = |λ|)
    torch.testing.assert_close(
        -lam * loop_policy_loss(mtp, old, adv, mask, **kw), loop_policy_loss(mtp, old, -lam * adv, mask, **kw)
    )


def test_the_microbatch_timing_description_says_where_it_departs_from_the_reference_code():
    text = OCCConfig.model_fields["timing"].description
    assert "λ < 0" in text and "L(λ·A)" in text
