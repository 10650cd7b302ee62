"""The per-token inputs of one micro-batch, as the MTP objective and the OCC calibrator read them.

One frozen :class:`TokenInputs` replaces the ten separate arguments that used to travel through
``MTPObjective.__call__``, ``depth_losses``, ``OCCCalibrator.statistics`` and the NeMo-RL loss. The
per-depth lists are checked against each other once, when it is built; what depends on the config (the
number of depths the model must have, which old log-probs the ratio uses) is checked by the consumer.

Letters: B sequences, S token positions, K MTP depths (``len(mtp_logprobs)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nemo_occ.core.losses import Number

__all__ = ["TokenInputs"]


@dataclass(frozen=True)
class TokenInputs:
    """One micro-batch's per-token inputs; the per-depth sequences are stored as tuples.

    ``main_logprobs`` (the calibrator's δ_RL) may be None where only the MTP losses are asked for (the exact
    probes); ``advantages`` and ``global_valid_tokens`` may be None where only the calibrator's statistics are.
    """

    old_logprobs: torch.Tensor  # [B, S] the main head's old log-probs
    mask: torch.Tensor  # [B, S] loss tokens
    mtp_logprobs: Sequence[torch.Tensor]  # K x [B, S], aligned to the main positions
    main_logprobs: torch.Tensor | None = None  # [B, S]
    advantages: torch.Tensor | None = None  # [B] or [B, S]
    mtp_masks: Sequence[torch.Tensor] | None = None  # K x [B, S]: positions with a depth-k target
    mtp_old_logprobs: Sequence[torch.Tensor] | None = None  # K x [B, S]: each MTP head's own old log-probs
    global_valid_tokens: Number | None = None  # the loss's denominators over the global batch
    global_valid_seqs: Number = 0

    def __post_init__(self) -> None:
        for name in ("mtp_logprobs", "mtp_masks", "mtp_old_logprobs"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        K = len(self.mtp_logprobs)
        for name in ("mtp_masks", "mtp_old_logprobs"):
            entries = getattr(self, name)
            if entries is not None and len(entries) != K:
                raise ValueError(
                    f"{name} has {len(entries)} entries but there are {K} MTP depth(s) "
                    f"(mtp_logprobs has {K}); pass one per depth, depth 1 first"
                )
        for k, mk in enumerate(self.mtp_masks or ()):
            if mk.shape != self.mask.shape:  # `mask & mk` would broadcast a [S] or [B, 1] mask silently
                raise ValueError(
                    f"mtp_masks[{k}] has shape {tuple(mk.shape)} but mask has {tuple(self.mask.shape)}; "
                    "each depth's mask must be [B, S] like the main mask"
                )

    @property
    def num_depths(self) -> int:
        """K, the number of MTP depths the inputs carry."""
        return len(self.mtp_logprobs)

    def depth_masks(self) -> list[torch.Tensor]:
        """K x [B, S] bool: mask_k = mask ∧ mtp_masks[k] (the main mask where no depth masks are given)."""
        mask = self.mask.bool()
        if self.mtp_masks is None:
            return [mask] * self.num_depths
        return [mask & mk.bool() for mk in self.mtp_masks]
