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
from typing import TYPE_CHECKING, Literal

import torch

from nemo_occ.core.losses import Number, clipped_policy_loss, cross_entropy_loss

if TYPE_CHECKING:
    from nemo_occ.core.loss_config import PolicyLossConfig

__all__ = ["REGIMES", "RegimeName", "RegimeSpec", "get_regime"]


@dataclass(frozen=True)
class RegimeSpec:
    """What a regime asks of the loss and of the model layer: one row of the table above.

    Callers ask it (``spec.calibrated``, ``spec.has_mtp_term``, ...) instead of comparing names.
    """

    name: str
    objective: Literal["none", "ce", "policy"]  # each depth's unscaled MTP loss
    trunk_gradient: bool  # the MTP loss may send gradient into the shared trunk (embedding, decoder, head)
    calibrated: bool  # λ_t comes from OCC (Eq. 13) instead of the fixed ``coef``

    @property
    def has_mtp_term(self) -> bool:
        """Whether the regime adds an MTP term to the loss at all."""
        return self.objective != "none"

    @property
    def uses_policy_loss(self) -> bool:
        """Whether the MTP term is the main head's clipped policy loss (a ratio against an old log-prob)."""
        return self.objective == "policy"

    @property
    def uses_coef(self) -> bool:
        """Whether the MTP term is scaled by the fixed ``coef``."""
        return self.has_mtp_term and not self.calibrated

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
    spec.name: spec
    for spec in (
        RegimeSpec("none", "none", trunk_gradient=False, calibrated=False),
        RegimeSpec("detach", "ce", trunk_gradient=False, calibrated=False),
        RegimeSpec("ce", "ce", trunk_gradient=True, calibrated=False),
        RegimeSpec("policy", "policy", trunk_gradient=True, calibrated=False),
        RegimeSpec("occ", "policy", trunk_gradient=True, calibrated=True),
    )
}
REGIMES: tuple[str, ...] = tuple(_SPECS)  # the names, in the table's order
RegimeName = Literal[REGIMES]  # the config field's type: the same names, nothing to keep in sync


def get_regime(name: str) -> RegimeSpec:
    """The :class:`RegimeSpec` of ``name`` (none | detach | ce | policy | occ); ValueError names the choices."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown MTP regime '{name}'; choose one of: {', '.join(REGIMES)}") from None
