"""The fused MTP log-prob path (gradient taken chunk by chunk in forward) against autograd of the unfused one.

Reference: ``token_logprobs`` (log-probs, then the core loss, then autograd: four GEMMs per chunk);
under test: ``fused_token_loss`` with ``token_loss_grad`` (three). Both write the weight gradient into a
``main_grad`` like Megatron DDP's. Also the GPU-default-path defects of the unfused path: no fresh
[Vl, H] zeros per call, one rounding into a bf16 ``main_grad``, no host sync per call.

Letters: B sequences, S positions, T = B·S tokens, H hidden, V vocabulary, Vl one rank's shard.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_occ.core.config import PolicyLossConfig
from nemo_occ.core.losses import clipped_policy_loss, cross_entropy_loss, token_loss_grad, token_loss_weights
from nemo_occ.megatron import chunked_logprobs
from nemo_occ.megatron.chunked_logprobs import fused_token_loss, raise_deferred_errors, token_logprobs

B, S, H, V = 4, 13, 16, 40


def _batch(seed=0, dtype=torch.float32, v=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * S, H, generator=gen).to(dtype)  # [T, H]
    weight = (torch.randn(v, H, generator=gen) / H**0.5).to(dtype)  # [V, H]
    targets = torch.randint(0, v, (B * S,), generator=gen)  # [T]
    old = -torch.rand(B, S, generator=gen) * 4  # [B, S]: ratios far from 1, so the clip acts
    adv = torch.randn(B, generator=gen)  # [B]
    mask = torch.rand(B, S, generator=gen) > 0.25  # [B, S]
    mask[1] = False  # a sequence with no valid token
    mask[1, 3] = True
    return hidden, weight, targets, old, adv, mask


def _leaf_with_main_grad(weight, seed=5, dtype=torch.float32):
    w = weight.detach().clone().requires_grad_(True)
    w.main_grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return w


CASES = {
    "ce": ("ce", PolicyLossConfig()),
    "policy-token-mean": ("policy", PolicyLossConfig(ratio_clip_low=0.2, ratio_clip_high=0.28)),
    "policy-dual-clip": (
        "policy",
        PolicyLossConfig(ratio_clip_low=0.2, ratio_clip_high=0.2, ratio_clip_c=3.0),
    ),
    "policy-seq-mean": ("policy", PolicyLossConfig(aggregation="seq_mean_token_mean")),
}
G_TOK, G_SEQ = 57.0, 7.0  # global counts (other micro-batches and ranks hold the rest)


def _unfused_loss(objective, cfg, lp, old, adv, mask, coef):
    if objective == "ce":
        loss, _ = cross_entropy_loss(lp, mask, global_valid_tokens=G_TOK)
    else:
        loss, _ = clipped_policy_loss(
            lp, old, adv, mask, cfg, global_valid_tokens=G_TOK, global_valid_seqs=G_SEQ
        )
    return coef * loss


def _token_grad(objective, cfg, old, adv, mask, coef):
    """The fused path's dL/dlog p for flat rows, built once per micro-batch like the training path does."""
    weights = token_loss_weights(
        objective, mask, cfg.aggregation, coef, global_valid_tokens=G_TOK, global_valid_seqs=G_SEQ
    ).reshape(-1)
    old_flat, adv_flat = old.reshape(-1), adv[:, None].expand(B, S).reshape(-1)
    return lambda rows, lp: token_loss_grad(objective, lp, old_flat[rows], adv_flat[rows], weights[rows], cfg)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [5, 64])
@pytest.mark.parametrize("with_main_grad", [True, False], ids=["main_grad", "no-main_grad"])
def test_fused_gradient_equals_autograd_of_unfused(case, chunk_size, with_main_grad):
    objective, cfg = CASES[case]
    hidden, weight, targets, old, adv, mask = _batch(seed=1)
    coef = -0.37  # a signed λ, as OCC's estimator gives
    # reference
    h_ref = hidden.clone().requires_grad_(True)
    w_ref = _leaf_with_main_grad(weight) if with_main_grad else weight.clone().requires_grad_(True)
    lp_ref = token_logprobs(h_ref, w_ref, targets, chunk_size=chunk_size).view(B, S)
    loss_ref = _unfused_loss(objective, cfg, lp_ref, old, adv, mask, coef)
    (3.0 * loss_ref).backward()  # an incoming scale, e.g. Megatron's loss normalisation
    # fused
    h = hidden.clone().requires_grad_(True)
    w = _leaf_with_main_grad(weight) if with_main_grad else weight.clone().requires_grad_(True)
    lp, _, carrier = fused_token_loss(
        h,
        w,
        targets,
        _token_grad(objective, cfg, old, adv, mask, coef),
        grad_scale=3.0,
        chunk_size=chunk_size,
    )
    loss = _unfused_loss(objective, cfg, lp.view(B, S), old, adv, mask, coef) + carrier
    (3.0 * loss).backward()
    assert not lp.requires_grad  # the calibrator and the metrics read them detached
    torch.testing.assert_close(lp.view(B, S), lp_ref.detach())
    torch.testing.assert_close(loss.detach(), loss_ref.detach())
    torch.testing.assert_close(h.grad, h_ref.grad)
    if with_main_grad:
        torch.testing.assert_close(w.main_grad, w_ref.main_grad)
        assert w.grad is None and w_ref.grad is None  # nothing for DDP's hook to add again
    else:
        torch.testing.assert_close(w.grad, w_ref.grad)


def test_gspo_sequence_ratio_is_refused_by_the_token_gradient():
    hidden, weight, targets, old, adv, mask = _batch()
    cfg = PolicyLossConfig(importance_ratio="sequence", aggregation="seq_mean_token_mean")
    with pytest.raises(ValueError, match="sequence ratio"):
        token_loss_grad("policy", old.reshape(-1), old.reshape(-1), adv.repeat(S), torch.ones(B * S), cfg)


def test_fused_detached_weight_gives_hidden_grad_only():
    objective, cfg = CASES["policy-token-mean"]
    hidden, weight, targets, old, adv, mask = _batch(seed=2)
    h = hidden.clone().requires_grad_(True)
    _, _, carrier = fused_token_loss(h, weight, targets, _token_grad(objective, cfg, old, adv, mask, 1.0))
    carrier.backward()
    h_ref = hidden.clone().requires_grad_(True)
    lp_ref = token_logprobs(h_ref, weight, targets).view(B, S)
    _unfused_loss(objective, cfg, lp_ref, old, adv, mask, 1.0).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


def test_wrong_incoming_scale_is_an_error_not_a_wrong_gradient():
    objective, cfg = CASES["ce"]
    hidden, weight, targets, old, adv, mask = _batch(seed=3)
    w = _leaf_with_main_grad(weight)
    grad = _token_grad(objective, cfg, old, adv, mask, 1.0)
    _, _, carrier = fused_token_loss(hidden.clone().requires_grad_(True), w, targets, grad, grad_scale=1.0)
    with pytest.raises(RuntimeError, match="scaled by 0.5"):
        (0.5 * carrier).backward()
    _, _, carrier = fused_token_loss(hidden.clone().requires_grad_(True), w, targets, grad, validate=False)
    (0.5 * carrier).backward()  # recorded on the device, raised once per step
    with pytest.raises(ValueError, match="another scale"):
        raise_deferred_errors()
    raise_deferred_errors()  # reported once


# ---------------------------------------------------------------------------------------------------
# GPU-default-path defects of the unfused path (and the fused one): each test failed before the fix.


class _CountAllocations(TorchDispatchMode):
    """Counts new buffers of ``shape`` made by any op (not views, not in-place results)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and tuple(t.shape) == self.shape
                and t.untyped_storage().data_ptr() not in seen
            ):
                self.count += 1
        return out


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_no_fresh_weight_sized_gradient_per_call_with_main_grad(fused):
    hidden, weight, targets, old, adv, mask = _batch(seed=4)
    w = _leaf_with_main_grad(weight)
    grad = _token_grad("ce", CASES["ce"][1], old, adv, mask, 1.0)

    def step():
        h = hidden.clone().requires_grad_(True)
        if fused:
            _, _, out = fused_token_loss(h, w, targets, grad, chunk_size=8)
        else:
            out = token_logprobs(h, w, targets, chunk_size=8).sum()
        out.backward()  # autograd's accumulation into .grad included (a returned dummy would be cloned there)

    with _CountAllocations((V, H)) as counter:
        step()
        step()
    assert counter.count == 0 and w.grad is None


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_bf16_main_grad_is_rounded_once_per_call(fused):
    # Megatron's fused kernel adds a micro-batch's weight gradient into a bf16 main_grad with one rounding
    # (fp32 accumulation inside one GEMM). Reference: the same computation into an fp32 main_grad holding
    # the same values, rounded to bf16 once at the end.
    t = 2048
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(t, H, generator=gen).bfloat16()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).bfloat16()
    targets = torch.randint(0, V, (t,), generator=gen)
    upstream = torch.randn(t, generator=gen)

    def run(main_dtype):
        w = _leaf_with_main_grad(weight, dtype=torch.bfloat16)
        w.main_grad = w.main_grad.to(main_dtype)
        if fused:
            _, _, carrier = fused_token_loss(
                hidden, w, targets, lambda rows, lp: upstream[rows], chunk_size=16
            )
            carrier.backward()
        else:
            (token_logprobs(hidden, w, targets, chunk_size=16) * upstream).sum().backward()
        return w.main_grad

    once = run(torch.float32).to(torch.bfloat16)
    got = run(torch.bfloat16)
    differ = (got != once).float().mean().item()
    # The fp32 sums differ in order only (0 + chunks, then + main_grad): a rare element crosses a rounding
    # boundary. Rounding after each of the 128 chunks moves about 40% of them.
    assert differ < 0.01, differ


class _NoHostSync:
    """Makes every device-to-host read of a tensor raise (what stalls a GPU stream), while active."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(name):
            def method(*args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name}")

            return method

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_training_path_has_no_host_sync(fused):
    hidden, weight, targets, old, adv, mask = _batch(seed=7)
    w = _leaf_with_main_grad(weight)
    grad = _token_grad("policy", CASES["policy-token-mean"][1], old, adv, mask, 0.5)
    h = hidden.clone().requires_grad_(True)
    with _NoHostSync():
        if fused:
            _, _, out = fused_token_loss(h, w, targets, grad, chunk_size=8, validate=False)
        else:
            out = token_logprobs(h, w, targets, chunk_size=8, validate=False).sum()
        out.backward()
    raise_deferred_errors()  # nothing wrong was recorded


def test_deferred_ownership_check_raises_once_per_step():
    hidden, weight, targets, *_ = _batch(seed=8)
    bad = targets.clone()
    bad[4] = V + 3
    token_logprobs(hidden, weight, bad, validate=False)
    token_logprobs(hidden, weight, targets, validate=False)
    with pytest.raises(ValueError, match="owned by no vocab shard"):
        raise_deferred_errors()
    assert not chunked_logprobs._DEFERRED


def test_cp_positions_need_no_host_sync():
    from nemo_occ.megatron.context_parallel import cp_local_positions

    bounds = torch.tensor([0, 8, 12, 24])
    with _NoHostSync():
        got = [cp_local_positions(24, 2, r, cu_seqlens_padded=bounds) for r in range(2)]
    expected = [
        torch.tensor([0, 1, 6, 7, 8, 11, 12, 13, 14, 21, 22, 23]),
        torch.tensor([2, 3, 4, 5, 9, 10, 15, 16, 17, 18, 19, 20]),
    ]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


# ---------------------------------------------------------------------------------------------------
# TP2 (gloo): each rank holds half the vocabulary; the fused gradient equals TP1 autograd of the unfused.


def _tp2_body(rank, world_size):
    for case in ("policy-token-mean", "policy-seq-mean", "ce"):
        for sequence_parallel in (False, True):
            _tp2_case(rank, world_size, case, sequence_parallel)


def _tp2_case(rank, world_size, case, sequence_parallel):
    import torch.distributed as dist

    objective, cfg = CASES[case]
    hidden, weight, targets, old, adv, mask = _batch(seed=11, v=V)
    coef = 0.61
    h_ref = hidden.clone().requires_grad_(True)
    w_ref = _leaf_with_main_grad(weight)
    lp_ref = token_logprobs(h_ref, w_ref, targets, chunk_size=7).view(B, S)
    _unfused_loss(objective, cfg, lp_ref, old, adv, mask, coef).backward()

    shard = V // world_size
    rows = slice(rank * shard, (rank + 1) * shard)
    w = _leaf_with_main_grad(weight[rows])
    before = w.main_grad.clone()
    tokens = B * S
    if sequence_parallel:
        h = hidden[rank * tokens // 2 : (rank + 1) * tokens // 2].clone().requires_grad_(True)
    else:
        h = hidden.clone().requires_grad_(True)
    lp, _, carrier = fused_token_loss(
        h,
        w,
        targets,
        _token_grad(objective, cfg, old, adv, mask, coef),
        tp_group=dist.group.WORLD,
        vocab_start=rank * shard,
        chunk_size=7,
        sequence_parallel=sequence_parallel,
    )
    carrier.backward()
    torch.testing.assert_close(lp.view(B, S), lp_ref.detach())
    grad_h = h.grad.clone()
    if not sequence_parallel:
        dist.all_reduce(grad_h)  # what copy_to_tensor_model_parallel_region does in backward
        torch.testing.assert_close(grad_h, h_ref.grad)
    else:
        torch.testing.assert_close(grad_h, h_ref.grad[rank * tokens // 2 : (rank + 1) * tokens // 2])
    reference_delta = w_ref.main_grad[rows] - _leaf_with_main_grad(weight).main_grad[rows]
    torch.testing.assert_close(w.main_grad - before, reference_delta)


@pytest.mark.distributed
def test_fused_tp2_and_tp2_sp_equal_tp1_autograd():
    # one spawn for all cases (token mean, sequence mean, cross-entropy; with and without SP)
    from tests._megatron_dist import run_ranks

    run_ranks(_tp2_body, 2)
