"""MTP log-probs under megatron-core's distributed optimizer with ``overlap_param_gather`` (its own hooks).

DDP all-gathers updated parameters bucket by bucket; each module's forward pre-hook waits for its
bucket. The log-probs read the output weight outside ``output_layer.forward``: both ways of computing
them must leave no all-gather pending (a pending one means the weight was read stale, and megatron-core
asserts at the next step's ``start_param_sync``). One bucket per parameter (``bucket_size=1``), so the
output weight's gather is its own. gloo, world of one.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.lab.tiny_gpt import build_tiny_gpt  # noqa: E402
from nemo_occ.megatron.mtp_capture import MTPCapture  # noqa: E402
from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs  # noqa: E402

V = 64


def _ddp(tied):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    torch.manual_seed(0)
    gpt = build_tiny_gpt(
        vocab_size=V,
        hidden_size=32,
        num_attention_heads=4,
        mtp_num_layers=1,
        share_embeddings_and_output_weights=tied,
    )
    cfg = DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_param_gather=True, overlap_grad_reduce=True, bucket_size=1
    )
    return gpt, DistributedDataParallel(gpt.config, cfg, gpt)


def _pending(gpt, model):
    names = {p: n for n, p in gpt.named_parameters()}
    return [names[p] for g in model.bucket_groups if g.param_gather_handle is not None for p in g.params]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("path", ["forward_with_mtp_logprobs", "capture"])
def test_no_parameter_all_gather_left_pending(single_rank, tied, path):
    gpt, model = _ddp(tied)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 10), generator=g)
    pos = torch.arange(10).expand(2, 10).contiguous()
    for _ in range(2):  # the second step's start_param_sync asserts on a handle the first left pending
        model.start_param_sync()
        if path == "capture":  # NeMo-RL's way: its own forward (output layer included), MTP captured
            with MTPCapture(model, detach_trunk=False) as cap:
                model(ids, pos, None)
                cap.logprobs(ids)
        else:  # the package's own forward: stops before the output layer, main head by the chunked path
            forward_with_mtp_logprobs(model, ids, pos, detach_trunk=False)
        assert _pending(gpt, model) == []
