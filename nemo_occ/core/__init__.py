"""Core math of nemo-occ: torch only (no megatron, NeMo-RL or Ray).

See ``docs/design.md`` for how these pieces are called during one training step.
"""

from nemo_occ.core.alignment import align_mtp_to_main, mtp_targets, shift_left, shift_right
from nemo_occ.core.calibration import OCCCalibrator, proxy_statistics
from nemo_occ.core.config import (
    REGIMES,
    ConfigError,
    NemoOCCConfig,
    OCCConfig,
    PolicyLossConfig,
    load_config,
)
from nemo_occ.core.diagnostics import (
    ExactStatistics,
    GradientStatistics,
    ProbeParameter,
    cross_fitted_statistics,
    exact_cross_fitted_statistics,
    exact_gradient_statistics,
    gradient_statistics,
)
from nemo_occ.core.fidelity import HeadGap, ProbeHistory, sign_agreement, spearman_interval, trust_verdict
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.losses import clipped_policy_loss, cross_entropy_loss, valid_counts
from nemo_occ.core.metrics import DepthStatistics, UpdateStatistics, acceptance_counts, step_metrics
from nemo_occ.core.objective import MTPObjective
from nemo_occ.core.regimes import RegimeSpec, get_regime

__all__ = [
    "TokenInputs",
    "REGIMES",
    "ConfigError",
    "DepthStatistics",
    "ExactStatistics",
    "GradientStatistics",
    "HeadGap",
    "MTPObjective",
    "NemoOCCConfig",
    "OCCCalibrator",
    "OCCConfig",
    "PolicyLossConfig",
    "ProbeHistory",
    "ProbeParameter",
    "RegimeSpec",
    "UpdateStatistics",
    "acceptance_counts",
    "align_mtp_to_main",
    "clipped_policy_loss",
    "cross_entropy_loss",
    "cross_fitted_statistics",
    "exact_cross_fitted_statistics",
    "exact_gradient_statistics",
    "get_regime",
    "gradient_statistics",
    "load_config",
    "mtp_targets",
    "proxy_statistics",
    "shift_left",
    "shift_right",
    "sign_agreement",
    "spearman_interval",
    "step_metrics",
    "trust_verdict",
    "valid_counts",
]
