"""CPU compatibility patches for megatron-core (``cpu_compat``) and what runs through them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.lab import cpu_compat  # noqa: E402


def _patched_objects():
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import torch_norm

    return (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        torch.Tensor.cuda,
        schedules.forward_backward_no_pipelining,
        schedules.forward_backward_pipelining_without_interleaving,
        tp_random.CudaRNGStatesTracker.fork,
        vars(torch_norm.WrappedTorchNorm)["__new__"],
    )


def test_enable_disable_restores_everything():
    before = _patched_objects()
    with cpu_compat.cpu_compat() as applied:
        assert applied and cpu_compat.is_enabled()
        assert torch.cuda.current_device() == torch.device("cpu")
        with cpu_compat.cpu_compat():  # re-entrant: the inner exit must not undo the outer
            pass
        assert torch.cuda.current_device() == torch.device("cpu")
        x = torch.ones(2)
        assert x.cuda() is x
        torch.cuda.synchronize()
    assert _patched_objects() == before and not cpu_compat.is_enabled()


def test_never_applied_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = torch.cuda.current_device
    with cpu_compat.cpu_compat() as applied:
        assert applied is False
        assert torch.cuda.current_device is original and not cpu_compat.is_enabled()


def test_a_failure_while_patching_undoes_what_was_patched(monkeypatch):
    before = _patched_objects()

    def broken(original_new):
        raise RuntimeError("cannot patch the norm")

    monkeypatch.setattr(cpu_compat, "_make_torch_norm_new", broken)  # the last CPU patch made
    with pytest.raises(RuntimeError, match="cannot patch the norm"):
        with cpu_compat.cpu_compat():
            pass
    assert _patched_objects() == before and not cpu_compat.is_enabled()


def test_the_demo_policy_sets_nothing_up_itself():
    """The demo's entry point enters the CPU patches and the process group; building its model adds none."""
    from nemo_occ.lab.demo.config import DemoConfig
    from nemo_occ.lab.demo.policy import DemoPolicy
    from nemo_occ.lab.demo.task import AdditionTask
    from nemo_occ.lab.parallel import model_parallel

    before = _patched_objects()
    with cpu_compat.cpu_compat(), model_parallel():
        cfg = DemoConfig()
        DemoPolicy.build(cfg, AdditionTask(digits=cfg.task.digits))
    assert _patched_objects() == before and not cpu_compat.is_enabled()
    assert not torch.distributed.is_initialized()


def test_packed_causal_mask_matches_loop():
    cu = torch.tensor([0, 3, 5, 9])
    mask = cpu_compat.packed_causal_mask(cu, 11)[0, 0]
    seg = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]  # 9, 10 are padding: their own segment
    for t in range(11):
        for u in range(11):
            assert bool(mask[t, u]) == (not (seg[t] == seg[u] and u <= t)), (t, u)


@pytest.mark.mcore_latest
def test_newer_core_capture_skips_process_mtp_loss(monkeypatch, single_rank):
    from megatron.core import package_info
    from megatron.core.models.gpt import gpt_model

    if not hasattr(gpt_model, "process_mtp_loss"):
        pytest.skip(
            f"megatron-core {package_info.__version__} has no process_mtp_loss (needs a newer core than 0.16.x)"
        )
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.mtp_capture import MTPCapture

    calls = []
    monkeypatch.setattr(gpt_model, "process_mtp_loss", lambda *a, **k: calls.append(1))
    model = build_tiny_gpt(mtp_num_layers=1)
    ids = torch.randint(0, 64, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    with MTPCapture(model, detach_trunk=True) as cap:
        logits = model(ids, pos, None)  # newer cores derive MTP labels from input_ids here
        out = cap.logprobs(ids)
    assert calls == [] and logits.shape == (2, 8, 64) and len(out.mtp_logprobs) == 1


@pytest.mark.mcore_latest
def test_mtp_layer_builds_without_transformer_engine():
    """0.20: the MTP layer's is_inference_column_parallel_linear check raises without TE unless patched."""
    from megatron.core.tensor_parallel import inference_layers

    if not hasattr(inference_layers, "is_inference_column_parallel_linear"):
        pytest.skip("this megatron-core has no is_inference_column_parallel_linear (needs >= 0.20)")
    if inference_layers.HAVE_TE:
        pytest.skip("Transformer Engine is installed: the check works as is and is not patched")
    from megatron.core.transformer import multi_token_prediction

    from nemo_occ.lab import parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt

    originals = (
        inference_layers.is_inference_column_parallel_linear,
        multi_token_prediction.is_inference_column_parallel_linear,
    )
    with cpu_compat.cpu_compat():
        parallel.init_model_parallel()
        try:
            model = build_tiny_gpt(mtp_num_layers=2)
            assert len(model.mtp.layers) == 2
        finally:
            parallel.destroy_model_parallel()
    assert (
        inference_layers.is_inference_column_parallel_linear,
        multi_token_prediction.is_inference_column_parallel_linear,
    ) == originals
