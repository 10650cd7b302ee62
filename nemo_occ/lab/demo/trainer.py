"""One regime's RL run in the CPU demo: GRPO groups, DAPO clipping and dynamic sampling, OCC.

One RL step, as in the paper's setup (scaled down):
  1. sample ``prompts_per_step`` problems (seeded by (seed, step): identical across regimes);
  2. generate ``samples_per_prompt`` responses each at temperature 1.0 with the model's own
     sampling loop (main head only, MTP block skipped);
  3. verifiable reward, group-normalised advantages (GRPO), DAPO dynamic sampling drops groups
     whose rewards are all equal;
  4. old log-probs of the main head and of every MTP depth in one no-grad forward (θ_old);
  5. ``minibatches`` optimizer updates over the kept groups. Each update runs the production path:
     ``forward_with_mtp_logprobs`` (chunked vocab-parallel log-probs, trunk cut for ``detach``, the
     MTP heads' arg-max hits for the draft-acceptance proxy), the main head's clipped loss,
     ``MTPObjective`` for the regime's MTP term, a backward in two passes (RL part, then MTP term, so
     the MTP term's share of the update is measured), the gradient clip, an Adam step, then
     ``MTPObjective.close_update`` (OCC: the λ of the next update). Every ``fidelity_every`` steps one
     update (``nemo_occ.core.fidelity.probed_update``) is probed first: exact c and v² from the same
     forward, recorded with that update's proxies in a ``ProbeHistory``, and the cosine between the RL
     gradients of its minibatch's two halves;
  6. the step's row: the updates reduced by the metrics contract (``nemo_occ.core.metrics``) plus
     this demo's own per-update metrics (losses, ``grad_norm``, ``update/*``) averaged over them.

Determinism: every random draw of step t comes from generators seeded by (seed, t), so a run resumed
from a checkpoint reproduces the uninterrupted run's metrics exactly (on the same machine/threads).

Letters: N sequences, L sequence length, K MTP depths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nemo_occ.atomic_io import atomic_write
from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.core.diagnostics import exact_cross_fitted_statistics, gradient_statistics, half_masks
from nemo_occ.core.fidelity import ProbeHistory, probed_update, refresh_lambda_from_probe
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.losses import clipped_policy_loss, valid_counts
from nemo_occ.core.metrics import (
    UpdateStatistics,
    acceptance_counts,
    logged_name,
    metric_rule,
    reduce_values,
    step_metrics,
)
from nemo_occ.core.objective import MTPObjective
from nemo_occ.core.preconditioner import adam_preconditioner
from nemo_occ.lab.demo.checkpoint import load_checkpoint, save_checkpoint
from nemo_occ.lab.demo.config import DemoConfig
from nemo_occ.lab.demo.output import DemoOutputError, regime_fingerprint
from nemo_occ.lab.demo.policy import DemoPolicy
from nemo_occ.lab.demo.task import AdditionTask

if TYPE_CHECKING:
    from nemo_occ.megatron.mtp_logprobs import ModelLogProbs

__all__ = [
    "RegimeRun",
    "clip_gradients",
    "Rollout",
    "finished_run",
    "step_row",
    "regime_progress",
    "rollout",
    "run_regime",
]


def _seed(*parts: int) -> int:
    h = 0x9E3779B9
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**62)
    return h


def clip_gradients(model: torch.nn.Module, clip: float, scope: str) -> torch.Tensor:
    """Clip ``model``'s gradients to norm ``clip`` (``RLConfig.clip_scope``) and return the norm reported as
    ``grad_norm``: the global one, or with ``separate`` the main model's, the one that decides whether the RL
    gradient was scaled (``mtp.*`` is then clipped by its own norm)."""
    if scope == "global":
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip, error_if_nonfinite=True)
    parts: dict[str, list] = {"main": [], "mtp": []}
    for name, param in model.named_parameters():
        parts["mtp" if name.startswith("mtp.") else "main"].append(param)
    norm = torch.nn.utils.clip_grad_norm_(parts["main"], clip, error_if_nonfinite=True)
    if parts["mtp"]:
        torch.nn.utils.clip_grad_norm_(parts["mtp"], clip, error_if_nonfinite=True)
    return norm


@dataclass
class RegimeRun:
    """A finished regime as its output folder recorded it."""

    metrics: list[dict]
    wall_time_s: float
    step_time_s: (
        float  # mean time of an RL step, generation + updates (no eval, no exact-gradient probes; with the
        # two-pass backward of every MTP update that measures update/mtp_share)
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


def finished_run(out_dir: Path, fingerprint: dict, steps: int) -> RegimeRun | None:
    """The regime's run as its checkpoint and metrics.jsonl recorded it if all ``steps`` are done
    (None otherwise); no model is built."""
    ckpt = load_checkpoint(out_dir / "checkpoint.pt", fingerprint)
    if ckpt is None or ckpt["step"] != steps:
        return None
    times = list(ckpt["step_times"])
    metrics = _read_metrics(out_dir / "metrics.jsonl", ckpt["step"])
    return RegimeRun(metrics, ckpt["elapsed"], sum(times) / max(len(times), 1))


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
    nemo_occ_cfg: NemoOCCConfig,
    warm_state: dict,
    out_dir: Path,
    *,
    progress=None,
) -> None:
    """Train one regime from the shared warm start, resuming from ``out_dir/checkpoint.pt`` if present;
    :func:`finished_run` reads the result back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    task = AdditionTask(cfg.task.digits)
    trainer = _Trainer.build(regime, cfg, nemo_occ_cfg, task, warm_state)
    fingerprint = regime_fingerprint(cfg, nemo_occ_cfg, regime)
    start_step, elapsed, step_times, history = trainer.resume(out_dir, fingerprint)
    log = _MetricsLog(out_dir, history, purge_step=start_step if start_step > 1 else None)
    eval_ops = task.eval_operands(cfg.eval.problems, cfg.seed)
    if start_step == 1:
        log.write({"step": 0, "eval/accuracy": evaluate(trainer.policy, task, cfg, eval_ops, 0)})

    t_run = time.perf_counter() - elapsed
    for step in range(start_step, cfg.rl.steps + 1):
        t0 = time.perf_counter()
        batch = rollout(trainer.policy, task, cfg, step)
        row = {"step": step, **batch.metrics()}
        updates = trainer.train_step(batch, probe=_probe_due(cfg, trainer.objective, step))
        row.update(step_row(updates))
        # the probes' extra backward passes are not training
        step_time = time.perf_counter() - t0 - sum(u.probe_seconds for u in updates)
        step_times.append(step_time)
        row["time/step_s"] = step_time
        if step % cfg.eval.every == 0 or step == cfg.rl.steps:
            row["eval/accuracy"] = evaluate(trainer.policy, task, cfg, eval_ops, step)
        log.write(row)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(regime=regime, reward=f"{row['reward/mean']:.2f}", refresh=False)
        if step % cfg.rl.checkpoint_every == 0 or step == cfg.rl.steps:
            trainer.checkpoint(out_dir, fingerprint, step, time.perf_counter() - t_run, step_times)
    log.close()


# -- rollout -------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One RL step's samples, rewards and old log-probs (θ_old); P prompts x G samples = N sequences."""

    seqs: torch.Tensor  # [N, L]
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N] group-normalised (GRPO)
    keep_groups: torch.Tensor  # [P] bool: groups kept by dynamic sampling
    old: ModelLogProbs  # main and per-depth MTP log-probs at θ_old, with top-1 hits
    mask: torch.Tensor  # [N, L-1] response tokens
    group_size: int

    def metrics(self) -> dict:
        """Reward, kept groups, and the main head's top-1 agreement with the sampled tokens at θ_old (the
        MTP heads' agreement, ``train/mtp/accuracy_k``, comes from the updates' training forwards:
        ``step_row``)."""
        return {
            "reward/mean": float(self.rewards.mean()),
            "rl/kept_groups": int(self.keep_groups.sum()),
            "main/accuracy": float((self.old.main_top1 & self.mask).sum() / self.mask.sum()),
        }

    def minibatches(self, count: int) -> list[torch.Tensor]:
        """Sequence indices of each minibatch: the kept groups split into ``count`` (non-empty) parts."""
        kept = self.keep_groups.nonzero().flatten()
        G = self.group_size
        return [
            (c[:, None] * G + torch.arange(G)).flatten() for c in torch.tensor_split(kept, count) if len(c)
        ]


def rollout(policy: DemoPolicy, task: AdditionTask, cfg: DemoConfig, step: int) -> Rollout:
    """Sample step ``step``'s problems and responses (seeded by (seed, step)), score them, and take the
    old log-probs of every head in one no-grad forward."""
    P, G = cfg.rl.prompts_per_step, cfg.rl.samples_per_prompt
    g = torch.Generator().manual_seed(_seed(cfg.seed, step))
    ops = task.sample_operands(P, g).repeat_interleave(G, dim=0)  # [N, 2]
    seqs = policy.generate(task.prompts(ops), task.response_len, cfg.rl.temperature, g)  # [N, L]
    rewards = task.rewards(ops, seqs[:, task.prompt_len :])  # [N]
    grouped = rewards.view(P, G)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
    keep_groups = grouped.std(1) > 0 if cfg.rl.dynamic_sampling else torch.ones(P, dtype=torch.bool)
    with torch.no_grad():
        old = policy.logprobs(seqs, detach_trunk=True, return_top1=True)
    return Rollout(seqs, rewards, adv, keep_groups, old, task.response_mask(P * G), G)


# -- updates -------------------------------------------------------------------------------------------


@dataclass
class UpdateResult:
    """What one optimizer update reports."""

    metrics: dict  # losses, grad_norm, update/* (this demo's own per-update metrics)
    statistics: UpdateStatistics | None  # the OCC statistics (MTPObjective.close_update); None: regime none
    acceptance: torch.Tensor  # [K, 2] (arg-max hits, tokens) of its training forward
    probed: dict  # exact/* and fidelity/* when this update was probed, else {}
    probe_seconds: float  # time spent on the probe's extra backward passes


def _probe_due(cfg: DemoConfig, objective: MTPObjective, step: int) -> bool:
    return cfg.fidelity_every > 0 and step % cfg.fidelity_every == 0 and objective.regime.has_mtp_term


@dataclass
class _Trainer:
    """A regime's model, optimizer, MTP objective and probe history: what a checkpoint holds."""

    cfg: DemoConfig
    policy: DemoPolicy
    optimizer: torch.optim.Optimizer
    objective: MTPObjective
    probes: ProbeHistory
    params: list  # ProbeParameter of every trainable tensor; part "main" = the main model (paper's c, v²)
    stats_group: object  # the process group the probes' scalars are summed over

    @classmethod
    def build(
        cls, regime: str, cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, task: AdditionTask, warm_state: dict
    ) -> _Trainer:
        nemo_occ_cfg = nemo_occ_cfg.model_copy(update={"regime": regime})
        policy = DemoPolicy.build(cfg, task)
        policy.model.load_state_dict(warm_state)
        optimizer = torch.optim.Adam(policy.model.parameters(), lr=cfg.rl.lr)
        objective = MTPObjective(nemo_occ_cfg, cfg.policy_loss)
        probes = ProbeHistory.from_config(nemo_occ_cfg.num_depths, nemo_occ_cfg.fidelity)
        from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group

        params = probe_parameters(policy.model)
        return cls(cfg, policy, optimizer, objective, probes, params, probe_statistics_group())

    def train_step(self, batch: Rollout, *, probe: bool) -> list[UpdateResult]:
        """The step's optimizer updates over the kept groups, in order.

        The first update runs at θ = θ_old (δ_RL = 0): it is reported but does not refresh λ.
        With ``probe``, update ``probed_update(n)`` is probed first (exact c, v² from the same forward).
        """
        chunks = batch.minibatches(self.cfg.rl.minibatches)
        probed_at = probed_update(len(chunks)) if probe and chunks else -1
        return [self.update(batch, idx, refresh=u > 0, probe=u == probed_at) for u, idx in enumerate(chunks)]

    def update(self, batch: Rollout, idx: torch.Tensor, *, refresh: bool, probe: bool) -> UpdateResult:
        """One optimizer update on sequences ``idx`` through the production path."""
        mask = batch.mask[idx]
        n_tok, n_seq = valid_counts(mask)
        cur = self.policy.logprobs(
            batch.seqs[idx], detach_trunk=not self.objective.regime.trunk_gradient, return_top1=True
        )
        # draft acceptance at θ over the update's loss tokens with a depth-k target (the metrics contract)
        acceptance = acceptance_counts(cur.mtp_top1, [mask & m for m in cur.mtp_masks])
        inputs = TokenInputs(
            main_logprobs=cur.main_logprobs, old_logprobs=batch.old.main_logprobs[idx], advantages=batch.advantages[idx], mask=mask,
            mtp_logprobs=cur.mtp_logprobs, mtp_masks=cur.mtp_masks,
            mtp_old_logprobs=[o[idx] for o in batch.old.mtp_logprobs],
            global_valid_tokens=n_tok, global_valid_seqs=n_seq,
        )  # fmt: skip
        main_loss, main_m = clipped_policy_loss(
            cur.main_logprobs, inputs.old_logprobs, inputs.advantages, mask, self.cfg.policy_loss,
            global_valid_tokens=n_tok, global_valid_seqs=n_seq,
        )  # fmt: skip
        mtp_loss, mtp_m = self.objective(inputs)
        exact, probed, t_probe = None, {}, 0.0
        if probe:
            tf = time.perf_counter()
            exact = self._probe(cur.main_logprobs, inputs, batch.group_size)
            probed["exact/half_batch_cos"] = self._half_batch_cosine(cur.main_logprobs, batch, idx)
            t_probe = time.perf_counter() - tf
        self.optimizer.zero_grad(set_to_none=True)
        upd = {f"loss/{k}": v for k, v in main_m.items()}
        upd.update(mtp_m)
        upd.update(self._backward(main_loss, mtp_loss))
        grad_norm = clip_gradients(self.policy.model, self.cfg.rl.grad_clip, self.cfg.rl.clip_scope)
        self.optimizer.step()
        statistics = self.objective.close_update(refresh=refresh)
        if exact is not None:  # the probe next to this update's own proxies
            probed.update(self.probes.record_update(statistics, exact))
            cfg = self.objective.cfg
            if cfg.occ.estimator == "probed" and self.objective.regime.calibrated:  # λ of the next updates
                refresh_lambda_from_probe(self.objective.calibrator, exact, cfg.fidelity.metric)
        upd["grad_norm"] = grad_norm
        upd["update/clipped"] = float(grad_norm > self.cfg.rl.grad_clip)  # clip_grad_norm_ scaled the update
        return UpdateResult(_jsonable(upd), statistics, acceptance, probed, t_probe)

    def _probe(self, main_logprobs: torch.Tensor, inputs: TokenInputs, group_size: int):
        """Same-sample, cross-fitted and Adam-preconditioned exact statistics of this update
        (``nemo_occ.core.diagnostics.cross_fitted_statistics``), from the training forward: 2(1 + K)
        backward passes. The halves keep GRPO groups whole (advantages are normalised within a group,
        so sequences of one group are not independent), unless the minibatch holds a single group;
        P is read before this update's step."""
        units = torch.arange(inputs.mask.shape[0]) // group_size
        if int(units.max()) < 1:  # one group: split its sequences (within a group they are not independent)
            units = torch.arange(inputs.mask.shape[0])
        by = "sequences" if self.cfg.policy_loss.aggregation == "seq_mean_token_mean" else "tokens"
        mask_a, mask_b, shares = half_masks(inputs.mask, units, by=by)
        halves = []
        for m in (mask_a, mask_b):  # each half's part of the minibatch loss: the minibatch's denominators
            rl, _ = clipped_policy_loss(
                main_logprobs, inputs.old_logprobs, inputs.advantages, m, self.cfg.policy_loss,
                global_valid_tokens=inputs.global_valid_tokens, global_valid_seqs=inputs.global_valid_seqs,
            )  # fmt: skip
            halves.append((rl, self.objective.unscaled_losses(dataclasses.replace(inputs, mask=m))))
        params = [pp for pp in self.params if pp.param.requires_grad]
        shards, note = adam_preconditioner(self.optimizer, params)
        return exact_cross_fitted_statistics(
            [h[0] for h in halves], [h[1] for h in halves], params, shares=shares, preconditioner=shards,
            precond_note=note, stats_group=self.stats_group,
        )  # fmt: skip

    def _main_params(self) -> list:
        return [pp for pp in self.params if pp.part == "main"]

    def _backward(self, main_loss: torch.Tensor, mtp_loss: torch.Tensor) -> dict:
        """Gradients of main_loss + mtp_loss into ``.grad``, taken in two passes so that the MTP term's
        part of the update over the main model's parameters can be told apart from the RL part:

            update/mtp_share = ||g_term|| / ||g_RL||,   update/mtp_cos = cos(g_RL, g_term)

        with g_term the gradient of Σ_k λ_k L_MTP,k as applied (λ included) and g_RL the main loss's
        (``nemo_occ.core.diagnostics.gradient_statistics`` over the main model). Regime none: share 0.
        """
        if not mtp_loss.requires_grad:  # regime none: no MTP term
            main_loss.backward()
            return {"update/mtp_share": 0.0}
        main = self._main_params()
        main_loss.backward(retain_graph=True)
        rl = [None if pp.param.grad is None else pp.param.grad.clone() for pp in main]
        mtp_loss.backward()
        term = [
            None if pp.param.grad is None else pp.param.grad - (0 if r is None else r)
            for pp, r in zip(main, rl, strict=True)
        ]
        stats = gradient_statistics(rl, [term], main)
        share = math.sqrt(stats.v2[0] / stats.rl_norm2) if stats.rl_norm2 > 0 else float("nan")
        return {"update/mtp_share": share, "update/mtp_cos": _cosine(stats.c[0], stats.rl_norm2, stats.v2[0])}

    def _half_batch_cosine(
        self, main_logprobs: torch.Tensor, batch: Rollout, idx: torch.Tensor
    ) -> float | None:
        """cos(g_RL of the minibatch's first half of groups, g_RL of its second half) over the main model:
        how much of one minibatch's RL gradient is signal rather than sampling noise (0: all noise)."""
        G = batch.group_size
        half = (len(idx) // G // 2) * G
        if half == 0:
            return None
        main = self._main_params()
        grads = []
        for part in (slice(0, half), slice(half, None)):
            mask = batch.mask[idx][part]
            n_tok, n_seq = valid_counts(mask)
            loss, _ = clipped_policy_loss(
                main_logprobs[part], batch.old.main_logprobs[idx][part], batch.advantages[idx][part], mask,
                self.cfg.policy_loss, global_valid_tokens=n_tok, global_valid_seqs=n_seq,
            )  # fmt: skip
            grads.append(
                list(
                    torch.autograd.grad(loss, [pp.param for pp in main], retain_graph=True, allow_unused=True)
                )
            )
        stats = gradient_statistics(grads[0], [grads[1]], main)
        return _cosine(stats.c[0], stats.rl_norm2, stats.v2[0])

    # -- checkpoint / resume ---------------------------------------------------------------------------

    def resume(self, out_dir: Path, fingerprint: dict) -> tuple[int, float, list[float], list[dict]]:
        """Load ``out_dir/checkpoint.pt`` if there is one: (first step to run, elapsed seconds, step times,
        metrics rows up to the checkpoint). Without one the regime starts over (its TensorBoard events go)."""
        ckpt = load_checkpoint(out_dir / "checkpoint.pt", fingerprint)
        if ckpt is None:  # same configuration (the output folder checked it): start this regime over
            shutil.rmtree(out_dir / "tb", ignore_errors=True)
            return 1, 0.0, [], []
        self.policy.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.objective.load_state_dict(ckpt["objective"])
        self.probes.load_state_dict(ckpt["probes"])
        # drop what was logged after the checkpoint
        history = _read_metrics(out_dir / "metrics.jsonl", ckpt["step"])
        return ckpt["step"] + 1, ckpt["elapsed"], list(ckpt["step_times"]), history

    def checkpoint(
        self, out_dir: Path, fingerprint: dict, step: int, elapsed: float, step_times: list
    ) -> None:
        state = {
            "step": step,
            "model": self.policy.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "probes": self.probes.state_dict(),
            "elapsed": elapsed,
            "step_times": step_times,
        }
        save_checkpoint(out_dir / "checkpoint.pt", state, fingerprint)


def _cosine(dot: float, norm2_a: float, norm2_b: float) -> float | None:
    """<a, b> / (||a|| ||b||); None when either vector is zero (undefined)."""
    return dot / math.sqrt(norm2_a * norm2_b) if norm2_a > 0 and norm2_b > 0 else None


# -- logging -------------------------------------------------------------------------------------------


def step_row(updates: list[UpdateResult]) -> dict:
    """One step's row from its updates: the OCC statistics and draft acceptance reduced by the metrics
    contract (``nemo_occ.core.metrics.step_metrics``: λ of the last update, statistics averaged over
    applied updates, accuracy = Σ hits / Σ tokens), this demo's per-update metrics (losses,
    ``grad_norm``, ``update/*``) reduced over the updates by the same rule (``metric_rule``: the mean),
    and the probed update's ``exact/*``, ``fidelity/*``. The MTP metrics are named as NeMo-RL logs them
    (``logged_name``: ``train/mtp/loss_k``, ``train/mtp/occ/lambda_k``, ``train/mtp/accuracy_k``,
    ``train/mtp/fidelity/*``, ...)."""
    row: dict = {"updates": len(updates)}
    if not updates:
        return row
    for key in updates[0].metrics:  # one micro-batch per update: a Reduce.SUM metric is its update's value
        vals = [u.metrics[key] for u in updates if u.metrics.get(key) is not None]
        row[logged_name(key)] = reduce_values(vals, metric_rule(key)) if vals else None
    statistics = [u.statistics for u in updates if u.statistics is not None]
    acceptance = torch.stack([u.acceptance for u in updates]).sum(0)
    for key, value in step_metrics(statistics, acceptance).items():
        row[logged_name(key)] = value
    for u in updates:
        row.update({logged_name(key): value for key, value in u.probed.items()})
    return row


class _MetricsLog:
    """metrics.jsonl (rewritten atomically with the rows kept on resume, then appended) and TensorBoard."""

    def __init__(self, out_dir: Path, history: list[dict], *, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / "metrics.jsonl"
        self.history = history
        text = "".join(json.dumps(h) + "\n" for h in history)
        atomic_write(self.path, lambda f: f.write(text.encode()))
        self.writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=purge_step)

    def write(self, row: dict) -> None:
        row = _jsonable(row)
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.writer.close()
