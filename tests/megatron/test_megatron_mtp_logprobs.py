"""MTP/main log-probs of a real megatron-core GPTModel on CPU (one process, gloo, TP=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.lab.tiny_gpt import build_tiny_gpt  # noqa: E402
from nemo_occ.megatron.mtp_capture import MTPCapture  # noqa: E402
from nemo_occ.megatron.mtp_logprobs import forward_main_logits, forward_with_mtp_logprobs  # noqa: E402
from tests._megatron_reference import reference_logprobs  # noqa: E402

V = 48


@pytest.fixture(scope="module")
def model2(single_rank):
    torch.manual_seed(0)
    return build_tiny_gpt(vocab_size=V, hidden_size=32, num_attention_heads=4, mtp_num_layers=2)


def _batch(b=3, s=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, s), generator=g)
    return ids, torch.arange(s).expand(b, s).contiguous()


def test_logprobs_match_full_logits_reference_two_depths(model2):
    ids, pos = _batch()
    out = forward_with_mtp_logprobs(model2, ids, pos, detach_trunk=False, chunk_size=7, return_top1=True)
    main, mtp, valid = reference_logprobs(model2, ids, pos, num_depths=2)
    torch.testing.assert_close(out.main_logprobs, main)
    assert out.main_mask.all()
    assert len(out.mtp_logprobs) == 2
    for d in range(2):
        assert torch.equal(out.mtp_masks[d], valid[d])
        torch.testing.assert_close(out.mtp_logprobs[d], torch.where(valid[d], mtp[d], 0.0))
    # top-1: the sampled token is the arg-max of the full-vocab logits.
    logits = forward_main_logits(model2, ids, pos)
    assert torch.equal(out.main_top1, logits[:, :-1].argmax(-1) == ids[:, 1:])


def test_capture_around_plain_model_call_without_labels(model2):
    """Someone else calls model(...) with labels=None (NeMo-RL): no crash, main logits unchanged."""
    ids, pos = _batch(seed=2)
    with MTPCapture(model2, detach_trunk=False) as cap:
        logits = model2(ids, pos, None)  # 0.16.1 would crash on labels=None without the capture
        got = cap.logprobs(ids)
    torch.testing.assert_close(logits, forward_main_logits(model2, ids, pos))
    _, mtp, valid = reference_logprobs(model2, ids, pos, num_depths=2)
    for d in range(2):
        torch.testing.assert_close(got.mtp_logprobs[d], torch.where(valid[d], mtp[d], 0.0))
    # Hooks and config are restored: the model is its 0.16 self again (labels needed for MTP).
    assert model2.config.mtp_num_layers == 2 and not model2.mtp._forward_hooks


def test_capture_and_training_forward_give_one_result(model2):
    """MTPCapture around anyone's forward and forward_with_mtp_logprobs: one result type, equal MTP rows."""
    ids, pos = _batch(seed=5)
    with MTPCapture(model2, detach_trunk=False) as cap:
        model2(ids, pos, None)
        captured = cap.logprobs(ids, chunk_size=5, return_top1=True)
    full = forward_with_mtp_logprobs(model2, ids, pos, detach_trunk=False, chunk_size=5, return_top1=True)
    assert type(captured) is type(full)
    assert captured.main_logprobs is None and captured.main_mask is None and captured.main_top1 is None
    assert len(captured.mtp_logprobs) == len(full.mtp_logprobs) == 2
    for d in range(2):
        torch.testing.assert_close(captured.mtp_logprobs[d], full.mtp_logprobs[d])
        assert torch.equal(captured.mtp_masks[d], full.mtp_masks[d])
        assert torch.equal(captured.mtp_top1[d], full.mtp_top1[d])


def _grads(model):
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def _main_only_grads(model, ids, pos):
    model.zero_grad(set_to_none=True)
    logits = forward_main_logits(model, ids, pos)
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp.sum().backward()
    return _grads(model)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_and_joint_gradients(model2, detach):
    ids, pos = _batch(seed=3)
    main_only = _main_only_grads(model2, ids, pos)
    model2.zero_grad(set_to_none=True)
    out = forward_with_mtp_logprobs(model2, ids, pos, detach_trunk=detach)
    loss = out.main_logprobs.sum() + sum(
        (lp * m).sum() for lp, m in zip(out.mtp_logprobs, out.mtp_masks, strict=True)
    )
    loss.backward()
    both = _grads(model2)
    # MTP-only gradient = total minus the main head's (megatron's own MTP loss adds nothing).
    for name, grad in both.items():
        mtp_part = grad - main_only[name]
        if name.startswith("mtp."):
            assert grad.abs().sum() > 0, name
            continue
        if detach:
            torch.testing.assert_close(grad, main_only[name], msg=f"MTP gradient leaked into {name}")
    if not detach:
        for name in (
            "embedding.word_embeddings.weight",
            "decoder.layers.0.self_attention.linear_qkv.weight",
            "output_layer.weight",
        ):
            assert (both[name] - main_only[name]).abs().max() > 1e-6, f"joint: no MTP gradient in {name}"
    model2.zero_grad(set_to_none=True)
    del mtp_part


def test_packed_documents_equal_separate_rows(model2):
    """Three documents packed in one THD row score exactly like three separate rows."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [5, 7, 4]
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, V, (1, n), generator=g) for n in lengths]
    ids = torch.cat(docs, dim=1)  # [1, T]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    psp = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7
    )
    packed = forward_with_mtp_logprobs(model2, ids, pos, packed_seq_params=psp, detach_trunk=False)
    assert packed.main_logprobs.shape == (1, 15)
    for k, n in enumerate(lengths):
        start = int(cu[k])
        row = forward_with_mtp_logprobs(model2, docs[k], torch.arange(n)[None], detach_trunk=False)
        sl = slice(start, start + n - 1)
        torch.testing.assert_close(packed.main_logprobs[:, sl], row.main_logprobs)
        assert packed.main_mask[:, sl].all()
        if start + n - 1 < 15:
            assert not packed.main_mask[0, start + n - 1]  # document end: next token is another document
        for d in range(2):
            torch.testing.assert_close(packed.mtp_logprobs[d][:, sl], row.mtp_logprobs[d])
            assert torch.equal(packed.mtp_masks[d][:, sl], row.mtp_masks[d])


def test_bad_inputs_raise(model2):
    ids, pos = _batch()
    with pytest.raises(ValueError, match="position_ids"):
        forward_with_mtp_logprobs(model2, ids, pos[:, :-1], detach_trunk=True)
    with pytest.raises(TypeError, match="detach_trunk"):
        MTPCapture(model2, detach_trunk="yes")
    with pytest.raises(TypeError, match="GPTModel"):
        forward_main_logits(torch.nn.Linear(2, 2), ids, pos)
    with (
        MTPCapture(model2, detach_trunk=True) as cap,
        pytest.raises(ValueError, match="no MTP hidden states"),
    ):
        cap.take()


def _padded_slot_batch():
    """Documents of lengths 5, 7, 4 in slots padded to multiples of 4: starts 0, 8, 16; row of 20."""
    lengths, slots = [5, 7, 4], [8, 8, 4]
    g = torch.Generator().manual_seed(6)
    docs = [torch.randint(0, V, (1, n), generator=g) for n in lengths]
    ids = torch.cat(
        [
            torch.cat([d, torch.randint(0, V, (1, s - d.shape[1]), generator=g)], dim=1)
            for d, s in zip(docs, slots, strict=True)
        ],
        dim=1,
    )  # [1, 20]: each document followed by padding tokens
    pos = torch.cat([torch.arange(s) for s in slots])[None]
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)  # real lengths, as if unpadded
    cu_pad = torch.tensor([0, 8, 16, 20], dtype=torch.int32)
    return docs, ids, pos, cu, cu_pad


def test_padded_slots_with_real_lengths_are_refused(model2):
    """cu_seqlens_q (real lengths) != cu_seqlens_q_padded: megatron's MTP roll would misplace documents 2+."""
    from megatron.core.packed_seq_params import PackedSeqParams

    _, ids, pos, cu, cu_pad = _padded_slot_batch()
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=8,
        max_seqlen_kv=8,
    )
    with pytest.raises(ValueError, match="cu_seqlens_q = cu_seqlens_q_padded"):
        forward_with_mtp_logprobs(model2, ids, pos, packed_seq_params=psp, detach_trunk=False)
    with pytest.raises(ValueError, match="cu_seqlens_q = cu_seqlens_q_padded"):
        with MTPCapture(model2, detach_trunk=True):
            model2(ids, pos, None, packed_seq_params=psp)
    # nothing stays behind: hooks removed, the model's own config back
    assert model2.config.mtp_num_layers == 2 and not model2.mtp._forward_hooks
    assert not model2.mtp._forward_pre_hooks


def test_padded_slots_passed_as_cu_seqlens_q_equal_separate_rows(model2):
    """The layout the refusal asks for (NeMo-RL's): padded bounds as cu_seqlens_q; real positions are exact."""
    from megatron.core.packed_seq_params import PackedSeqParams

    docs, ids, pos, _, cu_pad = _padded_slot_batch()
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_pad,
        cu_seqlens_kv=cu_pad,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=8,
        max_seqlen_kv=8,
    )
    packed = forward_with_mtp_logprobs(model2, ids, pos, packed_seq_params=psp, detach_trunk=False)
    for k, doc in enumerate(docs):
        n, start = doc.shape[1], int(cu_pad[k])
        row = forward_with_mtp_logprobs(model2, doc, torch.arange(n)[None], detach_trunk=False)
        sl = slice(start, start + n - 1)
        torch.testing.assert_close(packed.main_logprobs[:, sl], row.main_logprobs)
        for d in range(2):
            valid = row.mtp_masks[d]
            assert packed.mtp_masks[d][:, sl][valid].all()
            torch.testing.assert_close(packed.mtp_logprobs[d][:, sl][valid], row.mtp_logprobs[d][valid])


def test_detach_cuts_the_block_input_wherever_a_depth_reads_it(model2):
    """Newer cores' ``mtp_hsm`` also feeds the MTP block's input into depths >= 2 (rolled and mixed with
    the previous depth's output). Stand-in for that read: depth 2's input mixed with whatever the block
    received after every pre-hook. Under detach the trunk must still get no MTP gradient at all."""
    block = model2.mtp
    original = block.forward

    def forward_reading_the_block_input_at_depth_2(*args, **kwargs):
        block_input = kwargs["hidden_states"]

        def mix(module, layer_args, layer_kwargs):
            layer_kwargs["hidden_states"] = 0.5 * (layer_kwargs["hidden_states"] + block_input)
            return layer_args, layer_kwargs

        handle = block.layers[1].register_forward_pre_hook(mix, with_kwargs=True, prepend=True)
        try:
            return original(*args, **kwargs)
        finally:
            handle.remove()

    block.forward = forward_reading_the_block_input_at_depth_2
    try:
        ids, pos = _batch(seed=5)
        model2.zero_grad(set_to_none=True)
        out = forward_with_mtp_logprobs(model2, ids, pos, detach_trunk=True)
        sum((lp * m).sum() for lp, m in zip(out.mtp_logprobs, out.mtp_masks, strict=True)).backward()
    finally:
        del block.forward
    grads = _grads(model2)
    model2.zero_grad(set_to_none=True)
    leaked = [n for n, g in grads.items() if not n.startswith("mtp.") and g.abs().sum() > 0]
    assert leaked == [], f"MTP gradient reached the trunk: {leaked}"
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith("mtp.layers.1.eh_proj"))


def test_hidden_in_another_dtype_than_the_output_weight_raises(model2):
    """No silent [V, H] copy of the output weight: a dtype mismatch is the caller's to fix."""
    from nemo_occ.megatron.head_logprobs import head_logprobs, sequence_layout

    ids, pos = _batch(seed=5)
    with MTPCapture(model2, detach_trunk=False) as cap:
        model2(ids, pos, None)
        hidden = cap.take().mtp_hidden[0]  # [S, B, H] fp32, like the model
    layout = sequence_layout(model2, ids)
    with pytest.raises(
        TypeError, match="hidden states are torch.bfloat16 but the output weight is torch.float32"
    ):
        head_logprobs(model2, hidden.to(torch.bfloat16), layout, 1)
