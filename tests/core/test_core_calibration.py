"""OCC proxies ĉ, v̂² and λ (Eq. 12-13, Appendix E) against loops over tokens (tests/_refs.py).

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

import pytest
import torch

from nemo_occ.core.calibration import OCCCalibrator, proxy_statistics
from nemo_occ.core.config import OCCConfig
from nemo_occ.core.inputs import TokenInputs
from tests._refs import close_metrics, loop_lambda, loop_proxies, rand_batch


def _assert_float(a: float, b: float):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


def _accumulate(cal, main, old, mtp, mask, **kwargs):
    """One micro-batch's statistics added to the open update, as ``MTPObjective`` does; returns them."""
    stats = cal.statistics(
        TokenInputs(main_logprobs=main, old_logprobs=old, mtp_logprobs=mtp, mask=mask, **kwargs)
    )
    cal.add_statistics(stats)
    return stats


def _negate_alignment(main, old, mtp):
    """Mirror δ_RL so that ĉ changes sign while v̂² stays."""
    return old - (main - old), old, mtp


def test_proxy_statistics_match_loop():
    main, old, mtp, _, mask = rand_batch(seed=20)
    eps = 1e-3
    stats = proxy_statistics(main, old, mtp, old, mask, eps)
    c, v2, pairs = loop_proxies(main, old, mtp, mask)
    assert stats.dtype == torch.float64
    _assert_float(float(stats[0]), c)
    _assert_float(float(stats[1]), v2)
    assert float(stats[2]) == len(pairs)
    _assert_float(float(stats[3]), sum(a * b / (b * b + eps) for a, b in pairs))


def test_proxy_statistics_with_own_mtp_old_logprobs():
    main, old, mtp, _, mask = rand_batch(seed=21)
    mtp_old = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=old.dtype)
    cal = OCCCalibrator(1)
    stats = cal.statistics(
        TokenInputs(
            main_logprobs=main, old_logprobs=old, mtp_logprobs=[mtp], mask=mask, mtp_old_logprobs=[mtp_old]
        )
    )
    c, v2, _ = loop_proxies(main, old, mtp, mask, mtp_old=mtp_old)
    _assert_float(float(stats[0, 0]), c)
    _assert_float(float(stats[0, 1]), v2)


@pytest.mark.parametrize("estimator", ["signed", "clipped", "reference"])
@pytest.mark.parametrize("flip", [False, True], ids=["c_pos", "c_neg"])
def test_lambda_matches_loop(estimator, flip):
    main, old, mtp, _, mask = rand_batch(seed=22)
    if flip:
        main, old, mtp = _negate_alignment(main, old, mtp)
    c, _, _ = loop_proxies(main, old, mtp, mask)
    assert (c < 0) == flip
    cfg = OCCConfig(estimator=estimator, lambda_plus=0.7, eps=1e-4)
    cal = OCCCalibrator(1, cfg)
    _accumulate(cal, main, old, [mtp], mask)
    metrics = close_metrics(cal)
    expected = loop_lambda(main, old, mtp, mask, lambda_plus=0.7, eps=1e-4, estimator=estimator)
    _assert_float(cal.lambdas[0], expected)
    _assert_float(metrics["occ/lambda_1"], expected)
    _assert_float(metrics["occ/c_hat_1"], c)


def test_negative_alignment_gives_negative_signed_and_zero_clipped_lambda():
    main, old, mtp, _, mask = rand_batch(seed=23)
    main, old, mtp = _negate_alignment(main, old, mtp)
    lams = {}
    for est in ("signed", "clipped"):
        cal = OCCCalibrator(1, OCCConfig(estimator=est))
        _accumulate(cal, main, old, [mtp], mask)
        close_metrics(cal)
        lams[est] = cal.lambdas[0]
    assert lams["signed"] < 0
    assert lams["clipped"] == 0.0


@pytest.mark.parametrize("flip", [False, True], ids=["c_pos", "c_neg"])
@pytest.mark.parametrize("estimator", ["signed", "reference"])
def test_lambda_max_clamps_both_signs(flip, estimator):
    main, old, mtp, _, mask = rand_batch(seed=24)
    if flip:
        main, old, mtp = _negate_alignment(main, old, mtp)
    free = loop_lambda(main, old, mtp, mask, lambda_plus=50.0, estimator=estimator)
    cap = abs(free) / 3  # the unclamped λ is 3x the cap
    cal = OCCCalibrator(1, OCCConfig(lambda_plus=50.0, lambda_max=cap, estimator=estimator))
    _accumulate(cal, main, old, [mtp], mask)
    close_metrics(cal)
    _assert_float(cal.lambdas[0], cap if free > 0 else -cap)


def test_lambda_max_leaves_small_lambda_alone():
    main, old, mtp, _, mask = rand_batch(seed=24)
    free = loop_lambda(main, old, mtp, mask)
    cal = OCCCalibrator(1, OCCConfig(lambda_max=abs(free) * 2))
    _accumulate(cal, main, old, [mtp], mask)
    close_metrics(cal)
    _assert_float(cal.lambdas[0], free)


def test_statistics_are_summed_over_micro_batches_before_the_ratio():
    """Eq. 13 is a ratio of sums over the whole update: eight micro-batches of 1 == one of 8."""
    main, old, mtp, _, mask = rand_batch(seed=25)
    one = OCCCalibrator(1)
    _accumulate(one, main, old, [mtp], mask)
    m1 = close_metrics(one)
    eight = OCCCalibrator(1)
    for i in range(8):
        _accumulate(eight, main[i : i + 1], old[i : i + 1], [mtp[i : i + 1]], mask[i : i + 1])
    m8 = close_metrics(eight)
    _assert_float(eight.lambdas[0], one.lambdas[0])
    _assert_float(eight.lambdas[0], loop_lambda(main, old, mtp, mask))
    for key in ("occ/c_hat_1", "occ/v2_hat_1", "occ/valid_tokens_1"):
        _assert_float(m8[key], m1[key])


def test_update_metrics_match_loop_and_describe_the_applied_lambda():
    main, old, mtp, _, mask = rand_batch(seed=26)
    cal = OCCCalibrator(1, OCCConfig(initial_lambda=0.25))
    _accumulate(cal, main, old, [mtp], mask)
    m = close_metrics(cal)
    c, v2, pairs = loop_proxies(main, old, mtp, mask)
    n = len(pairs)
    _assert_float(m["occ/lambda_applied_1"], 0.25)  # the update just closed ran with initial_lambda
    _assert_float(m["occ/first_order_1"], 0.25 * c)
    _assert_float(m["occ/second_order_1"], 0.5 * 0.25**2 * v2)
    _assert_float(m["occ/c_hat_mean_1"], c / n)
    _assert_float(m["occ/v2_hat_mean_1"], v2 / n)
    assert m["occ/valid_tokens_1"] == n and m["occ/no_valid_tokens_1"] == 0.0
    assert cal.num_updates == 1
    # statistics were consumed: an update without new data has no valid token
    m2 = close_metrics(cal)
    assert m2["occ/no_valid_tokens_1"] == 1.0 and cal.lambdas == [0.0]
    _assert_float(m2["occ/lambda_applied_1"], loop_lambda(main, old, mtp, mask))


def test_initial_lambda_is_used_before_any_statistics():
    cal = OCCCalibrator(2, OCCConfig(initial_lambda=0.3))
    assert cal.lambdas == [0.3, 0.3]


def test_two_depths_use_their_own_masks():
    main, old, mtp, _, mask = rand_batch(seed=27)
    mtp2 = old + 0.5 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2), dtype=old.dtype)
    m2 = mask.clone()
    m2[:, 0] = False  # depth 2 has no value at the first position of each row
    m2[:, 2] = False
    cal = OCCCalibrator(2)
    _accumulate(cal, main, old, [mtp, mtp2], mask, mtp_masks=[mask, m2])
    close_metrics(cal)
    _assert_float(cal.lambdas[0], loop_lambda(main, old, mtp, mask))
    _assert_float(cal.lambdas[1], loop_lambda(main, old, mtp2, mask & m2))
    assert abs(cal.lambdas[1] - loop_lambda(main, old, mtp2, mask)) > 1e-6  # the mask matters


def test_microbatch_timing_local_lambdas_match_loop():
    main, old, mtp, _, mask = rand_batch(seed=28)
    cal = OCCCalibrator(1, OCCConfig(timing="microbatch"))
    used = []
    for sl in (slice(0, 3), slice(3, 8)):
        stats = _accumulate(cal, main[sl], old[sl], [mtp[sl]], mask[sl])
        used.append(cal.local_lambdas(stats)[0])
        _assert_float(used[-1], loop_lambda(main[sl], old[sl], mtp[sl], mask[sl]))
    m = close_metrics(cal)
    _assert_float(m["occ/lambda_applied_1"], sum(used) / 2)
    _assert_float(m["occ/lambda_1"], loop_lambda(main, old, mtp, mask))


# ---------------------------------------------------------------------------------------------
# degenerate and bad input


def test_no_valid_token_gives_zero_lambda_and_flags_it():
    main, old, mtp, _, mask = rand_batch(seed=29)
    cal = OCCCalibrator(1, OCCConfig(initial_lambda=0.5))
    _accumulate(cal, main, old, [mtp], torch.zeros_like(mask))
    m = close_metrics(cal)
    assert cal.lambdas == [0.0]
    assert m["occ/no_valid_tokens_1"] == 1
    assert m["occ/valid_tokens_1"] == 0
    for est in ("signed", "clipped", "reference"):
        c2 = OCCCalibrator(1, OCCConfig(estimator=est))
        _accumulate(c2, main, old, [mtp], torch.zeros_like(mask))
        close_metrics(c2)
        assert c2.lambdas == [0.0]


@pytest.mark.parametrize("estimator", ["signed", "clipped", "reference"])
def test_zero_variance_gives_zero_finite_lambda(estimator):
    """MTP head unchanged (δ_MTP = 0): v̂² = 0 and ĉ = 0, so λ = 0/ε = 0, not NaN."""
    main, old, _, _, mask = rand_batch(seed=30)
    cal = OCCCalibrator(1, OCCConfig(estimator=estimator))
    _accumulate(cal, main, old, [old.clone()], mask)
    m = close_metrics(cal)
    assert m["occ/v2_hat_1"] == 0.0 and m["occ/c_hat_1"] == 0.0
    assert cal.lambdas == [0.0]


def test_nan_at_valid_position_raises_and_at_masked_position_is_ignored():
    main, old, mtp, _, mask = rand_batch(seed=31)
    bad = mtp.clone()
    bad[0, 0] = float("nan")
    cal = OCCCalibrator(1)
    with pytest.raises(ValueError, match="NaN/Inf"):
        _accumulate(cal, main, old, [bad], mask)
    pad = ~mask
    assert bool(pad.any())
    m2, o2, t2 = main.clone(), old.clone(), mtp.clone()
    m2[pad], o2[pad], t2[pad] = float("nan"), float("-inf"), float("-inf")
    _accumulate(cal, m2, o2, [t2], mask)
    close_metrics(cal)
    _assert_float(cal.lambdas[0], loop_lambda(main, old, mtp, mask))


def test_bad_shapes_and_depth_counts_raise():
    main, old, mtp, _, mask = rand_batch(seed=32)
    cal = OCCCalibrator(2)
    with pytest.raises(ValueError, match="num_depths=2"):
        _accumulate(cal, main, old, [mtp], mask)
    with pytest.raises(ValueError, match="mtp_masks"):
        _accumulate(cal, main, old, [mtp, mtp], mask, mtp_masks=[mask])
    with pytest.raises(ValueError, match="mtp_old_logprobs"):
        _accumulate(cal, main, old, [mtp, mtp], mask, mtp_old_logprobs=[old])
    with pytest.raises(ValueError, match="mtp_logprobs has shape"):
        _accumulate(cal, main, old, [mtp, mtp[:, :-1]], mask)
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        cal.add_statistics(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="num_depths"):
        OCCCalibrator(0)


def test_statistics_do_not_depend_on_the_calibrator_that_computes_them():
    main, old, mtp, _, mask = rand_batch(seed=33)
    a = OCCCalibrator(1)
    _accumulate(a, main, old, [mtp], mask)
    b = OCCCalibrator(1)
    b.add_statistics(
        OCCCalibrator(1).statistics(
            TokenInputs(main_logprobs=main, old_logprobs=old, mtp_logprobs=[mtp], mask=mask)
        )
    )
    close_metrics(a)
    close_metrics(b)
    assert a.lambdas == b.lambdas


# ---------------------------------------------------------------------------------------------
# checkpointing


def test_state_dict_round_trip_continues_exactly():
    """Save mid-update (after one accumulated micro-batch), resume, and finish the same sequence."""
    batches = [rand_batch(seed=40 + i) for i in range(4)]
    cfg = OCCConfig(lambda_plus=0.8, timing="microbatch")

    def run(cal, items):
        out = []
        for j, (main, old, mtp, _, mask) in enumerate(items):
            stats = _accumulate(cal, main, old, [mtp], mask)
            cal.local_lambdas(stats)
            if j % 2 == 1:
                out.append(close_metrics(cal))
        return out

    straight = OCCCalibrator(1, cfg)
    ref_metrics = run(straight, batches)

    first = OCCCalibrator(1, cfg)
    run(first, batches[:2])
    stats = _accumulate(first, *[batches[2][k] for k in (0, 1)], [batches[2][2]], batches[2][4])
    first.local_lambdas(stats)
    state = first.state_dict()
    resumed = OCCCalibrator(1, cfg)
    resumed.load_state_dict(state)
    last = _accumulate(resumed, *[batches[3][k] for k in (0, 1)], [batches[3][2]], batches[3][4])
    resumed.local_lambdas(last)
    m = close_metrics(resumed)
    assert m == ref_metrics[1]
    assert resumed.lambdas == straight.lambdas
    assert resumed.num_updates == straight.num_updates == 2
    # the state holds copies, not views of the live tensors
    _accumulate(first, *[batches[3][k] for k in (0, 1)], [batches[3][2]], batches[3][4])
    assert torch.equal(state["stats"], OCCCalibrator(1, cfg).state_dict()["stats"] + stats)


def test_load_state_dict_with_other_depth_count_raises():
    state = OCCCalibrator(2).state_dict()
    with pytest.raises(ValueError, match="num_depths"):
        OCCCalibrator(1).load_state_dict(state)


def test_update_without_refresh_reports_statistics_but_keeps_lambda():
    # the first update of an RL step runs at θ = θ_old: δ_RL = 0, ĉ = 0, and it must not zero λ
    main, old, mtp, _, mask = rand_batch(seed=31)
    cal = OCCCalibrator(1, OCCConfig())
    _accumulate(cal, main, old, [mtp], mask)
    close_metrics(cal)  # a real update sets λ from its statistics
    lam = cal.lambdas[0]
    assert lam != 0.0
    _accumulate(cal, old, old, [mtp], mask)  # on-policy: current main log-probs equal the old ones
    m = close_metrics(cal, refresh=False)
    assert cal.lambdas[0] == lam and m["occ/lambda_1"] == lam and m["occ/refreshed"] == 0.0
    assert m["occ/c_hat_1"] == 0.0
    _assert_float(m["occ/lambda_applied_1"], lam)
    _accumulate(cal, main, old, [mtp], mask)
    m = close_metrics(cal)  # refreshing again takes this update's statistics
    assert m["occ/refreshed"] == 1.0
    _assert_float(cal.lambdas[0], loop_lambda(main, old, mtp, mask))


# ---------------------------------------------------------------------------------------------
# bad input leaves the calibrator unchanged


def _snapshot(cal):
    s = cal.state_dict()
    return s["lambdas"], s["stats"].clone(), s["applied"].clone(), s["num_updates"]


def _unchanged(cal, snap):
    lambdas, stats, applied, n = _snapshot(cal)
    return (
        lambdas == snap[0] and torch.equal(stats, snap[1]) and torch.equal(applied, snap[2]) and n == snap[3]
    )


def _busy_calibrator(K=1, timing="microbatch"):
    """A calibrator with a closed update and a pending micro-batch (so every field is non-trivial)."""
    cal = OCCCalibrator(K, OCCConfig(timing=timing))
    main, old, mtp, _, mask = rand_batch(seed=90)
    for _ in range(2):
        cal.local_lambdas(_accumulate(cal, main, old, [mtp] * K, mask))
    close_metrics(cal)
    cal.local_lambdas(_accumulate(cal, main, old, [mtp] * K, mask))
    return cal


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.tensor([[float("nan"), 1.0, 3.0, 0.0]]), "NaN/Inf"),
        (torch.tensor([[1.0, float("inf"), 3.0, 0.0]]), "NaN/Inf"),
        (torch.tensor([[1.0, -1.0, 3.0, 0.0]]), "negative"),
        (torch.tensor([[1.0, 1.0, -3.0, 0.0]]), "negative"),
        (torch.zeros(2, 4), r"\[1, 4\]"),
        ([[1.0, 1.0, 3.0, 0.0]], "tensor"),
    ],
    ids=["nan_c", "inf_v2", "negative_v2", "negative_n", "two_rows_for_one_depth", "a_list"],
)
def test_bad_statistics_raise_and_leave_state_unchanged(bad, error):
    """add_statistics used to take NaN (every later λ NaN); local_lambdas broadcast a [1, 4] row over
    two depths' applied-λ record. Both now check first."""
    for method in ("add_statistics", "local_lambdas"):
        cal = _busy_calibrator()
        snap = _snapshot(cal)
        with pytest.raises((ValueError, TypeError), match=error):
            getattr(cal, method)(bad)
        assert _unchanged(cal, snap), method


def test_local_lambdas_with_one_depth_row_for_two_depths_raises():
    cal = _busy_calibrator(K=2)
    snap = _snapshot(cal)
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        cal.local_lambdas(torch.tensor([[1.0, 1.0, 3.0, 0.0]]))
    assert _unchanged(cal, snap)


def test_a_depth_mask_that_would_broadcast_raises():
    """mask & mtp_mask used to broadcast a [S] or [B, 1] mask silently."""
    main, old, mtp, _, mask = rand_batch(seed=91)
    cal = _busy_calibrator()
    snap = _snapshot(cal)
    for mk in (mask[0], mask[:, :1]):
        with pytest.raises(ValueError, match=r"mtp_masks\[0\] has shape"):
            _accumulate(cal, main, old, [mtp], mask, mtp_masks=[mk])
    assert _unchanged(cal, snap)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.pop("num_updates"),
        lambda s: s.__setitem__("num_updates", "three"),
        lambda s: s.__setitem__("lambdas", [float("nan")]),
        lambda s: s.__setitem__("lambdas", [0.1, 0.2]),
        lambda s: s.__setitem__("stats", torch.zeros(1, 3)),
        lambda s: s.__setitem__("stats", torch.full((1, 4), float("inf"))),
        lambda s: s.__setitem__("applied", torch.zeros(2, 2)),
    ],
    ids=[
        "no_num_updates",
        "num_updates_not_int",
        "nan_lambda",
        "two_lambdas",
        "stats_shape",
        "inf_stats",
        "applied_shape",
    ],
)
def test_a_corrupt_state_dict_raises_and_leaves_state_unchanged(corrupt):
    """load_state_dict used to assign λ and the sums before failing on a later key."""
    other = OCCCalibrator(1, OCCConfig(lambda_plus=0.5))
    main, old, mtp, _, mask = rand_batch(seed=92)
    _accumulate(other, main, old, [mtp], mask)
    close_metrics(other)
    state = other.state_dict()
    corrupt(state)
    cal = _busy_calibrator()
    snap = _snapshot(cal)
    with pytest.raises(ValueError):
        cal.load_state_dict(state)
    assert _unchanged(cal, snap)


@pytest.mark.parametrize("timing", ["lagged", "microbatch"])
def test_an_overflowing_lambda_raises_and_leaves_state_unchanged(timing):
    """lambda_plus = 1e308 (finite, so the config accepts it) used to give λ = inf silently."""
    main, old, mtp, _, mask = rand_batch(seed=93)
    cal = OCCCalibrator(1, OCCConfig(lambda_plus=1e308, timing=timing))
    _accumulate(cal, main, old, [mtp], mask)
    snap = _snapshot(cal)
    with pytest.raises(ValueError, match="λ overflowed to inf.*lower occ.lambda_plus"):
        close_metrics(cal)
    assert _unchanged(cal, snap)
    stats = cal.statistics(TokenInputs(main_logprobs=main, old_logprobs=old, mtp_logprobs=[mtp], mask=mask))
    with pytest.raises(ValueError, match="λ overflowed"):
        cal.local_lambdas(stats)
    assert _unchanged(cal, snap)
    # λ_max keeps it finite
    capped = OCCCalibrator(1, OCCConfig(lambda_plus=1e308, lambda_max=3.0))
    _accumulate(capped, main, old, [mtp], mask)
    close_metrics(capped)
    assert capped.lambdas == [3.0]


def test_a_skipped_update_keeps_lambda_and_its_statistics_never_count():
    # Megatron's step() returned update_successful=False: θ did not move, nothing of the update sets a λ
    main, old, mtp, _, mask = rand_batch(seed=32)
    main2, old2, mtp2, _, mask2 = rand_batch(seed=33)
    cal = OCCCalibrator(1, OCCConfig())
    _accumulate(cal, main, old, [mtp], mask)
    close_metrics(cal)
    lam, updates = cal.lambdas[0], cal.num_updates
    flipped_main, _, _ = _negate_alignment(main, old, mtp)
    _accumulate(cal, flipped_main, old, [mtp], mask)  # would flip λ's sign
    m = close_metrics(cal, skipped=True)
    assert cal.lambdas == [lam] and cal.num_updates == updates
    assert m == {"occ/lambda_1": lam, "occ/refreshed": 0.0, "occ/skipped": 1.0}
    _accumulate(cal, main2, old2, [mtp2], mask2)  # the next update's λ comes from its own statistics only
    m = close_metrics(cal)
    _assert_float(cal.lambdas[0], loop_lambda(main2, old2, mtp2, mask2))
    assert m["occ/skipped"] == 0.0 and m["occ/lambda_applied_1"] == lam


def test_a_skipped_update_discards_microbatch_timing_lambdas_too():
    main, old, mtp, _, mask = rand_batch(seed=34)
    cal = OCCCalibrator(1, OCCConfig(timing="microbatch"))
    cal.local_lambdas(_accumulate(cal, main, old, [mtp], mask))
    close_metrics(cal, skipped=True)
    assert cal.state_dict()["applied"].abs().sum() == 0 and cal.state_dict()["stats"].abs().sum() == 0


def test_update_with_a_group_but_no_torch_distributed_raises_and_leaves_state_unchanged():
    cal = _busy_calibrator()
    snap = _snapshot(cal)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        close_metrics(cal, group=object())
    assert _unchanged(cal, snap)
