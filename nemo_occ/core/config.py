"""Typed configuration of nemo-occ's math: one pydantic model per block, unknown keys rejected.

YAML layout (a recipe's ``nemo_occ:`` block; the policy-loss block lives next to it in the demo and
is derived from NeMo-RL's ``loss_fn`` block in the NeMo-RL glue)::

    nemo_occ:
      regime: occ            # none | detach | ce | policy | occ
      num_depths: 1
      coef: 0.1              # fixed λ of detach / ce / policy
      old_logprobs: main     # main | mtp
      occ: {lambda_plus: 1.0, eps: 1.0e-8, estimator: signed, timing: lagged}
      fidelity: {every: 0, metric: euclidean, window: 6, min_windows: 3}   # exact probes, off by default
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from nemo_occ.core.loss_config import PolicyLossConfig, _Strict
from nemo_occ.core.regimes import REGIMES, RegimeName, RegimeSpec, get_regime

# the name of nemo-occ's block: at the top of a recipe, and in NeMo-RL's policy config, where the entry point
# copies it for the workers
CONFIG_KEY = "nemo_occ"

__all__ = [
    "REGIMES",
    "PolicyLossConfig",
    "OCCConfig",
    "FidelityConfig",
    "NemoOCCConfig",
    "load_config",
    "ConfigError",
]


class ConfigError(ValueError):
    """A configuration the user has to change; the message says what to set."""


class OCCConfig(_Strict):
    """Optimal Coefficient Calibration, Eq. 13 of the OCC paper: λ_t = λ+ · ĉ_t / (v̂_t² + ε)."""

    lambda_plus: float = Field(
        1.0, gt=0.0, description="λ+, absorbs the unknown smoothness prefactor of Eq. 11 (paper default 1.0)."
    )
    eps: float = Field(1e-8, gt=0.0, description="ε in the denominator of Eq. 13 (paper default 1e-8).")
    estimator: Literal["signed", "clipped", "reference", "probed"] = Field(
        "signed",
        description="signed: ĉ/(v̂²+ε) over all valid tokens of the batch (OCC-NoClip, the paper's default). "
        "clipped: max(0, ĉ)/(v̂²+ε) (OCC-Clip, Appendix E). reference: mean over valid tokens of the "
        "per-token ratios δ_RL·δ_MTP/(δ_MTP²+ε), as the public reference code does (parity only; the reference "
        "also averages unmasked positions per micro-batch and divides by the number of MTP layers, which is 1 "
        "in every published run). probed (beyond the paper): λ = λ+·c_x/(v²_x+ε) from the cross-fitted exact "
        "statistics of the probed update (fidelity.metric picks Euclidean or Adam-preconditioned), set every "
        "fidelity.every RL steps and held in between; needs fidelity.every > 0.",
    )
    timing: Literal["lagged", "microbatch"] = Field(
        "lagged",
        description="lagged: statistics of update u (summed over its micro-batches and ranks) set the λ of "
        "update u+1 (except an RL step's first update, made at θ = θ_old, whose statistics keep λ), identical "
        "on every rank and independent of the micro-batch split. microbatch: each "
        "micro-batch uses the λ of its own local statistics, the reference code's timing "
        "(not split-invariant). It does not reproduce the reference code for λ < 0: this package applies "
        "λ·L(A) (the paper's Eq. 2), the reference code L(λ·A), which agree for λ >= 0 and differ for "
        "λ < 0 because clipping then acts on the other side (docs/library.md, 'Sign convention for λ < 0').",
    )
    lambda_max: float | None = Field(
        None, gt=0.0, description="Optional clamp |λ_t| <= lambda_max; None (the paper) leaves λ_t unclamped."
    )
    initial_lambda: float = Field(
        0.0,
        description="λ used before statistics set one: under lagged timing, by the first two updates of a run "
        "(the first has no statistics before it, and its own, made at θ = θ_old, keep λ).",
    )
    allow_one_update_per_step: bool = Field(
        False,
        description="Accept a NeMo-RL recipe with one optimizer update per RL step (train_global_batch_size "
        "equal to the step's samples). That update runs at θ = θ_old, where δ_RL = 0, so OCC gets no statistics "
        "and λ stays initial_lambda for the whole run; the recipe check refuses it unless this is true.",
    )


class FidelityConfig(_Strict):
    """Exact-statistics probes of c and v² (Eq. 7) and the proxy-trust metrics over them
    (``nemo_occ.core.fidelity``): do ĉ and v̂² track what they estimate on this run?"""

    every: int = Field(
        0,
        ge=0,
        description="Probe one optimizer update (one minibatch) every N RL steps: its exact c and v² over the "
        "main model's parameters (and v² over mtp.*), at the cost of 1 + K extra backward passes of that "
        "update (bench/bench_probe.py). 0 (the default) turns the probes off.",
    )
    metric: Literal["euclidean", "preconditioned"] = Field(
        "euclidean",
        description="The metric of the cross-fitted statistics that the trust verdict and estimator: probed "
        "use: euclidean <g_RL, g_MTP>, or preconditioned <g_RL, P g_MTP> with P = 1/(√v̂+ε) from Adam's "
        "second moment (the alignment that governs an Adam update). Both are always reported.",
    )
    window: int = Field(
        6,
        ge=4,
        description="Consecutive probes per window of the trust verdict: rank agreement is computed within "
        "each window (where the run has not drifted much), and windows are the unit its interval resamples.",
    )
    min_windows: int = Field(
        3, ge=2, description="Complete windows needed before the trust verdict fidelity/trusted_k can be 1."
    )


class NemoOCCConfig(_Strict):
    """How the MTP heads are trained during RL: the ``nemo_occ:`` block of a recipe."""

    regime: RegimeName = Field(
        "occ",
        description="none: no MTP term. detach: MTP cross-entropy on sampled tokens, MTP parameters only. "
        "ce: MTP cross-entropy into the trunk, fixed λ=coef. policy: the main head's clipped policy loss "
        "on the MTP heads, fixed λ=coef. occ: policy loss with λ_t from OCC.",
    )
    num_depths: int = Field(1, ge=1, description="Number of MTP layers (depths) the model has and we train.")
    coef: float = Field(
        0.1,
        ge=0.0,
        description="Fixed MTP coefficient λ for detach, ce and policy (paper: 0.1). Unused by occ.",
    )
    old_logprobs: Literal["main", "mtp"] = Field(
        "main",
        description="Old log-prob in the MTP heads' ratio and in δ_MTP. main: the main head's old log-prob, "
        "as the paper's reference code does (the ratio is then the draft/main probability ratio, so clipping "
        "keeps the MTP head near the main head's old distribution). mtp: each MTP head's own old log-prob "
        "(a trust region on the head's own change; needs old MTP log-probs from the rollout-logprob pass).",
    )
    occ: OCCConfig = Field(default_factory=OCCConfig, description="OCC calibrator settings (regime occ).")
    fidelity: FidelityConfig = Field(
        default_factory=FidelityConfig, description="Exact-statistics probes and proxy-trust metrics."
    )
    monitor_proxies: bool = Field(
        True,
        description="Also compute ĉ, v̂² (and the λ OCC would pick) under detach/ce/policy, for plots like "
        "the paper's Fig. 2. Costs one no-grad reduction per micro-batch.",
    )

    @property
    def regime_spec(self) -> RegimeSpec:
        """The regime's unit (``nemo_occ.core.regimes``): what its loss is, whether λ is calibrated, ..."""
        return get_regime(self.regime)

    @model_validator(mode="after")
    def _probed_needs_probes(self) -> NemoOCCConfig:
        if self.occ.estimator == "probed" and self.regime_spec.calibrated and not self.fidelity.every:
            raise ValueError(
                "occ.estimator: probed takes λ from the exact probes: set fidelity.every (e.g. 10) to probe "
                "every N RL steps"
            )
        if self.occ.estimator == "probed" and self.occ.timing == "microbatch":
            raise ValueError(
                "occ.estimator: probed sets λ from the probes, once per probe; occ.timing: microbatch sets it "
                "from each micro-batch's proxies: use timing: lagged"
            )
        return self

    @model_validator(mode="after")
    def _warn_unused(self) -> NemoOCCConfig:
        fields = self.model_fields_set
        spec = self.regime_spec
        if not spec.uses_coef and "coef" in fields:
            warnings.warn(
                f"nemo_occ.coef has no effect with regime '{self.regime}'"
                + (" (OCC computes λ_t; tune occ.lambda_plus instead)" if spec.calibrated else ""),
                stacklevel=2,
            )
        if not spec.calibrated and "occ" in fields and not self.monitor_proxies:
            warnings.warn(
                f"nemo_occ.occ has no effect with regime '{self.regime}' and monitor_proxies: false",
                stacklevel=2,
            )
        if self.fidelity.every and not spec.has_mtp_term:
            warnings.warn(
                f"nemo_occ.fidelity has no effect with regime '{self.regime}' (there is no MTP loss)",
                stacklevel=2,
            )
        if self.fidelity.every and spec.has_mtp_term and not (spec.calibrated or self.monitor_proxies):
            warnings.warn(
                "nemo_occ.fidelity compares the exact statistics with the proxies, which regime "
                f"'{self.regime}' computes only with monitor_proxies: true; the trust metrics stay empty",
                stacklevel=2,
            )
        if not spec.uses_policy_loss and "old_logprobs" in fields:
            warnings.warn(
                f"nemo_occ.old_logprobs only matters for policy/occ (and the proxies); regime '{self.regime}' "
                "uses no ratio",
                stacklevel=2,
            )
        return self


def _format_validation_error(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (remove it or check its spelling)")
        else:
            lines.append(f"  {loc}: {e['msg']}")
    return "invalid nemo-occ configuration:\n" + "\n".join(lines)


def parse_block(model: type[BaseModel], data: Any, prefix: str) -> Any:
    """Validate ``data`` against ``model`` with a message that names the keys to change."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, prefix)) from None


def load_config(source: str | Path | dict, key: str | None = CONFIG_KEY) -> NemoOCCConfig:
    """Load the ``nemo_occ`` block from a YAML file (or an already-parsed dict).

    ``key=None`` treats the whole mapping as the block.
    """
    if isinstance(source, dict):
        data = source
    else:
        import yaml

        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open() as f:
            data = yaml.safe_load(f) or {}
    if key is not None:
        if key not in data:
            raise ConfigError(f"no '{key}:' block in the config; add one (see docs/design.md for its fields)")
        data = data[key]
    return parse_block(NemoOCCConfig, data, key or "")
