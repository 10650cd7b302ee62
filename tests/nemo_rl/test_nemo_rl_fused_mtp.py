"""The fused MTP path end to end on a megatron-core GPT with two MTP depths: NeMo-RL's loss protocol.

Unfused reference: MTP log-probs with autograd -> ``OCCLossFn`` -> backward. Fused: the same loss with
``fused_mtp_term`` built from the micro-batch before the log-probs, the log-probs detached, the carrier
added. Every parameter's gradient, the loss value and its metrics must agree; the settings whose
gradient is not known in forward take the unfused path with one warning.

Letters: B sequences, S tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.core.config import NemoOCCConfig  # noqa: E402
from nemo_occ.lab.tiny_gpt import build_tiny_gpt  # noqa: E402
from nemo_occ.megatron.mtp_capture import MTPCapture  # noqa: E402
from nemo_occ.nemo_rl.fused_mtp import MTP_CARRIER_KEY, fused_mtp_term  # noqa: E402
from nemo_occ.nemo_rl.loss import OCCLossFn  # noqa: E402
from nemo_occ.nemo_rl.loss_config import policy_loss_config  # noqa: E402
from nemo_occ.nemo_rl.mtp_batch import attach_mtp_to_batch  # noqa: E402

B, S, V = 3, 12, 64


class _TokenMeanNLL:
    """A stand-in main loss with NeMo-RL's LossFunction protocol (not NeMo-RL's maths)."""

    loss_type = "token_level"
    input_type = "logprob"
    force_on_policy_ratio = False

    def __call__(self, next_token_logprobs, data, global_valid_seqs, global_valid_toks):
        mask = data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)
        return -(next_token_logprobs * mask).sum() / global_valid_toks, {}


@pytest.fixture(scope="module")
def gpt(single_rank):
    torch.manual_seed(0)
    return build_tiny_gpt(vocab_size=V, hidden_size=32, num_attention_heads=4, mtp_num_layers=2)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    token_mask = torch.zeros(B, S)
    for b in range(B):
        token_mask[b, 1 + b % 2 : S - b] = 1.0
    return {
        "input_ids": torch.randint(0, V, (B, S), generator=g),
        "token_mask": token_mask,
        "sample_mask": torch.tensor([1.0, 1.0, 0.0]),
        "prev_logprobs": -torch.rand(B, S, generator=g) * 5,
        "advantages": torch.randn(B, 1, generator=g).expand(B, S).clone(),
    }


def _loss_fn(regime, **loss_cfg):
    # occ: a signed λ before any statistics (lagged timing: the λ of the update being trained)
    extra = {"coef": 0.3} if regime != "occ" else {"occ": {"initial_lambda": -0.45}}
    occ = NemoOCCConfig(regime=regime, num_depths=2, **extra)
    return OCCLossFn(_TokenMeanNLL(), occ, policy_loss_config({"ratio_clip_max": 0.28, **loss_cfg}))


def _step(gpt, fn, data, *, fused):
    """One micro-batch as the post-processor and the loss run it; every parameter's gradient."""
    gpt.zero_grad(set_to_none=True)
    data = dict(data)
    ids = data["input_ids"]
    pos = torch.arange(S).expand(B, S)
    g_seq, g_tok = torch.tensor(4.0), torch.tensor(40.0)
    with MTPCapture(gpt, detach_trunk=False) as cap:
        logits = gpt(ids, pos, None)
        term = fused_mtp_term(fn, data, g_seq, g_tok, fp16=False, packed=False, cp_size=1) if fused else None
        mtp = cap.take().logprobs(ids, fused=term, return_top1=True)
    attach_mtp_to_batch(data, mtp, None)
    if mtp.mtp_carrier is not None:
        data[MTP_CARRIER_KEY] = mtp.mtp_carrier
    main_lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss, metrics = fn(main_lp, data, g_seq, g_tok)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads, term


@pytest.mark.parametrize(
    ("regime", "loss_cfg"),
    [
        ("policy", {}),
        ("policy", {"ratio_clip_c": 3.0}),
        ("policy", {"token_level_loss": False}),
        ("occ", {}),
        ("ce", {}),
    ],
    ids=["policy", "dual-clip", "seq-mean", "occ-lagged", "ce"],
)
def test_fused_equals_unfused_through_the_nemo_rl_loss(gpt, regime, loss_cfg):
    data = _data(seed=1)
    ref_loss, ref_metrics, ref_grads, _ = _step(gpt, _loss_fn(regime, **loss_cfg), data, fused=False)
    loss, metrics, grads, term = _step(gpt, _loss_fn(regime, **loss_cfg), data, fused=True)
    assert term is not None
    torch.testing.assert_close(loss, ref_loss)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m, n=name: f"{n}: {m}")
    main_only = _step(gpt, _loss_fn("none"), data, fused=False)[2]
    assert (grads["output_layer.weight"] - main_only["output_layer.weight"]).abs().max() > 1e-6  # an MTP term


@pytest.mark.parametrize(
    ("regime", "loss_cfg", "kwargs", "reason"),
    [
        (
            "policy",
            {"sequence_level_importance_ratios": True, "token_level_loss": False},
            {},
            "sequence ratio",
        ),
        ("policy", {}, {"fp16": True}, "fp16"),
        ("policy", {}, {"packed": True}, "packed"),
        ("policy", {}, {"cp_size": 2}, "context parallelism"),
    ],
)
def test_unknowable_gradients_fall_back_with_one_warning(regime, loss_cfg, kwargs, reason):
    from nemo_occ.nemo_rl import fused_mtp

    fused_mtp._WARNED.clear()
    args = {"fp16": False, "packed": False, "cp_size": 1, **kwargs}
    fn = _loss_fn(regime, **loss_cfg)
    with pytest.warns(UserWarning, match=reason):
        assert fused_mtp_term(fn, _data(), 4.0, 40.0, **args) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_mtp_term(fn, _data(), 4.0, 40.0, **args) is None  # once per reason


def test_microbatch_timing_and_probes_fall_back():
    from nemo_occ.nemo_rl import fused_mtp

    fused_mtp._WARNED.clear()
    occ = NemoOCCConfig(regime="occ", num_depths=2, occ={"timing": "microbatch"})
    fn = OCCLossFn(_TokenMeanNLL(), occ, policy_loss_config({}))
    with pytest.warns(UserWarning, match="microbatch"):
        assert fused_mtp_term(fn, _data(), 4.0, 40.0, fp16=False, packed=False, cp_size=1) is None
    fn = _loss_fn("policy")
    with fn.probing(1):
        assert fused_mtp_term(fn, _data(), 4.0, 40.0, fp16=False, packed=False, cp_size=1) is None
