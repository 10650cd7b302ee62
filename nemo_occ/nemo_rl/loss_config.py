"""NeMo-RL ``loss_fn:`` settings -> the :class:`PolicyLossConfig` of the MTP term.

The main head keeps NeMo-RL's own ``ClippedPGLossFn``; the MTP term of the policy/occ regimes must clip
and aggregate the same way, so its config is derived from the same block:

| NeMo-RL ``loss_fn`` key            | ``PolicyLossConfig``                               |
|------------------------------------|----------------------------------------------------|
| ``ratio_clip_min`` (ε_low)         | ``ratio_clip_low``                                 |
| ``ratio_clip_max`` (ε_high, DAPO)  | ``ratio_clip_high``                                |
| ``ratio_clip_c`` (dual clip)       | ``ratio_clip_c``                                   |
| ``token_level_loss: true/false``   | ``aggregation: token_mean / seq_mean_token_mean``  |
| ``sequence_level_importance_ratios`` (GSPO) | ``importance_ratio: sequence``            |

NeMo-RL settings that change the main head's surrogate in ways the MTP term does not follow are
rejected (``disable_ppo_ratio``, ``use_cispo`` with a policy-gradient MTP term) or reported as not
applying to it (KL penalty, importance-sampling corrections, ``force_on_policy_ratio``); they keep
their exact NeMo-RL meaning for the main head. Defaults are NeMo-RL's ``ClippedPGLossConfig`` defaults.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from nemo_occ.core.config import ConfigError, NemoOCCConfig, PolicyLossConfig, parse_block

__all__ = ["policy_loss_config", "check_loss_settings"]

# NeMo-RL's ClippedPGLossConfig defaults for the keys we read.
_NEMO_RL_DEFAULTS = {
    "ratio_clip_min": 0.2,
    "ratio_clip_max": 0.2,
    "ratio_clip_c": None,
    "token_level_loss": True,
    "sequence_level_importance_ratios": False,
}


def _as_dict(loss_cfg: Any) -> dict[str, Any]:
    if isinstance(loss_cfg, Mapping):
        return dict(loss_cfg)
    if hasattr(loss_cfg, "model_dump"):  # NeMo-RL's pydantic ClippedPGLossConfig
        return loss_cfg.model_dump()
    raise TypeError(
        f"loss_fn settings must be a mapping or a ClippedPGLossConfig, got {type(loss_cfg).__name__}"
    )


def policy_loss_config(loss_cfg: Mapping | Any) -> PolicyLossConfig:
    """The MTP term's :class:`PolicyLossConfig` for a NeMo-RL ``loss_fn`` block (see the table above)."""
    cfg = {**_NEMO_RL_DEFAULTS, **_as_dict(loss_cfg)}
    gspo = bool(cfg["sequence_level_importance_ratios"])
    if gspo and cfg["token_level_loss"]:
        raise ConfigError(
            "GSPO (loss_fn.sequence_level_importance_ratios: true) needs loss_fn.token_level_loss: false"
        )
    return parse_block(
        PolicyLossConfig,
        {
            "ratio_clip_low": cfg["ratio_clip_min"],
            "ratio_clip_high": cfg["ratio_clip_max"],
            "ratio_clip_c": cfg["ratio_clip_c"],
            "aggregation": "token_mean" if cfg["token_level_loss"] else "seq_mean_token_mean",
            "importance_ratio": "sequence" if gspo else "token",
        },
        "loss_fn",
    )


def check_loss_settings(loss_cfg: Mapping | Any, nemo_occ_cfg: NemoOCCConfig) -> PolicyLossConfig:
    """Reject NeMo-RL loss settings the regime's MTP term cannot follow; warn on those it ignores."""
    cfg = _as_dict(loss_cfg)
    policy_cfg = policy_loss_config(cfg)
    regime = nemo_occ_cfg.regime_spec
    if not regime.uses_policy_loss:
        return policy_cfg
    if cfg.get("disable_ppo_ratio"):
        raise ConfigError(
            f"regime '{regime.name}' applies the clipped ratio loss to the MTP heads, but loss_fn.disable_ppo_ratio "
            "is true (REINFORCE): set it to false or use regime detach/ce"
        )
    if cfg.get("use_cispo"):
        raise ConfigError(
            f"loss_fn.use_cispo: true is not supported with regime '{regime.name}' (the MTP term uses the clipped "
            "surrogate): set use_cispo: false or use regime detach/ce"
        )
    if regime.calibrated and cfg.get("force_on_policy_ratio"):
        raise ConfigError(
            "loss_fn.force_on_policy_ratio: true makes δ_RL = log π - log π_old identically 0, so OCC's λ_t would "
            "always be 0: set it to false (with several updates per step) or use regime policy"
        )
    ignored = [
        key
        for key in (
            "use_importance_sampling_correction",
            "truncated_importance_sampling_type",
            "force_on_policy_ratio",
            "positive_example_nll_weight",
        )
        if cfg.get(key)
    ]
    if float(cfg.get("reference_policy_kl_penalty") or 0.0) and not cfg.get("use_kl_in_reward"):
        ignored.append("reference_policy_kl_penalty")
    if ignored:
        warnings.warn(
            f"loss_fn settings {ignored} apply to the main head only; the MTP term is the plain clipped "
            "surrogate (with the same clip ranges and aggregation)",
            stacklevel=2,
        )
    return policy_cfg
