"""Exact probes c = <g_RL, g_MTP,k>, v² = ||g_MTP,k||² on sharded megatron-core models (gloo, CPU)
equal the unsharded values: TP=2 (two MTP depths), TP=2 + sequence parallel, MoE experts at EP=2
(where the two ranks are also data-parallel replicas with one half of the batch each) and PP=2
(the gradients through megatron's own pipeline schedule).

Every body first computes a reference in the same processes with one unsharded model on the whole
batch, by brute force: one ``.backward()`` per loss into ``.grad``, and the dot products summed over
named parameters in Python, split by the ``mtp.`` prefix. Then megatron's groups are re-made with the
layout under test, the reference weights are loaded (sliced per rank), and the probes run with
``nemo_occ.megatron.probe_layout.probe_parameters`` and one scalar all-reduce over the world.

The losses are weighted sums of the main and MTP log-probs with distinct weights per row, position
and head, so every gradient path is exercised and the batch splits additively over ranks.

The same runs check the cross-fitted statistics (``nemo_occ.core.diagnostics.cross_fitted_statistics``:
halves A = rows 0, 2 and B = rows 1, 3, so each data-parallel rank holds one row of each) and all four
of them in a preconditioned metric: a fixed positive P per reference parameter element, sliced per rank
like the weights, and where the layout has data-parallel replicas also split over them as megatron's
distributed optimizer splits its state (rank r holds one contiguous range of each parameter, counted
once over the replicas), against the same brute-force reference with P applied by name.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from tests._megatron_dist import run_ranks  # noqa: E402
from tests.megatron.test_megatron_distributed import _load_full, _shard, _source_name  # noqa: E402

pytestmark = pytest.mark.distributed

V, S, B = 64, 16, 4
IN_A = torch.tensor([True, False, True, False])  # the halves: each DP rank's rows hold one of each


def _batch(depths: int):
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S).contiguous()
    weights = torch.rand(1 + depths, B, S - 1, generator=g) - 0.3  # [1 + K, B, S-1], both signs
    return ids, pos, weights


def _losses(out, weights):
    """[RL loss, MTP loss of depth 1, ...]: weighted sums of the rows this rank holds."""
    losses = [-(out.main_logprobs * weights[0]).sum()]
    losses += [-(lp * weights[d]).sum() for d, lp in enumerate(out.mtp_logprobs, start=1)]
    return losses


def _brute_force(model, losses):
    """{part: (||g_RL||², [c_k], [v²_k])} from .grad after one backward per loss, dotted in Python."""
    grads = []
    for loss in losses:
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None})
    out = {}
    for part in ("main", "mtp"):

        def dot(a, b, part=part):
            names = [n for n in a if n in b and n.startswith("mtp.") == (part == "mtp")]
            return sum(float((a[n] * b[n]).sum()) for n in names)

        out[part] = (
            dot(grads[0], grads[0]),
            [dot(grads[0], g) for g in grads[1:]],
            [dot(g, g) for g in grads[1:]],
        )
    return out


def _half_grads(model, losses_of_half):
    """[half][loss] -> {name: .grad} from one backward per loss of each half."""
    out = []
    for losses in losses_of_half:
        half = []
        for loss in losses:
            model.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            half.append(
                {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
            )
        out.append(half)
    return out


def _brute_force_cross_fit(halves, inverse):
    """{(metric, part): (||g_RL||², [c_k], [v²_k])} for the four statistics, by name, P = ``inverse``."""
    out = {}
    for metric, weight in (("euclid", None), ("precond", inverse)):
        for part in ("main", "mtp"):

            def dot(a, b, part=part, weight=weight):
                names = [n for n in a if n in b and n.startswith("mtp.") == (part == "mtp")]
                return sum(float((a[n] * b[n] * (1 if weight is None else weight[n])).sum()) for n in names)

            def add(a, b):
                return {n: a.get(n, 0) + b.get(n, 0) for n in a.keys() | b.keys()}

            (ra, *ma), (rb, *mb) = halves
            r = add(ra, rb)
            m = [add(x, y) for x, y in zip(ma, mb, strict=True)]
            out[("same", metric, part)] = (dot(r, r), [dot(r, x) for x in m], [dot(x, x) for x in m])
            s = 1 / 0.25  # shares (½, ½): ĝ^h = 2 g^h
            out[("cross", metric, part)] = (
                s * dot(ra, rb),
                [s * (dot(ra, y) + dot(rb, x)) / 2 for x, y in zip(ma, mb, strict=True)],
                [s * dot(x, y) for x, y in zip(ma, mb, strict=True)],
            )
    return out


def _check_cross_fit(stats, ref):
    for kind, metric, actual in (
        ("same", "euclid", stats.same_sample),
        ("cross", "euclid", stats.cross_fit),
        ("same", "precond", stats.same_sample_precond),
        ("cross", "precond", stats.cross_fit_precond),
    ):
        rl2, c, v2 = ref[(kind, metric, "main")]
        assert rl2 != 0 and all(abs(x) > 1e-4 for x in c) and all(x != 0 for x in v2), "a trivial reference"
        torch.testing.assert_close(
            torch.tensor([actual.rl_norm2, *actual.c, *actual.v2], dtype=torch.float64),
            torch.tensor([rl2, *c, *v2], dtype=torch.float64),
            rtol=1e-5,
            atol=1e-9,
        )
        if metric == "euclid":
            _, _, mtp_v2 = ref[(kind, metric, "mtp")]
            torch.testing.assert_close(
                torch.tensor(actual.mtp_v2, dtype=torch.float64),
                torch.tensor(mtp_v2, dtype=torch.float64),
                rtol=1e-5,
                atol=1e-9,
            )


def _inverse(state: dict) -> dict:
    """A fixed positive P for every reference parameter element (a stand-in for Adam's 1/(√v̂ + ε))."""
    g = torch.Generator().manual_seed(5)
    return {n: 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in sorted(state.items())}


def _shards(model, params, inverse, num_experts=None, name_of=None):
    """This rank's PreconditionerShard per probe parameter: the reference P sliced like the weights, and
    split over the data-parallel replicas as megatron's distributed optimizer splits its state."""
    from megatron.core import parallel_state as ps

    from nemo_occ.core.diagnostics import PreconditionerShard

    names = {id(p): n for n, p in model.named_parameters()}
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    edp_rank = torch.distributed.get_rank(ps.get_expert_data_parallel_group())
    edp = torch.distributed.get_world_size(ps.get_expert_data_parallel_group())
    out = []
    for pp in params:
        name = names[id(pp.param)]
        source = name_of(name) if name_of else _source_name(name, num_experts)
        full = _shard(pp.param, inverse[source]).reshape(-1)
        size, rank = (edp, edp_rank) if not getattr(pp.param, "allreduce", True) else (dp, dp_rank)
        n = full.numel()
        start, stop = rank * n // size, (rank + 1) * n // size
        out.append(PreconditionerShard(start, stop, full[start:stop], pp.copies // size))
    return out


def _check(stats, ref):
    rl2, c, v2 = ref["main"]
    assert rl2 > 0 and all(abs(x) > 1e-3 for x in c) and all(x > 0 for x in v2), "a trivial reference"
    actual = torch.tensor([stats.rl_norm2, *stats.c, *stats.v2], dtype=torch.float64)
    torch.testing.assert_close(actual, torch.tensor([rl2, *c, *v2], dtype=torch.float64), rtol=1e-5, atol=0)
    _, mtp_c, mtp_v2 = ref["mtp"]
    assert all(x > 0 for x in mtp_v2) and all(x == 0 for x in mtp_c)  # the RL loss does not reach mtp.*
    torch.testing.assert_close(
        torch.tensor(stats.mtp_v2, dtype=torch.float64),
        torch.tensor(mtp_v2, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )
    assert stats.mtp_c == [0.0] * len(mtp_c) and stats.mtp_rl_norm2 == 0.0


def _reference(rank, world, model_kwargs, depths):
    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    ids, pos, weights = _batch(depths)
    init_model_parallel(rank=rank, world_size=world)
    torch.manual_seed(0)
    base = {k: v for k, v in model_kwargs.items() if k != "sequence_parallel"}
    ref = build_tiny_gpt(vocab_size=V, mtp_num_layers=depths, **base)
    out = forward_with_mtp_logprobs(ref, ids, pos, detach_trunk=False)
    reference = _brute_force(ref, _losses(out, weights))
    state = {n: p.detach().clone() for n, p in ref.named_parameters()}
    halves = _half_grads(ref, [_losses(out, weights * IN_A[:, None]), _losses(out, weights * ~IN_A[:, None])])
    reference["cross_fit"] = _brute_force_cross_fit(
        [[{n: g for n, g in grads.items()} for grads in half] for half in halves], _inverse(state)
    )
    return reference, state


def _layout_vs_reference(rank, world, layout: dict, model_kwargs: dict, depths: int):
    from megatron.core import parallel_state as ps

    from nemo_occ.core.diagnostics import exact_cross_fitted_statistics, exact_gradient_statistics
    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs
    from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group

    reference, full_state = _reference(rank, world, model_kwargs, depths)
    ids, pos, weights = _batch(depths)
    init_model_parallel(rank=rank, world_size=world, **layout)
    model = build_tiny_gpt(vocab_size=V, mtp_num_layers=depths, **model_kwargs)
    _load_full(model, full_state, model_kwargs.get("num_experts"))
    # this data-parallel rank's rows of the batch (all of them when DP = 1)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    out = forward_with_mtp_logprobs(model, ids[rows], pos[rows], detach_trunk=False)
    rl, *mtp = _losses(out, weights[:, rows])
    stats = exact_gradient_statistics(rl, mtp, probe_parameters(model), stats_group=probe_statistics_group())
    _check(stats, reference)
    in_a = IN_A[rows][None, :, None]
    (rl_a, *mtp_a), (rl_b, *mtp_b) = (
        _losses(out, weights[:, rows] * in_a),
        _losses(out, weights[:, rows] * ~in_a),
    )
    params = probe_parameters(model)
    shards = _shards(model, params, _inverse(full_state), model_kwargs.get("num_experts"))
    cross = exact_cross_fitted_statistics(
        (rl_a, rl_b), (mtp_a, mtp_b), params, preconditioner=shards, stats_group=probe_statistics_group()
    )
    _check_cross_fit(cross, reference["cross_fit"])
    ps.destroy_model_parallel()


def test_probes_tensor_parallel_2_equal_unsharded():
    run_ranks(_layout_vs_reference, 2, {"tensor_parallel": 2}, {}, 2)


def test_probes_tensor_parallel_2_sequence_parallel_equal_unsharded():
    run_ranks(_layout_vs_reference, 2, {"tensor_parallel": 2}, {"sequence_parallel": True}, 1)


def test_probes_moe_expert_parallel_2_equal_unsharded():
    run_ranks(_layout_vs_reference, 2, {"expert_parallel": 2}, {"num_experts": 4, "moe_router_topk": 2}, 1)


# -- pipeline parallelism: the gradients come from megatron's schedule, one run per loss ------------


def _stage_name(name: str, stage: int, layers: int) -> str:
    """Local decoder layer i of pipeline stage ``stage`` is the reference's layer stage*L/2 + i."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if match is None:
        return name
    return name.replace(match.group(0), f"decoder.layers.{stage * layers // 2 + int(match.group(1))}.", 1)


def _pipeline_vs_reference(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_occ.core.diagnostics import cross_fitted_statistics, gradient_statistics
    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.model_access import unwrap_gpt_model
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs
    from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group

    depths, layers = 1, 2
    kwargs = {"position_embedding_type": "rope", "num_layers": layers}
    reference, full_state = _reference(rank, world, kwargs, depths)
    ids, pos, weights = _batch(depths)
    init_model_parallel(rank=rank, world_size=world, pipeline_parallel=2)
    stage = ps.get_pipeline_model_parallel_rank()
    model = build_tiny_gpt(vocab_size=V, mtp_num_layers=depths, **kwargs)
    gpt = unwrap_gpt_model(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(full_state[_stage_name(name, stage, layers)])
    gpt.config.calculate_per_token_loss = True  # as NeMo-RL: the loss is used as returned

    def gradients_of(which: int, rows: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Run the schedule over the batch (one row per micro-batch) with loss number ``which`` of ``rows``."""
        model.zero_grad(set_to_none=True)

        def forward_step(data_iterator, chunk):
            row = next(data_iterator)
            if not gpt.post_process:
                return chunk(ids[row : row + 1], pos[row : row + 1], None), None
            out = forward_with_mtp_logprobs(chunk, ids[row : row + 1], pos[row : row + 1], detach_trunk=False)
            loss = _losses(out, weights[:, row : row + 1] * (1 if rows is None else rows[row]))[which]
            return loss, lambda output: (output, torch.tensor(1), {"loss": output.detach()})

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(range(B)),
            model=[model],
            num_microbatches=B,
            seq_length=S,
            micro_batch_size=1,
            forward_only=False,
        )
        return [None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad]

    rl = gradients_of(0)
    mtp = [gradients_of(d) for d in range(1, depths + 1)]
    stats = gradient_statistics(rl, mtp, probe_parameters(model), stats_group=probe_statistics_group())
    _check(stats, reference)
    halves = [[gradients_of(w, rows) for w in range(1 + depths)] for rows in (IN_A, ~IN_A)]
    params = probe_parameters(model)
    shards = _shards(
        model, params, _inverse(full_state), name_of=lambda name: _stage_name(name, stage, layers)
    )
    cross = cross_fitted_statistics(
        [h[0] for h in halves], [h[1:] for h in halves], params, preconditioner=shards,
        stats_group=probe_statistics_group(),
    )  # fmt: skip
    _check_cross_fit(cross, reference["cross_fit"])
    ps.destroy_model_parallel()


def test_probes_pipeline_parallel_2_through_megatron_schedule_equal_unsharded():
    run_ranks(_pipeline_vs_reference, 2)
