"""The five MTP training regimes of the OCC paper (Table 1), each a small named unit.

| regime | MTP objective per depth                 | MTP gradient into trunk | coefficient          |
|--------|-----------------------------------------|-------------------------|----------------------|
| none   | nothing                                 | -                       | -                    |
| detach | cross-entropy on the sampled tokens     | no (MTP params only)    | fixed ``coef``       |
| ce     | cross-entropy on the sampled tokens     | yes                     | fixed ``coef``       |
| policy | the main head's clipped policy loss     | yes                     | fixed ``coef``       |
| occ    | the main head's clipped policy loss     | yes                     | λ_t from OCC (Eq. 13)|

How the trunk is cut for ``detach`` belongs to the model layer (``nemo_occ.megatron``): this module
only defines each depth's unscaled loss and whether the coefficient is calibrated.

Letters: B sequences, S token positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_occ.core.config import REGIMES, PolicyLossConfig
from nemo_occ.core.losses import Number, clipped_policy_loss, cross_entropy_loss

__all__ = ["RegimeSpec", "get_regime"]


@dataclass(frozen=True)
class RegimeSpec:
    """What a regime asks of the loss and of the model layer."""

    name: str
    objective: str  # "none" | "ce" | "policy"
    trunk_gradient: bool
    calibrated: bool

    def depth_loss(
        self,
        mtp_logprobs: torch.Tensor,  # [B, S] aligned MTP log-probs of one depth
        old_logprobs: torch.Tensor,  # [B, S] the old log-prob its ratio uses
        advantages: torch.Tensor,  # [B] or [B, S]
        mask: torch.Tensor,  # [B, S] valid for this depth
        policy_cfg: PolicyLossConfig,
        *,
        global_valid_tokens: Number,
        global_valid_seqs: Number,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One depth's loss before its coefficient."""
        if self.objective == "ce":
            return cross_entropy_loss(mtp_logprobs, mask, global_valid_tokens=global_valid_tokens)
        if self.objective == "policy":
            return clipped_policy_loss(
                mtp_logprobs,
                old_logprobs,
                advantages,
                mask,
                policy_cfg,
                global_valid_tokens=global_valid_tokens,
                global_valid_seqs=global_valid_seqs,
            )
        raise AssertionError(f"regime {self.name} has no MTP loss")


_SPECS = {
    "none": RegimeSpec("none", "none", trunk_gradient=False, calibrated=False),
    "detach": RegimeSpec("detach", "ce", trunk_gradient=False, calibrated=False),
    "ce": RegimeSpec("ce", "ce", trunk_gradient=True, calibrated=False),
    "policy": RegimeSpec("policy", "policy", trunk_gradient=True, calibrated=False),
    "occ": RegimeSpec("occ", "policy", trunk_gradient=True, calibrated=True),
}
assert tuple(_SPECS) == REGIMES


def get_regime(name: str) -> RegimeSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown MTP regime '{name}'; choose one of: {', '.join(REGIMES)}") from None
