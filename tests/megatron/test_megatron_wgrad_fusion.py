"""MTP gradient into the output weight under Megatron DDP with fused weight-gradient accumulation.

With ``gradient_accumulation_fusion`` the output layer adds its weight gradient straight into
``weight.main_grad`` and sets ``grad_added_to_main_grad``; DDP's hook then ignores ``.grad`` unless
``zero_out_wgrad`` is set (Megatron sets it on the embedding only). The chunked MTP log-probs must still
deliver their gradient, tied and untied. Runs megatron-core's real ``DistributedDataParallel`` (gloo,
world size 1) and real output layer; on the CPU the CUDA kernel is a stand-in (see ``_Kernel``), and the
``gpu`` test repeats the check on CUDA with the real kernel megatron-core imports.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.lab import parallel  # noqa: E402
from nemo_occ.lab.tiny_gpt import build_tiny_gpt  # noqa: E402
from nemo_occ.megatron.head_logprobs import FusedMTPTerm  # noqa: E402
from nemo_occ.megatron.mtp_capture import MTPCapture  # noqa: E402

V = 48


class _Kernel:
    """Records the ``main_grad`` buffers megatron's layers pass to ``fused_weight_gradient_mlp_cuda``.

    With ``real`` (the CUDA extension megatron-core imported) each call goes to it; without, a CPU
    stand-in with the real ``wgrad_gemm_accum_fp32(input, d_output, d_weight)``'s signature and effect:
    collapse leading dims, then d_weight [out, in] += d_output^T @ input in fp32 (the product megatron's
    FSDP branch of the same layer computes with ``torch.matmul(grad_output.t(), total_input, ...)``).
    """

    def __init__(self, real=None):
        self.real = real
        self.main_grads: list[torch.Tensor] = []

    def wgrad_gemm_accum_fp32(self, total_input, grad_output, main_grad):
        assert main_grad.dtype == torch.float32
        self.main_grads.append(main_grad)
        if self.real is not None:
            self.real.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
            return
        inp = total_input.reshape(-1, total_input.shape[-1]).float()
        grad = grad_output.reshape(-1, grad_output.shape[-1]).float()
        main_grad.add_(grad.t() @ inp)

    def wgrad_gemm_accum_fp16(self, total_input, grad_output, main_grad):
        raise AssertionError("the models here keep fp32 gradient buffers")


def _main_grads(
    *, tied: bool, fused: bool, with_mtp: bool, device: str = "cpu", mtp_path="unfused", overlap=False
):
    """main_grad of every parameter after one NeMo-RL-style step: model(...) -> logits, captured MTP.

    Also returns the name of the weight the output layer multiplies with and its ``main_grad``.
    ``mtp_path="fused"``: the MTP term's gradient is taken in the log-prob kernel (``FusedMTPTerm``);
    ``overlap``: DDP with ``overlap_grad_reduce``, which refuses a first batch in which some parameter's
    backward hook did not fire.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    torch.manual_seed(0)
    gpt = build_tiny_gpt(
        vocab_size=V,
        hidden_size=32,
        num_attention_heads=4,
        mtp_num_layers=2,
        share_embeddings_and_output_weights=tied,
    ).to(device)  # built on the CPU (megatron's CPU initialisation), moved before DDP sizes its buffers
    if fused:
        # What gradient_accumulation_fusion=True in the config gives each linear layer (the CPU config
        # turns it off because the kernel is CUDA-only; the layers read this attribute in forward).
        gpt.config.gradient_accumulation_fusion = True
        for module in gpt.modules():
            if hasattr(module, "gradient_accumulation_fusion"):
                module.gradient_accumulation_fusion = True
    model = DistributedDataParallel(
        gpt.config, DistributedDataParallelConfig(overlap_grad_reduce=overlap), gpt
    )
    model.zero_grad_buffer()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 10), generator=g).to(device)
    pos = torch.arange(10, device=device).expand(2, 10).contiguous()
    main_w = torch.rand(2, 9, generator=g).to(device)
    mtp_w = torch.rand(2, 2, 9, generator=g).to(device)  # [depth, B, S-1]

    def prepare(depth, valid):  # the MTP term Σ w·lp below: dL/dlp = w where valid
        weights = mtp_w[depth - 1] * valid
        return lambda b, j, lp: weights[b, j]

    term = FusedMTPTerm(prepare=prepare) if mtp_path == "fused" and with_mtp else None
    with MTPCapture(model, detach_trunk=False) as cap:
        logits = model(ids, pos, None)  # [B, S, V] through the real output layer
        mtp = cap.logprobs(ids, chunk_size=7, fused=term)
    main = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = (main * main_w).sum()
    if with_mtp:
        for d, (lp, mask) in enumerate(zip(mtp.mtp_logprobs, mtp.mtp_masks, strict=True)):
            loss = loss + (lp * mask * mtp_w[d]).sum()
    if term is not None:
        loss = loss + mtp.mtp_carrier
    loss.backward()
    # DP size 1: finish_grad_sync would only all-reduce over one rank.
    grads = {n: p.main_grad.clone() for n, p in gpt.named_parameters()}
    if overlap:
        # The next step's reset asserts that every parameter's hook fired in this first batch (on a CPU;
        # finish_grad_sync's overlapped path needs CUDA streams in newer cores).
        model.zero_grad_buffer()
    output = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
    return grads, output, gpt.get_parameter(output).main_grad


def _check_fused_equals_unfused(monkeypatch, kernel: _Kernel, *, tied: bool, device: str) -> None:
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", kernel, raising=False)

    reference, output, _ = _main_grads(tied=tied, fused=False, with_mtp=True, device=device)
    main_only, _, _ = _main_grads(tied=tied, fused=False, with_mtp=False, device=device)
    # The comparison is meaningful: the MTP term moves the output weight's gradient.
    assert (reference[output] - main_only[output]).abs().max() > 1e-3
    assert not kernel.main_grads  # unfused: the kernel is never called

    fused, _, output_main_grad = _main_grads(tied=tied, fused=True, with_mtp=True, device=device)
    assert any(t is output_main_grad for t in kernel.main_grads), "output layer took the unfused path"
    for name, grad in reference.items():
        torch.testing.assert_close(fused[name], grad, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_wgrad_keeps_mtp_gradient_in_output_weight(single_rank, monkeypatch, tied):
    _check_fused_equals_unfused(monkeypatch, _Kernel(), tied=tied, device="cpu")


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap_grad_reduce"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_mtp_path_equals_unfused_under_fused_wgrad(single_rank, monkeypatch, tied, overlap):
    # Megatron's output layer with fused weight-gradient accumulation, and the MTP term's gradient taken
    # in the log-prob kernel's forward: every main_grad equals the unfused reference's, tied and untied;
    # with overlap_grad_reduce every bucket's hooks fired (the MTP heads give the weight no .grad).
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", _Kernel(), raising=False)
    reference, output, _ = _main_grads(tied=tied, fused=True, with_mtp=True)
    main_only, _, _ = _main_grads(tied=tied, fused=True, with_mtp=False)
    assert (reference[output] - main_only[output]).abs().max() > 1e-3
    got, _, _ = _main_grads(tied=tied, fused=True, with_mtp=True, mtp_path="fused", overlap=overlap)
    for name, grad in reference.items():
        torch.testing.assert_close(got[name], grad, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture
def cuda_single_rank():
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    parallel.init_model_parallel(backend="nccl")
    try:
        yield
    finally:
        parallel.destroy_model_parallel()


def _real_kernel():
    """The ``fused_weight_gradient_mlp_cuda`` extension megatron-core's layers imported (APEX), or None."""
    from megatron.core.tensor_parallel import layers

    if not getattr(layers, "_grad_accum_fusion_available", False):
        return None
    return getattr(layers, "fused_weight_gradient_mlp_cuda", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_wgrad_keeps_mtp_gradient_with_real_kernel(cuda_single_rank, monkeypatch, tied):
    real = _real_kernel()
    if real is None:
        pytest.skip(
            "megatron.core.tensor_parallel.layers could not import fused_weight_gradient_mlp_cuda "
            "(APEX's fused weight-gradient extension)"
        )
    _check_fused_equals_unfused(monkeypatch, _Kernel(real), tied=tied, device="cuda")
