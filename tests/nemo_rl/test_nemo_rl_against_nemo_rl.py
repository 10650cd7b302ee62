"""Our loss against NeMo-RL's real code (``nemo_rl.algorithms.loss``), on CPU.

Runs where NeMo-RL's loss package imports (its container, or a checkout on PYTHONPATH with its light
dependencies; see docs/nemo_rl.md); skipped otherwise. The reference for the MTP term is NeMo-RL's own
``ClippedPGLossFn`` evaluated on the MTP log-probs with the MTP validity folded into ``token_mask``, so
the test shows that the MTP term clips, aggregates and normalises exactly like NeMo-RL's main loss.

Letters: B sequences, S tokens, V vocabulary.
"""

from __future__ import annotations

import pickle

import pytest
import torch

pytestmark = pytest.mark.nemo_rl
nemo_loss = pytest.importorskip("nemo_rl.algorithms.loss", reason="needs NeMo-RL's loss package (nemo_rl)")

from nemo_occ.core.config import NemoOCCConfig  # noqa: E402
from nemo_occ.nemo_rl.loss import build_loss_fn  # noqa: E402
from nemo_occ.nemo_rl.mtp_batch import mtp_logprobs_key, mtp_valid_key  # noqa: E402

DAPO = {
    "reference_policy_kl_penalty": 0.0,
    "ratio_clip_min": 0.2,
    "ratio_clip_max": 0.28,
    "ratio_clip_c": 3.0,
}
GSPO = {
    "reference_policy_kl_penalty": 0.0,
    "ratio_clip_min": 3e-4,
    "ratio_clip_max": 4e-4,
    "token_level_loss": False,
    "sequence_level_importance_ratios": True,
}
GRPO_KL = {"reference_policy_kl_penalty": 0.01, "ratio_clip_min": 0.2, "ratio_clip_max": 0.2}


def _data(B=3, S=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    token_mask = torch.zeros(B, S)
    for b in range(B):
        token_mask[b, 1 + b % 2 : S - b] = 1.0
    prev = -torch.rand(B, S, generator=g) * 2
    data = {
        "input_ids": torch.randint(0, 17, (B, S), generator=g),
        "token_mask": token_mask,
        "sample_mask": torch.ones(B),
        "advantages": torch.randn(B, 1, generator=g).expand(B, S).clone(),
        "prev_logprobs": prev,
        "generation_logprobs": prev + 0.01 * torch.randn(B, S, generator=g),
        "reference_policy_logprobs": prev + 0.1 * torch.randn(B, S, generator=g),
    }
    main = (prev[:, 1:] + 0.3 * torch.randn(B, S - 1, generator=g)).requires_grad_()
    mtp = (prev[:, 1:] + 0.5 * torch.randn(B, S - 1, generator=g)).requires_grad_()
    data[mtp_logprobs_key(1)] = mtp
    return main, mtp, data


def _counts(data):
    mask = data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)
    return torch.tensor(float(data["sample_mask"].sum())), mask.sum()


def _nemo(cfg):
    return nemo_loss.ClippedPGLossFn(nemo_loss.ClippedPGLossConfig(**cfg))


@pytest.mark.parametrize("cfg", [DAPO, GSPO, GRPO_KL], ids=["dapo", "gspo", "grpo-kl"])
def test_regime_none_reproduces_nemo_rl_exactly(cfg):
    main, _, data = _data()
    n_seq, n_tok = _counts(data)
    ours = build_loss_fn(cfg, NemoOCCConfig(regime="none"))
    loss, metrics = ours(main, data, n_seq, n_tok)
    ref, ref_metrics = _nemo(cfg)(main, data, n_seq, n_tok)
    assert torch.equal(loss, ref)
    assert metrics == ref_metrics
    assert ours.loss_type == _nemo(cfg).loss_type and ours.input_type == nemo_loss.ClippedPGLossFn.input_type


@pytest.mark.parametrize("cfg", [DAPO, GSPO], ids=["dapo", "gspo"])
def test_policy_regime_adds_exactly_coef_times_nemo_rls_loss_on_the_mtp_head(cfg):
    main, mtp, data = _data(seed=1)
    n_seq, n_tok = _counts(data)
    ours = build_loss_fn(cfg, NemoOCCConfig(regime="policy", coef=0.1))
    total, metrics = ours(main, data, n_seq, n_tok)
    main_ref, _ = _nemo(cfg)(main, data, n_seq, n_tok)

    # NeMo-RL's loss on the MTP log-probs: same old log-probs, MTP validity (j >= 1) folded into the mask.
    mtp_data = dict(data)
    mtp_data["token_mask"] = data["token_mask"].clone()
    mtp_data["token_mask"][:, 1] = 0.0  # position j = 0 of the [B, S-1] log-probs has no depth-1 value
    mtp_ref, _ = _nemo({**cfg, "reference_policy_kl_penalty": 0.0})(mtp, mtp_data, n_seq, n_tok)

    torch.testing.assert_close(total - main_ref, 0.1 * mtp_ref)
    assert metrics["mtp/loss_1"] == pytest.approx(mtp_ref.item(), rel=1e-5)
    g_ours = torch.autograd.grad(total, mtp)[0]
    g_ref = torch.autograd.grad(0.1 * mtp_ref, mtp)[0]
    torch.testing.assert_close(g_ours, g_ref)


def test_explicit_mtp_validity_is_honoured_like_a_token_mask():
    main, mtp, data = _data(seed=2)
    n_seq, n_tok = _counts(data)
    valid = torch.ones_like(mtp, dtype=torch.bool)
    valid[:, :3] = False
    data[mtp_valid_key(1)] = valid
    ours = build_loss_fn(DAPO, NemoOCCConfig(regime="policy", coef=0.5))
    total, _ = ours(main, data, n_seq, n_tok)
    main_ref, _ = _nemo(DAPO)(main, data, n_seq, n_tok)
    mtp_data = dict(data)
    mtp_data["token_mask"] = data["token_mask"].clone()
    mtp_data["token_mask"][:, 1:4] = 0.0
    mtp_ref, _ = _nemo(DAPO)(mtp, mtp_data, n_seq, n_tok)
    torch.testing.assert_close(total - main_ref, 0.5 * mtp_ref)


def test_through_nemo_rls_input_preparation_and_sequence_packing_wrapper(monkeypatch):
    """Logits -> NeMo-RL's prepare_loss_input -> our loss; packed per-sequence wrapper == unpacked batch."""
    from functools import partial

    if not torch.cuda.is_available():  # NeMo-RL moves the target ids with a bare .cuda()
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)

    from nemo_rl.algorithms.loss import (
        SequencePackingLossWrapper,
        prepare_loss_input,
        wrap_loss_fn_with_input_preparation,
    )
    from nemo_rl.distributed.batched_data_dict import BatchedDataDict

    B, S, V = 3, 10, 17
    _, _, raw = _data(B=B, S=S, seed=3)
    logits = torch.randn(B, S, V, generator=torch.Generator().manual_seed(4))
    data = BatchedDataDict({k: v.detach() if torch.is_tensor(v) else v for k, v in raw.items()})
    data["input_lengths"] = torch.full((B,), S)
    n_seq, n_tok = _counts(data)
    ours = build_loss_fn(DAPO, NemoOCCConfig(regime="occ"))
    ours.objective.calibrator._lambdas = [0.4]  # a λ from an earlier update

    unpacked, _ = wrap_loss_fn_with_input_preparation(
        logits, data, n_seq, n_tok, loss_fn=ours, prepare_fn=prepare_loss_input
    )
    packed_logits = logits.reshape(1, B * S, V)  # documents back to back, no padding
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    wrapper = SequencePackingLossWrapper(
        ours, partial(prepare_loss_input), cu_seqlens_q=cu, cu_seqlens_q_padded=cu
    )
    packed, packed_metrics = wrapper(packed_logits, data, n_seq, n_tok)
    torch.testing.assert_close(packed, unpacked)
    assert packed_metrics["mtp/loss_1"] != 0.0


def test_built_loss_pickles_with_nemo_rls_main_loss():
    ours = build_loss_fn(GSPO, NemoOCCConfig(regime="occ"))
    copy = pickle.loads(pickle.dumps(ours))
    assert copy.loss_type == ours.loss_type and copy.sequence_level_importance_ratios is True
    assert copy._objective is None
    names = copy.metric_normalizations
    assert names["mtp/loss_1"].value == "sequences"  # GSPO: per sequence
    assert names["mtp/valid_fraction_1"].value == "tokens"
    upstream = getattr(nemo_loss.interfaces, "MetricNormalizer", None)  # NeMo-RL #2683, after v0.7.0
    if upstream is not None:
        assert type(names["mtp/loss_1"]) is upstream  # NeMo-RL's own enum, compared by identity there
        assert names["probs_ratio"] is upstream.TOKENS  # NeMo-RL's own kept
    else:  # v0.7.0: ClippedPGLossFn names no denominators, and no trainer reads the table
        assert not hasattr(ours.main_loss, "metric_normalizations")


def _split(data, parts):
    """The batch's micro-batches, as NeMo-RL's trainer cuts it (rows in order)."""
    B = data["token_mask"].shape[0]
    bounds = [round(i * B / parts) for i in range(parts + 1)]
    return [
        {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in data.items()}
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


@pytest.mark.parametrize("cfg", [DAPO, GSPO], ids=["dapo", "gspo"])
def test_mtp_metrics_reduce_over_micro_batches_like_the_whole_batch(cfg):
    """The MTP metrics of a step are there and reduced right on the installed NeMo-RL (v0.7.0 and main).

    NeMo-RL's synchronous trainer, the one nemo-occ runs, hands every micro-batch the step's global
    denominators and sums the per-micro-batch metrics (grpo.py): the sum must be the whole batch's value.
    ``metric_normalizations`` must name the denominator each metric is really divided by: doubling the
    token count halves exactly the metrics it names ``tokens`` and leaves the ``sequences`` ones alone.
    """
    main, _, data = _data(B=4, S=12, seed=5)
    data = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in data.items()}
    main = main.detach()
    n_seq, n_tok = _counts(data)
    whole = build_loss_fn(cfg, NemoOCCConfig(regime="policy", coef=0.2))
    _, whole_metrics = whole(main, data, n_seq, n_tok)
    mtp_keys = [k for k in whole_metrics if k.startswith("mtp/")]
    assert {"mtp/loss_1", "mtp/loss_scaled", "mtp/valid_fraction_1"} <= set(mtp_keys)
    assert all(whole_metrics[k] != 0.0 for k in ("mtp/loss_1", "mtp/valid_fraction_1"))

    synchronous = build_loss_fn(cfg, NemoOCCConfig(regime="policy", coef=0.2))
    summed: dict[str, float] = {}
    rows = 0
    for part in _split(data, 3):
        b = part["token_mask"].shape[0]
        _, m = synchronous(main[rows : rows + b], part, n_seq, n_tok)
        rows += b
        for k in mtp_keys:
            summed[k] = summed.get(k, 0.0) + m[k]
    assert rows == main.shape[0]
    for k in mtp_keys:
        assert summed[k] == pytest.approx(whole_metrics[k], rel=1e-5), k

    _, doubled = build_loss_fn(cfg, NemoOCCConfig(regime="policy", coef=0.2))(main, data, n_seq, 2 * n_tok)
    kinds = {k: whole.metric_normalizations[k].value for k in mtp_keys}
    assert set(kinds.values()) <= {"tokens", "sequences"}
    for k, kind in kinds.items():
        expected = whole_metrics[k] / 2 if kind == "tokens" else whole_metrics[k]
        assert doubled[k] == pytest.approx(expected, rel=1e-5), (k, kind)
