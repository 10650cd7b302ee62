"""What ``nemo-occ study`` runs, and in which order: the variants (regime + settings), the seeds, the
fixed checkpoints that get probed, and each job's priority tier.

Every variant is compared with ``detach`` (the paper's baseline: the MTP heads train on their own loss,
the main model on RL alone), paired by seed. Variants, on the demo's configuration:

- core: ``detach``, ``occ`` at the configured λ+ (the paper's 1.0), ``policy`` and ``ce`` at the
  configured coefficient (the paper's 0.1);
- controls: ``ce`` at coef 1.0 (the paper's "CE hurts"); ``ce_matched``, CE at the coefficient whose MTP
  share of the update (``update/mtp_share`` = ||g_MTP term|| / ||g_RL|| over the main model) matches what
  the ``occ`` runs measured (:func:`matched_coefficient`; so "CE hurts" can be told apart from "a large
  MTP term hurts"); ``ce_coef1_clipsep``, CE at 1.0 with the main model and ``mtp.*`` clipped by their own
  norms (``rl.clip_scope: separate``; with one global norm, as Megatron clips, CE's large MTP gradient
  scales the RL gradient down); ``occ_oldmtp``, OCC with ``old_logprobs: mtp`` (each MTP head's own old
  log-prob in its ratio); ``occ_probed``, OCC with ``occ.estimator: probed`` (λ from the cross-fitted
  exact statistics of the training probes, held between probes);
- sweeps, at the sweep seeds (none by default: they do not fit the default study's hour on 2 cores):
  ``none`` (no MTP loss), ``policy`` with ``old_logprobs: mtp``, ``policy`` at coef {0.2, 0.5, 1.0},
  ``occ`` at λ+ ∈ {0.1, 0.5, 2.0} (values equal to the core's are the core run).

Order (a study cut short by ``--max-minutes`` still holds the most important comparisons): tier 1 the
core variants for every seed; tier 2 the controls for every seed (``ce_matched`` needs tier 1's ``occ`` and
``ce`` runs); tier 3 the fixed-checkpoint probes of the core ``occ``, ``policy`` and ``ce`` runs; tier 4 the
sweeps. Jobs of one tier are independent of each other, so they may run in parallel.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.lab.demo.config import DemoConfig, _merge

__all__ = ["Job", "Variant", "build_plan", "matched_coefficient", "probe_steps", "variants"]

POLICY_COEFS = (0.1, 0.2, 0.5, 1.0)
LAMBDA_PLUS = (0.1, 0.5, 1.0, 2.0)
BASELINE = "detach"
MATCHED = "ce_matched"  # its coef is measured by the study (matched_coefficient), None in the plan


@dataclass(frozen=True)
class Variant:
    name: str  # folder name, e.g. "policy_coef0.5"
    regime: str
    overrides: dict = field(default_factory=dict, hash=False, compare=False)  # nemo_occ: block entries
    demo_overrides: dict = field(default_factory=dict, hash=False, compare=False)  # demo: block entries
    kind: str = "sweep"  # "core" | "control" | "sweep"

    @property
    def core(self) -> bool:
        """One of the core variants (trained for every seed, their checkpoints probed)."""
        return self.kind == "core"

    def describe(self) -> str:
        """The regime and its overrides, as the report names the variant."""
        if not self.overrides and not self.demo_overrides:
            return self.regime
        parts = []
        for k, v in {**self.overrides, **self.demo_overrides}.items():
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
    """Core variants, controls, then the sweeps (module docstring); sweep values equal to the core's are skipped."""
    # within a seed: the baseline first, then OCC and the fixed-λ policy loss it calibrates, then ce
    out = [Variant(r, r, {}, kind="core") for r in (BASELINE, "occ", "policy", "ce")]
    out += [
        Variant("ce_coef1", "ce", {"coef": 1.0}, kind="control"),
        Variant(MATCHED, "ce", {"coef": None}, kind="control"),
        Variant("ce_coef1_clipsep", "ce", {"coef": 1.0}, demo_overrides={"rl": {"clip_scope": "separate"}},
                kind="control"),  # fmt: skip
    ]
    out.append(Variant("occ_oldmtp", "occ", {"old_logprobs": "mtp"}, kind="control"))
    out.append(Variant("occ_probed", "occ", {"occ": {"estimator": "probed"}}, kind="control"))
    out.append(Variant("none", "none", {}))  # sweeps from here on
    out.append(Variant("policy_oldmtp", "policy", {"old_logprobs": "mtp"}))
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
    return out


def matched_coefficient(occ_shares: list[float], ce_shares: list[float], ce_coef: float) -> dict:
    """The CE coefficient whose MTP share of the update matches OCC's: the share ||g_term|| / ||g_RL|| is
    linear in the coefficient at a given model state, so coef = ce_coef · mean(occ share) / mean(ce share),
    from the per-step ``update/mtp_share`` of the ``occ`` and ``ce`` runs (every seed). Rounded to 3
    significant digits: the coefficient is a setting, and a rerun must give the same one."""
    finite_occ = [x for x in occ_shares if math.isfinite(x)]
    finite_ce = [x for x in ce_shares if math.isfinite(x)]
    if not finite_occ or not finite_ce or sum(finite_ce) <= 0:
        raise ValueError("no finite update/mtp_share in the occ and ce runs: cannot match CE's coefficient")
    occ = sum(finite_occ) / len(finite_occ)
    per_coef = sum(finite_ce) / len(finite_ce) / ce_coef
    coef = float(f"{occ / per_coef:.3g}")
    if coef <= 0:
        raise ValueError(f"occ's measured MTP share is {occ:g}: no positive CE coefficient matches it")
    return {"coef": coef, "occ_share": occ, "ce_share_per_coef": per_coef, "ce_coef": ce_coef,
            "steps": {"occ": len(finite_occ), "ce": len(finite_ce)}}  # fmt: skip


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
            Variant(v.name.replace("_oldmtp", "_oldmain"), v.regime, {"old_logprobs": "main"}, kind=v.kind)
            if v.name.endswith("_oldmtp")
            else v
            for v in all_variants
        ]
    core = [v for v in all_variants if v.kind == "core"]
    controls = [v for v in all_variants if v.kind == "control"]
    sweep = [v for v in all_variants if v.kind == "sweep"]
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
    jobs += [Job(2, "train", v, s) for s in seeds for v in controls]
    jobs += [Job(3, "probe", v, s, k) for s in seeds for k in ks for v in probed]
    jobs += [Job(4, "train", v, s) for s in sweep_seeds for v in sweep]
    return jobs


def variant_config(
    cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, variant: Variant, seed: int, checkpoint_every: int
) -> tuple[DemoConfig, NemoOCCConfig]:
    """The demo configuration of one run: the base one with the variant's ``nemo_occ`` settings."""
    if any(v is None for v in variant.overrides.values()):
        raise ValueError(f"{variant.name}: its coefficient is not measured yet (plan.matched_coefficient)")
    demo = _merge(cfg.model_dump(), variant.demo_overrides)
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
