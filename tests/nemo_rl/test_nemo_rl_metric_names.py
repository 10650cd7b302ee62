"""Metric names: the table in docs/nemo_rl.md section 4 is the one place they are documented, and it
matches what the loss and the calibrator emit, mapped the way NeMo-RL's grpo_train logs them; recipe
comments and the docs name only documented metrics.

Mapping (NeMo-RL ``grpo_train``): loss metrics reach ``train/<key>`` through ``all_mb_metrics``; the
worker's per-update and per-step metrics reach ``train/mtp/<key>`` through ``mtp_metrics``. The
nemo_rl-marked test reads those lines in NeMo-RL's source.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.core.diagnostics import ExactStatistics, GradientStatistics
from nemo_occ.core.fidelity import ProbeHistory
from nemo_occ.core.metrics import step_metrics
from nemo_occ.nemo_rl.loss import OCCLossFn
from nemo_occ.nemo_rl.loss_config import policy_loss_config
from nemo_occ.nemo_rl.mtp_batch import mtp_correct_key, mtp_logprobs_key, mtp_old_logprobs_key
from nemo_occ.nemo_rl.worker import OCCWorkerExtension

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "nemo_rl.md"
NAME = re.compile(r"`((?:train|validation)/[^`\s]*[^`\s/])`")  # a name, not a bare prefix like `train/mtp/`


def _documented() -> dict[str, str]:
    text = DOC.read_text()
    section = text[text.index("## 4. Metrics") : text.index("## 5.")]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `train/"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == 3 and cells[1] and cells[2], f"row needs meaning and reduction: {line}"
            for name in NAME.findall(cells[0]):
                rows[name] = cells[2]
    return rows


class _MainLoss:
    """A stand-in for NeMo-RL's main loss (its own metrics are NeMo-RL's, not ours)."""

    loss_type = "token_level"
    input_type = "logprob"

    def __call__(self, next_token_logprobs, data, global_valid_seqs, global_valid_toks):
        loss = -next_token_logprobs.sum() / global_valid_toks
        return loss, {"loss": loss.item()}


class _SingleProcessWorker(OCCWorkerExtension):
    """The worker's own metric code (``acceptance_over_ranks``) without a model: one process, no group."""

    def __init__(self):
        pass

    def occ_reduction_group(self):
        return None


def _probe_metrics() -> dict[str, float]:
    """What the worker adds on a probe step once enough probes exist for every statistic to be defined."""
    history = ProbeHistory(num_depths=1, window=4, min_windows=2)
    metrics = {}
    for i in range(8):
        same = GradientStatistics(c=[(-1.0) ** i * (i + 1)], v2=[2.0 + i * i], rl_norm2=3.0 + i,
                                  mtp_c=[0.0], mtp_v2=[1.0 + i])  # fmt: skip
        cross = GradientStatistics(
            c=[(-1.0) ** i * i], v2=[1.0 + i], rl_norm2=1.0 + i, mtp_c=[0.0], mtp_v2=[i]
        )
        exact = ExactStatistics(same, cross, same, cross)  # with the preconditioned pair
        metrics = history.record(
            c_hat=[0.5 * i - 1], v2_hat=[1.0 + i], tokens=[10.0], lambdas=[0.1], exact=exact
        )
    return metrics


def _emitted(regime: str) -> set[str]:
    """Logged names of one update under ``regime``: loss metrics + the calibrator's per-update metrics."""
    torch.manual_seed(0)
    B, S = 2, 6
    occ = NemoOCCConfig(regime=regime, monitor_proxies=True)
    fn = OCCLossFn(_MainLoss(), occ, policy_loss_config({}))
    data = {
        "token_mask": torch.ones(B, S),
        "sample_mask": torch.ones(B),
        "prev_logprobs": -torch.rand(B, S),
        "advantages": torch.randn(B, S),
        "input_ids": torch.randint(0, 9, (B, S)),
        mtp_logprobs_key(1): -torch.rand(B, S - 1),
        mtp_correct_key(1): torch.rand(B, S - 1) > 0.5,
        mtp_old_logprobs_key(1): -torch.rand(B, S),  # captured with prev_logprobs: the head-gap metrics
    }
    _, loss_metrics = fn(-torch.rand(B, S - 1), data, torch.tensor(2.0), torch.tensor(float(B * (S - 1))))
    update = fn.objective.close_update()
    acceptance = _SingleProcessWorker().acceptance_over_ranks(fn.pop_acceptance_counts())
    logged = step_metrics([update], acceptance)  # what the worker passes as mtp_metrics, per step
    names = {f"train/{k}" for k in loss_metrics if k.startswith("mtp/")}  # all_mb_metrics -> train/<key>
    names |= {f"train/mtp/{k}" for k in logged}  # mtp_metrics -> train/mtp/<key>
    names |= {f"train/mtp/{k}" for k in _probe_metrics()}  # a probe step's, also in mtp_metrics
    return {re.sub(r"_1$", "_<d>", n) for n in names}


@pytest.mark.parametrize("regime", ["occ", "policy", "ce", "detach"])
def test_every_emitted_metric_is_documented(regime):
    documented = set(_documented())
    for name in _emitted(regime):
        assert name.replace("/proxy/", "/occ/") in documented, f"{name} is logged but not in docs/nemo_rl.md"
    if regime != "occ":
        assert "train/mtp/proxy/<name>" in documented


def test_every_documented_metric_of_ours_is_emitted():
    ours = set(_emitted("occ")) | {n.replace("/proxy/", "/occ/") for n in _emitted("policy")}
    documented = {n for n in _documented() if n != "train/mtp/proxy/<name>"}
    assert documented == ours


def test_recipes_and_docs_name_only_documented_metrics():
    documented = set(_documented())
    nemo_rl_own = {"train/loss", "validation/accuracy", "train/vllm/spec_acceptance_rate",
                   "train/vllm/spec_acceptance_length", "train/vllm/spec_acceptance_rate-pos-<i>"}  # fmt: skip
    texts = [*(ROOT / "recipes").rglob("*.yaml"), DOC, ROOT / "README.md"]
    for path in texts:
        for name in NAME.findall(path.read_text()) + re.findall(
            r"\b((?:train|validation)(?:/[\w<>-]+)+)(?![\w<>/-])", path.read_text()
        ):
            name = re.sub(r"_\d+$", "_<d>", name)
            if name.endswith("/<name>"):  # the proxy row refers to the occ rows as a family
                continue
            assert name in documented or name in nemo_rl_own, (
                f"{path.name}: {name} is not a documented metric"
            )
    for path in (ROOT / "recipes").rglob("*.yaml"):  # bare names without NeMo-RL's prefix would mislead
        assert not re.search(r"(?<![\w/])(?:mtp|vllm|occ)/\w", path.read_text()), path.name


@pytest.mark.nemo_rl
def test_nemo_rl_logs_loss_and_mtp_metrics_under_train_as_assumed():
    from nemo_occ.nemo_rl.recipes import find_nemo_rl_root

    root = find_nemo_rl_root()
    if root is None:
        pytest.skip("no NeMo-RL source tree (set NEMO_RL_ROOT)")
    grpo = (root / "nemo_rl" / "algorithms" / "grpo.py").read_text()
    assert '{f"mtp/{k}": v for k, v in train_results["mtp_metrics"].items()}' in grpo
    assert 'metrics.update(train_results["all_mb_metrics"])' in grpo
    assert 'logger.log_metrics(metrics, total_steps + 1, prefix="train")' in grpo
    worker = (root / "nemo_rl" / "models" / "policy" / "workers" / "megatron_policy_worker.py").read_text()
    assert "loss_metrics[k] = x[k] / num_global_batches" in worker
