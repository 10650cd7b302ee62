"""Supervised warm start shared by every regime: cross-entropy on the reference answers for the
main head and for every MTP depth, so that RL starts from a policy with room to improve and MTP heads
that are useful drafters (as a pretrained MTP model would be). Built once per configuration and cached.

A fixed number of SFT steps (``WarmStartConfig.steps``), so every machine runs the same protocol; then one
measurement on fresh training problems at the rollout temperature (pass rate, each MTP depth's top-1
agreement with the sampled tokens), reported against the targets the step count was chosen for. (Stopping
at the first check inside the targets made the protocol machine-dependent: floating-point kernels differ
by CPU, so another machine stopped 100-200 steps earlier and started RL from another model.)

Letters: N sequences, L sequence length, K MTP depths.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from nemo_occ.core.losses import cross_entropy_loss, valid_counts
from nemo_occ.lab.demo.checkpoint import load_checkpoint, save_checkpoint
from nemo_occ.lab.demo.config import DemoConfig, WarmStartConfig
from nemo_occ.lab.demo.policy import DemoPolicy
from nemo_occ.lab.demo.task import AdditionTask

__all__ = ["gate", "gate_message", "warm_start"]


def gate(cfg: WarmStartConfig, pass_rate: float, agreements: list[float]) -> str:
    """``"within"`` (pass rate within ``cfg.pass_rate`` and every depth's agreement >= ``cfg.mtp_agreement``),
    ``"outside"`` (a target missed) or ``"none"`` (no targets set: a smoke run)."""
    if cfg.pass_rate is None and cfg.mtp_agreement is None:
        return "none"
    ok = True
    if cfg.pass_rate is not None:
        low, high = cfg.pass_rate
        ok = low <= pass_rate <= high
    if cfg.mtp_agreement is not None:
        ok = ok and all(a >= cfg.mtp_agreement for a in agreements)
    return "within" if ok else "outside"


def gate_message(metrics: dict, cfg: WarmStartConfig) -> str:
    """One line on the warm start: its steps, what it measured, and how that compares with the targets."""
    steps = int(metrics["warm_start/steps"])
    agree = ", ".join(
        f"{v:.2f}" for k, v in sorted(metrics.items()) if k.startswith("warm_start/mtp_agreement_")
    )
    measured = f"pass rate {metrics['warm_start/pass_rate']:.2f}, MTP agreement {agree}"
    verdict = metrics["warm_start/gate"]
    if verdict == "none":
        return f"warm start: {steps} SFT steps ({measured}; a smoke run: no targets)"
    wanted = []
    if cfg.pass_rate is not None:
        wanted.append(f"pass rate {cfg.pass_rate[0]:g}-{cfg.pass_rate[1]:g}")
    if cfg.mtp_agreement is not None:
        wanted.append(f"MTP agreement >= {cfg.mtp_agreement:g}")
    wanted = "targets: " + ", ".join(wanted)
    if verdict == "within":
        return f"warm start: {steps} SFT steps, within its targets ({measured}; {wanted})"
    return (
        f"warm start: {steps} SFT steps, OUTSIDE its targets ({measured}; {wanted}); RL starts from this model "
        "anyway, so the paper's starting conditions do not hold: change demo.warm_start (steps, mtp_coef) or the task"
    )


def warm_start(cfg: DemoConfig, path: Path, *, progress=None) -> tuple[dict, dict]:
    """(model state, metrics) after the fixed SFT steps; cached at ``path``.

    Metrics: ``warm_start/steps``, ``warm_start/gate`` ("within", "outside" or "none"), the final measurement's
    ``warm_start/pass_rate`` and ``warm_start/mtp_agreement_k``, final ``main_ce`` / ``mtp_ce_k``, ``wall_s``.
    """
    ws = cfg.warm_start
    fingerprint = {"seed": cfg.seed, "model": cfg.model.model_dump(), "task": cfg.task.model_dump(),
                   "warm_start": ws.model_dump(), "temperature": cfg.rl.temperature}  # fmt: skip
    cached = load_checkpoint(path, fingerprint)
    if cached is not None:
        return cached["model"], cached["metrics"]
    task = AdditionTask(cfg.task.digits)
    policy = DemoPolicy.build(cfg, task)
    opt = torch.optim.Adam(policy.model.parameters(), lr=ws.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    check_g = torch.Generator().manual_seed(cfg.seed + 2)  # its own stream: the check never shifts the data
    mask = task.response_mask(ws.batch_size)  # only the answer is predictable
    n_tok, _ = valid_counts(mask)
    metrics: dict = {}
    t0 = time.perf_counter()
    for _ in range(ws.steps):
        seqs = task.sequences(task.sample_operands(ws.batch_size, g))
        out = policy.logprobs(seqs, detach_trunk=False)
        loss, m = cross_entropy_loss(out.main_logprobs, mask, global_valid_tokens=n_tok)
        for k, lp in enumerate(out.mtp_logprobs):
            mtp_ce, _ = cross_entropy_loss(lp, mask & out.mtp_masks[k], global_valid_tokens=n_tok)
            loss = loss + ws.mtp_coef * mtp_ce
            metrics[f"warm_start/mtp_ce_{k + 1}"] = float(mtp_ce.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        metrics["warm_start/main_ce"] = float(m["loss"])
        if progress is not None:
            progress.update(1)
    pass_rate, agreements = _check(policy, task, ws.check_problems, cfg.rl.temperature, check_g)
    metrics["warm_start/pass_rate"] = pass_rate
    metrics.update({f"warm_start/mtp_agreement_{k + 1}": a for k, a in enumerate(agreements)})
    metrics["warm_start/steps"] = ws.steps
    metrics["warm_start/gate"] = gate(ws, pass_rate, agreements)
    metrics["warm_start/wall_s"] = time.perf_counter() - t0
    state = policy.model.state_dict()
    save_checkpoint(path, {"model": state, "metrics": metrics}, fingerprint)
    return state, metrics


def _check(
    policy: DemoPolicy, task: AdditionTask, n: int, temperature: float, g: torch.Generator
) -> tuple[float, list[float]]:
    """(pass rate, per-depth MTP top-1 agreement) on ``n`` fresh training problems, one sample each,
    measured as the RL step measures ``reward/mean`` and ``train/mtp/accuracy_k``."""
    ops = task.sample_operands(n, g)
    seqs = policy.generate(task.prompts(ops), task.response_len, temperature, g)  # [N, L]
    pass_rate = float(task.rewards(ops, seqs[:, task.prompt_len :]).mean())
    with torch.no_grad():
        out = policy.logprobs(seqs, detach_trunk=True, return_top1=True)
    mask = task.response_mask(n)
    agreements = []
    for hits, valid in zip(out.mtp_top1, out.mtp_masks, strict=True):
        valid = mask & valid
        agreements.append(float((hits & valid).sum() / valid.sum().clamp(min=1)))
    return pass_rate, agreements
