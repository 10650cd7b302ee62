"""Exact gradient statistics c = <g_RL, g_MTP,k>, v² = ||g_MTP,k||² against gradients obtained by
.backward() into .grad per loss and flattened by hand, on a tiny model (tests/_refs.py).

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

import pytest
import torch
from _refs import TinyMTPModel, flat_grad_by_backward

from nemo_occ.core.config import PolicyLossConfig
from nemo_occ.core.diagnostics import GradientStatistics, exact_gradient_statistics
from nemo_occ.core.losses import clipped_policy_loss, cross_entropy_loss


def _losses(K=2):
    model = TinyMTPModel(V=9, H=5, K=K, seed=7)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 9, (4, 8), generator=gen)
    main, mtp, masks = model(ids)
    old = main.detach() + 0.3 * torch.randn(main.shape, generator=gen, dtype=main.dtype)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = torch.ones_like(masks[0])
    n = int(mask.sum())
    cfg = PolicyLossConfig()
    rl, _ = clipped_policy_loss(main, old, adv, mask, cfg, global_valid_tokens=n)
    mtp_losses = [
        clipped_policy_loss(lp, old, adv, mk, cfg, global_valid_tokens=n)[0]
        for lp, mk in zip(mtp, masks, strict=True)
    ]
    return model, rl, mtp_losses


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a.tolist(), b.tolist(), strict=True))


def test_exact_statistics_match_backward_into_grad():
    model, rl, mtp_losses = _losses(K=2)
    params = list(model.parameters())
    stats = exact_gradient_statistics(rl, mtp_losses, params)
    g_rl = flat_grad_by_backward(rl, params)
    assert bool((g_rl != 0).any())
    torch.testing.assert_close(
        torch.tensor(stats.rl_norm2, dtype=torch.float64), torch.tensor(_dot(g_rl, g_rl), dtype=torch.float64)
    )
    for k, loss_k in enumerate(mtp_losses):
        g_k = flat_grad_by_backward(loss_k, params)
        torch.testing.assert_close(
            torch.tensor(stats.c[k], dtype=torch.float64), torch.tensor(_dot(g_rl, g_k), dtype=torch.float64)
        )
        torch.testing.assert_close(
            torch.tensor(stats.v2[k], dtype=torch.float64), torch.tensor(_dot(g_k, g_k), dtype=torch.float64)
        )
    assert len(stats.c) == len(stats.v2) == 2
    assert stats.c[0] != stats.c[1]


def test_parameter_subset_and_unreached_parameters():
    """Only the chosen parameters count; one the RL loss never reaches (an MTP layer) is zero in g_RL,
    so c ignores it while v² includes it."""
    model, rl, mtp_losses = _losses(K=1)
    params = [model.head, model.mtp[0]]
    stats = exact_gradient_statistics(rl, mtp_losses, params)
    g_rl = flat_grad_by_backward(rl, params)
    g_k = flat_grad_by_backward(mtp_losses[0], params)
    n_head = model.head.numel()
    assert bool((g_rl[n_head:] == 0).all())  # the main loss does not reach the MTP layer
    assert bool((g_k[n_head:] != 0).any())
    torch.testing.assert_close(
        torch.tensor(stats.c[0], dtype=torch.float64),
        torch.tensor(_dot(g_rl[:n_head], g_k[:n_head]), dtype=torch.float64),
    )
    torch.testing.assert_close(
        torch.tensor(stats.v2[0], dtype=torch.float64), torch.tensor(_dot(g_k, g_k), dtype=torch.float64)
    )


def test_cross_entropy_mtp_loss_and_frozen_parameters_are_skipped():
    model, rl, _ = _losses(K=1)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 9, (4, 8), generator=gen)
    _, mtp, masks = model(ids)
    ce, _ = cross_entropy_loss(mtp[0], masks[0], global_valid_tokens=int(masks[0].sum()))
    model.emb.requires_grad_(False)
    params = list(model.parameters())
    stats = exact_gradient_statistics(rl, [ce], params)
    trainable = [p for p in params if p.requires_grad]
    g_rl = flat_grad_by_backward(rl, trainable)
    g_ce = flat_grad_by_backward(ce, trainable)
    torch.testing.assert_close(
        torch.tensor(stats.c[0], dtype=torch.float64), torch.tensor(_dot(g_rl, g_ce), dtype=torch.float64)
    )


def test_no_trainable_parameter_raises():
    model, rl, mtp_losses = _losses(K=1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        exact_gradient_statistics(rl, mtp_losses, list(model.parameters()))


def test_metrics_names():
    s = GradientStatistics(c=[1.0, -2.0], v2=[3.0, 4.0], rl_norm2=5.0)
    assert s.metrics() == {
        "exact/rl_norm2": 5.0,
        "exact/c_1": 1.0,
        "exact/v2_1": 3.0,
        "exact/c_2": -2.0,
        "exact/v2_2": 4.0,
    }
