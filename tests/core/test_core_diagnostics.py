"""Exact gradient statistics c = <g_RL, g_MTP,k>, v² = ||g_MTP,k||² against gradients obtained by
.backward() into .grad per loss and flattened by hand, on a tiny model (tests/_refs.py); the split into
the main model and the MTP layers; and, on two gloo processes, parameters sharded and replicated by
hand (the counting and reductions that ``nemo_occ.megatron.probe_layout`` relies on; the megatron
layouts themselves are tested in test_megatron_probes.py).

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_occ.core import diagnostics
from nemo_occ.core.config import PolicyLossConfig
from nemo_occ.core.diagnostics import (
    GradientStatistics,
    ProbeParameter,
    exact_gradient_statistics,
    gradient_statistics,
)
from nemo_occ.core.losses import clipped_policy_loss, cross_entropy_loss
from tests._refs import TinyMTPModel, flat_grad_by_backward


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


def _f64(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [None, 7], ids=["one-chunk", "7-element-chunks"])
def test_main_model_and_mtp_layers_are_reported_apart(monkeypatch, chunk):
    """c, v², ||g_RL||² over the main model (emb, trunk, head) and v² over the MTP layer, separately."""
    if chunk is not None:  # the float64 accumulation walks each tensor in chunks: same result
        monkeypatch.setattr(diagnostics, "_CHUNK", chunk)
    model, rl, mtp_losses = _losses(K=2)
    main = [model.emb, model.trunk, model.head]
    params = [ProbeParameter(p, "main") for p in main] + [ProbeParameter(p, "mtp") for p in model.mtp]
    stats = exact_gradient_statistics(rl, mtp_losses, params)
    g_rl = flat_grad_by_backward(rl, main)
    for k, loss_k in enumerate(mtp_losses):
        g_k = flat_grad_by_backward(loss_k, main)
        torch.testing.assert_close(_f64(stats.c[k]), _f64(_dot(g_rl, g_k)))
        torch.testing.assert_close(_f64(stats.v2[k]), _f64(_dot(g_k, g_k)))
        g_k_mtp = flat_grad_by_backward(loss_k, list(model.mtp))
        assert bool((g_k_mtp != 0).any())
        torch.testing.assert_close(_f64(stats.mtp_v2[k]), _f64(_dot(g_k_mtp, g_k_mtp)))
    torch.testing.assert_close(_f64(stats.rl_norm2), _f64(_dot(g_rl, g_rl)))
    assert stats.mtp_c == [0.0, 0.0] and stats.mtp_rl_norm2 == 0.0  # the RL loss does not reach them
    assert set(stats.metrics()) >= {"exact/mtp_params/v2_1", "exact/mtp_params/v2_2"}


def test_non_finite_gradient_and_malformed_input_raise():
    model, rl, mtp_losses = _losses(K=1)
    params = [ProbeParameter(model.head)]
    grad = torch.ones_like(model.head)
    with pytest.raises(ValueError, match="NaN/Inf"):
        gradient_statistics([grad], [[grad * float("nan")]], params)
    with pytest.raises(ValueError, match="entries for 1 parameters"):
        gradient_statistics([grad, grad], [[grad]], params)
    with pytest.raises(ValueError, match="one gradient list per MTP depth"):
        gradient_statistics([grad], [], params)
    with pytest.raises(ValueError, match="shape"):
        gradient_statistics([grad[:1]], [[grad]], params)
    with pytest.raises(ValueError, match="copies"):
        ProbeParameter(model.head, copies=0)
    with pytest.raises(ValueError, match="part"):
        ProbeParameter(model.head, part="trunk")
    with pytest.raises(TypeError, match="ProbeParameter"):
        exact_gradient_statistics(rl, mtp_losses, ["head"])


# -- two gloo processes: a parameter split over the ranks, one replicated, one averaged ------------
#
# The "model" is linear in its parameters, so every gradient is a fixed tensor and the expected
# statistics can be written down: L_j = <A_j, W> + <a_j, b> + <m_j, M> for loss j (0 = RL, 1 = MTP).
# W [4, 3] is split by rows (rank r holds rows 2r, 2r+1: held once); b [3] is replicated and each rank
# sees half of the data (its gradient sums over the ranks, copies = 2); M [2] is replicated and every
# rank computes the same-sized estimate of its gradient that training averages ("mean", copies = 2).


def _linear_problem():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)  # [loss, rows, cols] gradient of W
    a = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)  # [loss, rank, 3]: each rank's share for b
    m = torch.randn(2, 2, 2, generator=g, dtype=torch.float64)  # [loss, rank, 2]: each rank's estimate for M
    return A, a, m


def _linear_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        A, a, m = _linear_problem()
        W = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)  # rows 2r, 2r+1
        b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        M = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        losses = [
            (A[j, 2 * rank : 2 * rank + 2] * W).sum() + (a[j, rank] * b).sum() + (m[j, rank] * M).sum()
            for j in range(2)
        ]
        world = dist.group.WORLD
        params = [
            ProbeParameter(W, "main", copies=1),
            ProbeParameter(b, "main", copies=2, grad_reductions=((world, "sum"),)),
            ProbeParameter(M, "mtp", copies=2, grad_reductions=((world, "mean"),)),
        ]
        stats = exact_gradient_statistics(losses[0], losses[1:], params, stats_group=world)
        torch.save(stats, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_split_replicated_and_averaged_parameters_are_counted_once(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_linear_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    A, a, m = _linear_problem()
    # the full gradients, written out: W's is A, b's the sum over ranks, M's the mean over ranks
    g_main = [torch.cat([A[j].reshape(-1), a[j].sum(0)]) for j in range(2)]
    g_mtp = [m[j].mean(0) for j in range(2)]
    for r in range(2):
        stats = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        torch.testing.assert_close(_f64(stats.rl_norm2), g_main[0] @ g_main[0])
        torch.testing.assert_close(_f64(stats.c[0]), g_main[0] @ g_main[1])
        torch.testing.assert_close(_f64(stats.v2[0]), g_main[1] @ g_main[1])
        torch.testing.assert_close(_f64(stats.mtp_rl_norm2), g_mtp[0] @ g_mtp[0])
        torch.testing.assert_close(_f64(stats.mtp_c[0]), g_mtp[0] @ g_mtp[1])
        torch.testing.assert_close(_f64(stats.mtp_v2[0]), g_mtp[1] @ g_mtp[1])
