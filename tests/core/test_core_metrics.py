"""The metrics contract (nemo_occ.core.metrics): one step's updates -> logged metrics, reduced as its
table says, and the draft-acceptance counts, against values written out by hand and explicit loops."""

from __future__ import annotations

import pytest
import torch

from nemo_occ.core.metrics import (
    Denominator,
    DepthStatistics,
    MetricRule,
    Reduce,
    UpdateStatistics,
    acceptance_counts,
    logged_name,
    loss_metric_names,
    metric_rule,
    reduce_values,
    step_metrics,
)


def _update(c, v2, n, applied, nxt, *, refreshed=True, skipped=False, calibrated=True, **gap):
    return UpdateStatistics((DepthStatistics(c, v2, n, applied, nxt, **gap),), refreshed, skipped, calibrated)


def test_lambda_is_the_last_updates_and_statistics_are_means_over_applied_updates():
    step = [
        _update(0.0, 4.0, 10.0, 0.5, 0.5, refreshed=False),  # at θ_old: reported, λ kept
        _update(0.0, 0.0, 0.0, 0.5, 0.5, refreshed=False, skipped=True),  # discarded
        _update(2.0, 8.0, 20.0, 0.5, 0.25),
    ]
    m = step_metrics(step)
    assert m["occ/lambda_1"] == 0.25  # what the next step starts with
    assert m["occ/lambda_applied_1"] == 0.5
    assert m["occ/c_hat_1"] == (0.0 + 2.0) / 2 and m["occ/v2_hat_1"] == (4.0 + 8.0) / 2
    assert m["occ/c_hat_mean_1"] == (0.0 / 10 + 2.0 / 20) / 2 and m["occ/v2_hat_mean_1"] == (0.4 + 0.4) / 2
    assert m["occ/first_order_1"] == (0.5 * 0.0 + 0.5 * 2.0) / 2
    assert m["occ/second_order_1"] == (0.5 * 0.25 * 4.0 + 0.5 * 0.25 * 8.0) / 2
    assert m["occ/valid_tokens_1"] == 15.0 and m["occ/no_valid_tokens_1"] == 0.0
    assert m["occ/refreshed"] == pytest.approx(1 / 3) and m["occ/skipped"] == pytest.approx(1 / 3)
    assert not any("head_gap" in k or "vs_" in k for k in m)  # not measured: not reported


def test_monitored_proxies_are_named_proxy_and_an_all_skipped_step_reports_lambda_only():
    fixed = step_metrics([_update(1.0, 2.0, 3.0, 0.1, 0.7, calibrated=False)])
    assert fixed["proxy/lambda_1"] == 0.7 and fixed["proxy/lambda_applied_1"] == 0.1
    assert not any(k.startswith("occ/") for k in fixed)
    skipped = step_metrics([_update(0.0, 0.0, 0.0, 0.3, 0.3, refreshed=False, skipped=True)])
    assert skipped == {"occ/lambda_1": 0.3, "occ/refreshed": 0.0, "occ/skipped": 1.0}
    assert step_metrics([]) == {}


def test_head_gap_is_a_mean_of_each_updates_share():
    gap = dict(v2_hat_vs_main_old=4.0, v2_hat_vs_own_old=1.0, static_gap=2.0)
    step = [_update(1.0, 4.0, 5.0, 0.0, 0.0, **gap), _update(1.0, 4.0, 5.0, 0.0, 0.0,
            v2_hat_vs_main_old=0.0, v2_hat_vs_own_old=0.0, static_gap=0.0)]  # fmt: skip
    m = step_metrics(step)
    assert m["occ/v2_hat_vs_main_old_1"] == 2.0 and m["occ/v2_hat_vs_own_old_1"] == 0.5
    assert m["occ/head_gap_share_1"] == 0.5  # the second update has no share (v̂² = 0)


def test_accuracy_is_hits_over_mtp_valid_loss_tokens_summed_before_the_ratio():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(3, 5, generator=g) > 0.5, torch.rand(3, 5, generator=g) > 0.3) for _ in range(2)]
    counts = sum(acceptance_counts([hit], [mask]) for hit, mask in batches)
    hits = tokens = 0
    for hit, mask in batches:
        for b in range(3):
            for j in range(5):
                tokens += bool(mask[b, j])
                hits += bool(mask[b, j]) and bool(hit[b, j])
    assert step_metrics([], counts) == {"accuracy_1": pytest.approx(hits / tokens)}
    assert step_metrics([], torch.zeros(1, 2)) == {"accuracy_1": 0.0}  # nothing valid: Megatron's 0
    with pytest.raises(ValueError, match="one per depth"):
        acceptance_counts([batches[0][0]], [])
    with pytest.raises(ValueError, match="differ"):
        acceptance_counts([batches[0][0]], [batches[0][1][:, :-1]])


@pytest.mark.parametrize(
    ("key", "per_seq", "expected"),
    [
        ("mtp/loss_2", False, MetricRule(Reduce.SUM, Denominator.TOKENS)),
        ("mtp/loss_2", True, MetricRule(Reduce.SUM, Denominator.SEQUENCES)),
        ("mtp/loss_scaled", True, MetricRule(Reduce.SUM, Denominator.SEQUENCES)),
        ("mtp/clip_fraction_1", True, MetricRule(Reduce.SUM, Denominator.TOKENS)),  # a share of tokens
        ("mtp/valid_fraction_1", True, MetricRule(Reduce.SUM, Denominator.TOKENS)),
        ("occ/lambda_1", False, MetricRule(Reduce.LAST)),
        ("proxy/lambda_3", False, MetricRule(Reduce.LAST)),
        ("occ/lambda_applied_1", False, MetricRule(Reduce.MEAN)),
        ("occ/refreshed", False, MetricRule(Reduce.SHARE)),
        ("proxy/skipped", False, MetricRule(Reduce.SHARE)),
        ("accuracy_2", False, MetricRule(Reduce.RATIO)),
        ("fidelity/trusted_1", False, MetricRule(Reduce.LAST)),
        ("mtp/ratio_min", False, MetricRule(Reduce.MIN)),  # NeMo-RL never sums _min/_max keys
        ("occ/c_hat_max_1", False, MetricRule(Reduce.MAX)),
        ("grad_norm", False, MetricRule(Reduce.MEAN)),
    ],
)
def test_one_rule_names_each_metrics_reduction(key, per_seq, expected):
    assert metric_rule(key, loss_per_sequence=per_seq) == expected


def test_loss_metric_names_list_each_depths_summable_metrics():
    assert loss_metric_names(2) == [
        "mtp/loss_scaled", "mtp/loss_1", "mtp/clip_fraction_1", "mtp/valid_fraction_1",
        "mtp/loss_2", "mtp/clip_fraction_2", "mtp/valid_fraction_2",
    ]  # fmt: skip


def test_reduce_values_follows_the_rule_and_refuses_what_it_cannot_reduce():
    vals = [3.0, 1.0, 2.0]
    assert reduce_values(vals, MetricRule(Reduce.SUM, Denominator.TOKENS)) == 2.0  # mean of update sums
    assert reduce_values(vals, MetricRule(Reduce.MEAN)) == 2.0
    assert reduce_values([1.0, 0.0, 0.0, 1.0], MetricRule(Reduce.SHARE)) == 0.5
    assert reduce_values(vals, MetricRule(Reduce.LAST)) == 2.0
    assert reduce_values(vals, MetricRule(Reduce.MIN)) == 1.0
    assert reduce_values(vals, MetricRule(Reduce.MAX)) == 3.0
    with pytest.raises(ValueError, match="numerators and denominators"):
        reduce_values(vals, MetricRule(Reduce.RATIO))
    with pytest.raises(ValueError, match="no values"):
        reduce_values([], MetricRule(Reduce.MEAN))


@pytest.mark.parametrize(
    ("key", "logged"),
    [
        ("mtp/loss_1", "train/mtp/loss_1"),  # a loss metric: NeMo-RL's grpo_train logs it as train/<key>
        ("mtp/loss_scaled", "train/mtp/loss_scaled"),
        ("occ/lambda_2", "train/mtp/occ/lambda_2"),  # the worker's mtp_metrics: train/mtp/<key>
        ("proxy/refreshed", "train/mtp/proxy/refreshed"),
        ("accuracy_1", "train/mtp/accuracy_1"),
        ("fidelity/trusted_1", "train/mtp/fidelity/trusted_1"),
        ("reward/mean", "reward/mean"),  # a caller's own metric keeps its name
        ("loss/clip_fraction", "loss/clip_fraction"),
        ("accuracy", "accuracy"),
    ],
)
def test_logged_name_is_the_name_nemo_rl_logs(key, logged):
    assert logged_name(key) == logged
