"""One regime's RL run in the CPU demo: GRPO groups, DAPO clipping and dynamic sampling, OCC.

One RL step, as in the paper's setup (scaled down):
  1. sample ``prompts_per_step`` problems (seeded by (seed, step): identical across regimes);
  2. generate ``samples_per_prompt`` responses each at temperature 1.0 with the model's own
     sampling loop (main head only, MTP block skipped);
  3. verifiable reward, group-normalised advantages (GRPO), DAPO dynamic sampling drops groups
     whose rewards are all equal;
  4. old log-probs of the main head and of every MTP depth in one no-grad forward (θ_old), plus
     the MTP head's top-1 agreement with the sampled token (the draft-acceptance proxy);
  5. ``minibatches`` optimizer updates over the kept groups. Each update runs the production path:
     ``forward_with_mtp_logprobs`` (chunked vocab-parallel log-probs, trunk cut for ``detach``),
     the main head's clipped loss, ``MTPObjective`` for the regime's MTP term, one backward, an
     Adam step, then ``MTPObjective.finish_update`` (OCC: the λ of the next update). Every
     ``fidelity_every`` steps one update (``nemo_occ.core.fidelity.probed_update``) is probed first:
     exact c and v² from the same forward, recorded with that update's proxies in a ``ProbeHistory``.

Determinism: every random draw of step t comes from generators seeded by (seed, t), so a run resumed
from a checkpoint reproduces the uninterrupted run's metrics exactly (on the same machine/threads).

Letters: N sequences, L sequence length, K MTP depths.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_occ.atomic_io import atomic_write
from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.core.diagnostics import exact_gradient_statistics
from nemo_occ.core.fidelity import ProbeHistory, probed_update
from nemo_occ.core.losses import clipped_policy_loss, valid_counts
from nemo_occ.core.objective import MTPObjective
from nemo_occ.demo.checkpoint import load_checkpoint, save_checkpoint
from nemo_occ.demo.config import DemoConfig
from nemo_occ.demo.output import DemoOutputError, regime_fingerprint
from nemo_occ.demo.policy import DemoPolicy
from nemo_occ.demo.task import AdditionTask

__all__ = ["RegimeRun", "finished_run", "regime_progress", "run_regime"]


def _seed(*parts: int) -> int:
    h = 0x9E3779B9
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**62)
    return h


@dataclass
class RegimeRun:
    regime: str
    out_dir: Path
    metrics: list[dict]
    wall_time_s: float
    step_time_s: (
        float  # mean time of an RL step, generation + updates (no eval, no exact-gradient diagnostics)
    )


def _jsonable(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = float(v.detach()) if isinstance(v, torch.Tensor) else v
        out[k] = v if not isinstance(v, float) or math.isfinite(v) else None
    return out


def _read_metrics(path: Path, upto: int) -> list[dict]:
    """Rows of ``path`` up to step ``upto``. Rows are appended before the checkpoint that covers them,
    so a last line cut short by a kill belongs to a step after the checkpoint and is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DemoOutputError(
                    f"{path}, line {i + 1}: not JSON; add --overwrite to start fresh or choose another --out"
                ) from None
    return [r for r in rows if r["step"] <= upto]


def regime_progress(out_dir: Path, fingerprint: dict) -> int:
    """The last checkpointed RL step of the regime in ``out_dir`` (0: nothing to resume)."""
    ckpt = load_checkpoint(out_dir / "checkpoint.pt", fingerprint)
    return 0 if ckpt is None else int(ckpt["step"])


def finished_run(regime: str, out_dir: Path, fingerprint: dict, steps: int) -> RegimeRun | None:
    """The regime's run as its checkpoint and metrics.jsonl recorded it if all ``steps`` are done
    (None otherwise); no model is built."""
    ckpt = load_checkpoint(out_dir / "checkpoint.pt", fingerprint)
    if ckpt is None or ckpt["step"] != steps:
        return None
    times = list(ckpt["step_times"])
    metrics = _read_metrics(out_dir / "metrics.jsonl", ckpt["step"])
    return RegimeRun(regime, out_dir, metrics, ckpt["elapsed"], sum(times) / max(len(times), 1))


def evaluate(policy: DemoPolicy, task: AdditionTask, cfg: DemoConfig, ops: torch.Tensor, step: int) -> float:
    """avg@k: mean over held-out problems of the fraction of k samples that are correct."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, 7, step))
    prompts = task.prompts(ops).repeat_interleave(cfg.eval.samples, dim=0)
    seqs = policy.generate(prompts, task.response_len, cfg.rl.temperature, g)
    rewards = task.rewards(ops.repeat_interleave(cfg.eval.samples, dim=0), seqs[:, task.prompt_len :])
    return float(rewards.view(-1, cfg.eval.samples).mean(dim=1).mean())


def run_regime(
    regime: str,
    cfg: DemoConfig,
    occ_cfg: NemoOCCConfig,
    warm_state: dict,
    out_dir: Path,
    *,
    progress=None,
) -> RegimeRun:
    """Train one regime from the shared warm start, resuming from ``out_dir/checkpoint.pt`` if present."""
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    task = AdditionTask(cfg.task.digits)
    fingerprint = regime_fingerprint(cfg, occ_cfg, regime)
    occ_cfg = occ_cfg.model_copy(update={"regime": regime})
    policy = DemoPolicy.build(cfg, task)
    policy.model.load_state_dict(warm_state)
    optimizer = torch.optim.Adam(policy.model.parameters(), lr=cfg.rl.lr)
    objective = MTPObjective(occ_cfg, cfg.policy_loss)
    probes = ProbeHistory(occ_cfg.num_depths, occ_cfg.fidelity.min_probes)

    metrics_path = out_dir / "metrics.jsonl"
    history: list[dict] = []
    start_step, elapsed, step_times = 1, 0.0, []
    ckpt = load_checkpoint(out_dir / "checkpoint.pt", fingerprint)
    if ckpt is not None:
        policy.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        objective.load_state_dict(ckpt["objective"])
        probes.load_state_dict(ckpt["probes"])
        start_step, elapsed, step_times = ckpt["step"] + 1, ckpt["elapsed"], list(ckpt["step_times"])
        history = _read_metrics(metrics_path, ckpt["step"])  # drop what was logged after the checkpoint
    else:  # no checkpoint yet (same configuration: the output folder checked it): start this regime over
        shutil.rmtree(out_dir / "tb", ignore_errors=True)
    text = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(metrics_path, lambda f: f.write(text.encode()))
    writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_step if ckpt is not None else None)

    eval_ops = task.eval_operands(cfg.eval.problems, cfg.seed)
    P, G = cfg.rl.prompts_per_step, cfg.rl.samples_per_prompt
    lp = task.prompt_len
    resp_mask = task.response_mask(P * G)  # [N, L-1]

    def log(row: dict) -> None:
        row = _jsonable(row)
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, row["step"])

    if start_step == 1:
        log({"step": 0, "eval/accuracy": evaluate(policy, task, cfg, eval_ops, 0)})

    t_run = time.perf_counter() - elapsed
    for step in range(start_step, cfg.rl.steps + 1):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(_seed(cfg.seed, step))
        ops = task.sample_operands(P, g).repeat_interleave(G, dim=0)  # [N, 2]
        prompts = task.prompts(ops)
        seqs = policy.generate(prompts, task.response_len, cfg.rl.temperature, g)  # [N, L]
        rewards = task.rewards(ops, seqs[:, lp:])  # [N]
        grouped = rewards.view(P, G)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
        keep_groups = grouped.std(1) > 0 if cfg.rl.dynamic_sampling else torch.ones(P, dtype=torch.bool)

        with torch.no_grad():
            old = policy.logprobs(seqs, detach_trunk=True, return_top1=True)
        row: dict = {
            "step": step,
            "reward/mean": float(rewards.mean()),
            "rl/kept_groups": int(keep_groups.sum()),
        }
        for k in range(len(old.mtp_logprobs)):
            valid = resp_mask & old.mtp_masks[k]
            row[f"mtp/accuracy_{k + 1}"] = float((old.mtp_top1[k] & valid).sum() / valid.sum().clamp(min=1))
        row["main/accuracy"] = float((old.main_top1 & resp_mask).sum() / resp_mask.sum())

        kept = keep_groups.nonzero().flatten()
        chunks = [c for c in torch.tensor_split(kept, cfg.rl.minibatches) if len(c)]
        fidelity_now = (
            cfg.fidelity_every > 0 and step % cfg.fidelity_every == 0 and objective.regime.objective != "none"
        )
        t_fid = 0.0
        update_rows = []
        for u, groups in enumerate(chunks):
            idx = (groups[:, None] * G + torch.arange(G)).flatten()  # sequences of the kept groups
            mask = resp_mask[idx]
            n_tok, n_seq = valid_counts(mask)
            cur = policy.logprobs(seqs[idx], detach_trunk=not objective.regime.trunk_gradient)
            main_loss, main_m = clipped_policy_loss(
                cur.main_logprobs, old.main_logprobs[idx], adv[idx], mask, cfg.policy_loss,
                global_valid_tokens=n_tok, global_valid_seqs=n_seq,
            )  # fmt: skip
            mtp_loss, mtp_m = objective(
                main_logprobs=cur.main_logprobs, old_logprobs=old.main_logprobs[idx], advantages=adv[idx],
                mask=mask, mtp_logprobs=cur.mtp_logprobs, mtp_masks=cur.mtp_masks,
                mtp_old_logprobs=[o[idx] for o in old.mtp_logprobs],
                global_valid_tokens=n_tok, global_valid_seqs=n_seq,
            )  # fmt: skip
            probed = fidelity_now and u == probed_update(len(chunks))
            if probed:
                tf = time.perf_counter()
                unscaled = [
                    loss
                    for loss, _ in objective.depth_losses(
                        mtp_logprobs=cur.mtp_logprobs,
                        old_logprobs=old.main_logprobs[idx],
                        advantages=adv[idx],
                        mask=mask,
                        mtp_masks=cur.mtp_masks,
                        mtp_old_logprobs=[o[idx] for o in old.mtp_logprobs],
                        global_valid_tokens=n_tok,
                        global_valid_seqs=n_seq,
                    )  # fmt: skip
                ]
                from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group

                exact = exact_gradient_statistics(
                    main_loss, unscaled, probe_parameters(policy.model), stats_group=probe_statistics_group()
                )
                row.update(exact.metrics("exact"))
                t_fid = time.perf_counter() - tf
            optimizer.zero_grad(set_to_none=True)
            (main_loss + mtp_loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                policy.model.parameters(), cfg.rl.grad_clip, error_if_nonfinite=True
            )
            optimizer.step()
            upd = {f"loss/{k}": v for k, v in main_m.items()}
            upd.update(mtp_m)
            # the step's first update runs at θ = θ_old (δ_RL = 0): report it, keep λ
            upd.update(objective.finish_update(refresh=u > 0))
            if probed:  # the probe next to this update's own proxies
                row.update(probes.record_update(upd, exact))
            upd["grad_norm"] = grad_norm
            update_rows.append(_jsonable(upd))
        if update_rows:
            # per-update statistics: λ and the proxies of the step's last update (the λ carried into the
            # next step), losses averaged over the step's updates
            last = update_rows[-1]
            for key in last:
                if key.startswith(("occ/", "proxy/")):
                    row[key] = last[key]
                else:
                    vals = [r[key] for r in update_rows if r.get(key) is not None]
                    row[key] = sum(vals) / len(vals) if vals else None
            for k in range(1, occ_cfg.num_depths + 1):  # mean λ the step's updates actually used
                used = [
                    r.get(f"occ/lambda_applied_{k}", r.get(f"proxy/lambda_applied_{k}")) for r in update_rows
                ]
                used = [x for x in used if x is not None]
                if used:
                    row[f"lambda_applied_mean_{k}"] = sum(used) / len(used)
        row["updates"] = len(update_rows)
        step_time = time.perf_counter() - t0 - t_fid
        step_times.append(step_time)
        row["time/step_s"] = step_time
        if step % cfg.eval.every == 0 or step == cfg.rl.steps:
            row["eval/accuracy"] = evaluate(policy, task, cfg, eval_ops, step)
        log(row)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(regime=regime, reward=f"{row['reward/mean']:.2f}", refresh=False)
        if step % cfg.rl.checkpoint_every == 0 or step == cfg.rl.steps:
            save_checkpoint(
                out_dir / "checkpoint.pt",
                {
                    "step": step,
                    "model": policy.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "objective": objective.state_dict(),
                    "probes": probes.state_dict(),
                    "elapsed": time.perf_counter() - t_run,
                    "step_times": step_times,
                },
                fingerprint,
            )
    writer.close()
    wall = time.perf_counter() - t_run
    return RegimeRun(regime, out_dir, history, wall, sum(step_times) / max(len(step_times), 1))
