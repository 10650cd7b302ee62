"""What nemo-occ adds to NeMo-RL's Megatron policy worker, as a mixin over its ``train`` loop.

NeMo-RL's ``MegatronPolicyWorkerImpl.train(data, loss_fn, ...)`` runs, per global batch (= one
optimizer update): ``process_global_batch`` -> ``megatron_forward_backward`` over the micro-batches
(each forward followed by ``LossPostProcessor``'s loss) -> ``optimizer.step()``. The mixin keeps that
loop and adds three things around it, for the duration of one ``train`` call:

1. **MTP log-probs in the normal forward.** The model runs inside :class:`nemo_occ.megatron.mtp_capture.
   MTPCapture`, which keeps the MTP depths' hidden states (Megatron's own MTP loss is skipped) and cuts
   the trunk for the ``detach`` regime. The loss post-processor of each micro-batch (NeMo-RL's
   ``LossPostProcessor``, swapped for a subclass while ``train`` runs) turns them into aligned per-depth
   log-probs and puts them in the micro-batch ``data`` (:mod:`nemo_occ.nemo_rl.mtp_batch`), unpacked to
   NeMo-RL's [B, S-1] rows when sequences are packed.
2. **One calibrator update per optimizer update.** ``optimizer.step`` is wrapped: after each update the
   persistent :class:`MTPObjective` closes it (``close_update``, a SUM all-reduce of the OCC statistics
   over the data-parallel group; see :meth:`OCCWorkerExtension.occ_reduction_group`), so λ of update u+1
   comes from the statistics of update u ("lagged" timing). The first update of each ``train`` call (one
   RL step) runs at θ = θ_old, where δ_RL = 0: it is reported but does not refresh λ. An update Megatron
   did not apply (``optimizer.step()`` returned ``update_successful=False``: inf/NaN gradients under loss
   scaling, or a gradient norm over ``grad_norm_skip_threshold``; ANDed over the model-parallel group as
   NeMo-RL does, :meth:`OCCWorkerExtension.update_applied`) left θ where it was: its statistics are
   discarded, λ is kept, it counts in ``occ/skipped``, and the step's updates count as made at θ_old
   until one is applied.
3. **A persistent objective.** The loss object arrives freshly unpickled in every ``train`` call; the
   mixin binds the worker's objective into it, saves its state next to NeMo-RL's checkpoint
   (``policy/nemo_occ_state.pt``) and restores it on resume.

4. **Exact probes** (``nemo_occ.fidelity.every: N``, off by default). In every N-th ``train`` call (RL
   step), the update :func:`nemo_occ.core.fidelity.probed_update` picks runs its micro-batches through
   NeMo-RL's ``megatron_forward_backward`` 2(1 + K) extra times first, each with a loss that is one
   component only (the RL loss, then each depth's unscaled MTP loss) of one half of the sequences
   (``OCCLossFn.probing``), while gradients only accumulate on this rank
   (:meth:`OCCWorkerExtension.gradient_probe_pass`, the hooks NeMo-RL's own split-step API nulls). The
   accumulated gradients go through ``nemo_occ.megatron.probe_layout`` (every DP/TP/PP/EP layout) into
   the same-sample, cross-fitted and Adam-preconditioned c and v²
   (:func:`nemo_occ.core.diagnostics.cross_fitted_statistics`; P read from the optimizer before the
   update's step), recorded with that update's proxies in a :class:`nemo_occ.core.fidelity.ProbeHistory`;
   under ``occ.estimator: probed`` they also set λ. Then the update trains as usual.

5. **The MTP heads' own old log-probs** (``old_logprobs: mtp``, or whenever probes are on: the head-gap
   metrics use both readings of δ_MTP). ``get_logprobs``, the forward NeMo-RL runs for ``prev_logprobs``,
   also runs the MTP layers (:class:`MTPCapture`, its ``LogprobsPostProcessor`` swapped for a subclass)
   and returns each depth's old log-probs next to ``logprobs`` under
   :func:`nemo_occ.nemo_rl.mtp_batch.mtp_old_logprobs_key`, in ``prev_logprobs``' layout. NeMo-RL's GRPO loop
   keeps only ``logprobs``; :class:`nemo_occ.nemo_rl.policy.OCCPolicy` carries the rest into the
   training batch.

Each concern is a mixin in its own module: the MTP capture and old log-probs (items 1 and 5,
:mod:`nemo_occ.nemo_rl.worker_capture`), the calibrator sync and the step's metrics (item 2,
:mod:`nemo_occ.nemo_rl.worker_sync`), checkpointing (item 3, :mod:`nemo_occ.nemo_rl.worker_checkpoint`) and the
probes (item 4, :mod:`nemo_occ.nemo_rl.worker_probes`); this module composes them and runs ``train``.

The four swaps of NeMo-RL internals (post-processors, ``megatron_forward_backward``, ``optimizer.step``)
live in :mod:`nemo_occ.nemo_rl.megatron_policy_worker_patches`, each with the upstream behaviour it relies
on. Setup fails when the regime needs MTP layers the built model does not have, saying what to set.
Everything NeMo-RL-specific is reached through a few overridable methods, so the mixin runs on CPU
against a stand-in worker in the tests; the classes Ray instantiates are in
:mod:`nemo_occ.nemo_rl.megatron_worker`.

Letters: B sequences, S tokens per sequence, T packed tokens, K MTP depths.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemo_occ.core.config import CONFIG_KEY, NemoOCCConfig, load_config
from nemo_occ.core.fidelity import ProbeHistory, probed_update
from nemo_occ.core.metrics import UpdateStatistics, step_metrics
from nemo_occ.core.objective import MTPObjective
from nemo_occ.nemo_rl import megatron_policy_worker_patches as patches
from nemo_occ.nemo_rl.worker_capture import ModelInputRecorder, MTPCaptureMixin
from nemo_occ.nemo_rl.worker_checkpoint import STATE_FILE, CheckpointMixin
from nemo_occ.nemo_rl.worker_probes import ProbeMixin
from nemo_occ.nemo_rl.worker_sync import CalibratorSyncMixin

__all__ = ["OCCWorkerExtension", "ModelInputRecorder", "STATE_FILE", "WORKER_FQN"]

# The Ray actor class NeMo-RL instantiates, for Policy(worker_extension_cls_fqn=...) and the actor registry.
# A plain string, so the driver (whose venv has no megatron, Bridge or TE) never imports megatron_worker,
# which imports NeMo-RL's Megatron worker.
WORKER_FQN = "nemo_occ.nemo_rl.megatron_worker.OCCMegatronPolicyWorker"


class OCCWorkerExtension(MTPCaptureMixin, CalibratorSyncMixin, ProbeMixin, CheckpointMixin):
    """Mixin placed before NeMo-RL's ``MegatronPolicyWorkerImpl`` (see the module docstring).

    Hooks a subclass or a test may override: :meth:`occ_reduction_group`, :meth:`is_state_writer`,
    :meth:`broadcast_from_last_stage`, :meth:`patched_loss_post_processor`, :meth:`patched_forward_backward`,
    :meth:`updates_in_step`, :meth:`gradient_probe_pass`, :meth:`patched_logprobs_post_processor`,
    :meth:`broadcast_tensors_from_last_stage`, :meth:`update_applied`.
    """

    nemo_occ_cfg: NemoOCCConfig
    occ_objective: MTPObjective

    def __init__(self, config: Mapping[str, Any], *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        block = config.get(CONFIG_KEY)
        if block is None:
            raise ValueError(
                f"policy config has no '{CONFIG_KEY}' block: start training with "
                "`python -m nemo_occ.nemo_rl.run_grpo --config <recipe>`, which passes the recipe's nemo_occ block"
            )
        self.nemo_occ_cfg = load_config(dict(block), key=None)
        # The clip settings are the loss's (derived from loss_fn:); train() adopts them from the bound loss.
        self.occ_objective = MTPObjective(self.nemo_occ_cfg)
        self.occ_probes = ProbeHistory.from_config(self.nemo_occ_cfg.num_depths, self.nemo_occ_cfg.fidelity)
        self.occ_rl_steps = 0  # train() calls outside eval: the probe schedule counts them
        self._occ_updates: list[UpdateStatistics | None] = []  # this train() call's closed updates
        self._occ_moved = False  # an update of this train() call was applied: θ is no longer θ_old
        self._occ_exact = None  # exact statistics of the update being trained, when it was probed
        self._occ_fidelity: dict[str, float] = {}
        self._occ_reference_pass = False  # get_logprobs called for the reference policy
        self.check_mtp_layers(config)
        weights_path = kwargs.get("weights_path", args[1] if len(args) > 1 else None)
        if weights_path:
            self.load_occ_state(Path(weights_path).parent / STATE_FILE)

    def train(
        self, data: Any, loss_fn: Any, eval_mode: bool = False, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """NeMo-RL's ``train`` with the MTP capture, the bound objective and one OCC update per step.

        It refuses a loss that is not nemo-occ's, or was built from another nemo_occ config, before it
        changes anything. If NeMo-RL's ``train`` raises, the statistics of the update in flight are dropped
        and the objective's clip settings restored; the updates it completed stay (θ moved with them).
        """
        if not hasattr(loss_fn, "bind_objective"):
            raise TypeError(
                f"nemo-occ's worker needs nemo-occ's loss (nemo_occ.nemo_rl.loss.OCCLossFn), got {type(loss_fn).__name__}"
            )
        objective = self.occ_objective
        if eval_mode:  # evaluation uses the current λ but must not move it or leave statistics behind
            objective = copy.deepcopy(self.occ_objective)
        every = self.nemo_occ_cfg.fidelity.every
        probe = (
            not eval_mode
            and every > 0
            and objective.calibrator is not None
            and (self.occ_rl_steps + 1) % every == 0
        )
        index = probed_update(self.updates_in_step(data, kwargs.get("gbs"))) if probe else None
        # bind_objective checks the loss's config: the last step that can refuse, so nothing is changed before
        loss_fn.bind_objective(objective)
        policy_cfg = objective.policy_cfg
        objective.policy_cfg = loss_fn.policy_cfg  # the MTP term clips like the main loss
        self._occ_updates, self._occ_fidelity, self._occ_exact = [], {}, None
        self._occ_moved = False
        try:
            metrics = self._train_with_occ(data, loss_fn, eval_mode, index, *args, **kwargs)
        except BaseException:
            # the update in flight never closed: its partial statistics must not reach the next one
            objective.discard_open_update()
            objective.policy_cfg = policy_cfg
            raise
        if not eval_mode:
            self.occ_rl_steps += 1
        if not eval_mode and self.nemo_occ_cfg.regime_spec.calibrated and len(self._occ_updates) == 1:
            warnings.warn(
                "this RL step made a single optimizer update, which runs at θ = θ_old (δ_RL = 0), so OCC "
                "cannot refresh λ; make policy.train_global_batch_size smaller than the step's samples "
                "(the paper: 4 updates per step)",
                stacklevel=2,
            )
        occ_metrics = step_metrics(
            [u for u in self._occ_updates if u is not None],
            self.acceptance_over_ranks(loss_fn.pop_acceptance_counts()),
        )
        occ_metrics.update(self._occ_fidelity)  # the probe's own update, not a mean
        occ_metrics = self.broadcast_from_last_stage(occ_metrics)
        if occ_metrics:
            metrics.setdefault("mtp_metrics", {}).update(occ_metrics)  # logged as train/mtp/occ/...
        return metrics

    def _train_with_occ(
        self, data: Any, loss_fn: Any, eval_mode: bool, probe_index: int | None, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """NeMo-RL's ``train`` inside the MTP capture, the per-update calibration and the probe."""
        with contextlib.ExitStack() as stack:
            if self.nemo_occ_cfg.regime_spec.has_mtp_term:
                from nemo_occ.megatron.mtp_capture import MTPCapture

                capture = stack.enter_context(
                    MTPCapture(self.model, detach_trunk=not self.nemo_occ_cfg.regime_spec.trunk_gradient)
                )
                inputs = stack.enter_context(ModelInputRecorder(self.model))
                stack.enter_context(self.patched_loss_post_processor(capture, inputs))
            if not eval_mode:
                stack.enter_context(patches.after_each_optimizer_step(self.optimizer, self._close_occ_update))
            if probe_index is not None:
                stack.enter_context(
                    self.patched_forward_backward(self._probing_forward_backward(loss_fn, probe_index))
                )
            return super().train(data, loss_fn, eval_mode, *args, **kwargs)
