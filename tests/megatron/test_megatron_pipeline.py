"""Pipeline parallelism 2 through megatron's own 1F1B schedule (gloo, CPU) equals one stage.

Two processes. Each first builds a single-stage reference (PP=1) and takes its log-probs and gradients
by plain autograd; then megatron's groups are re-made with PP=2, the same weights are loaded (stage s
holds decoder layers s*L/2 ... of the reference, the last stage the MTP block, the output layer and
megatron's copy of the word embedding that the MTP layers read), and two micro-batches run through
``get_forward_backward_func()`` (the schedule NeMo-RL's worker calls), with the activations and their
gradients crossing the stages by megatron's p2p communication. MTP runs on the last stage only.

Checked: the last stage's main and MTP log-probs equal the reference's; every parameter's gradient on
either stage equals the reference's, the word embedding's as the sum of its two copies (what megatron's
``finalize_model_grads`` all-reduces across the embedding group); under ``detach`` the last stage's
embedding copy gets no gradient and the trunk gets only the main head's. RoPE, as GLM-4.5 and MiMo.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from tests._megatron_dist import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

V, S, LAYERS, DEPTHS = 64, 12, 2, 2


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, S), generator=g)
    pos = torch.arange(S).expand(2, S).contiguous()
    weights = torch.rand(1 + DEPTHS, 2, S - 1, generator=g)  # one weight per head, row and position
    return ids, pos, weights


def _loss(out, weights) -> torch.Tensor:
    """sum_heads sum_positions w * logprob: distinct weights so every gradient path is exercised."""
    loss = (out.main_logprobs * weights[0]).sum()
    for d, lp in enumerate(out.mtp_logprobs, start=1):
        loss = loss + (lp * weights[d]).sum()
    return loss


def _reference_name(name: str, stage: int) -> str:
    """Local decoder layer i of pipeline stage ``stage`` is the reference's layer stage*L/2 + i."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if match is None:
        return name
    return name.replace(match.group(0), f"decoder.layers.{stage * LAYERS // 2 + int(match.group(1))}.", 1)


def _pipeline_vs_reference(rank, world, detach: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.model_access import unwrap_gpt_model
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    ids, pos, weights = _batch()
    shape = dict(vocab_size=V, num_layers=LAYERS, mtp_num_layers=DEPTHS, position_embedding_type="rope")

    # -- reference: one stage, plain autograd ------------------------------------------------------
    init_model_parallel(rank=rank, world_size=world)
    torch.manual_seed(0)
    ref = build_tiny_gpt(**shape)
    ref_out = forward_with_mtp_logprobs(ref, ids, pos, detach_trunk=detach)
    _loss(ref_out, weights).backward()
    full_state = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}

    # -- two stages through megatron's schedule -----------------------------------------------------
    init_model_parallel(rank=rank, world_size=world, pipeline_parallel=2)
    stage = ps.get_pipeline_model_parallel_rank()
    model = build_tiny_gpt(**shape)
    gpt = unwrap_gpt_model(model)
    assert gpt.mtp_process == (stage == 1) and gpt.post_process == (stage == 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(full_state[_reference_name(name, stage)])
    # NeMo-RL's worker sets this: the loss function's value is used as is, not divided per micro-batch.
    gpt.config.calculate_per_token_loss = True

    outputs = []

    def forward_step(data_iterator, chunk):
        row = next(data_iterator)
        if not gpt.post_process:
            return chunk(ids[row : row + 1], pos[row : row + 1], None), None  # hidden states to stage 1
        out = forward_with_mtp_logprobs(chunk, ids[row : row + 1], pos[row : row + 1], detach_trunk=detach)
        outputs.append(out)
        loss = _loss(out, weights[:, row : row + 1])
        return loss, lambda output: (output, torch.tensor(1), {"loss": output.detach()})

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
        torch.testing.assert_close(torch.cat([o.main_logprobs for o in outputs]), ref_out.main_logprobs)
        for d in range(DEPTHS):
            torch.testing.assert_close(
                torch.cat([o.mtp_logprobs[d] for o in outputs]), ref_out.mtp_logprobs[d]
            )
            assert torch.equal(torch.cat([o.mtp_masks[d] for o in outputs]), ref_out.mtp_masks[d])

    embedding = gpt.embedding.word_embeddings.weight
    copy_grad = embedding.grad if embedding.grad is not None else torch.zeros_like(embedding)
    if stage == 1 and detach:
        assert not copy_grad.any(), "detach: the MTP layers' embedding must not train the word embedding"
    summed = copy_grad.clone()
    torch.distributed.all_reduce(summed, group=ps.get_embedding_group())
    for name, p in model.named_parameters():
        source = _reference_name(name, stage)
        grad = summed if p is embedding else p.grad
        expected = ref_grads.get(source)
        if expected is None:
            assert grad is None or not grad.any(), f"{name}: gradient where the reference has none"
        else:
            torch.testing.assert_close(grad, expected, msg=lambda m, n=name: f"stage {stage} {n}: {m}")
    ps.destroy_model_parallel()


@pytest.mark.parametrize("detach", [False, True], ids=["joint", "detach"])
def test_pipeline_parallel_2_through_megatron_schedule_equals_1(detach):
    run_ranks(_pipeline_vs_reference, 2, detach)
