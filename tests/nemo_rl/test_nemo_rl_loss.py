"""The NeMo-RL loss glue on CPU, without NeMo-RL: loss_fn key mapping and the MTP term added on top.

References are written independently of nemo_occ.core: explicit Python loops over tokens.
Letters: B sequences, S tokens per sequence (NeMo-RL's per-token fields), S-1 log-prob positions.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from nemo_occ.core.config import ConfigError, NemoOCCConfig
from nemo_occ.nemo_rl.loss import OCCLossFn
from nemo_occ.nemo_rl.loss_config import check_loss_settings, policy_loss_config
from nemo_occ.nemo_rl.mtp_batch import mtp_correct_key, mtp_logprobs_key, mtp_valid_key
from tests._refs import close_metrics

# -- loss_fn key mapping -------------------------------------------------------------------------


def test_mapping_dapo_keys():
    cfg = policy_loss_config(
        {"ratio_clip_min": 0.2, "ratio_clip_max": 0.28, "ratio_clip_c": 10.0, "token_level_loss": True}
    )
    assert (cfg.ratio_clip_low, cfg.ratio_clip_high, cfg.ratio_clip_c) == (0.2, 0.28, 10.0)
    assert cfg.aggregation == "token_mean" and cfg.importance_ratio == "token"


def test_mapping_gspo_keys():
    cfg = policy_loss_config(
        {
            "ratio_clip_min": 3e-4,
            "ratio_clip_max": 4e-4,
            "token_level_loss": False,
            "sequence_level_importance_ratios": True,
        }
    )
    assert cfg.aggregation == "seq_mean_token_mean" and cfg.importance_ratio == "sequence"
    assert (cfg.ratio_clip_low, cfg.ratio_clip_high) == (3e-4, 4e-4)


def test_mapping_uses_nemo_rl_defaults_for_absent_keys():
    cfg = policy_loss_config({})
    # NeMo-RL's ClippedPGLossConfig: symmetric 0.2, no dual clip, token-level loss.
    assert (cfg.ratio_clip_low, cfg.ratio_clip_high, cfg.ratio_clip_c) == (0.2, 0.2, None)
    assert cfg.aggregation == "token_mean"


def test_mapping_rejects_gspo_with_token_level_loss():
    with pytest.raises(ConfigError, match="token_level_loss: false"):
        policy_loss_config({"sequence_level_importance_ratios": True, "token_level_loss": True})


@pytest.mark.parametrize(
    "key, regime, match",
    [
        ("disable_ppo_ratio", "occ", "disable_ppo_ratio"),
        ("use_cispo", "policy", "use_cispo"),
        ("force_on_policy_ratio", "occ", "identically 0"),
    ],
)
def test_settings_the_mtp_term_cannot_follow_are_rejected(key, regime, match):
    with pytest.raises(ConfigError, match=match):
        check_loss_settings({key: True}, NemoOCCConfig(regime=regime))


def test_ce_regime_accepts_reinforce_settings():
    check_loss_settings({"disable_ppo_ratio": True}, NemoOCCConfig(regime="ce"))


def test_main_head_only_settings_warn():
    with pytest.warns(UserWarning, match="main head only"):
        check_loss_settings(
            {"use_importance_sampling_correction": True, "reference_policy_kl_penalty": 0.01},
            NemoOCCConfig(regime="occ"),
        )


# -- the MTP term on top of a main loss ------------------------------------------------------------


class TokenMeanNLL:
    """A stand-in main loss following NeMo-RL's LossFunction protocol (not NeMo-RL's maths)."""

    loss_type = "token_level"
    input_type = "logprob"
    reference_policy_kl_penalty = 0.0
    force_on_policy_ratio = False

    def __call__(self, next_token_logprobs, data, global_valid_seqs, global_valid_toks):
        mask = data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)
        loss = -(next_token_logprobs * mask).sum() / global_valid_toks
        return loss, {"loss": loss.item()}


def _batch(B=3, S=9, K=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    token_mask = torch.zeros(B, S)
    for b in range(B):  # prompt of 1-2 tokens, then a response of varying length
        start, end = 1 + b % 2, S - b
        token_mask[b, start:end] = 1.0
    data = {
        "token_mask": token_mask,
        "sample_mask": torch.tensor([1.0] * (B - 1) + [0.0 if B > 2 else 1.0]),
        "prev_logprobs": -torch.rand(B, S, generator=g) * 2,
        "advantages": torch.randn(B, 1, generator=g).expand(B, S).clone(),
        "input_ids": torch.randint(0, 50, (B, S), generator=g),
    }
    main = (-torch.rand(B, S - 1, generator=g) * 2).requires_grad_()
    for d in range(1, K + 1):
        data[mtp_logprobs_key(d)] = (-torch.rand(B, S - 1, generator=g) * 3).requires_grad_()
        data[mtp_correct_key(d)] = torch.rand(B, S - 1, generator=g) > 0.5
    return main, data


def _local_tokens(data):
    return float((data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)).sum())


def _ref_clipped_token_mean(lp, old, adv, mask, low, high, n_tok):
    """Σ_valid max(-A r, -A clip(r)) / n_tok with explicit loops; r = exp(lp - old)."""
    total = 0.0
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            if mask[b][t]:
                r = math.exp(lp[b][t] - old[b][t])
                a = adv[b][t]
                total += max(-a * r, -a * min(max(r, 1 - low), 1 + high))
    return total / n_tok


def _ref_mask(data, depth, width):
    """Main mask & 'position j >= depth' (the first depth positions of a row have no MTP value)."""
    out = []
    for b in range(data["token_mask"].shape[0]):
        row = []
        for j in range(width):
            row.append(bool(data["token_mask"][b, j + 1] and data["sample_mask"][b] and j >= depth))
        out.append(row)
    return out


def _loss(regime="policy", coef=0.1, num_depths=1, **loss_fn):
    occ = (
        NemoOCCConfig(regime=regime, coef=coef, num_depths=num_depths)
        if regime in ("ce", "policy", "detach")
        else NemoOCCConfig(regime=regime, num_depths=num_depths)
    )
    return OCCLossFn(TokenMeanNLL(), occ, policy_loss_config({"ratio_clip_max": 0.28, **loss_fn}))


def test_regime_none_returns_the_main_loss_unchanged():
    main_lp, data = _batch()
    del data[mtp_logprobs_key(1)]  # regime none never asks for MTP log-probs
    fn = _loss(regime="none")
    loss, metrics = fn(main_lp, data, torch.tensor(2.0), torch.tensor(_local_tokens(data)))
    ref, ref_metrics = TokenMeanNLL()(main_lp, data, torch.tensor(2.0), torch.tensor(_local_tokens(data)))
    assert torch.equal(loss, ref) and metrics == ref_metrics


def test_policy_regime_adds_coef_times_clipped_mtp_loss():
    main_lp, data = _batch()
    fn = _loss(regime="policy", coef=0.1)
    n_tok = _local_tokens(data) + 4.0  # the global batch has more tokens than this micro-batch
    loss, metrics = fn(main_lp, data, torch.tensor(2.0), torch.tensor(n_tok))
    main_only, _ = TokenMeanNLL()(main_lp, data, torch.tensor(2.0), torch.tensor(n_tok))
    width = main_lp.shape[1]
    ref = _ref_clipped_token_mean(
        data[mtp_logprobs_key(1)].tolist(),
        data["prev_logprobs"][:, 1:].tolist(),
        data["advantages"][:, 1:].tolist(),
        _ref_mask(data, 1, width),
        0.2,
        0.28,
        n_tok,
    )
    torch.testing.assert_close((loss - main_only).item(), 0.1 * ref)
    assert metrics["loss"] == pytest.approx(main_only.item())  # NeMo-RL's "loss" stays the main head's
    assert metrics["mtp/loss_1"] == pytest.approx(ref)
    loss.backward()
    assert data[mtp_logprobs_key(1)].grad is not None and data[mtp_logprobs_key(1)].grad.abs().sum() > 0


def test_valid_fraction_is_divided_by_global_tokens_and_acceptance_is_counted():
    fn = _loss(regime="ce")
    hits = valid = 0
    for seed in (0, 1):  # two micro-batches: the counts add up until popped
        main_lp, data = _batch(seed=seed)
        n_tok = _local_tokens(data) + 2.0
        _, metrics = fn(main_lp, data, torch.tensor(2.0), torch.tensor(n_tok))
        width = main_lp.shape[1]
        mask = _ref_mask(data, 1, width)
        valid_mb = 0
        for b in range(len(mask)):
            for j in range(width):
                if mask[b][j]:
                    valid_mb += 1
                    hits += bool(data[mtp_correct_key(1)][b, j])
        valid += valid_mb
        assert metrics["mtp/valid_fraction_1"] == pytest.approx(valid_mb / n_tok)
        assert "mtp/accuracy_1" not in metrics  # its denominator is global: the worker reports it
    assert pickle.loads(pickle.dumps(fn)).pop_acceptance_counts() is None  # not shipped to workers
    assert fn.pop_acceptance_counts().tolist() == [[hits, valid]]
    assert fn.pop_acceptance_counts() is None


def test_explicit_validity_masks_out_positions():
    main_lp, data = _batch()
    data[mtp_valid_key(1)] = torch.zeros_like(main_lp, dtype=torch.bool)  # nothing valid
    fn = _loss(regime="ce")
    _, metrics = fn(main_lp, data, torch.tensor(2.0), torch.tensor(_local_tokens(data)))
    assert metrics["mtp/loss_1"] == 0.0 and metrics["mtp/valid_fraction_1"] == 0.0


def test_missing_mtp_logprobs_says_how_to_launch():
    main_lp, data = _batch()
    del data[mtp_logprobs_key(1)]
    with pytest.raises(ValueError, match="nemo_occ.nemo_rl.run_grpo"):
        _loss(regime="occ")(main_lp, data, torch.tensor(2.0), torch.tensor(_local_tokens(data)))


def test_two_microbatches_sum_to_the_full_batch_and_give_the_same_lambda():
    main_lp, data = _batch(B=4, S=10, seed=3)
    n_tok = (data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)).sum()
    n_seq = data["sample_mask"].sum()

    whole = _loss(regime="occ")
    whole.objective.calibrator._lambdas = [0.7]  # a λ from a previous update
    loss_whole, _ = whole(main_lp, data, n_seq, n_tok)
    lam_whole = close_metrics(whole.objective)["occ/lambda_1"]

    split = _loss(regime="occ")
    split.objective.calibrator._lambdas = [0.7]
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: v[rows] for k, v in data.items()}
        loss_part, _ = split(main_lp[rows], part, n_seq, n_tok)
        total = total + loss_part
    lam_split = close_metrics(split.objective)["occ/lambda_1"]
    torch.testing.assert_close(total, loss_whole)
    assert lam_split == pytest.approx(lam_whole)


def test_pickled_copy_keeps_config_and_drops_calibrator_state():
    fn = _loss(regime="occ")
    fn.objective.calibrator._lambdas = [0.3]
    copy = pickle.loads(pickle.dumps(fn))
    assert copy.nemo_occ_cfg == fn.nemo_occ_cfg and copy.policy_cfg == fn.policy_cfg
    assert copy._objective is None  # the worker binds its persistent objective
    persistent = fn.objective
    copy.bind_objective(persistent)
    assert copy.objective.coefficients() == [0.3]


def test_bind_rejects_an_objective_of_another_config():
    fn = _loss(regime="occ")
    other = _loss(regime="policy").objective
    with pytest.raises(ValueError, match="different nemo_occ config"):
        fn.bind_objective(other)


def test_unknown_attributes_come_from_the_main_loss():
    fn = _loss(regime="occ")
    assert fn.reference_policy_kl_penalty == 0.0 and fn.force_on_policy_ratio is False
    assert fn.loss_type == "token_level" and fn.input_type == "logprob"
    with pytest.raises(AttributeError):
        fn.no_such_attribute  # noqa: B018


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_a_batch_the_acceptance_count_refuses_leaves_the_calibrator_unchanged():
    fn = _loss(regime="occ")
    main_lp, data = _batch(seed=0)
    fn(main_lp, data, torch.tensor(2.0), torch.tensor(_local_tokens(data)))  # one good micro-batch first
    before = copy.deepcopy(fn.objective.state_dict())
    counts = fn.pop_acceptance_counts()
    _, bad = _batch(seed=1)
    bad[mtp_correct_key(1)] = torch.ones(4, main_lp.shape[1], dtype=torch.bool)  # 4 rows for a batch of 3
    with pytest.raises(ValueError, match="arg-max hits"):
        fn(main_lp, bad, torch.tensor(2.0), torch.tensor(_local_tokens(bad)))
    assert _same_state(fn.objective.state_dict(), before)  # the bad batch's statistics were not recorded
    assert fn.pop_acceptance_counts() is None and counts is not None


def test_our_metrics_cost_one_device_to_host_copy_per_micro_batch():
    # Each .item()/.tolist() stalls the GPU stream; loss.py's own reads are counted (core and the main
    # loss stand-in are not this test's concern).
    import sys

    fn = _loss("policy", num_depths=2)
    lp, data = _batch(K=2)
    n_seq, n_tok = torch.tensor(3.0), torch.tensor(_local_tokens(data) + 2.0)
    reads = []
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__bool__")}

    def counting(name):
        def method(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("nemo_rl/loss.py"):
                reads.append(name)
            return saved[name](self, *args, **kwargs)

        return method

    for name in saved:
        setattr(torch.Tensor, name, counting(name))
    try:
        _, metrics = fn(lp, data, n_seq, n_tok)
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
    assert len(reads) == 1, reads
    assert all(isinstance(v, float) for k, v in metrics.items() if k.startswith("mtp/"))
