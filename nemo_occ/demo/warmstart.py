"""Supervised warm start shared by every regime: cross-entropy on the reference answers for the
main head and for every MTP depth, so that RL starts from a non-zero pass rate and the MTP heads
start as useful drafters (as a pretrained MTP model would). Built once per configuration and cached.

Letters: N sequences, L sequence length.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from nemo_occ.core.losses import cross_entropy_loss, valid_counts
from nemo_occ.demo.checkpoint import load_checkpoint, save_checkpoint
from nemo_occ.demo.config import DemoConfig
from nemo_occ.demo.policy import DemoPolicy
from nemo_occ.demo.task import AdditionTask

__all__ = ["warm_start"]


def warm_start(cfg: DemoConfig, path: Path, *, progress=None) -> tuple[dict, dict]:
    """(model state, metrics) after ``cfg.warm_start.steps`` SFT steps; cached at ``path``."""
    fingerprint = {"seed": cfg.seed, "model": cfg.model.model_dump(), "task": cfg.task.model_dump(),
                   "warm_start": cfg.warm_start.model_dump()}  # fmt: skip
    cached = load_checkpoint(path, fingerprint)
    if cached is not None:
        return cached["model"], cached["metrics"]
    task = AdditionTask(cfg.task.digits)
    policy = DemoPolicy.build(cfg, task)
    opt = torch.optim.Adam(policy.model.parameters(), lr=cfg.warm_start.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    mask = task.response_mask(cfg.warm_start.batch_size)  # only the answer is predictable
    n_tok, _ = valid_counts(mask)
    metrics: dict = {}
    t0 = time.perf_counter()
    for _ in range(cfg.warm_start.steps):
        seqs = task.sequences(task.sample_operands(cfg.warm_start.batch_size, g))
        out = policy.logprobs(seqs, detach_trunk=False)
        loss, m = cross_entropy_loss(out.main_logprobs, mask, global_valid_tokens=n_tok)
        for k, lp in enumerate(out.mtp_logprobs):
            mtp_ce, _ = cross_entropy_loss(lp, mask & out.mtp_masks[k], global_valid_tokens=n_tok)
            loss = loss + cfg.warm_start.mtp_coef * mtp_ce
            metrics[f"warm_start/mtp_ce_{k + 1}"] = float(mtp_ce.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        metrics["warm_start/main_ce"] = float(m["loss"])
        if progress is not None:
            progress.update(1)
    metrics["warm_start/wall_s"] = time.perf_counter() - t0
    state = policy.model.state_dict()
    save_checkpoint(path, {"model": state, "metrics": metrics}, fingerprint)
    return state, metrics
