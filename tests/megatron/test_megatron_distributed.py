"""MTP/main log-probs under TP, SP, EP (MoE), CP re-assembly and PP, several gloo processes on CPU.

Every body first builds a single-shard reference (TP=1, EP=1, PP=1) in the same processes, then
re-initialises megatron's groups with the layout under test, copies the reference weights in
(sliced along each parameter's ``partition_dim``), and compares log-probs and parameter gradients.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from tests._megatron_dist import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

V = 64


def _inputs(packed: bool):
    from megatron.core.packed_seq_params import PackedSeqParams

    g = torch.Generator().manual_seed(7)
    if not packed:
        ids = torch.randint(0, V, (2, 16), generator=g)
        return ids, torch.arange(16).expand(2, 16).contiguous(), None
    lengths = [8, 4, 8]
    ids = torch.randint(0, V, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 8, 12, 20], dtype=torch.int32)
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=8,
        max_seqlen_kv=8,
    )
    return ids, pos, psp


def _run(model, ids, pos, psp, detach=False):
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    model.zero_grad(set_to_none=True)
    out = forward_with_mtp_logprobs(model, ids, pos, packed_seq_params=psp, detach_trunk=detach, chunk_size=5)
    # A loss with distinct weights per depth and position, so every gradient path is exercised.
    g = torch.Generator().manual_seed(11)
    loss = (out.main_logprobs * torch.rand(out.main_logprobs.shape, generator=g)).sum()
    for lp in out.mtp_logprobs:
        loss = loss + (lp * torch.rand(lp.shape, generator=g)).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _source_name(name: str, num_experts: int | None) -> str:
    from megatron.core import parallel_state as ps

    match = re.search(r"local_experts\.(\d+)\.", name)
    if match and num_experts:
        per_rank = num_experts // ps.get_expert_model_parallel_world_size()
        global_index = ps.get_expert_model_parallel_rank() * per_rank + int(match.group(1))
        name = name.replace(match.group(0), f"local_experts.{global_index}.")
    return name


def _shard(param, full: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    if getattr(param, "allreduce", True):
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    else:  # expert weights are split over the expert-tensor-parallel group
        size, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    return full.chunk(size, dim=param.partition_dim)[rank]


def _load_full(model, full_state: dict, num_experts=None):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_shard(p, full_state[_source_name(name, num_experts)]))


def _layout_vs_reference(rank, world, layout: dict, model_kwargs: dict, packed: bool):
    from megatron.core import parallel_state as ps

    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt

    ids, pos, psp = _inputs(packed)
    base = {k: v for k, v in model_kwargs.items() if k != "sequence_parallel"}
    init_model_parallel(rank=rank, world_size=world)
    torch.manual_seed(0)
    ref_model = build_tiny_gpt(vocab_size=V, **base)
    ref_out, ref_grads = _run(ref_model, ids, pos, psp)
    full_state = {n: p.detach().clone() for n, p in ref_model.named_parameters()}

    init_model_parallel(rank=rank, world_size=world, **layout)
    model = build_tiny_gpt(vocab_size=V, **model_kwargs)
    _load_full(model, full_state, model_kwargs.get("num_experts"))
    out, grads = _run(model, ids, pos, psp)

    torch.testing.assert_close(out.main_logprobs, ref_out.main_logprobs)
    assert torch.equal(out.main_mask, ref_out.main_mask)
    for d in range(len(ref_out.mtp_logprobs)):
        torch.testing.assert_close(out.mtp_logprobs[d], ref_out.mtp_logprobs[d])
        assert torch.equal(out.mtp_masks[d], ref_out.mtp_masks[d])
    tp_group = ps.get_tensor_model_parallel_group()
    ep = ps.get_expert_model_parallel_world_size()
    for name, p in model.named_parameters():
        grad = grads[name]
        if getattr(p, "sequence_parallel", False):
            # SP: each TP rank saw part of the sequence; megatron's finalize_model_grads sums these.
            torch.distributed.all_reduce(grad, group=tp_group)
        expected = _shard(p, ref_grads[_source_name(name, model_kwargs.get("num_experts"))])
        if not getattr(p, "allreduce", True) and ep > 1:
            # The all-gather dispatcher routes every EP rank's tokens (identical batches here) to the
            # expert's owner, so its gradient holds ep copies of the single-rank gradient.
            expected = expected * ep
        torch.testing.assert_close(grad, expected, msg=lambda m, n=name: f"{n}: {m}")
    ps.destroy_model_parallel()


def test_tensor_parallel_2_equals_1():
    run_ranks(_layout_vs_reference, 2, {"tensor_parallel": 2}, {"mtp_num_layers": 2}, False)


def test_tensor_parallel_2_sequence_parallel_packed_equals_1():
    run_ranks(
        _layout_vs_reference,
        2,
        {"tensor_parallel": 2},
        {"mtp_num_layers": 1, "sequence_parallel": True},
        True,
    )


def test_moe_top2_expert_parallel_2_equals_1():
    run_ranks(
        _layout_vs_reference,
        2,
        {"expert_parallel": 2},
        {"mtp_num_layers": 1, "num_experts": 4, "moe_router_topk": 2},
        False,
    )


def _context_parallel_body(rank, world, packed: bool):
    """CP=2 re-assembly and gradient rule on real MTP hidden states (local attention has no CP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.context_parallel import cp_local_positions
    from nemo_occ.megatron.head_logprobs import head_logprobs, sequence_layout
    from nemo_occ.megatron.mtp_capture import MTPCapture

    ids, pos, psp = _inputs(packed)
    init_model_parallel(rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_tiny_gpt(vocab_size=V, mtp_num_layers=2)
    with MTPCapture(model, detach_trunk=False) as cap:
        model(ids, pos, None, packed_seq_params=psp)
        captured = cap.take()
    heads = [captured.main_hidden] + captured.mtp_hidden  # [S, B, H] each, full sequence
    g = torch.Generator().manual_seed(5)
    weights = [torch.rand(ids.shape[0], ids.shape[1] - 1, generator=g) for _ in heads]

    def evaluate(hidden_list, input_ids, loss_scale=1.0):
        layout = sequence_layout(model, input_ids, psp)
        leaves = [h.detach().clone().requires_grad_(True) for h in hidden_list]
        results = [head_logprobs(model, h, layout, depth) for depth, h in enumerate(leaves)]
        loss = sum((lp * w).sum() for (lp, _, _), w in zip(results, weights, strict=True))
        (loss * loss_scale).backward()
        return [(lp.detach(), valid) for lp, valid, _ in results], [h.grad for h in leaves]

    reference, reference_grads = evaluate(heads, ids)

    init_model_parallel(rank=rank, world_size=world, context_parallel=2)
    model.pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    cp_rank = ps.get_context_parallel_rank()
    bounds = psp.cu_seqlens_q_padded if packed else None
    # Megatron's load-balanced layout written out: each (padded) sequence is cut into 2*CP = 4
    # chunks and CP rank r keeps chunks r and 3 - r.
    local = []
    for start, end in zip(
        *(([0], [ids.shape[1]]) if bounds is None else (bounds[:-1].tolist(), bounds[1:].tolist())),
        strict=True,
    ):
        chunk = (end - start) // 4
        for index in (cp_rank, 3 - cp_rank):
            local += list(range(start + index * chunk, start + (index + 1) * chunk))
    local_pos = torch.tensor(local)
    assert torch.equal(local_pos, cp_local_positions(ids.shape[1], 2, cp_rank, cu_seqlens_padded=bounds))
    local_hidden = [h.index_select(0, local_pos) for h in heads]
    local_ids = ids.index_select(-1, local_pos)  # what the model gets on this CP rank
    # NeMo-RL's convention: every CP rank computes the full-sequence loss divided by the CP size
    sharded, sharded_grads = evaluate(local_hidden, local_ids, loss_scale=1 / 2)
    for (lp, valid), (ref_lp, ref_valid) in zip(sharded, reference, strict=True):
        torch.testing.assert_close(lp, ref_lp)  # every CP rank holds the full sequence
        assert torch.equal(valid, ref_valid)
    for grad, ref_grad in zip(sharded_grads, reference_grads, strict=True):
        # The gather's backward sums the (loss / CP) gradients over the CP ranks, so each rank ends with
        # its slice of the full-sequence gradient.
        torch.testing.assert_close(grad, ref_grad.index_select(0, local_pos))
    ps.destroy_model_parallel()


def _context_parallel_both(rank, world):
    for packed in (False, True):
        _context_parallel_body(rank, world, packed)


def test_context_parallel_2_reassembly_rows_and_packed():
    run_ranks(_context_parallel_both, 2)


def _sequence_parallel_saved_tensors_body(rank, world):
    """Under TP=2+SP a head keeps only this rank's sequence shard of its hidden states for backward."""
    from megatron.core import parallel_state as ps

    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.head_logprobs import head_logprobs, output_weight, sequence_layout
    from nemo_occ.megatron.mtp_capture import MTPCapture

    ids, pos, _ = _inputs(packed=False)
    init_model_parallel(rank=rank, world_size=world, tensor_parallel=2)
    torch.manual_seed(0)
    model = build_tiny_gpt(vocab_size=V, mtp_num_layers=1, sequence_parallel=True)
    with MTPCapture(model, detach_trunk=False) as cap:
        model(ids, pos, None)
        captured = cap.take()
    weight = output_weight(model)
    layout = sequence_layout(model, ids)
    for depth, hidden in enumerate([captured.main_hidden] + captured.mtp_hidden):
        shard = hidden.detach().clone().requires_grad_(True)  # [s / tp, b, H]
        assert shard.shape[0] * 2 == ids.shape[1]
        saved = []

        def pack(t, saved=saved, hidden_size=shard.shape[-1]):
            if t.dim() and t.shape[-1] == hidden_size and t.data_ptr() != weight.data_ptr():
                saved.append(t.numel())  # hidden-sized tensors (the output weight excluded)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, valid, _ = head_logprobs(model, shard, layout, depth, chunk_size=5)
        assert saved and max(saved) == shard.numel(), (depth, saved, shard.numel())
        (lp * valid).sum().backward()
        assert shard.grad is not None and shard.grad.shape == shard.shape
    ps.destroy_model_parallel()


def test_sequence_parallel_heads_save_the_local_shard_only():
    run_ranks(_sequence_parallel_saved_tensors_body, 2)
