"""The MTP term of the training loss for one regime: Σ_k λ_k · L_MTP,k.

``L_MTP,k`` is the regime's loss of depth k (cross-entropy, or the main head's clipped policy loss
evaluated on the MTP head's aligned log-probs); λ_k is the fixed ``coef`` or, for ``occ``, the
calibrator's λ_t (Eq. 13 of the OCC paper). The caller adds the returned term to the main head's
policy loss and back-propagates the sum, so the MTP term's gradient is exactly λ_k times the
unscaled one.

Sign convention: the term is λ_k · L(A), Eq. 2 of the paper. The public reference code computes
L(λ·A) (it scales the advantages inside the clipped loss). The two agree for λ >= 0; for λ < 0,
which the signed estimator often gives, clipping acts on the other side: λ·L(A) silences the tokens
past the clip bound in A's direction and bounds the move against A only through the dual clip,
while L(λ·A) bounds the move against A like a policy loss with advantages λ·A. So
``timing: microbatch`` reproduces the reference code's coefficient timing but not its MTP loss when
λ < 0.

Denominators: the MTP term uses the main head's global denominators (valid tokens / sequences of
the global batch). Any fixed global denominator keeps micro-batch and rank invariance; using the
main head's gives λ the same meaning as in the reference code (a weight relative to the main loss).

Per micro-batch the objective also feeds the calibrator (regime occ, or any MTP regime when
``monitor_proxies`` is on, for the paper's Fig. 2 curves); :meth:`MTPObjective.close_update` closes
an optimizer update and returns its statistics (``nemo_occ.core.metrics``; see
``nemo_occ.core.calibration`` for which update uses which λ).

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from nemo_occ.core.calibration import OCCCalibrator
from nemo_occ.core.config import NemoOCCConfig, PolicyLossConfig
from nemo_occ.core.fidelity import HeadGap
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.metrics import UpdateStatistics

__all__ = ["MTPObjective"]


class MTPObjective:
    def __init__(self, cfg: NemoOCCConfig, policy_cfg: PolicyLossConfig | None = None):
        self.cfg = cfg
        self.policy_cfg = policy_cfg or PolicyLossConfig()
        self.regime = cfg.regime_spec
        wants_stats = self.regime.calibrated or (cfg.monitor_proxies and self.regime.has_mtp_term)
        self.calibrator = OCCCalibrator(cfg.num_depths, cfg.occ) if wants_stats else None
        # v̂² under both readings of δ_MTP, whenever the MTP heads' own old log-probs are given
        self.head_gap = HeadGap(cfg.num_depths) if wants_stats else None
        self._head_gap_seen = False

    # ----------------------------------------------------------------------------------------------
    def coefficients(self) -> list[float]:
        """λ_k in effect for the current update (lagged timing) or the fixed coefficient."""
        if not self.regime.has_mtp_term:
            return [0.0] * self.cfg.num_depths
        if self.regime.calibrated:
            return self.calibrator.lambdas
        return [self.cfg.coef] * self.cfg.num_depths

    def __call__(self, inputs: TokenInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(Σ_k λ_k · L_MTP,k, metrics) of one micro-batch; metrics with a ``mtp/`` prefix are summable.

        Nothing moves before everything that can raise has run: a call that raises adds nothing to the
        calibrator's sums (nor, under ``timing: microbatch``, to the record of applied λ).
        Regime ``none`` returns 0.
        """
        if not self.regime.has_mtp_term:
            return inputs.main_logprobs.new_zeros(()), {}
        # 1. everything that can raise: each depth's loss and the micro-batch's statistics (pure)
        depth_losses = self.depth_losses(inputs)
        stats = None
        if self.calibrator is not None:
            own_old = inputs.mtp_old_logprobs if self.cfg.old_logprobs == "mtp" else None
            stats = self.calibrator.statistics(replace(inputs, mtp_old_logprobs=own_old))
        gap = None
        if self.head_gap is not None and inputs.mtp_old_logprobs is not None:
            gap = self.head_gap.statistics(
                inputs.mtp_logprobs, inputs.old_logprobs, inputs.mtp_old_logprobs, inputs.depth_masks()
            )
        microbatch_lambdas = self.regime.calibrated and self.cfg.occ.timing == "microbatch"
        if microbatch_lambdas:
            self.calibrator.lambda_from_statistics(stats)  # raises, before any state moves, if λ overflows
        # 2. only then move state
        coefs = self._record(stats, gap, microbatch_lambdas)
        return self._scaled_sum(inputs, depth_losses, coefs)

    def _record(self, stats, gap, microbatch_lambdas: bool) -> list[float]:
        """Add a micro-batch's statistics to the sums; the λ_k its MTP term uses."""
        if stats is not None:
            self.calibrator.add_statistics(stats)
        if gap is not None:
            self.head_gap.add(gap)
            self._head_gap_seen = True
        if microbatch_lambdas:
            return self.calibrator.local_lambdas(stats)
        return self.coefficients()

    @staticmethod
    def _scaled_sum(inputs, depth_losses, coefs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Σ_k λ_k · L_MTP,k and its per-depth metrics (``mtp/loss_d``, ``mtp/clip_fraction_d``)."""
        total = (
            inputs.old_logprobs.new_zeros(())
            if inputs.main_logprobs is None
            else inputs.main_logprobs.new_zeros(())
        )
        metrics: dict[str, torch.Tensor | float] = {}
        for k, (loss_k, m_k) in enumerate(depth_losses):
            total = total + coefs[k] * loss_k
            d = k + 1
            metrics[f"mtp/loss_{d}"] = m_k["loss"]
            if "clip_fraction" in m_k:
                metrics[f"mtp/clip_fraction_{d}"] = m_k["clip_fraction"]
        metrics["mtp/loss_scaled"] = total.detach()
        return total, metrics

    def depth_losses(self, inputs: TokenInputs) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Each depth's unscaled loss L_MTP,k and its metrics, before λ_k; no state moves.

        What the training term scales by λ_k, and what the exact probes differentiate for g_MTP,k.
        The ratio's old log-prob is the main head's or each MTP head's own (``nemo_occ.old_logprobs``).
        """
        K = self.cfg.num_depths
        self._check_depths(inputs)
        if not self.regime.has_mtp_term:
            raise ValueError(f"regime '{self.regime.name}' has no MTP loss")
        if inputs.advantages is None or inputs.global_valid_tokens is None:
            raise ValueError("the MTP loss needs the advantages and global_valid_tokens of the micro-batch")
        if self.cfg.old_logprobs == "mtp":
            if inputs.mtp_old_logprobs is None:
                raise ValueError(
                    "nemo_occ.old_logprobs is 'mtp' but no old MTP log-probs were given; compute them with the "
                    "rollout's old log-probs or set old_logprobs: main"
                )
            olds = list(inputs.mtp_old_logprobs)
        else:
            olds = [inputs.old_logprobs] * K
        masks = inputs.depth_masks()
        return [
            self.regime.depth_loss(
                inputs.mtp_logprobs[k],
                olds[k],
                inputs.advantages,
                masks[k],
                self.policy_cfg,
                global_valid_tokens=inputs.global_valid_tokens,
                global_valid_seqs=inputs.global_valid_seqs,
            )
            for k in range(K)
        ]

    def unscaled_losses(self, inputs: TokenInputs) -> list[torch.Tensor]:
        """L_MTP,k for every depth k, before λ_k: what the exact probes differentiate for g_MTP,k.

        The caller never chooses which old log-prob the ratio uses (``nemo_occ.old_logprobs`` decides); no
        state moves.
        """
        return [loss for loss, _ in self.depth_losses(inputs)]

    def _check_depths(self, inputs: TokenInputs) -> None:
        """The inputs carry one entry per MTP depth of the config (the lists agree with each other already)."""
        K = self.cfg.num_depths
        if inputs.num_depths != K:
            raise ValueError(
                f"the model produced {inputs.num_depths} MTP depth(s) but nemo_occ.num_depths={K}; "
                "set num_depths to the model's mtp_num_layers"
            )

    def close_update(
        self, group=None, *, refresh: bool = True, skipped: bool = False
    ) -> UpdateStatistics | None:
        """Close one optimizer update (a collective over ``group`` when distributed); its statistics.

        Pass ``refresh=False`` for the first update of each RL step (made at θ = θ_old, so δ_RL = 0):
        its statistics are reported but do not replace λ (see ``nemo_occ.core.calibration``).
        Pass ``skipped=True`` when the optimizer did not apply the update: its statistics (and head-gap
        sums) are discarded and λ is kept. ``group``: the group the loss's token counts are summed
        over (NeMo-RL: data-parallel). None under regimes without a calibrator. When the proxies are
        only monitored (detach/ce/policy), ``lambda_next`` is the λ that OCC would pick and
        ``lambda_applied`` the fixed ``coef``; :func:`nemo_occ.core.metrics.step_metrics` logs them.
        """
        if self.calibrator is None:
            return None
        update = self.calibrator.close_update(group, refresh=refresh, skipped=skipped)
        depths = update.depths
        if self._head_gap_seen:
            gaps = self.head_gap.finish(group)  # a collective on every rank, and resets the sums
            if not update.skipped:
                depths = tuple(
                    replace(s, v2_hat_vs_main_old=vs_main, v2_hat_vs_own_old=vs_own, static_gap=gap)
                    for s, (vs_main, vs_own, gap) in zip(depths, gaps, strict=True)
                )
        calibrated = self.regime.calibrated
        if not calibrated and not update.skipped:  # the fixed λ actually applied
            depths = tuple(
                replace(s, lambda_applied=lam) for s, lam in zip(depths, self.coefficients(), strict=True)
            )
        return replace(update, depths=depths, calibrated=calibrated)

    def discard_open_update(self) -> None:
        """Drop the statistics of an update that will never be closed (its ``train`` raised); local, λ kept."""
        if self.calibrator is not None:
            self.calibrator.discard_open_update()
        if self.head_gap is not None:
            self.head_gap.discard()

    def state_dict(self) -> dict:
        """The regime and the calibrator's state (None without a calibrator)."""
        return {
            "regime": self.cfg.regime,
            "calibrator": self.calibrator.state_dict() if self.calibrator else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; a different regime or calibrator shape is refused unchanged."""
        if state.get("regime") != self.cfg.regime:
            raise ValueError(
                f"checkpoint was trained with regime '{state.get('regime')}' but the config says '{self.cfg.regime}'"
            )
        if self.calibrator is not None and state.get("calibrator") is not None:
            self.calibrator.load_state_dict(state["calibrator"])
