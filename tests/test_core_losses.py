"""Clipped policy loss and MTP cross-entropy against loop-written references (tests/_refs.py).

Letters: B sequences, S token positions, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _refs import TinyMTPModel, count_valid, loop_policy_loss, loss_kwargs, rand_batch

from nemo_occ.core.config import PolicyLossConfig
from nemo_occ.core.losses import clipped_policy_loss, cross_entropy_loss, valid_counts

CLIPS = {
    "symmetric": dict(ratio_clip_low=0.2, ratio_clip_high=0.2),
    "dapo_asymmetric": dict(ratio_clip_low=0.2, ratio_clip_high=0.28),
    "wide_asymmetric": dict(ratio_clip_low=0.1, ratio_clip_high=0.5),
    "dual_clip": dict(ratio_clip_low=0.2, ratio_clip_high=0.28, ratio_clip_c=1.5),
}


def _both(cfg: PolicyLossConfig, new, old, adv, mask):
    """(loss, grad) of the code and of the loop reference w.r.t. the current log-probs."""
    n_tok, n_seq = count_valid(mask)
    lp = new.clone().requires_grad_(True)
    loss, metrics = clipped_policy_loss(
        lp, old, adv, mask, cfg, global_valid_tokens=n_tok, global_valid_seqs=n_seq
    )
    (grad,) = torch.autograd.grad(loss, lp)
    lp_ref = new.clone().requires_grad_(True)
    ref = loop_policy_loss(lp_ref, old, adv, mask, **loss_kwargs(cfg, mask))
    (grad_ref,) = torch.autograd.grad(ref, lp_ref)
    return loss, grad, ref, grad_ref, metrics


def _clip_activity(new, old, adv, mask, low, high):
    """How many valid tokens sit in each clipped branch (so a test is known to exercise it)."""
    r = torch.exp(new - old)
    a = adv[:, None].expand_as(r)
    up = int((mask & (a > 0) & (r > 1 + high)).sum())
    down = int((mask & (a < 0) & (r < 1 - low)).sum())
    return up, down


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_token_ratio_loss_and_gradient_match_loop(clip, aggregation):
    cfg = PolicyLossConfig(aggregation=aggregation, **CLIPS[clip])
    new, old, _, adv, mask = rand_batch(seed=1)
    up, down = _clip_activity(new, old, adv, mask, cfg.ratio_clip_low, cfg.ratio_clip_high)
    assert up > 0 and down > 0, "test data must hit both clip bounds"
    loss, grad, ref, grad_ref, _ = _both(cfg, new, old, adv, mask)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_dual_clip_is_exercised_and_changes_the_loss():
    """The dual-clip branch is reached (ratio > c with A < 0) and it matters for the value."""
    new, old, _, adv, mask = rand_batch(seed=1)
    r = torch.exp(new - old)
    assert bool((mask & (adv[:, None] < 0) & (r > 1.5)).any())
    with_c = PolicyLossConfig(ratio_clip_c=1.5)
    without = PolicyLossConfig()
    n_tok, _ = count_valid(mask)
    a, _ = clipped_policy_loss(new, old, adv, mask, with_c, global_valid_tokens=n_tok)
    b, _ = clipped_policy_loss(new, old, adv, mask, without, global_valid_tokens=n_tok)
    assert float(a) < float(b)  # capping a positive per-token loss only lowers the sum


@pytest.mark.parametrize("clip", ["symmetric", "dapo_asymmetric", "dual_clip"])
def test_gspo_sequence_ratio_value_and_gradient_match_loop(clip):
    cfg = PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence", **CLIPS[clip])
    new, old, _, adv, mask = rand_batch(seed=2, spread=0.9)
    # sequence ratios on both sides of both bounds
    seq_r = [
        float(torch.exp((new[i] - old[i])[mask[i]].mean())) for i in range(mask.shape[0]) if mask[i].any()
    ]
    assert any(s > 1 + cfg.ratio_clip_high for s in seq_r) and any(s < 1 - cfg.ratio_clip_low for s in seq_r)
    loss, grad, ref, grad_ref, _ = _both(cfg, new, old, adv, mask)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_gspo_differs_from_token_ratio():
    """The sequence ratio is really used (a mutation falling back to token ratios must fail)."""
    new, old, _, adv, mask = rand_batch(seed=2, spread=0.9)
    n_tok, n_seq = count_valid(mask)
    kw = dict(global_valid_tokens=n_tok, global_valid_seqs=n_seq)
    seq = PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence")
    tok = PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="token")
    a, _ = clipped_policy_loss(new, old, adv, mask, seq, **kw)
    b, _ = clipped_policy_loss(new, old, adv, mask, tok, **kw)
    assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(ratio_clip_c=2.0),
        # with per-token advantages the GSPO gradient (through the shared sequence ratio) differs from
        # GSPO-token's (sg(s_i)·π_t/sg(π_t)); with one advantage per sequence they coincide
        PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence"),
    ],
    ids=["token_ratio_dual_clip", "gspo"],
)
def test_per_token_advantages_match_loop(cfg):
    new, old, _, _, mask = rand_batch(seed=3)
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)  # [B, S]
    loss, grad, ref, grad_ref, _ = _both(cfg, new, old, adv, mask)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_metrics_match_counts():
    cfg = PolicyLossConfig(ratio_clip_c=1.5)
    new, old, _, adv, mask = rand_batch(seed=4)
    n_tok, _ = count_valid(mask)
    _, metrics = clipped_policy_loss(new, old, adv, mask, cfg, global_valid_tokens=n_tok)
    clipped = dual = 0
    ratio_sum = kl = 0.0
    for i in range(mask.shape[0]):
        a = float(adv[i])
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            lr = float(new[i, t] - old[i, t])
            r = torch.tensor(lr, dtype=torch.float64).exp().item()
            clipped += (a > 0 and r > 1.28) or (a < 0 and r < 0.8)
            dual += a < 0 and -a * max(r, min(max(r, 0.8), 1.28)) > -1.5 * a
            ratio_sum += r
            kl += r - 1 - lr
    # fractions of counts are float32 (int count / float denominator)
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(clipped / n_tok, dtype=torch.float32))
    torch.testing.assert_close(metrics["dual_clip_fraction"], torch.tensor(dual / n_tok, dtype=torch.float32))
    assert 0 < clipped < n_tok and 0 < dual < n_tok
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(ratio_sum / n_tok, dtype=torch.float64))
    torch.testing.assert_close(metrics["kl_old"], torch.tensor(kl / n_tok, dtype=torch.float64))


@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(aggregation="token_mean"),
        PolicyLossConfig(aggregation="seq_mean_token_mean"),
        PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence"),
    ],
    ids=["token_mean", "seq_mean_token_mean", "gspo"],
)
def test_micro_batches_with_global_denominators_sum_to_the_full_batch(cfg):
    new, old, _, adv, mask = rand_batch(seed=5)
    n_tok, n_seq = count_valid(mask)
    kw = dict(global_valid_tokens=n_tok, global_valid_seqs=n_seq)
    lp = new.clone().requires_grad_(True)
    full, _ = clipped_policy_loss(lp, old, adv, mask, cfg, **kw)
    (g_full,) = torch.autograd.grad(full, lp)
    lp2 = new.clone().requires_grad_(True)
    parts = [
        clipped_policy_loss(lp2[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], cfg, **kw)[0]
        for i in range(8)
    ]
    total = sum(parts)
    (g_parts,) = torch.autograd.grad(total, lp2)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_parts, g_full)


def test_valid_counts_match_loop():
    _, _, _, _, mask = rand_batch(seed=6)
    mask[3] = False  # a sequence with no valid token is not counted
    n_tok, n_seq = valid_counts(mask)
    assert (int(n_tok), int(n_seq)) == count_valid(mask)


# ---------------------------------------------------------------------------------------------
# cross-entropy on a tiny model


def test_cross_entropy_matches_torch_cross_entropy_on_tiny_model():
    model = TinyMTPModel(V=11, H=6, K=1)
    ids = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, :2] = False
    main, _, _ = model(ids)  # [B, S-1] by per-token gather
    n = int(mask.sum())
    loss, _ = cross_entropy_loss(main, mask, global_valid_tokens=n)
    g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    # reference: F.cross_entropy on full logits, padding ignored through ignore_index
    main_full, _ = model.full_logprobs(ids)  # [B, S, V]
    targets = ids[:, 1:].clone()
    targets[~mask] = -100
    ref = (
        F.nll_loss(main_full[:, :-1].reshape(-1, 11), targets.reshape(-1), ignore_index=-100, reduction="sum")
        / n
    )
    g_ref = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a is None or bool((a == 0).all())
        else:
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# bad input


def test_shape_mismatch_raises():
    cfg = PolicyLossConfig()
    new, old, _, adv, mask = rand_batch(seed=7)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        clipped_policy_loss(new, old[:, :-1], adv, mask, cfg, global_valid_tokens=10)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(new, old, adv[:-1], mask, cfg, global_valid_tokens=10)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(new, old, adv[:, None].expand(8, 3), mask, cfg, global_valid_tokens=10)
    with pytest.raises(ValueError, match=r"mask must be \[B, S\]"):
        clipped_policy_loss(new[0], old[0], adv, mask[0], cfg, global_valid_tokens=10)
    with pytest.raises(ValueError, match="logprobs has shape"):
        cross_entropy_loss(new[:, :-1], mask, global_valid_tokens=10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_at_valid_position_raises(bad):
    cfg = PolicyLossConfig()
    new, old, _, adv, mask = rand_batch(seed=7)
    n_tok, _ = count_valid(mask)
    for which in ("new", "old"):
        x, y = new.clone(), old.clone()
        (x if which == "new" else y)[0, 0] = bad  # position 0 is valid in every row
        with pytest.raises(ValueError, match="NaN/Inf"):
            clipped_policy_loss(x, y, adv, mask, cfg, global_valid_tokens=n_tok)
    x = new.clone()
    x[0, 0] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        cross_entropy_loss(x, mask, global_valid_tokens=n_tok)
    a = adv.clone()
    a[0] = bad
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(new, old, a, mask, cfg, global_valid_tokens=n_tok)


@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(),
        PolicyLossConfig(aggregation="seq_mean_token_mean", ratio_clip_c=3.0),
        PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence"),
    ],
    ids=["token_mean", "seq_mean_token_mean_dual", "gspo"],
)
def test_nan_and_neg_inf_at_masked_positions_are_ignored(cfg):
    new, old, _, adv, mask = rand_batch(seed=8)
    assert bool((~mask).any())
    n_tok, n_seq = count_valid(mask)
    kw = dict(global_valid_tokens=n_tok, global_valid_seqs=n_seq)
    x, y = new.clone(), old.clone()
    pad = ~mask
    x[pad] = float("-inf")
    y[pad] = float("-inf")
    x[pad & (torch.arange(mask.shape[1]) % 2 == 0)] = float("nan")
    lp = x.clone().requires_grad_(True)
    loss, metrics = clipped_policy_loss(lp, y, adv, mask, cfg, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    ref, _ = clipped_policy_loss(new, old, adv, mask, cfg, **kw)  # same valid values, finite padding
    assert all(bool(torch.isfinite(v).all()) for v in metrics.values())
    assert bool(torch.isfinite(g).all()) and bool((g[pad] == 0).all())
    torch.testing.assert_close(loss.detach(), ref)
    lp_ce = x.clone().requires_grad_(True)
    ce, _ = cross_entropy_loss(lp_ce, mask, global_valid_tokens=n_tok)
    (g_ce,) = torch.autograd.grad(ce, lp_ce)
    assert bool(torch.isfinite(ce)) and bool(torch.isfinite(g_ce).all())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_no_valid_token_gives_zero_loss_and_zero_gradient(aggregation):
    cfg = PolicyLossConfig(aggregation=aggregation)
    new, old, _, adv, mask = rand_batch(seed=9)
    empty = torch.zeros_like(mask)
    lp = new.clone().requires_grad_(True)
    loss, metrics = clipped_policy_loss(lp, old, adv, empty, cfg, global_valid_tokens=0, global_valid_seqs=0)
    (g,) = torch.autograd.grad(loss, lp)
    assert float(loss.detach()) == 0.0
    assert bool((g == 0).all())
    assert all(float(v) == 0.0 for v in metrics.values())
    ce, _ = cross_entropy_loss(lp, empty, global_valid_tokens=0)
    assert float(ce.detach()) == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_denominator_raises(bad):
    new, old, _, adv, mask = rand_batch(seed=10)
    with pytest.raises(ValueError, match="global_valid_tokens"):
        clipped_policy_loss(new, old, adv, mask, PolicyLossConfig(), global_valid_tokens=bad)
    with pytest.raises(ValueError, match="global_valid_seqs"):
        clipped_policy_loss(
            new,
            old,
            adv,
            mask,
            PolicyLossConfig(aggregation="seq_mean_token_mean"),
            global_valid_tokens=10,
            global_valid_seqs=bad,
        )


def test_global_denominator_smaller_than_the_micro_batch_raises():
    """A forgotten global_valid_seqs (default 0) must not turn the sequence mean into a sum."""
    new, old, _, adv, mask = rand_batch(seed=11)
    n_tok, _ = count_valid(mask)
    seq_cfg = PolicyLossConfig(aggregation="seq_mean_token_mean")
    with pytest.raises(ValueError, match="global_valid_seqs"):
        clipped_policy_loss(new, old, adv, mask, seq_cfg, global_valid_tokens=n_tok)
    with pytest.raises(ValueError, match="global_valid_tokens"):
        clipped_policy_loss(new, old, adv, mask, PolicyLossConfig(), global_valid_tokens=n_tok - 1)
    with pytest.raises(ValueError, match="global_valid_tokens"):
        cross_entropy_loss(new, mask, global_valid_tokens=1)
