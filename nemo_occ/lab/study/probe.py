"""Fixed-checkpoint fidelity probes: many minibatches' exact c and v² next to their proxies ĉ, v̂².

The demo probes one update every few steps, so a run holds a few dozen (proxy, exact) pairs spread
over a drifting model. Here one checkpoint (model, Adam state, λ) of a regime's run is probed on many
fresh minibatches, so a correlation is measured on more than a handful of points:

1. rollouts as the trainer draws them (``prompts_per_step`` prompts x ``samples_per_prompt`` at the
   rollout temperature, GRPO advantages, DAPO dynamic sampling), repeated until 1 + ``minibatches``
   minibatches of ``prompts_per_step / rl.minibatches`` kept groups exist; old log-probs (main and MTP)
   at the checkpoint's θ_old;
2. one optimizer update of the regime's loss on the first minibatch (Adam from the checkpoint's
   state), so that θ ≠ θ_old: at θ = θ_old every δ_RL is 0 and ĉ = 0 whatever c is. The trainer's
   probed update is likewise a step's second (``nemo_occ.core.fidelity.probed_update``);
3. at that θ, for each of the other minibatches (no further update): the regime's proxies through
   ``MTPObjective`` (ĉ, v̂², and v̂² under both readings of δ_MTP with the head gap,
   ``nemo_occ.core.fidelity.HeadGap``), Σδ_RL² for the proxy cosine, and the exact c, v², ||g_RL||² over
   the main model's parameters, two ways (``exact_cross_fitted_statistics``: 2(1 + K) backward passes):
   cross-fitted (``c_cross``, ``v2_cross``, ``rl_norm2_cross``: the minibatch split into two halves of
   whole GRPO groups, and only products of one half's gradient with the other's, so no sample's noise
   is multiplied by itself) and same-sample (``c``, ``v2``, ``rl_norm2``: the full minibatch's gradients,
   which carry each sample's covariance with itself; kept for comparison, labelled as such).

Each record holds per-token proxies (divided by the minibatch's valid tokens, as ``ProbeHistory``
compares them) next to the exact statistics of the token-mean losses. Depth 1 only (the demo's
models have one MTP layer; more depths would add columns, not change the method).

Random draws come from a generator seeded by (seed, checkpoint step), so a probe is reproducible.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.core.diagnostics import exact_cross_fitted_statistics, half_masks
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.losses import clipped_policy_loss, valid_counts
from nemo_occ.core.metrics import metric_prefix, step_metrics
from nemo_occ.core.objective import MTPObjective
from nemo_occ.core.regimes import get_regime
from nemo_occ.lab.demo.config import DemoConfig

__all__ = ["probe_checkpoint", "PROBE_FIELDS"]

PROBE_FIELDS = (
    "step", "minibatch", "tokens", "lambda", "c", "v2", "rl_norm2", "c_cross", "v2_cross", "rl_norm2_cross",
    "c_hat", "v2_hat", "d_rl2", "v2_hat_main", "v2_hat_own", "head_gap",
)  # fmt: skip


def _seed(*parts: int) -> int:
    h = 0x5EED5EED
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**62)
    return h


def probe_checkpoint(
    cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, regime: str, snapshot: dict, *, minibatches: int
) -> list[dict]:
    """One record per probed minibatch (``PROBE_FIELDS``) at the checkpoint ``snapshot`` (the demo
    trainer's checkpoint dict: ``step``, ``model``, ``optimizer``, ``objective``)."""
    # long on purpose: rebuilding the checkpoint's model, objective and rollout and probing each minibatch
    # share one restored state; split, it would be passed around piecemeal
    from nemo_occ.lab.demo.policy import DemoPolicy
    from nemo_occ.lab.demo.task import AdditionTask
    from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group

    if minibatches < 1:
        raise ValueError(f"minibatches must be >= 1, got {minibatches}")
    nemo_occ_cfg = nemo_occ_cfg.model_copy(update={"regime": regime})
    objective = MTPObjective(nemo_occ_cfg, cfg.policy_loss)
    if objective.calibrator is None or not objective.regime.trunk_gradient:
        raise ValueError(
            f"regime {regime!r} has no MTP gradient into the main model (or no proxies); probe ce, policy or occ"
        )
    objective.load_state_dict(snapshot["objective"])
    task = AdditionTask(cfg.task.digits)
    policy = DemoPolicy.build(cfg, task)
    policy.model.load_state_dict(snapshot["model"])
    optimizer = torch.optim.Adam(policy.model.parameters(), lr=cfg.rl.lr)
    optimizer.load_state_dict(snapshot["optimizer"])
    step = int(snapshot["step"])

    P, G = cfg.rl.prompts_per_step, cfg.rl.samples_per_prompt
    per_update = max(1, P // cfg.rl.minibatches)  # groups per minibatch
    need = (1 + minibatches) * per_update
    g = torch.Generator().manual_seed(_seed(cfg.seed, step))
    seqs, adv = [], []
    kept = 0
    for _ in range(max(4, 4 * math.ceil(need / P))):  # bounded: a model that solves everything keeps nothing
        ops = task.sample_operands(P, g).repeat_interleave(G, dim=0)
        s = policy.generate(task.prompts(ops), task.response_len, cfg.rl.temperature, g)
        grouped = task.rewards(ops, s[:, task.prompt_len :]).view(P, G)
        a = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(P, G)
        keep = grouped.std(1) > 0 if cfg.rl.dynamic_sampling else torch.ones(P, dtype=torch.bool)
        seqs.append(s.view(P, G, -1)[keep])
        adv.append(a[keep])
        kept += int(keep.sum())
        if kept >= need:
            break
    groups = min(kept, need) // per_update * per_update
    if groups < 2 * per_update:
        return []  # fewer than two minibatches of informative groups: nothing to probe
    seqs = torch.cat(seqs)[:groups].flatten(0, 1)  # [N, L]
    adv = torch.cat(adv)[:groups].flatten()
    mask_all = task.response_mask(seqs.shape[0])
    with torch.no_grad():
        old = policy.logprobs(seqs, detach_trunk=True)
    detach_trunk = not objective.regime.trunk_gradient

    def losses(idx):
        mask = mask_all[idx]
        n_tok, n_seq = valid_counts(mask)
        cur = policy.logprobs(seqs[idx], detach_trunk=detach_trunk)
        common = dict(old_logprobs=old.main_logprobs[idx], advantages=adv[idx], mask=mask,
                      global_valid_tokens=n_tok, global_valid_seqs=n_seq)  # fmt: skip
        main_loss, _ = clipped_policy_loss(cur.main_logprobs, cfg=cfg.policy_loss, **common)
        mtp = dict(mtp_logprobs=cur.mtp_logprobs, mtp_masks=cur.mtp_masks,
                   mtp_old_logprobs=[o[idx] for o in old.mtp_logprobs])  # fmt: skip
        mtp_loss, _ = objective(TokenInputs(main_logprobs=cur.main_logprobs, **common, **mtp))
        return cur, mask, main_loss, mtp_loss, common, mtp

    per_mb = per_update * G
    chunks = [torch.arange(i, i + per_mb) for i in range(0, seqs.shape[0], per_mb)]
    # 2. the update that moves θ away from θ_old (the trainer's first update of a step)
    _, _, main_loss, mtp_loss, _, _ = losses(chunks[0])
    optimizer.zero_grad(set_to_none=True)
    (main_loss + mtp_loss).backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), cfg.rl.grad_clip, error_if_nonfinite=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.close_update(refresh=False)
    lam = objective.coefficients()[0]
    params = probe_parameters(policy.model)
    by = "sequences" if cfg.policy_loss.aggregation == "seq_mean_token_mean" else "tokens"
    records = []
    for j, idx in enumerate(chunks[1:], start=1):
        cur, mask, _, _, common, mtp = losses(idx)  # the objective's call accumulates the proxies
        inputs = TokenInputs(**common, **mtp)
        # halves of whole GRPO groups (advantages are normalised within a group), as the trainer's probe
        units = torch.arange(mask.shape[0]) // G
        mask_a, mask_b, shares = half_masks(mask, units, by=by)
        halves = []
        for m_half in (mask_a, mask_b):  # each half's part of the minibatch loss, minibatch denominators
            rl, _ = clipped_policy_loss(cur.main_logprobs, cfg=cfg.policy_loss, **{**common, "mask": m_half})
            halves.append((rl, objective.unscaled_losses(dataclasses.replace(inputs, mask=m_half))))
        exact = exact_cross_fitted_statistics(
            [h[0] for h in halves], [h[1] for h in halves], params, shares=shares,
            stats_group=probe_statistics_group(),
        )  # fmt: skip
        same, cross = exact.same_sample, exact.cross_fit
        m = step_metrics([objective.close_update(refresh=False)])  # this minibatch's proxies, λ kept
        pre = metric_prefix(get_regime(regime).calibrated)
        n = m[f"{pre}/valid_tokens_1"]
        if n <= 0:
            continue
        valid = mask.bool() & cur.mtp_masks[0].bool()
        d_rl = (cur.main_logprobs.detach().double() - old.main_logprobs[idx].double())[valid]
        v2_main = m.get(f"{pre}/v2_hat_vs_main_old_1", float("nan"))
        records.append(
            {
                "step": step,
                "minibatch": j,
                "tokens": n,
                "lambda": lam,
                "c": same.c[0],
                "v2": same.v2[0],
                "rl_norm2": same.rl_norm2,
                "c_cross": cross.c[0],
                "v2_cross": cross.v2[0],
                "rl_norm2_cross": cross.rl_norm2,
                "c_hat": m[f"{pre}/c_hat_1"] / n,
                "v2_hat": m[f"{pre}/v2_hat_1"] / n,
                "d_rl2": float((d_rl * d_rl).sum()) / n,
                "v2_hat_main": v2_main / n,
                "v2_hat_own": m.get(f"{pre}/v2_hat_vs_own_old_1", float("nan")) / n,
                "head_gap": m.get(f"{pre}/head_gap_share_1", float("nan")) * v2_main / n,
            }
        )
    return records
