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
import itertools
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_occ.atomic_io import atomic_write
from nemo_occ.core.config import CONFIG_KEY, NemoOCCConfig, load_config
from nemo_occ.core.diagnostics import cross_fitted_statistics
from nemo_occ.core.fidelity import ProbeHistory, probed_update, refresh_lambda_from_probe
from nemo_occ.core.metrics import UpdateStatistics, step_metrics
from nemo_occ.core.objective import MTPObjective
from nemo_occ.nemo_rl import megatron_policy_worker_patches as patches
from nemo_occ.nemo_rl.mtp_batch import mtp_old_logprobs_key, stack_old_logprobs

__all__ = ["OCCWorkerExtension", "ModelInputRecorder", "STATE_FILE", "WORKER_FQN"]

# The Ray actor class NeMo-RL instantiates, for Policy(worker_extension_cls_fqn=...) and the actor registry.
# A plain string, so the driver (whose venv has no megatron, Bridge or TE) never imports megatron_worker,
# which imports NeMo-RL's Megatron worker.
WORKER_FQN = "nemo_occ.nemo_rl.megatron_worker.OCCMegatronPolicyWorker"
STATE_FILE = "nemo_occ_state.pt"  # in <checkpoint>/policy/, next to NeMo-RL's weights/ and optimizer/


class OCCWorkerExtension:
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

    # -- setup check --------------------------------------------------------------------------------
    def check_mtp_layers(self, config: Mapping[str, Any]) -> None:
        """Fail at setup when the regime needs more MTP layers than the built model has."""
        if not self.nemo_occ_cfg.regime_spec.has_mtp_term:
            return
        from nemo_occ.megatron.mtp_capture import MTPCapture

        capture = MTPCapture(self.model, detach_trunk=not self.nemo_occ_cfg.regime_spec.trunk_gradient)
        if not capture.active and not self.holds_output_layer():
            return  # an earlier pipeline stage: MTP lives with the output layer on the last one
        if capture.num_depths < self.nemo_occ_cfg.num_depths:
            configured = (config.get("megatron_cfg") or {}).get("mtp_num_layers")
            raise ValueError(
                f"nemo_occ.regime '{self.nemo_occ_cfg.regime}' trains {self.nemo_occ_cfg.num_depths} MTP depth(s), but the model "
                f"built from {config.get('model_name')!r} has {capture.num_depths} MTP layer(s) "
                f"(policy.megatron_cfg.mtp_num_layers={configured}). Set policy.megatron_cfg.mtp_num_layers: "
                f"{self.nemo_occ_cfg.num_depths} explicitly (NeMo-RL's grpo_math_1B.yaml sets 0, which drops the layer) "
                "for a model that ships MTP weights, or use nemo_occ.regime: none"
            )

    def holds_output_layer(self) -> bool:
        from nemo_occ.megatron.model_access import unwrap_gpt_model

        return bool(getattr(unwrap_gpt_model(self.model), "post_process", True))

    # -- distributed hooks ---------------------------------------------------------------------------
    def occ_reduction_group(self):
        """Group the OCC statistics are summed over: data-parallel ranks.

        NeMo-RL hands every context-parallel rank the CP-gathered log-probs of whole sequences (and divides
        each CP rank's loss by the CP size), so the CP ranks of one DP replica hold identical statistics;
        summing them too would count every token CP times. The sum over the DP group covers each token of
        the global batch exactly once, matching NeMo-RL's own ``global_valid_toks`` reduction.
        """
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def is_state_writer(self) -> bool:
        """One rank writes the calibrator state (identical on all ranks after ``close_update``)."""
        from megatron.core import parallel_state

        return (
            parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0
            and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        )

    def broadcast_from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """Only the last pipeline stage computes the loss; give every stage its OCC metrics."""
        from nemo_rl.models.megatron.pipeline_parallel import broadcast_loss_metrics_from_last_stage

        return broadcast_loss_metrics_from_last_stage(metrics)

    def patched_loss_post_processor(self, capture: Any, inputs: ModelInputRecorder):
        """Make NeMo-RL's ``train`` build our MTP-aware post-processor (restored afterwards)."""
        return patches.loss_post_processor(capture, inputs)

    def patched_forward_backward(self, wrapper: Any):
        """Make NeMo-RL's ``train`` call ``wrapper(original, **kwargs)`` for ``megatron_forward_backward``."""
        return patches.forward_backward(wrapper)

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

    @contextlib.contextmanager
    def gradient_probe_pass(self) -> Iterator[None]:
        """One extra forward-backward whose gradient only accumulates on this rank, then is read and dropped.

        Megatron's DDP would reduce (or reduce-scatter, with the distributed optimizer) the gradient at the
        last micro-batch, and ``finalize_model_grads`` would also update MoE expert biases: NeMo-RL's split
        step API (``begin_train_step``) nulls the same three hooks and runs under ``model.no_sync()``. The
        MoE auxiliary loss is scaled to 0 (it belongs to neither c nor v²), and the model's buffers (MoE
        token counts) are restored, so the probe leaves no trace in the update that follows.
        """
        model_config = getattr(self.model, "config", None)
        hooks = ("grad_sync_func", "no_sync_func", "finalize_model_grads_func", "moe_grad_scale_func")
        saved = (
            {name: getattr(model_config, name, None) for name in hooks} if model_config is not None else {}
        )
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        if model_config is not None:
            model_config.grad_sync_func = None
            model_config.no_sync_func = contextlib.nullcontext
            model_config.finalize_model_grads_func = None
            model_config.moe_grad_scale_func = lambda: 0.0
        no_sync = getattr(self.model, "no_sync", None)
        try:
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                yield
        finally:
            for name, value in saved.items():
                setattr(model_config, name, value)
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name])

    def _probe_gradients(self, params: list[Any]) -> list[torch.Tensor | None]:
        """This rank's accumulated gradients (megatron's ``main_grad``, else ``.grad``), copied, then zeroed."""
        out = []
        for pp in params:
            g = getattr(pp.param, "main_grad", None)
            g = pp.param.grad if g is None else g
            out.append(None if g is None else g.detach().clone())
        if hasattr(self.model, "zero_grad_buffer"):
            self.model.zero_grad_buffer()
        else:
            self.model.zero_grad(set_to_none=True)
        return out

    def _probing_forward_backward(self, loss_fn: Any, probe_index: int):
        """``megatron_forward_backward`` that probes the ``probe_index``-th training call first."""
        from nemo_occ.megatron.probe_layout import (
            adam_preconditioner,
            probe_parameters,
            probe_statistics_group,
        )

        calls = itertools.count()

        def forward_backward(original: Any, **kwargs: Any):
            if kwargs.get("forward_only") or next(calls) != probe_index:
                return original(**kwargs)
            microbatches = list(kwargs.pop("data_iterator"))  # replayed by every pass
            params = probe_parameters(self.model, gradients="local")
            grads: list[list[list[torch.Tensor | None]]] = [[], []]  # [half][component][parameter]
            for half in (0, 1):
                for component in range(self.nemo_occ_cfg.num_depths + 1):
                    with loss_fn.probing(component, half=half), self.gradient_probe_pass():
                        original(data_iterator=iter(microbatches), **kwargs)
                    grads[half].append(self._probe_gradients(params))
            scale = (
                float(self.optimizer.get_loss_scale()) if hasattr(self.optimizer, "get_loss_scale") else 1.0
            )
            if scale != 1.0:  # fp16 loss scaling: report the gradients' statistics, not the scaled ones
                for g in itertools.chain.from_iterable(itertools.chain.from_iterable(grads)):
                    if g is not None:
                        g.div_(scale)
            try:
                shares = self.probe_shares(loss_fn)
            except ValueError as err:  # the same on every rank (the counts are all-reduced): no probe
                warnings.warn(f"probe skipped: {err}", stacklevel=2)
                return original(data_iterator=iter(microbatches), **kwargs)
            shards, note = adam_preconditioner(self.optimizer, params)
            self._occ_exact = cross_fitted_statistics(
                [h[0] for h in grads], [h[1:] for h in grads], params, shares=shares,
                preconditioner=shards, precond_note=note, stats_group=probe_statistics_group(),
            )  # fmt: skip
            return original(data_iterator=iter(microbatches), **kwargs)

        return forward_backward

    def probe_shares(self, loss_fn: Any) -> tuple[float, float]:
        """Each half's share of the probed update's loss denominator, the same on every rank.

        Only the stage holding the loss counts; its ranks of one data-parallel replica (TP, CP) count
        alike, so summing over the world scales both halves equally and the ratio is the batch's.
        """
        load = torch.tensor(
            loss_fn.probe_load() if self.holds_output_layer() else [0.0, 0.0], dtype=torch.float64
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from nemo_occ.core.distributed import all_reduce_sum_, collective_device
            from nemo_occ.megatron.probe_layout import probe_statistics_group

            group = probe_statistics_group()
            load = all_reduce_sum_(load.to(collective_device(group)), group).cpu()
        total = float(load.sum())
        if not total > 0 or float(load.min()) <= 0:
            raise ValueError(
                f"the probed update's halves hold {load.tolist()} of its loss denominator: cross-fitting needs "
                "at least two sequences with loss tokens"
            )
        return float(load[0]) / total, float(load[1]) / total

    # -- old log-probs -------------------------------------------------------------------------------
    def wants_mtp_old_logprobs(self) -> bool:
        """Capture the MTP heads' old log-probs with ``prev_logprobs``: for ``old_logprobs: mtp``, and for the
        probes' head-gap metrics (``fidelity.every > 0``). It costs the MTP layers' forward in that pass."""
        cfg = self.nemo_occ_cfg
        return cfg.regime_spec.has_mtp_term and (cfg.old_logprobs == "mtp" or cfg.fidelity.every > 0)

    def patched_logprobs_post_processor(self, capture: Any, inputs: ModelInputRecorder, sink: list):
        """Make NeMo-RL's ``get_logprobs`` build our post-processor, which also fills ``sink`` (restored after)."""
        return patches.logprobs_post_processor(capture, inputs, sink)

    def broadcast_tensors_from_last_stage(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """The last pipeline stage's tensors on every stage (as NeMo-RL's ``get_logprobs`` does for its own)."""
        from nemo_rl.models.megatron.pipeline_parallel import broadcast_tensors_from_last_stage

        return broadcast_tensors_from_last_stage(tensors)

    def get_logprobs(self, *, data: Any, micro_batch_size: int | None = None, **kwargs: Any) -> Any:
        """NeMo-RL's ``get_logprobs``, plus each MTP depth's old log-probs from the same forward (module docstring)."""
        if self._occ_reference_pass or not self.wants_mtp_old_logprobs():
            return super().get_logprobs(data=data, micro_batch_size=micro_batch_size, **kwargs)
        from nemo_occ.megatron.mtp_capture import MTPCapture

        sink: list[list[torch.Tensor]] = []  # per micro-batch, per depth: [B_mb, S_mb] old log-probs
        with contextlib.ExitStack() as stack:
            capture = stack.enter_context(MTPCapture(self.model, detach_trunk=False))
            inputs = stack.enter_context(ModelInputRecorder(self.model))
            stack.enter_context(self.patched_logprobs_post_processor(capture, inputs, sink))
            result = super().get_logprobs(data=data, micro_batch_size=micro_batch_size, **kwargs)
        keys = [mtp_old_logprobs_key(d) for d in range(1, self.nemo_occ_cfg.num_depths + 1)]
        tensors: dict[str, Any] = dict.fromkeys(keys)
        if self.holds_output_layer():  # NeMo-RL pads each micro-batch to the batch's length, then stacks
            tensors.update(
                stack_old_logprobs(sink, self.nemo_occ_cfg.num_depths, result["logprobs"].shape[1])
            )
        for key, value in self.broadcast_tensors_from_last_stage(tensors).items():
            result[key] = value.cpu()
        return result

    def get_reference_policy_logprobs(self, *args: Any, **kwargs: Any) -> Any:
        """NeMo-RL's, which calls ``get_logprobs`` with the reference weights: no MTP old log-probs there."""
        self._occ_reference_pass = True
        try:
            return super().get_reference_policy_logprobs(*args, **kwargs)
        finally:
            self._occ_reference_pass = False

    # -- training ----------------------------------------------------------------------------------
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

    def acceptance_over_ranks(self, counts: torch.Tensor | None) -> torch.Tensor | None:
        """The loss's [K, 2] draft-acceptance counts of this ``train`` call, summed over the DP ranks.

        Only the stage holding the loss has counts, and every DP rank of it does, so the collective is
        matched; :func:`nemo_occ.core.metrics.step_metrics` turns them into ``accuracy_<d>``.
        """
        if counts is None:
            return None
        from nemo_occ.core.distributed import all_reduce_sum_

        return all_reduce_sum_(counts, self.occ_reduction_group())

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

    # -- checkpointing -------------------------------------------------------------------------------
    def save_checkpoint(self, weights_path: str, *args: Any, **kwargs: Any):
        result = super().save_checkpoint(weights_path, *args, **kwargs)
        if self.is_state_writer():
            self.save_occ_state(Path(weights_path).parent / STATE_FILE)
        return result

    def save_occ_state(self, path: Path) -> None:
        """Write the objective's state atomically (``nemo_occ.atomic_io.atomic_write``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "nemo_occ": self.nemo_occ_cfg.model_dump(),
            "objective": self.occ_objective.state_dict(),
            "probes": self.occ_probes.state_dict(),
            "rl_steps": self.occ_rl_steps,
        }
        atomic_write(path, lambda f: torch.save(state, f))

    def load_occ_state(self, path: Path) -> bool:
        """Restore the objective saved by :meth:`save_occ_state`; warn when resuming without one.

        A different regime or number of depths is refused (the objective's ``load_state_dict``). Other
        ``nemo_occ`` settings that changed since the checkpoint are named in a warning: the restored λ and
        probe history were made under the saved ones, λ is used until the resumed run first refreshes it
        (its first applied update after the step's first), and moving the state file away restarts the
        calibrator at ``initial_lambda`` instead.
        """
        if not path.is_file():
            if self.occ_objective.calibrator is not None:
                warnings.warn(
                    f"resuming from {path.parent} without {STATE_FILE}: the OCC calibrator restarts at "
                    f"λ = {self.nemo_occ_cfg.occ.initial_lambda}",
                    stacklevel=2,
                )
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        probes = ProbeHistory.from_config(self.nemo_occ_cfg.num_depths, self.nemo_occ_cfg.fidelity)
        if "probes" in state:  # states written before the probes existed have none
            probes.load_state_dict(state["probes"])
        self.occ_objective.load_state_dict(state["objective"])
        self.occ_probes, self.occ_rl_steps = probes, int(state.get("rl_steps", 0))
        changed = _config_changes(state.get("nemo_occ", {}), self.nemo_occ_cfg.model_dump())
        if changed and self.is_state_writer():  # one rank says it, not every rank of the job
            warnings.warn(
                f"resuming the OCC state of {path} under changed nemo_occ settings ({'; '.join(changed)}): "
                "the restored λ and probe history were made under the saved ones, and λ is used until the "
                f"run first refreshes it; to restart the calibrator at λ = {self.nemo_occ_cfg.occ.initial_lambda} "
                f"instead, move {path} away before resuming",
                stacklevel=2,
            )
        return True


class ModelInputRecorder(contextlib.AbstractContextManager):
    """Remembers the ``input_ids`` of the last ``model(...)`` call (this CP rank's shard, packed or not).

    The MTP targets must be built from exactly the tokens the model saw; NeMo-RL packs and CP-shards them
    between the micro-batch ``data`` and the forward, so they are read off the forward call itself.
    """

    def __init__(self, model: torch.nn.Module):
        from nemo_occ.megatron.model_access import unwrap_gpt_model

        self.gpt = unwrap_gpt_model(model)
        self.input_ids: torch.Tensor | None = None
        self.packed_seq_params: Any = None
        self._handle = None

    def _hook(self, module, args, kwargs):
        self.input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.packed_seq_params = kwargs.get("packed_seq_params")

    def __enter__(self) -> ModelInputRecorder:
        self._handle = self.gpt.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.input_ids = None
        self.packed_seq_params = None


def _config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"occ.lambda_plus: 1.0 -> 0.5"`` for every (nested) field whose value differs."""
    out = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key, "(not saved)"), current.get(key, "(unset)")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += _config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old} -> {new}")
    return out
