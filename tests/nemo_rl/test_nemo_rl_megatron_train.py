"""nemo-occ's MTP capture inside NeMo-RL's own Megatron training step, on real megatron-core (gloo, CPU).

Needs NeMo-RL's code and megatron-core in one interpreter (NeMo-RL's Megatron worker venv, or on CPU:
NeMo-RL's driver venv with a Megatron-LM checkout on ``PYTHONPATH``, see scripts/upstream_check.sh);
skipped otherwise. Megatron-Bridge cannot be imported without Transformer Engine, and NeMo-RL's
``models/megatron`` modules import four of its names at module level only (``ModelProviderMixin``,
``ConfigContainer``, ``GlobalState`` for annotations; ``get_packed_seq_cp_partition_indices`` for context
parallelism, unused here): the spawned ranks give them empty stand-ins, nothing else is replaced.

What runs is NeMo-RL's: ``process_microbatch`` packs three documents of different lengths (THD, each
padded to a multiple of 4 as ``make_sequence_length_divisible_by`` asks under TP2+SP),
``megatron_forward_backward`` runs ``model_forward`` through megatron's schedule, and its
``LossPostProcessor`` (subclassed by nemo-occ's worker exactly as in training) feeds
``SequencePackingLossWrapper`` -> ``prepare_loss_input`` -> nemo-occ's loss on NeMo-RL's
``ClippedPGLossFn``. Checked: the log-probs the loss receives equal each document run alone, unpacked, on
one rank (main head: megatron's full logits, ``log_softmax`` and a gather; MTP: nemo-occ's unpacked path,
itself checked against a brute-force loop in test_megatron_mtp_logprobs.py), and every gradient under
TP=2 + sequence parallelism equals TP=1. RoPE, as GLM-4.5 and MiMo: NeMo-RL passes no position ids
with packed sequences.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")
pytest.importorskip("nemo_rl.algorithms.loss", reason="needs NeMo-RL's loss package (nemo_rl)")

from tests._megatron_dist import run_ranks  # noqa: E402

pytestmark = [pytest.mark.nemo_rl, pytest.mark.distributed, pytest.mark.slow]

V, DEPTHS, PAD = 64, 2, 4
MODEL = dict(vocab_size=V, mtp_num_layers=DEPTHS, position_embedding_type="rope")
LENGTHS = [7, 3, 6]  # real tokens per document; NeMo-RL pads each to a multiple of PAD when packing
WIDTH = max(LENGTHS) + 1  # the micro-batch rows are wider than the longest document
LOSS_CFG = {"reference_policy_kl_penalty": 0.0, "ratio_clip_min": 0.2, "ratio_clip_max": 0.28}


def _install_bridge_stand_in() -> None:
    """Empty stand-ins for the four Megatron-Bridge names NeMo-RL's megatron modules import."""

    def module(name: str, **attrs) -> None:
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod

    def no_context_parallel(*args, **kwargs):
        raise AssertionError("Bridge's context-parallel partitioning is not used with CP=1")

    for name in ("megatron.bridge", "megatron.bridge.models", "megatron.bridge.training"):
        module(name)
    module("megatron.bridge.training.utils")
    module("megatron.bridge.models.model_provider", ModelProviderMixin=type("ModelProviderMixin", (), {}))
    module("megatron.bridge.training.config", ConfigContainer=type("ConfigContainer", (), {}))
    module("megatron.bridge.training.state", GlobalState=type("GlobalState", (), {}))
    module(
        "megatron.bridge.training.utils.packed_seq_utils",
        get_packed_seq_cp_partition_indices=no_context_parallel,
    )


def _micro_batch():
    """NeMo-RL's per-sequence micro-batch: [N, WIDTH] rows, a response mask, advantages, old log-probs."""
    from nemo_rl.distributed.batched_data_dict import BatchedDataDict

    g = torch.Generator().manual_seed(5)
    n = len(LENGTHS)
    ids = torch.zeros(n, WIDTH, dtype=torch.long)
    token_mask = torch.zeros(n, WIDTH)
    for i, length in enumerate(LENGTHS):
        ids[i, :length] = torch.randint(1, V, (length,), generator=g)
        token_mask[i, 1:length] = 1.0  # the first token is the prompt
    prev = -torch.rand(n, WIDTH, generator=g) - 1.0
    return BatchedDataDict(
        {
            "input_ids": ids,
            "input_lengths": torch.tensor(LENGTHS),
            "token_mask": token_mask,
            "sample_mask": torch.ones(n),
            "advantages": torch.randn(n, 1, generator=g).expand(n, WIDTH).clone(),
            "prev_logprobs": prev,
            "generation_logprobs": prev.clone(),
            "reference_policy_logprobs": prev.clone(),
        }
    )


class _RecordingLoss:
    """Records what NeMo-RL hands the loss for each packed document, then calls nemo-occ's loss."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, next_token_logprobs, data, global_valid_seqs, global_valid_toks, **kwargs):
        from nemo_occ.nemo_rl.mtp_batch import mtp_logprobs_key

        mtp = [data[mtp_logprobs_key(d)].detach().clone() for d in range(1, DEPTHS + 1)]
        self.seen.append((next_token_logprobs.detach().clone(), mtp))
        return self.inner(next_token_logprobs, data, global_valid_seqs, global_valid_toks, **kwargs)


def _nemo_rl_train_step(model, data):
    """One micro-batch through NeMo-RL's Megatron training step with nemo-occ's worker pieces in place."""
    from nemo_rl.models.megatron import train as nemo_train
    from nemo_rl.models.megatron.data import ProcessedMicrobatch, process_microbatch

    from nemo_occ.core.config import NemoOCCConfig
    from nemo_occ.megatron.mtp_capture import MTPCapture
    from nemo_occ.nemo_rl.loss import build_loss_fn
    from nemo_occ.nemo_rl.megatron_policy_worker_patches import mtp_loss_post_processor_class
    from nemo_occ.nemo_rl.worker import ModelInputRecorder

    model.zero_grad(set_to_none=True)
    loss_fn = _RecordingLoss(build_loss_fn(LOSS_CFG, NemoOCCConfig(regime="policy", num_depths=DEPTHS)))
    mask = data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)
    processed = process_microbatch(
        data_dict=data,
        seq_length_key="input_lengths",
        pad_individual_seqs_to_multiple_of=PAD,
        pack_sequences=True,
    )
    micro_batch = ProcessedMicrobatch(data_dict=data, **vars(processed))
    with MTPCapture(model, detach_trunk=False) as capture, ModelInputRecorder(model) as inputs:
        post_processor_cls = mtp_loss_post_processor_class(nemo_train.LossPostProcessor, capture, inputs)
        nemo_train.megatron_forward_backward(
            model=model,
            data_iterator=iter([micro_batch]),
            num_microbatches=1,
            seq_length=int(processed.input_ids.shape[1]),
            mbs=1,
            post_processing_fn=post_processor_cls(loss_fn, cfg={"sequence_packing": {"enabled": True}}),
            global_valid_seqs=torch.tensor(float(len(LENGTHS))),
            global_valid_toks=mask.sum(),
        )
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_fn.seen, grads


def _one_document_alone(model, ids):
    """Main [1, L-1] from megatron's full logits; MTP K x [1, L-1] and validity from the unpacked path."""
    from nemo_occ.megatron.mtp_logprobs import forward_main_logits, forward_with_mtp_logprobs

    pos = torch.arange(ids.shape[1])[None]
    logits = forward_main_logits(model, ids, pos)  # [1, L, V]
    main = torch.log_softmax(logits.float(), dim=-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0][None]
    out = forward_with_mtp_logprobs(model, ids, pos, detach_trunk=False)
    return main, out.mtp_logprobs, out.mtp_masks


def _check_against_reference(seen, reference):
    assert len(seen) == len(LENGTHS)  # NeMo-RL's packing wrapper calls the loss once per document
    for (main, mtp), (ref_main, ref_mtp, ref_valid), length in zip(seen, reference, LENGTHS, strict=True):
        torch.testing.assert_close(main[:, : length - 1], ref_main)
        for d in range(DEPTHS):
            valid = ref_valid[d]
            assert valid.sum() == max(length - 1 - (d + 1), 0)  # positions d+1 .. L-2 have a target
            torch.testing.assert_close(mtp[d][:, : length - 1][valid], ref_mtp[d][valid])


def _train_step_vs_reference(rank, world):
    _install_bridge_stand_in()
    from megatron.core import parallel_state as ps

    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from tests.megatron.test_megatron_distributed import _load_full, _shard

    data = _micro_batch()
    init_model_parallel(rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_tiny_gpt(**MODEL)
    full_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = []
    with torch.no_grad():
        for i, length in enumerate(LENGTHS):
            reference.append(_one_document_alone(model, data["input_ids"][i : i + 1, :length]))
    seen, ref_grads = _nemo_rl_train_step(model, data)
    _check_against_reference(seen, reference)

    init_model_parallel(rank=rank, world_size=world, tensor_parallel=2)
    model = build_tiny_gpt(**MODEL, sequence_parallel=True)
    _load_full(model, full_state)
    seen, grads = _nemo_rl_train_step(model, _micro_batch())
    _check_against_reference(seen, reference)
    assert set(grads) == set(ref_grads)
    for name, p in model.named_parameters():
        grad = grads[name]
        if getattr(p, "sequence_parallel", False):  # megatron's finalize_model_grads sums these over TP
            torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        torch.testing.assert_close(grad, _shard(p, ref_grads[name]), msg=lambda m, n=name: f"{n}: {m}")
    ps.destroy_model_parallel()


def test_capture_in_nemo_rls_megatron_train_step_tp2_sp_packed_equals_reference():
    run_ranks(_train_step_vs_reference, 2)
