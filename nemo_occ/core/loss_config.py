"""The clipped policy-gradient loss's configuration (PPO/GRPO/DAPO/GSPO), shared by the main head and the MTP
heads; ``nemo_occ.core.config`` re-exports it with the other blocks. Apart from config.py so that the loss
and the regimes can name it without importing the whole configuration (which imports them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # allow_inf_nan=False: a float field rejects inf/nan (YAML `.inf`, `.nan`, "inf"), which would
    # otherwise pass every range check it is not compared against and turn λ or the loss into inf/NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class PolicyLossConfig(_Strict):
    """Clipped policy-gradient loss shared by the main head and the MTP heads (PPO/GRPO/DAPO/GSPO)."""

    ratio_clip_low: float = Field(
        0.2, ge=0.0, lt=1.0, description="ε_low: the ratio is clipped below at 1 - ratio_clip_low."
    )
    ratio_clip_high: float = Field(
        0.28,
        ge=0.0,
        description="ε_high: the ratio is clipped above at 1 + ratio_clip_high (DAPO clip-higher: 0.28).",
    )
    ratio_clip_c: float | None = Field(
        None,
        gt=1.0,
        description="Dual-clip constant c (> 1): for negative advantages the loss is capped at -c·A. None disables it.",
    )
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = Field(
        "token_mean",
        description="token_mean: mean over all valid tokens of the global batch (DAPO). "
        "seq_mean_token_mean: mean over sequences of each sequence's token mean (GRPO, GSPO).",
    )
    importance_ratio: Literal["token", "sequence"] = Field(
        "token",
        description="token: per-token ratio π/π_old (PPO, GRPO, DAPO). sequence: GSPO's length-normalised "
        "sequence ratio exp(mean_t(log π - log π_old)).",
    )

    @model_validator(mode="after")
    def _gspo_needs_sequence_aggregation(self) -> PolicyLossConfig:
        if self.importance_ratio == "sequence" and self.aggregation != "seq_mean_token_mean":
            raise ValueError(
                "GSPO (importance_ratio: sequence) needs sequence-level aggregation: "
                "set aggregation: seq_mean_token_mean (NeMo-RL: token_level_loss: false)"
            )
        return self
