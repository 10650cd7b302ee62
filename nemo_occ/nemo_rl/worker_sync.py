"""The worker extension's calibrator sync: one OCC update per optimizer update, closed over the data-parallel
group after each ``optimizer.step`` (item 2 of ``nemo_occ.nemo_rl.worker``), and the step's metrics
gathered where the loss ran.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_occ.core.fidelity import refresh_lambda_from_probe

__all__ = ["CalibratorSyncMixin"]


class CalibratorSyncMixin:
    """Closes each optimizer update in the persistent objective; sums and broadcasts the step's metrics."""

    def occ_reduction_group(self):
        """Group the OCC statistics are summed over: data-parallel ranks.

        NeMo-RL hands every context-parallel rank the CP-gathered log-probs of whole sequences (and divides
        each CP rank's loss by the CP size), so the CP ranks of one DP replica hold identical statistics;
        summing them too would count every token CP times. The sum over the DP group covers each token of
        the global batch exactly once, matching NeMo-RL's own ``global_valid_toks`` reduction.
        """
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def update_applied(self, step_result: Any) -> bool:
        """Whether the optimizer applied the update, on every model-parallel rank.

        Megatron's ``optimizer.step()`` returns ``(update_successful, grad_norm, num_zeros_in_grad)``;
        NeMo-RL's ``train`` ANDs ``update_successful`` over the model-parallel group (a rank without
        trainable parameters never skips), with Bridge's function used here, so every TP/PP rank keeps
        the same λ. The calibrator then ORs the skip over the data-parallel group.
        """
        from megatron.bridge.training.utils.pg_utils import get_pg_collection
        from megatron.bridge.training.utils.train_utils import logical_and_across_model_parallel_group

        update_successful = bool(step_result[0])
        return logical_and_across_model_parallel_group(
            update_successful, mp_group=get_pg_collection(self.model).mp
        )

    def updates_in_step(self, data: Any, gbs: int | None) -> int:
        """Optimizer updates NeMo-RL's ``train`` makes over ``data`` (this rank's equal share of the batch)."""
        from megatron.core import parallel_state

        gbs = gbs or self.cfg["train_global_batch_size"]
        return max(1, data.size * parallel_state.get_data_parallel_world_size() // gbs)

    def _close_occ_update(self, step_result: Any) -> None:
        """After each optimizer step: close the update in the objective (a collective over the DP group)."""
        applied = self.update_applied(step_result)
        # until an update of this train() call (one RL step) is applied, θ = θ_old and δ_RL = 0:
        # report the statistics but keep λ (see nemo_occ.core.calibration)
        update = self.occ_objective.close_update(
            self.occ_reduction_group(), refresh=self._occ_moved, skipped=not applied
        )
        skipped = update.skipped if update is not None else not applied  # any DP rank's skip
        self._occ_moved = self._occ_moved or not skipped
        self._occ_updates.append(update)
        if self._occ_exact is not None:  # this update was probed: pair it with its own proxies
            # (a skipped update's gradients were not finite or not used: no probe to record)
            if self.holds_output_layer() and not skipped:  # the proxies exist where the loss is
                self._occ_fidelity = self.occ_probes.record_update(update, self._occ_exact)
            cfg = self.nemo_occ_cfg
            if not skipped and cfg.occ.estimator == "probed" and cfg.regime_spec.calibrated:
                # every rank: the statistics are all-reduced, so λ stays identical everywhere
                refresh_lambda_from_probe(self.occ_objective.calibrator, self._occ_exact, cfg.fidelity.metric)
            self._occ_exact = None

    def acceptance_over_ranks(self, counts: torch.Tensor | None) -> torch.Tensor | None:
        """The loss's [K, 2] draft-acceptance counts of this ``train`` call, summed over the DP ranks.

        Only the stage holding the loss has counts, and every DP rank of it does, so the collective is
        matched; :func:`nemo_occ.core.metrics.step_metrics` turns them into ``accuracy_<d>``.
        """
        if counts is None:
            return None
        from nemo_occ.core.distributed import all_reduce_sum_

        return all_reduce_sum_(counts, self.occ_reduction_group())

    def broadcast_from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """Only the last pipeline stage computes the loss; give every stage its OCC metrics."""
        from nemo_rl.models.megatron.pipeline_parallel import broadcast_loss_metrics_from_last_stage

        return broadcast_loss_metrics_from_last_stage(metrics)
