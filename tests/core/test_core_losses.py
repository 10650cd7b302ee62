"""Clipped policy loss and MTP cross-entropy against loop-written references (tests/_refs.py).

Letters: B sequences, S token positions, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nemo_occ.core.config import PolicyLossConfig
from nemo_occ.core.losses import clipped_policy_loss, cross_entropy_loss, valid_counts
from tests._refs import TinyMTPModel, count_valid, loop_policy_loss, loss_kwargs, rand_batch

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


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), float("-inf"), torch.tensor(float("inf"))])
def test_bad_denominator_raises(bad):
    """inf used to pass and silently give a zero loss; NaN and negative counts are rejected too, for
    both denominators and every aggregation (the metrics divide by global_valid_tokens)."""
    new, old, _, adv, mask = rand_batch(seed=10)
    n_tok, n_seq = count_valid(mask)
    for cfg in (PolicyLossConfig(), PolicyLossConfig(aggregation="seq_mean_token_mean")):
        with pytest.raises(ValueError, match="global_valid_tokens must be a finite, non-negative count"):
            clipped_policy_loss(new, old, adv, mask, cfg, global_valid_tokens=bad, global_valid_seqs=n_seq)
        with pytest.raises(ValueError, match="global_valid_seqs must be a finite, non-negative count"):
            clipped_policy_loss(new, old, adv, mask, cfg, global_valid_tokens=n_tok, global_valid_seqs=bad)
    with pytest.raises(ValueError, match="global_valid_tokens must be a finite, non-negative count"):
        cross_entropy_loss(new, mask, global_valid_tokens=bad)


def test_denominator_of_the_wrong_kind_raises():
    new, old, _, adv, mask = rand_batch(seed=10)
    n_tok, _ = count_valid(mask)
    with pytest.raises(ValueError, match=r"global_valid_tokens must be a single number.*\(2,\)"):
        clipped_policy_loss(
            new, old, adv, mask, PolicyLossConfig(), global_valid_tokens=torch.tensor([n_tok, 1])
        )
    for bad in (str(n_tok), True, None):
        with pytest.raises(TypeError, match="global_valid_tokens must be a number or a one-element tensor"):
            cross_entropy_loss(new, mask, global_valid_tokens=bad)
    # a one-element tensor (NeMo-RL's form) and numpy-like reals are fine
    a, _ = cross_entropy_loss(new, mask, global_valid_tokens=torch.tensor([float(n_tok)]))
    b, _ = cross_entropy_loss(new, mask, global_valid_tokens=n_tok)
    torch.testing.assert_close(a, b)


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


# ---------------------------------------------------------------------------------------------
# half precision and the log-ratio clamp

_HALF = [torch.float16, torch.bfloat16]
_LOG_RATIOS = [-25.0, -15.0, -12.0, -3.0, -0.3, -0.05, 0.0, 0.1, 0.25, 2.0, 12.0, 15.0]


def _extreme_batch(dtype):
    """Log-probs in ``dtype`` whose log-ratios reach far beyond fp16's exp range on both sides, in rows
    of each advantage sign, plus -inf/NaN padding. A > 0 rows also reach +37 (clipped); A < 0 rows stop
    at +15 (unclipped there: beyond +20 the clamp, tested below, takes over from the loop reference)."""
    B, S = 6, len(_LOG_RATIOS) + 3
    g = torch.Generator().manual_seed(80)
    old = (-torch.rand(B, S, generator=g, dtype=torch.float64) * 4 - 0.5).to(dtype)  # [B, S]
    adv = torch.tensor([1.0, -1.0, 0.7, -0.4, 1.6, -2.0], dtype=torch.float64)  # [B]
    lr = torch.tensor(_LOG_RATIOS + [0.0] * 3, dtype=torch.float64).expand(B, S).clone()
    lr[:, len(_LOG_RATIOS)] = torch.where(adv > 0, 25.0, 5.0)
    # row offsets put GSPO's sequence log-ratio far out too: +12 and -12 with A > 0, -12 with A < 0
    lr += torch.tensor([0.0, 0.0, 12.0, -12.0, -12.0, 0.0], dtype=torch.float64)[:, None]
    new = (old.to(torch.float64) + lr).to(dtype)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, -2:] = False
    new[:, -2:], old[:, -2:] = float("-inf"), float("-inf")
    new[:, -1] = float("nan")
    return new, old, adv.to(dtype), mask


@pytest.mark.parametrize("dtype", _HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(),
        PolicyLossConfig(ratio_clip_c=3.0),
        PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence"),
    ],
    ids=["token_mean", "dual_clip", "gspo"],
)
def test_half_precision_log_probs_give_the_float32_result_and_finite_gradients(cfg, dtype):
    """fp16's exp overflows above 11: the loss used to stay finite while backward gave 0·inf = NaN on
    the clipped tokens (and bf16 returned a 3-digit loss). Now the value and gradient are the float32
    ones on the same values, against the float64 loop reference."""
    new, old, adv, mask = _extreme_batch(dtype)
    lr = (new.double() - old.double())[mask]
    a = adv.double()[:, None].expand_as(mask)[mask]
    assert bool(((lr > 12) & (a > 0)).any() and ((lr > 12) & (a < 0)).any() and (lr < -12).any())
    seq_lr = torch.stack([(new.double() - old.double())[i][mask[i]].mean() for i in range(mask.shape[0])])
    assert float(seq_lr.max()) > 11 and float(seq_lr.min()) < -11  # GSPO's s_i overflows fp16 too
    # a global batch of realistic size keeps every true gradient inside fp16's range (see the next test)
    kw = dict(global_valid_tokens=20000, global_valid_seqs=500)
    lp = new.clone().requires_grad_(True)
    loss, metrics = clipped_policy_loss(lp, old, adv, mask, cfg, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert bool(torch.isfinite(grad).all()) and bool((grad[~mask] == 0).all())
    assert all(bool(torch.isfinite(v).all()) for v in metrics.values())
    # the float64 loop reference on the same (rounded) values
    lp_ref = new.double().clone().requires_grad_(True)
    ref_kw = loss_kwargs(cfg, mask) | dict(n_tokens=20000, n_seqs=500)
    ref = loop_policy_loss(lp_ref, old.double(), adv.double(), mask, **ref_kw)
    (grad_ref,) = torch.autograd.grad(ref, lp_ref)
    torch.testing.assert_close(loss, ref.to(torch.float32))
    torch.testing.assert_close(grad, grad_ref.to(dtype))
    # the same call on float32 copies of the values
    lp32 = new.float().clone().requires_grad_(True)
    loss32, _ = clipped_policy_loss(lp32, old.float(), adv.float(), mask, cfg, **kw)
    (grad32,) = torch.autograd.grad(loss32, lp32)
    assert torch.equal(loss.detach(), loss32.detach()) and torch.equal(grad, grad32.to(dtype))


def test_fp16_gradient_beyond_fp16_range_is_inf_not_nan():
    """Documented limit: with a tiny denominator, an unclipped A < 0 token at r = e^15 has a true
    gradient |A|·r/N far above fp16's 65504; the fp16 gradient is then +inf (the float32 one rounded),
    never NaN, and the loss is the finite float32 value."""
    old = torch.full((1, 2), -3.0, dtype=torch.float16)
    new = old + torch.tensor([[15.0, 0.0]], dtype=torch.float16)
    adv = torch.tensor([-1.0], dtype=torch.float16)
    lp = new.clone().requires_grad_(True)
    loss, _ = clipped_policy_loss(
        lp, old, adv, torch.ones(1, 2, dtype=torch.bool), PolicyLossConfig(), global_valid_tokens=2
    )
    (g,) = torch.autograd.grad(loss, lp)
    r = math.exp(float(new[0, 0]) - float(old[0, 0]))
    torch.testing.assert_close(loss, torch.tensor((r + 1.0) / 2, dtype=torch.float32))
    assert g[0, 0] == float("inf") and float(g[0, 1]) == 0.5


@pytest.mark.parametrize("dtype", _HALF, ids=["fp16", "bf16"])
def test_half_precision_cross_entropy_sums_in_float32(dtype):
    """4096 tokens at log-prob -20 sum to 81920, beyond fp16's range: the loss used to be inf."""
    lp = torch.full((64, 64), -20.0, dtype=dtype, requires_grad=True)
    mask = torch.ones(64, 64, dtype=torch.bool)
    loss, _ = cross_entropy_loss(lp, mask, global_valid_tokens=4096)
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.dtype == torch.float32 and float(loss.detach()) == 20.0
    assert torch.equal(g, torch.full_like(lp, -1.0 / 4096))


@pytest.mark.parametrize("importance_ratio", ["token", "sequence"])
def test_log_ratio_is_clamped_to_plus_minus_20_with_zero_gradient_beyond(importance_ratio):
    """The documented clamp (docs/library.md, losses module docstring): A < 0 at log r = 30 contributes
    |A|·e^20/N with zero gradient (unclamped it would be |A|·e^30/N); A > 0 at log r = -30 contributes
    -A·e^-20/N, also with zero gradient."""
    agg = "seq_mean_token_mean" if importance_ratio == "sequence" else "token_mean"
    cfg = PolicyLossConfig(aggregation=agg, importance_ratio=importance_ratio)
    old = torch.full((2, 1), -2.0, dtype=torch.float64)
    lp = (old + torch.tensor([[30.0], [-30.0]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([-1.5, 0.5], dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, _ = clipped_policy_loss(lp, old, adv, mask, cfg, global_valid_tokens=2, global_valid_seqs=2)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(
        loss, torch.tensor((1.5 * math.exp(20) - 0.5 * math.exp(-20)) / 2, dtype=torch.float64)
    )
    assert bool((g == 0).all())
