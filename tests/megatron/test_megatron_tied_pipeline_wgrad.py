"""Tied embeddings + pipeline parallel 2 + fused weight-gradient accumulation equal the unfused reference.

Two gloo processes. Each first builds a single-stage reference (PP=1, tied output weight, no DDP, no
gradient-accumulation fusion, the chunked MTP path with autograd) and takes its gradients by plain
autograd. Then megatron's groups are re-made with PP=2 and the same weights loaded; each stage is wrapped
in megatron-core's ``DistributedDataParallel`` (fp32 ``main_grad``), every linear layer switched to
``gradient_accumulation_fusion`` (on the CPU the kernel is ``_Kernel``'s stand-in), and two micro-batches
run through ``get_forward_backward_func()`` with megatron's ``finalize_model_grads`` as the config's
``finalize_model_grads_func`` (what NeMo-RL's setup installs): at the end of the step it all-reduces the
shared word embedding's ``main_grad`` over the embedding group (first and last stage) and divides by the
token count the loss function reported.

The shared weight gets its gradient from four places: the embedding lookup on the first stage (``.grad``,
added by DDP's hook); on the last stage the output layer (the fused kernel, straight into ``main_grad``),
the MTP layers' own embedding lookup (``.grad``) and the MTP heads' log-probs, taken by the fused path
(``FusedMTPTerm``: the MTP term's gradient computed in forward, the weight's share added into
``main_grad`` there). After the step both stages' copies must hold the reference's gradient, and every
other parameter its reference's. A fused path that dropped its weight gradient, added it twice, or wrote
it where the embedding group's all-reduce does not read fails here.

Megatron by itself would lose one of them: the output layer marks the weight ``grad_added_to_main_grad``
and DDP's hook then skips ``.grad`` unless ``zero_out_wgrad`` is set, which megatron-core (0.16.1 to 0.20)
sets for tied weights at PP = 1 only, so the MTP layers' lookup gradient on the last stage would be
dropped. The log-prob path sets it on that copy (``head_logprobs.keep_lookup_grad_of_tied_copy``); this
test failed without it (embedding gradient on both stages).
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from tests._megatron_dist import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

V, S, LAYERS, DEPTHS, CHUNK = 64, 12, 2, 2, 7
EMBEDDING = "embedding.word_embeddings.weight"


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (2, S), generator=g)
    pos = torch.arange(S).expand(2, S).contiguous()
    weights = torch.rand(1 + DEPTHS, 2, S - 1, generator=g)  # one weight per head, row and position
    return ids, pos, weights


def _reference_name(name: str, stage: int) -> str:
    """Local decoder layer i of pipeline stage ``stage`` is the reference's layer stage*L/2 + i."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if match is None:
        return name
    return name.replace(match.group(0), f"decoder.layers.{stage * LAYERS // 2 + int(match.group(1))}.", 1)


def _main_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, S-1] log p(tok[j+1]) of the main head from megatron's [B, S, V] logits (full vocab, TP = 1)."""
    return torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def _enable_wgrad_fusion(gpt) -> None:
    """What ``gradient_accumulation_fusion=True`` gives each linear layer (the CPU config turns it off)."""
    gpt.config.gradient_accumulation_fusion = True
    for module in gpt.modules():
        if hasattr(module, "gradient_accumulation_fusion"):
            module.gradient_accumulation_fusion = True


class _NoStream:
    """``torch.cuda.current_stream()`` on a CPU: megatron-core 0.20's ``start_grad_sync`` asks for it to wait
    on CUDA-graph replay events, of which a CPU run has none."""

    def wait_event(self, event):
        raise AssertionError("no CUDA events exist on a CPU run")


def _tied_pp2_vs_reference(rank, world):
    # long on purpose: the reference, the two-stage step and the comparison share the batch and weights
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import layers

    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.head_logprobs import FusedMTPTerm
    from nemo_occ.megatron.model_access import unwrap_gpt_model
    from nemo_occ.megatron.mtp_capture import MTPCapture
    from tests.megatron.test_megatron_wgrad_fusion import _Kernel

    if not torch.cuda.is_available():  # this spawned process only
        torch.cuda.current_stream = lambda device=None: _NoStream()
    ids, pos, weights = _batch()
    shape = dict(
        vocab_size=V,
        num_layers=LAYERS,
        mtp_num_layers=DEPTHS,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=True,
    )

    # -- reference: one stage, plain autograd, unfused ----------------------------------------------
    init_model_parallel(rank=rank, world_size=world)
    torch.manual_seed(0)
    ref = build_tiny_gpt(**shape)
    with MTPCapture(ref, detach_trunk=False) as cap:
        logits = ref(ids, pos, None)
        mtp = cap.logprobs(ids, chunk_size=CHUNK)
    loss = (_main_logprobs(logits, ids) * weights[0]).sum()
    for d, (lp, mask) in enumerate(zip(mtp.mtp_logprobs, mtp.mtp_masks, strict=True), start=1):
        loss = loss + (lp * mask * weights[d]).sum()
    loss.backward()
    full_state = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    ps.destroy_model_parallel()

    # -- two stages, DDP main_grad, fused wgrad accumulation, fused MTP path, megatron's finalize ------
    kernel = _Kernel()
    layers.fused_weight_gradient_mlp_cuda = kernel  # this process only (spawned for the test)
    init_model_parallel(rank=rank, world_size=world, pipeline_parallel=2)
    stage = ps.get_pipeline_model_parallel_rank()
    gpt = build_tiny_gpt(**shape)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            source = _reference_name(name, stage)
            if source in full_state:  # the last stage's own output_layer.weight is unused when tied
                p.copy_(full_state[source])
    _enable_wgrad_fusion(gpt)
    gpt.config.calculate_per_token_loss = True  # NeMo-RL's setting: the loss is used as is
    gpt.config.finalize_model_grads_func = finalize_model_grads
    model = DistributedDataParallel(gpt.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)
    assert unwrap_gpt_model(model) is gpt
    shared = gpt.shared_embedding_or_output_weight()
    # Both stages hold a copy of the word embedding (the last one for its MTP layers).
    assert shared is gpt.embedding.word_embeddings.weight
    model.zero_grad_buffer()

    def forward_step(data_iterator, chunk):
        row = next(data_iterator)
        rows = slice(row, row + 1)
        if not gpt.post_process:
            return chunk(ids[rows], pos[rows], None), None  # hidden states to stage 1

        def prepare(depth, valid):  # the MTP term Σ w·lp: dL/dlp = w where valid
            w = weights[depth, rows] * valid
            return lambda b, j, lp: w[b, j]

        with MTPCapture(chunk, detach_trunk=False) as capture:
            out_logits = chunk(ids[rows], pos[rows], None)  # through the real (fused) output layer
            out = capture.logprobs(ids[rows], chunk_size=CHUNK, fused=FusedMTPTerm(prepare=prepare))
        loss = (_main_logprobs(out_logits, ids[rows]) * weights[0, rows]).sum() + out.mtp_carrier
        one_token = torch.tensor(1, dtype=torch.int)  # finalize divides by the sum: 2 micro-batches
        return loss, lambda output: (output, one_token, {"loss": output.detach()})

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(range(2)),
        model=[model],
        num_microbatches=2,
        seq_length=S,
        micro_batch_size=1,
        forward_only=False,
    )

    if stage == 1:
        assert any(t is shared.main_grad for t in kernel.main_grads), "output layer took the unfused path"
    for name, p in gpt.named_parameters():
        expected = ref_grads.get(_reference_name(name, stage))
        got = p.main_grad
        if expected is None:
            assert not got.any(), f"stage {stage} {name}: gradient where the reference has none"
            continue
        expected = expected / 2  # finalize_model_grads: divided by the 2 tokens the loss reported
        torch.testing.assert_close(got, expected, msg=lambda m, n=name: f"stage {stage} {n}: {m}")
    ps.destroy_model_parallel()


def test_tied_pp2_fused_wgrad_and_fused_mtp_equal_unfused_reference():
    run_ranks(_tied_pp2_vs_reference, 2)
