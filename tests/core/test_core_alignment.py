"""MTP targets and MTP-to-main alignment against loops over documents (tests/_refs.py), and against
a tiny model whose MTP log-probs are gathered one token at a time (F.log_softmax + index).

Letters: B rows, S tokens per row, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from nemo_occ.core.alignment import align_mtp_to_main, mtp_targets, segment_ids, shift_left, shift_right
from tests._refs import TinyMTPModel, documents, loop_align, loop_targets

# three documents of lengths 5, 1, 4, then 3 padding positions; another with an empty document
PACKED = [torch.tensor([0, 5, 6, 10]), torch.tensor([0, 3, 3, 9, 13])]


def _ids(B, S, seed=0):
    return torch.randint(1, 50, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_targets_match_loop_unpacked(depth):
    ids = _ids(3, 9)
    tgt, valid = mtp_targets(ids, depth)
    ref_t, ref_v = loop_targets(ids, depth)
    assert torch.equal(valid, ref_v)
    assert torch.equal(tgt, ref_t)


@pytest.mark.parametrize("cu", PACKED, ids=["3docs_pad", "empty_doc"])
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_targets_match_loop_packed(cu, depth):
    ids = _ids(1, 13, seed=1)
    tgt, valid = mtp_targets(ids, depth, cu_seqlens=cu)
    ref_t, ref_v = loop_targets(ids, depth, cu)
    assert torch.equal(valid, ref_v)
    assert torch.equal(tgt, ref_t)


@pytest.mark.parametrize("cu", [None, *PACKED], ids=["unpacked", "3docs_pad", "empty_doc"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_align_matches_loop(cu, depth):
    vals = torch.randn(1 if cu is not None else 3, 13, generator=torch.Generator().manual_seed(depth))
    out, valid = align_mtp_to_main(vals, depth, cu_seqlens=cu, fill=-7.0)
    ref, ref_v = loop_align(vals, depth, cu, fill=-7.0)
    assert torch.equal(valid, ref_v)
    # values wherever there is a source (valid or not for the main head), the fill elsewhere
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cu", [None, *PACKED], ids=["unpacked", "3docs_pad", "empty_doc"])
@pytest.mark.parametrize("shift", [0, 1, 2, 5, 20])
def test_shifts_match_loop(cu, shift):
    x = torch.arange(13).reshape(1, 13) * 10 + 1
    left = shift_left(x, shift, cu_seqlens=cu, fill=-1)
    right = shift_right(x, shift, cu_seqlens=cu, fill=-1)
    ref_l = torch.full_like(x, -1)
    ref_r = torch.full_like(x, -1)
    for s, e in documents(13, cu):
        for p in range(s, e):
            if p + shift < e:
                ref_l[0, p] = x[0, p + shift]
            if p - shift >= s:
                ref_r[0, p] = x[0, p - shift]
    assert torch.equal(left, ref_l)
    assert torch.equal(right, ref_r)


def test_segment_ids_match_loop():
    for cu in PACKED:
        n = len(cu) - 1
        ref = [n] * 13  # padding after the last boundary is segment N
        for k in range(n):
            for p in range(int(cu[k]), int(cu[k + 1])):
                ref[p] = k
        assert segment_ids(cu, 13).tolist() == ref


@pytest.mark.parametrize("K", [1, 2])
def test_tiny_model_megatron_positions_align_to_the_main_head(K):
    """Gather each depth's log-probs at Megatron positions with ``mtp_targets`` and align them: they
    equal the tiny model's per-token MTP log-probs of the same token the main head scores."""
    model = TinyMTPModel(V=11, H=5, K=K, seed=3)
    ids = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(4))
    _, ref_mtp, ref_masks = model.forward_loops(ids)  # K x [B, S-1] by per-token loops
    _, fast_mtp, fast_masks = model(ids)  # vectorised, used by the objective tests
    for a, b, ma, mb in zip(ref_mtp, fast_mtp, ref_masks, fast_masks, strict=True):
        assert torch.equal(ma, mb)
        torch.testing.assert_close(a, b)
    _, full = model.full_logprobs(ids)  # K x [B, S, V]
    for d in range(1, K + 1):
        tgt, has_tgt = mtp_targets(ids, d)  # [B, S]
        lp = full[d - 1].gather(-1, tgt[..., None])[..., 0]  # [B, S] at Megatron positions
        lp = torch.where(has_tgt, lp, torch.zeros_like(lp))
        aligned, valid = align_mtp_to_main(lp, d)
        aligned, valid = aligned[:, :-1], valid[:, :-1]  # next-token convention [B, S-1]
        assert torch.equal(valid, ref_masks[d - 1])
        torch.testing.assert_close(aligned[valid], ref_mtp[d - 1][valid])


def test_packed_documents_never_leak():
    """A value moved across a document boundary would carry its document's tag."""
    cu = torch.tensor([0, 4, 9, 13])
    doc = torch.zeros(1, 13)
    for k, (s, e) in enumerate(documents(13, cu)):
        doc[0, s:e] = k
    for d in (1, 2, 3):
        out, valid = align_mtp_to_main(doc, d, cu_seqlens=cu, fill=-1.0)
        assert bool((out[valid] == doc[valid]).all())
        # the last position of each document has no main-head target
        for _, e in documents(13, cu):
            assert not bool(valid[0, e - 1])


def test_bad_input_raises():
    ids = _ids(1, 10)
    with pytest.raises(ValueError, match="start at 0"):
        mtp_targets(ids, 1, cu_seqlens=torch.tensor([1, 5, 10]))
    with pytest.raises(ValueError, match="non-decreasing"):
        mtp_targets(ids, 1, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="only 10 tokens"):
        mtp_targets(ids, 1, cu_seqlens=torch.tensor([0, 5, 12]))
    with pytest.raises(ValueError, match="1-D"):
        mtp_targets(ids, 1, cu_seqlens=torch.tensor([[0, 5, 10]]))
    with pytest.raises(ValueError, match="depth must be >= 0"):
        mtp_targets(ids, -1)
    with pytest.raises(TypeError, match="integer"):
        mtp_targets(ids.float(), 1)
    with pytest.raises(ValueError, match="MTP depth starts at 1"):
        align_mtp_to_main(ids.float(), 0)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        shift_left(ids, -1)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        shift_right(ids, -1)
