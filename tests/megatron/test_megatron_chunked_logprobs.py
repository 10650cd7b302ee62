"""token_logprobs against a naive full-logits reference (F.log_softmax + gather + autograd).

Shapes: T tokens, H hidden, V full vocab, Vl one rank's vocab shard, C chunk size.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_occ.megatron.chunked_logprobs import token_logprobs

T, H, V = 37, 16, 50


def _inputs(seed=0, t=T, h=H, v=V, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(t, h, generator=gen) * scale).to(dtype)  # [T, H]
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype)  # [V, H]
    targets = torch.randint(0, v, (t,), generator=gen)  # [T]
    grad_out = torch.randn(t, generator=gen)  # [T] upstream dL/dlogp
    return hidden, weight, targets, grad_out


def _naive(hidden, weight, targets, grad_out):
    """Full [T, V] logits, log_softmax, gather; gradients by autograd."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    logits = (hidden @ weight.t()).float()  # [T, V]
    logprobs = F.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)  # [T]
    (logprobs * grad_out).sum().backward()
    is_top1 = logits.argmax(dim=-1) == targets  # [T]
    return logprobs.detach(), hidden.grad, weight.grad, is_top1


def _chunked(hidden, weight, targets, grad_out, **kwargs):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    logprobs, is_top1 = token_logprobs(hidden, weight, targets, return_top1=True, **kwargs)
    (logprobs * grad_out).sum().backward()
    return logprobs.detach(), hidden.grad, weight.grad, is_top1


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 1024])
def test_logprobs_and_grads_match_naive(chunk_size):
    hidden, weight, targets, grad_out = _inputs()
    lp, gh, gw, _ = _chunked(hidden, weight, targets, grad_out, chunk_size=chunk_size)
    ref_lp, ref_gh, ref_gw, _ = _naive(hidden, weight, targets, grad_out)
    assert lp.dtype == torch.float32 and lp.shape == (T,)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)


def test_top1_matches_argmax_of_full_logits():
    hidden, weight, targets, grad_out = _inputs(seed=1)
    targets[::2] = (hidden @ weight.t()).argmax(dim=-1)[::2]  # make half the targets the arg-max
    *_, top1 = _chunked(hidden, weight, targets, grad_out, chunk_size=6)
    *_, ref_top1 = _naive(hidden, weight, targets, grad_out)
    assert top1.dtype == torch.bool and not top1.requires_grad
    assert ref_top1.sum() >= T // 2  # the check below covers both classes
    assert torch.equal(top1, ref_top1)


def test_leading_dims_are_kept():
    hidden, weight, targets, grad_out = _inputs(t=24)
    lp = token_logprobs(hidden.view(4, 6, H), weight, targets.view(4, 6), chunk_size=5)  # [S, B]
    ref_lp, *_ = _naive(hidden, weight, targets, grad_out)
    assert lp.shape == (4, 6)
    torch.testing.assert_close(lp.reshape(-1), ref_lp)


def test_detached_weight_gives_hidden_grad_only():
    hidden, weight, targets, grad_out = _inputs(seed=2)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp = token_logprobs(h, w.detach(), targets, chunk_size=7)  # the detach regime
    (lp * grad_out).sum().backward()
    _, ref_gh, _, _ = _naive(hidden, weight, targets, grad_out)
    assert w.grad is None
    torch.testing.assert_close(h.grad, ref_gh)


def test_no_grad_forward_matches():
    hidden, weight, targets, grad_out = _inputs(seed=3)
    with torch.no_grad():
        lp = token_logprobs(hidden, weight, targets, chunk_size=4)
    ref_lp, *_ = _naive(hidden, weight, targets, grad_out)
    torch.testing.assert_close(lp, ref_lp)


def test_large_logits_are_finite_and_exact():
    # logits of order 1e4: a naive exp() overflows fp32, a stable log-sum-exp does not
    hidden, weight, targets, grad_out = _inputs(seed=4, scale=3e3)
    assert (hidden @ weight.t()).abs().max() > 1e4
    lp, gh, gw, _ = _chunked(hidden, weight, targets, grad_out, chunk_size=10)
    ref_lp, ref_gh, ref_gw, _ = _naive(hidden, weight, targets, grad_out)
    assert torch.isfinite(lp).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-2)  # |lp| ~ 1e4: fp32 resolution ~1e-3
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)  # entries ~|hidden| ~ 1e3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    # Same arithmetic as Megatron: matmul in the inputs' dtype, softmax in fp32. Each row of a chunk's
    # matmul equals the row of the full matmul, so log-probs and hidden grads match the naive
    # low-precision path; the weight grad adds up per-chunk low-precision products, so it is judged
    # by its error against an fp64 truth, relative to the naive path's error.
    hidden, weight, targets, grad_out = _inputs(seed=5, t=300, dtype=dtype)
    lp, gh, gw, _ = _chunked(hidden, weight, targets, grad_out, chunk_size=8)
    ref_lp, ref_gh, ref_gw, _ = _naive(hidden, weight, targets, grad_out)
    _, _, true_gw, _ = _naive(hidden.double(), weight.double(), targets, grad_out.double())
    assert lp.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(gh, ref_gh)  # dtype-default tolerances (bf16: rtol 1.6e-2)

    def rel_err(x):
        return ((x.double() - true_gw).norm() / true_gw.norm()).item()

    assert rel_err(gw) <= 1.5 * rel_err(ref_gw), (rel_err(gw), rel_err(ref_gw))


# ---------------------------------------------------------------------------------------------------
# Megatron DDP's main_grad: the weight gradient is added into it (fp32), and .grad receives zeros.


def _with_main_grad(weight, main_dtype=torch.float32, seed=9):
    """A leaf weight carrying a pre-filled ``main_grad`` (earlier micro-batches' sum), as DDP gives it."""
    w = weight.detach().clone().requires_grad_(True)
    w.main_grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(main_dtype)
    return w, w.main_grad.clone()


def test_fp32_weight_gradient_is_added_into_main_grad():
    hidden, weight, targets, grad_out = _inputs(seed=10)
    w, before = _with_main_grad(weight)
    h = hidden.clone().requires_grad_(True)
    (token_logprobs(h, w, targets, chunk_size=6) * grad_out).sum().backward()
    _, ref_gh, ref_gw, _ = _naive(hidden, weight, targets, grad_out)
    torch.testing.assert_close(w.main_grad, before + ref_gw)
    assert w.grad is None  # nothing left for DDP's hook to add twice
    torch.testing.assert_close(h.grad, ref_gh)


def test_low_precision_heads_are_summed_in_fp32_main_grad():
    # Two heads on one bf16 weight (main + MTP), fp32 main_grad (grad_reduce_in_fp32): each head adds in
    # fp32, so the sum is never rounded to bf16. Judged against an fp64 truth like the naive path.
    hidden, weight, targets, grad_out = _inputs(seed=11, t=300, dtype=torch.bfloat16)
    w, before = _with_main_grad(weight)
    upstream = (grad_out, -0.5 * grad_out)  # two heads, different losses
    for g in upstream:
        (token_logprobs(hidden, w, targets, chunk_size=8) * g).sum().backward()
    naive = sum(_naive(hidden, weight, targets, g)[2] for g in upstream)  # bf16 sum, as autograd adds
    true = sum(_naive(hidden.double(), weight.double(), targets, g.double())[2] for g in upstream)
    assert w.main_grad.dtype == torch.float32 and w.grad is None

    def rel_err(x):
        return ((x.double() - true).norm() / true.norm()).item()

    got = w.main_grad - before
    assert rel_err(got) <= 1.5 * rel_err(naive), (rel_err(got), rel_err(naive))


class _StandInWgradKernel:
    """CPU stand-in for APEX/TE's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input,
    d_output, d_weight)``: d_weight [out, in] (fp32) += d_output^T @ input, operands in one dtype."""

    def __init__(self):
        self.calls = []

    def wgrad_gemm_accum_fp32(self, total_input, grad_output, main_grad):
        self.calls.append((total_input.dtype, grad_output.dtype, tuple(total_input.shape), main_grad))
        main_grad.add_(grad_output.float().t() @ total_input.float())


def test_low_precision_uses_megatrons_fused_wgrad_kernel(monkeypatch):
    layers = pytest.importorskip("megatron.core.tensor_parallel.layers", reason="needs megatron-core")
    kernel = _StandInWgradKernel()
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", kernel, raising=False)
    hidden, weight, targets, grad_out = _inputs(seed=12, t=40, dtype=torch.bfloat16)
    w, before = _with_main_grad(weight)
    (token_logprobs(hidden, w, targets, chunk_size=16) * grad_out).sum().backward()
    # one call per chunk, bf16 operands, accumulating into the weight's own fp32 buffer
    assert [c[:3] for c in kernel.calls] == [(torch.bfloat16, torch.bfloat16, (n, H)) for n in (16, 16, 8)]
    assert all(c[3] is w.main_grad for c in kernel.calls)
    true = _naive(hidden.double(), weight.double(), targets, grad_out.double())[2]
    naive = _naive(hidden, weight, targets, grad_out)[2]
    got = w.main_grad - before
    assert ((got.double() - true).norm() <= (naive.double() - true).norm()).item()


class _RecordingKernel:
    """Passes each call on to the real ``fused_weight_gradient_mlp_cuda`` and records the buffer."""

    def __init__(self, real):
        self.real, self.main_grads = real, []

    def wgrad_gemm_accum_fp32(self, total_input, grad_output, main_grad):
        self.main_grads.append(main_grad)
        self.real.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_fp32_reference_and_fills_fp32_main_grad(monkeypatch):
    # What a GPU run does: bf16 hidden/weight on CUDA (cuBLAS; megatron's fused fp32 wgrad kernel where
    # megatron-core imported it), the weight gradient added into an fp32 main_grad. Judged against
    # F.log_softmax in fp32 of the same bf16 inputs, and the gradients against an fp64 truth relative to
    # the naive bf16 path's error.
    kernel = None
    try:
        from megatron.core.tensor_parallel import layers
    except ImportError:
        layers = None
    if layers is not None and getattr(layers, "fused_weight_gradient_mlp_cuda", None) is not None:
        kernel = _RecordingKernel(layers.fused_weight_gradient_mlp_cuda)
        monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", kernel)
    t, h, v = 1000, 256, 4096
    hidden, weight, targets, grad_out = (
        x.cuda() for x in _inputs(seed=14, t=t, h=h, v=v, dtype=torch.bfloat16)
    )
    w, before = _with_main_grad(weight)
    w.main_grad, before = w.main_grad.cuda(), before.cuda()
    x = hidden.clone().requires_grad_(True)
    lp = token_logprobs(x, w, targets, chunk_size=128)
    (lp * grad_out).sum().backward()

    ref_lp, _, _, _ = _naive(hidden.float(), weight.float(), targets, grad_out)
    # Each bf16 logit is off by <= eps/2 |z| (fp32 accumulation, one rounding), so
    # log p = z_y - logsumexp(z) by <= eps max|z|; 1e-4 covers the fp32 softmax.
    bound = torch.finfo(torch.bfloat16).eps * (hidden.float() @ weight.float().t()).abs().max().item() + 1e-4
    assert lp.dtype == torch.float32 and lp.device.type == "cuda"
    torch.testing.assert_close(lp, ref_lp, rtol=0.0, atol=bound)

    _, naive_gh, naive_gw, _ = _naive(hidden, weight, targets, grad_out)
    _, true_gh, true_gw, _ = _naive(hidden.double(), weight.double(), targets, grad_out.double())

    def rel_err(got, true):
        return ((got.double() - true).norm() / true.norm()).item()

    assert x.grad.dtype == torch.bfloat16
    assert rel_err(x.grad, true_gh) <= 1.5 * rel_err(naive_gh, true_gh)
    assert w.main_grad.dtype == torch.float32 and w.grad is None
    got_gw = w.main_grad - before
    assert rel_err(got_gw, true_gw) <= 1.5 * rel_err(naive_gw, true_gw)
    if kernel is not None:  # fp32 accumulation went through megatron's kernel, into this buffer
        assert kernel.main_grads and all(m is w.main_grad for m in kernel.main_grads)


def test_empty_input():
    hidden, weight, _, _ = _inputs()
    h = hidden[:0].clone().requires_grad_(True)
    lp = token_logprobs(h, weight, torch.zeros(0, dtype=torch.long))
    lp.sum().backward()
    assert lp.shape == (0,) and h.grad.shape == (0, H)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materialises_token_by_vocab_logits():
    t, h, v, c = 256, 8, 64, 16
    hidden, weight, targets, grad_out = _inputs(t=t, h=h, v=v)
    bound = max(c * v, t * h, v * h)  # one logits chunk, or the size of an input/gradient
    with _MaxNumel() as naive_mode:
        _naive(hidden, weight, targets, grad_out)
    assert naive_mode.max_numel >= t * v > bound  # the probe sees a [T, V] tensor when there is one
    with _MaxNumel() as mode:
        _chunked(hidden, weight, targets, grad_out, chunk_size=c)
    assert mode.max_numel <= bound


@pytest.mark.parametrize("bad", [V, V + 7, -1, -100])
def test_out_of_range_target_raises(bad):
    hidden, weight, targets, _ = _inputs()
    targets[3] = bad
    with pytest.raises(ValueError, match=rf"target id {bad} at flat position 3"):
        token_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True, None])
def test_bad_chunk_size_raises(chunk_size):
    hidden, weight, targets, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        token_logprobs(hidden, weight, targets, chunk_size=chunk_size)


def test_bad_shapes_and_dtypes_raise():
    hidden, weight, targets, _ = _inputs()
    with pytest.raises(ValueError, match="same H"):
        token_logprobs(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="leading shape"):
        token_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(TypeError, match="integer tensor"):
        token_logprobs(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="share one floating dtype"):
        token_logprobs(hidden.double(), weight, targets)
    with pytest.raises(ValueError, match="vocab_start != 0 needs tp_group"):
        token_logprobs(hidden, weight, targets, vocab_start=5)
    with pytest.raises(TypeError, match="sequence_parallel must be a bool"):
        token_logprobs(hidden, weight, targets, sequence_parallel="yes")


# ---------------------------------------------------------------------------------------------------
# Vocab-parallel: each gloo rank holds a vocab shard; the result must equal the one-process full vocab.


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SP_ROWS, SP_TOKENS = 12, 36  # the sequence-parallel check's [S, B] = [12, 3] layout (S divisible by tp)


def _shard_worker(rank, world_size, port, shard_sizes, data_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        hidden, weight, targets, grad_out = torch.load(data_path)
        vocab_start = sum(shard_sizes[:rank])
        shard = weight[vocab_start : vocab_start + shard_sizes[rank]]  # [Vl, H]
        h = hidden.clone().requires_grad_(True)
        w = shard.clone().requires_grad_(True)
        lp, top1 = token_logprobs(
            h, w, targets, tp_group=dist.group.WORLD, vocab_start=vocab_start, chunk_size=6, return_top1=True
        )
        (lp * grad_out).sum().backward()
        bad_targets = targets.clone()
        bad_targets[5] = sum(shard_sizes)  # owned by no rank: every rank must raise, none may hang
        try:
            token_logprobs(h, w, bad_targets, tp_group=dist.group.WORLD, vocab_start=vocab_start)
            error = ""
        except ValueError as exc:
            error = str(exc)
        # Sequence parallel: this rank holds rows [S/tp * rank, S/tp * (rank + 1)) of a [S, B, H] layout.
        seq = hidden[:SP_TOKENS].view(SP_ROWS, -1, H).chunk(world_size)[rank]  # [S / tp, B, H]
        h_sp = seq.clone().requires_grad_(True)
        w_sp = shard.clone().requires_grad_(True)
        lp_sp = token_logprobs(
            h_sp,
            w_sp,
            targets[:SP_TOKENS].view(SP_ROWS, -1),
            tp_group=dist.group.WORLD,
            vocab_start=vocab_start,
            chunk_size=5,
            sequence_parallel=True,
        )  # [S, B]
        (lp_sp * grad_out[:SP_TOKENS].view(SP_ROWS, -1)).sum().backward()
        torch.save(
            {
                "lp": lp.detach(),
                "top1": top1,
                "grad_hidden": h.grad,
                "grad_weight": w.grad,
                "error": error,
                "sp_lp": lp_sp.detach(),
                "sp_grad_hidden": h_sp.grad,
                "sp_grad_weight": w_sp.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("shard_sizes", [(31, 19), (16, 16, 16, 16)], ids=["tp2-uneven", "tp4"])
def test_vocab_parallel_equals_full_vocab(tmp_path, shard_sizes):
    world_size, vocab = len(shard_sizes), sum(shard_sizes)
    hidden, weight, targets, grad_out = _inputs(seed=7, v=vocab)
    targets[::3] = (hidden @ weight.t()).argmax(dim=-1)[::3]  # some top-1 hits on every shard
    data_path = str(tmp_path / "data.pt")
    torch.save((hidden, weight, targets, grad_out), data_path)
    mp.spawn(
        _shard_worker,
        args=(world_size, _free_port(), shard_sizes, data_path, str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    ref_lp, ref_gh, ref_gw, ref_top1 = _naive(hidden, weight, targets, grad_out)
    for res in results:
        torch.testing.assert_close(res["lp"], ref_lp)
        assert torch.equal(res["top1"], ref_top1)
        assert "owned by 0 vocab shards" in res["error"]
    # the caller's copy_to_tensor_model_parallel_region all-reduces the partial hidden grads
    torch.testing.assert_close(sum(res["grad_hidden"] for res in results), ref_gh)
    torch.testing.assert_close(torch.cat([res["grad_weight"] for res in results]), ref_gw)
    # each rank's hidden grad is a partial sum, not the full gradient
    assert not torch.allclose(results[0]["grad_hidden"], ref_gh)

    # sequence parallel: every rank gets all log-probs and the complete gradient of its own rows
    sp = slice(0, SP_TOKENS)
    sp_lp, sp_gh, sp_gw, _ = _naive(hidden[sp], weight, targets[sp], grad_out[sp])
    sp_gh = sp_gh.view(SP_ROWS, -1, H).chunk(world_size)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["sp_lp"].reshape(-1), sp_lp)
        torch.testing.assert_close(res["sp_grad_hidden"], sp_gh[rank])
    torch.testing.assert_close(torch.cat([res["sp_grad_weight"] for res in results]), sp_gw)
