"""What ``nemo-occ study`` runs, and in which order: the variants (regime + nemo_occ settings), the
seeds, the fixed checkpoints that get probed, and each job's priority tier.

Variants (the paper's Sec. 5 settings, on the demo's configuration):

- core: ``none``, ``detach``, ``ce``, ``policy`` at the configured coefficient (the paper's 0.1) and
  ``occ`` at the configured λ+ (the paper's 1.0);
- the fixed-coefficient sweep of the paper: ``policy`` at coef {0.1, 0.2, 0.5, 1.0} and ``ce`` at
  {0.1, 1.0} (values equal to the core's are the core run);
- λ+ ∈ {0.1, 0.5, 1.0, 2.0} for ``occ``;
- ``old_logprobs: mtp`` (each MTP head's own old log-prob) for ``policy`` and ``occ``, the regimes whose
  MTP loss reads the old log-prob (``ce`` and ``detach`` do not; ``none`` has no MTP loss);
- ``occ.estimator: probed`` (beyond the paper: λ from the probes' cross-fitted exact statistics, held
  between probes), beside the core ``occ`` run's signed estimator.

Order (the study can stop at any point and still hold the most important comparison first):
tier 1 the core variants for every seed; tier 2 ``ce`` at coef 1.0 (the paper's "CE hurts") for every
seed; tier 3 the probes of the first seed's core ce/policy/occ runs; tier 4 the other sweep variants at
the first sweep seed; tier 5 the probes of the other seeds; tier 6+ the sweeps at the other sweep seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.lab.demo.config import DemoConfig, _merge

__all__ = ["Job", "Variant", "build_plan", "probe_steps", "variants"]

POLICY_COEFS = (0.1, 0.2, 0.5, 1.0)
CE_COEFS = (0.1, 1.0)
LAMBDA_PLUS = (0.1, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Variant:
    name: str  # folder name, e.g. "policy_coef0.5"
    regime: str
    overrides: dict = field(default_factory=dict, hash=False, compare=False)  # nemo_occ: block entries
    core: bool = False

    def describe(self) -> str:
        """The regime and its overrides, as the report names the variant."""
        if not self.overrides:
            return self.regime
        parts = []
        for k, v in self.overrides.items():
            if isinstance(v, dict):
                parts += [f"{k}.{kk}={vv}" for kk, vv in v.items()]
            else:
                parts.append(f"{k}={v}")
        return f"{self.regime} ({', '.join(parts)})"


@dataclass(frozen=True)
class Job:
    tier: int
    kind: str  # "train" | "probe"
    variant: Variant
    seed: int
    step: int = 0  # probe: the checkpoint's RL step

    @property
    def label(self) -> str:
        """'<variant> seed <s>: training' or '...: probe at step <k>', for progress lines."""
        what = f"probe at step {self.step}" if self.kind == "probe" else "training"
        return f"{self.variant.name} seed {self.seed}: {what}"


def _num(x: float) -> str:
    return f"{x:g}"


def variants(coef: float, lambda_plus: float) -> list[Variant]:
    """Core variants first, then the sweeps (module docstring); values equal to the core's are skipped."""
    # within a seed: the baseline, then OCC and the fixed-λ policy loss it calibrates, then ce, and detach
    # last (its MTP gradient never reaches the main model, so its main-model run repeats none's)
    out = [Variant(r, r, {}, core=True) for r in ("none", "occ", "policy", "ce", "detach")]
    out += [Variant(f"ce_coef{_num(c)}", "ce", {"coef": c}) for c in CE_COEFS if not math.isclose(c, coef)]
    out += [
        Variant(f"policy_coef{_num(c)}", "policy", {"coef": c})
        for c in POLICY_COEFS
        if not math.isclose(c, coef)
    ]
    out += [
        Variant(f"occ_lp{_num(lp)}", "occ", {"occ": {"lambda_plus": lp}})
        for lp in LAMBDA_PLUS
        if not math.isclose(lp, lambda_plus)
    ]
    out += [Variant(f"{r}_oldmtp", r, {"old_logprobs": "mtp"}) for r in ("policy", "occ")]
    out.append(Variant("occ_probed", "occ", {"occ": {"estimator": "probed"}}))
    return out


def probe_steps(steps: int, checkpoints: int) -> list[int]:
    """``checkpoints`` RL steps spread evenly over the run, the last one at ``steps``: i·steps/checkpoints."""
    if checkpoints < 1 or steps < checkpoints:
        raise ValueError(
            f"need 1 <= probe checkpoints <= steps, got {checkpoints} checkpoints for {steps} steps"
        )
    return sorted({round(i * steps / checkpoints) for i in range(1, checkpoints + 1)})


def build_plan(
    *,
    seeds: list[int],
    sweep_seeds: list[int],
    coef: float,
    lambda_plus: float,
    old_logprobs: str,
    steps: int,
    checkpoints: int,
    probes: bool = True,
) -> list[Job]:
    """Every job of the study in the order it runs (module docstring)."""
    if not seeds:
        raise ValueError("the study needs at least one seed")
    if any(s not in seeds for s in sweep_seeds):
        raise ValueError(f"sweep seeds {sweep_seeds} must be among the seeds {seeds}")
    all_variants = variants(coef, lambda_plus)
    if old_logprobs == "mtp":  # the configured reading is already mtp: the other one is main
        all_variants = [
            Variant(v.name.replace("_oldmtp", "_oldmain"), v.regime, {"old_logprobs": "main"})
            if v.name.endswith("_oldmtp")
            else v
            for v in all_variants
        ]
    core = [v for v in all_variants if v.core]
    ce_hurts = [v for v in all_variants if v.name == "ce_coef1"]
    sweep = [v for v in all_variants if not v.core and v not in ce_hurts]
    # probes: the last checkpoint first, then earlier ones; at each, occ and policy before ce, so that a
    # study cut short has the calibrated regimes' probes at the trained model
    from nemo_occ.core.regimes import get_regime  # imports torch: only when a plan is built

    spec = {v.name: get_regime(v.regime) for v in core}
    probed = sorted(  # detach and none are not probed: their g_MTP over the main model is 0
        (v for v in core if spec[v.name].trunk_gradient),
        key=lambda v: (not spec[v.name].calibrated, not spec[v.name].uses_policy_loss),
    )
    ks = sorted(probe_steps(steps, checkpoints), reverse=True) if probes else []
    jobs = [Job(1, "train", v, s) for s in seeds for v in core]
    jobs += [Job(2, "train", v, s) for s in seeds for v in ce_hurts]
    jobs += [Job(3, "probe", v, seeds[0], k) for k in ks for v in probed]
    if sweep_seeds:
        jobs += [Job(4, "train", v, sweep_seeds[0]) for v in sweep]
    jobs += [Job(5, "probe", v, s, k) for s in seeds[1:] for k in ks for v in probed]
    jobs += [Job(6 + i, "train", v, s) for i, s in enumerate(sweep_seeds[1:]) for v in sweep]
    return jobs


def variant_config(
    cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, variant: Variant, seed: int, checkpoint_every: int
) -> tuple[DemoConfig, NemoOCCConfig]:
    """The demo configuration of one run: the base one with the variant's ``nemo_occ`` settings."""
    demo = cfg.model_dump()
    demo.update(seed=seed, regimes=[variant.regime])
    demo["rl"]["checkpoint_every"] = checkpoint_every
    occ = _merge(nemo_occ_cfg.model_dump(), variant.overrides)
    occ["regime"] = variant.regime
    with warnings.catch_warnings():  # advisories on base settings a regime ignores (coef under occ, ...)
        warnings.simplefilter("ignore", UserWarning)
        return DemoConfig.model_validate(demo), NemoOCCConfig.model_validate(occ)


def run_dir(out: Path, job: Job) -> Path:
    """The folder of one training job's demo run."""
    return out / "runs" / job.variant.name / f"seed{job.seed}"


def probe_path(out: Path, job: Job, step: int, suffix: str) -> Path:
    """The file of one probe job's result (``suffix`` .json or .pt)."""
    return out / "probes" / job.variant.name / f"seed{job.seed}" / f"step{step}{suffix}"
