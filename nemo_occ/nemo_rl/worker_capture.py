"""The worker extension's MTP capture: the model runs inside ``MTPCapture``, and NeMo-RL's post-processors
(swapped while a call runs, ``nemo_occ.nemo_rl.megatron_policy_worker_patches``) turn the captured hidden
states into each depth's aligned log-probs in the micro-batch (training) or next to ``logprobs`` (old log-probs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from nemo_occ.nemo_rl import megatron_policy_worker_patches as patches
from nemo_occ.nemo_rl.mtp_batch import mtp_old_logprobs_key, stack_old_logprobs

__all__ = ["MTPCaptureMixin", "ModelInputRecorder"]


class MTPCaptureMixin:
    """The MTP log-probs in NeMo-RL's forwards: the training forward's (items 1 and 5 of
    ``nemo_occ.nemo_rl.worker``), and each depth's old log-probs in ``get_logprobs``."""

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
        """Whether this pipeline stage has the output layer (and so the MTP layers and the loss)."""
        from nemo_occ.megatron.model_access import unwrap_gpt_model

        return bool(getattr(unwrap_gpt_model(self.model), "post_process", True))

    def patched_loss_post_processor(self, capture: Any, inputs: ModelInputRecorder):
        """Make NeMo-RL's ``train`` build our MTP-aware post-processor (restored afterwards)."""
        return patches.loss_post_processor(capture, inputs)

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
