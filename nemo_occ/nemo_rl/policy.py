"""Driver side of ``old_logprobs: mtp``: NeMo-RL's ``Policy`` carrying the MTP heads' old log-probs into training.

NeMo-RL's GRPO loop computes the old log-probs with ``policy.get_logprobs(logprob_data)`` and keeps only
``["logprobs"]`` as the batch's ``prev_logprobs``; then it calls ``policy.train(train_data, loss_fn)`` on the
same rollouts (``train_data["input_ids"]`` is the tensor ``logprob_data`` was built from). nemo-occ's worker
returns each MTP depth's old log-probs from that same forward (``nemo_occ.nemo_rl.worker``, item 5), under
:func:`nemo_occ.nemo_rl.mtp_batch.mtp_old_logprobs_key`; NeMo-RL's own gather (``BatchedDataDict.from_batches``
and the dynamic-batching reorder) carries them like ``logprobs``. :class:`OCCPolicy` keeps them from
``get_logprobs`` and adds them to the batch of the next ``train`` call, after checking that it is the same
rollouts. Only the driver runs this module: it imports NeMo-RL's ``Policy`` but never megatron.
"""

from __future__ import annotations

from typing import Any

import torch
from nemo_rl.models.policy.lm_policy import Policy

from nemo_occ.nemo_rl.mtp_batch import take_mtp_old_logprobs

__all__ = ["OCCPolicy"]


class OCCPolicy(Policy):
    """NeMo-RL's ``Policy`` that hands the MTP heads' old log-probs from ``get_logprobs`` to ``train``."""

    _occ_pending: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def get_logprobs(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """NeMo-RL's ``get_logprobs``; the MTP depths' old log-probs it also returned are kept for the next ``train``."""
        out = super().get_logprobs(data, *args, **kwargs)
        mtp_old = take_mtp_old_logprobs(out)
        self._occ_pending = (data["input_ids"], mtp_old) if mtp_old else None
        return out

    def train(self, data: Any, loss_fn: Any, *args: Any, **kwargs: Any) -> Any:
        """NeMo-RL's ``train`` on ``data`` with the kept MTP old log-probs added (:meth:`with_mtp_old_logprobs`)."""
        return super().train(self.with_mtp_old_logprobs(data), loss_fn, *args, **kwargs)

    def with_mtp_old_logprobs(self, data: Any) -> Any:
        """``data`` plus the MTP old log-probs of the last ``get_logprobs``, which must be of these rollouts."""
        if self._occ_pending is None:
            return data
        input_ids, mtp_old = self._occ_pending
        self._occ_pending = None
        if tuple(data["input_ids"].shape) != tuple(input_ids.shape) or not torch.equal(
            data["input_ids"], input_ids
        ):
            raise ValueError(
                "the batch given to train() is not the one whose old log-probs get_logprobs() computed, so the MTP "
                "heads' old log-probs cannot be attached; nemo-occ supports NeMo-RL's synchronous grpo_train loop"
            )
        out = type(data)(data)  # a shallow copy: the caller's batch keeps its keys
        out.update(mtp_old)
        return out
