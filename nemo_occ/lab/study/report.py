"""The study's report: ``summary.json``, ``summary.md``, ``provenance.json`` and the figures.

Everything is read back from the run folders and probe files, so ``nemo-occ study --report-only``
rebuilds it from whatever finished. Per run (variant, seed), :func:`run_metrics`:

- ``eval_final``: held-out avg@k at the last RL step (the paper's measure), ``eval_start`` before RL;
- ``reward_final``: mean training reward over the last ``tail`` RL steps (tail = max(5, steps/5));
- ``agreement_final``: mean MTP top-1 agreement with the sampled token over the same tail;
- ``lambda_positive``: fraction of RL steps whose λ from the update's own statistics is > 0 (every
  MTP regime monitors it; it is the applied λ's source only under ``occ``), ``lambda_median``;
- ``mtp_share_median`` (median over steps of ||λ·g_MTP|| / ||g_RL|| over the main model) and
  ``clipped_mean`` (share of updates the gradient clip scaled): descriptive, the confounds of a claim.

The statistics are ``nemo_occ.lab.study.stats``: every variant against ``detach``
paired by seed on each outcome, three more contrasts the paper's claims need (:data:`CONTRASTS`), the
one-sample tests of the mechanism's claims over seeds, Benjamini-Hochberg over all of them, effect sizes
with t intervals over seeds, the minimal detectable effect of each comparison. Probe correlations are
within one checkpoint, summarised over seeds; the exact statistics are the cross-fitted ones
(``c_cross``, ``v2_cross``) when the probes have them, the same-sample ones only as a labelled secondary.
:data:`CLAIMS` lists the paper's claims, each with its figure and its test.

Determinism: the same run folders give byte-identical ``summary.json`` and ``summary.md`` (no clocks, no
wall times, no load averages, no random draws). What does change between invocations (the report's own
command line, commit and machine, wall times, load averages) goes to ``provenance.json``.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nemo_occ.atomic_io import atomic_write
from nemo_occ.core.regimes import get_regime
from nemo_occ.lab.figures import exact_keys, training_probes
from nemo_occ.lab.study import stats
from nemo_occ.lab.study.plan import Job, probe_path, run_dir, variant_config
from nemo_occ.safe_load import load_state

__all__ = [
    "CLAIMS",
    "CONTRASTS",
    "OUTCOMES",
    "analyse",
    "build_study_report",
    "run_metrics",
    "summary_markdown",
]

BASELINE = "detach"
# outcome -> what it is (the comparisons test each of them)
OUTCOMES = {
    "eval_final": "held-out avg@k at the last step",
    "reward_final": "training reward, mean over the last max(5, steps/5) steps",
    "agreement_final": "MTP top-1 agreement, mean over the same steps",
}
# contrasts beyond "variant − detach" that a claim needs: (a, b) tested as a − b, paired by seed
CONTRASTS = (("occ", "policy"), ("occ", "ce_matched"), ("ce_coef1_clipsep", "ce_coef1"))
PER_RUN = (
    "reward_final", "eval_start", "eval_final", "agreement_final", "lambda_positive", "lambda_median",
    "mtp_share_median", "clipped_mean",
)  # fmt: skip
ADAM = (
    "the study trains with Adam while the paper's Eq. 2 assumes an SGD step: the update is preconditioned, "
    "so ĉ (which follows the update) and the Euclidean c measure alignment in different metrics "
    "(docs/design.md, 'What each number measures')"
)
SCALE = "a 2-layer, hidden-64 model on digit addition for a few dozen RL steps, not the paper's 7B model over 200 steps"


@dataclass(frozen=True)
class Claim:
    """One claim of the paper (or of the study's earlier report) and the test that decides it."""

    key: str
    text: str
    figure: str
    test: str  # a key of the report's test family (see analyse)
    direction: int  # +1: the claim says the effect is positive, -1 negative
    confounds: str = ""  # what else could produce or hide the effect here
    settle: str = ""  # the run that would settle it, beside more seeds


def _cmp(outcome: str, a: str, b: str = BASELINE) -> str:
    return f"{outcome}: {a} − {b}"


CLAIMS = (
    Claim("occ_eval", "OCC raises held-out accuracy above detach (paper: 61.7 vs 58.9 avg@32)", "fig6_reward.png",
          _cmp("eval_final", "occ"), +1, f"how large OCC's MTP term is (its MTP share); {SCALE}",
          "more RL steps, so that held-out accuracy can separate"),
    Claim("occ_reward", "OCC raises the training reward above detach", "fig6_reward.png",
          _cmp("reward_final", "occ"), +1, "as for held-out accuracy"),
    Claim("occ_vs_policy", "OCC beats the policy-loss MTP term at the fixed coefficient 0.1 (61.7 vs 57.4)",
          "fig6_reward.png", _cmp("eval_final", "occ", "policy"), +1,
          "how large the two MTP terms are (their MTP shares)"),
    Claim("ce_eval", "CE as the MTP objective at coef 0.1 lowers held-out accuracy (47.7 vs 58.9)",
          "fig6_reward.png", _cmp("eval_final", "ce"), -1, "how large CE's MTP term is (its MTP share)"),
    Claim("ce1_reward", "CE at coef 1.0 lowers the training reward (the study's earlier 'CE hurts')",
          "fig6_ce_coef.png", _cmp("reward_final", "ce_coef1"), -1,
          "at coef 1.0 the MTP term can exceed the RL gradient, and the global clip (which includes mtp.*) then "
          "scales the RL gradient down: see ce_coef1_clipsep and ce_matched"),
    Claim("ce1_clipsep_reward", "CE at coef 1.0 lowers the reward with mtp.* clipped apart from the main model",
          "fig6_ce_coef.png", _cmp("reward_final", "ce_coef1_clipsep"), -1,
          "with separate clipping the RL gradient keeps its own norm: what remains is CE's direction and size"),
    Claim("ce_matched_reward", "CE at OCC's measured MTP share lowers the reward", "fig6_ce_coef.png",
          _cmp("reward_final", "ce_matched"), -1, "the coefficient matches the mean share over all steps and seeds"),
    Claim("occ_vs_ce_matched", "At the same MTP share, the policy-loss objective (OCC) beats CE", "fig6_ce_coef.png",
          _cmp("eval_final", "occ", "ce_matched"), +1, "OCC's λ varies by step; the matched CE's coefficient is fixed"),
    Claim("coef1_costs", "A larger fixed coefficient costs accuracy (policy loss at 1.0: 56.6 vs 57.4 at 0.1)",
          "fig6_policy_coef.png", _cmp("eval_final", "policy_coef1"), -1, "the sweep may run at fewer seeds"),
    Claim("lambda_positive", "λ from OCC's statistics is mostly positive (fraction of steps > 0.5)",
          "fig4_lambda.png", "lambda_positive: occ", +1, ADAM),
    Claim("aligned_occ", "g_RL and g_MTP are aligned over the main model under OCC (cross-fitted c > 0)",
          "fig2_dynamics.png", "alignment: occ", +1, ADAM),
    Claim("aligned_policy", "g_RL and g_MTP are aligned over the main model under the policy loss",
          "fig2_dynamics.png", "alignment: policy", +1, ADAM),
    Claim("proxy_c", "ĉ ranks minibatches like the exact c (ρ within a checkpoint > 0, under OCC)",
          "fig8_fidelity.png", "rho_c: occ", +1, ADAM, "more probed minibatches per checkpoint"),
    Claim("proxy_v2", "v̂² ranks minibatches like the exact v² (ρ within a checkpoint > 0, under OCC)",
          "fig8_fidelity.png", "rho_v2: occ", +1,
          "under old_logprobs: main, v̂² is mostly the static head gap (Fig. 2c)", "more probed minibatches"),
)  # fmt: skip


def _vals(rows, key):
    return [r[key] for r in rows if r.get(key) is not None]


def run_metrics(rows: list[dict], steps: int) -> dict:
    """The per-run numbers of the module docstring from a run's metric rows."""
    from nemo_occ.lab.figures import KEYS, final_tail

    tail = final_tail(steps)
    rl_rows = [r for r in rows if r["step"] > steps - tail]
    out: dict = {}
    rew = _vals(rl_rows, "reward/mean")
    out["reward_final"] = sum(rew) / len(rew) if rew else None
    ev = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    out["eval_start"] = ev[0][1] if ev and ev[0][0] == 0 else None
    out["eval_final"] = ev[-1][1] if ev else None
    agr = _vals(rl_rows, KEYS["agreement"][0])
    out["agreement_final"] = sum(agr) / len(agr) if agr else None
    lam_key = next((k for k in KEYS["lambda_stats"] if any(r.get(k) is not None for r in rows)), None)
    lam = _vals(rows, lam_key) if lam_key else []
    out["lambda_positive"] = sum(v > 0 for v in lam) / len(lam) if lam else None
    out["lambda_median"] = statistics.median(lam) if lam else None
    share, clipped = _vals(rows, "update/mtp_share"), _vals(rows, "update/clipped")
    out["mtp_share_median"] = statistics.median(share) if share else None
    out["clipped_mean"] = sum(clipped) / len(clipped) if clipped else None
    return out


def _describe(values: list) -> dict:
    """mean, sd (ddof 1), min, max over seeds of the finite values."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "min": float(min(v)), "max": float(max(v)), "n": len(v)}  # fmt: skip


def _alignment(r: dict, c_key: str) -> float | None:
    """c / sqrt(||g_RL||²·v²) with the minibatch's own (same-sample, positive) norms: its sign is c's."""
    den = r.get("rl_norm2", 0.0) * r.get("v2", 0.0)
    return r[c_key] / math.sqrt(den) if den > 0 and r.get(c_key) is not None else None


def probe_statistics(recs: list[dict], cluster: str | None = "step") -> dict:
    """A variant's probe records (each with ``seed``): the within-cluster correlations of the proxies with
    the exact statistics (cross-fitted when every record has them; the same-sample ones labelled beside
    them), the alignment per seed, sign agreement, and per checkpoint means (descriptive)."""
    from nemo_occ.core.fidelity import sign_agreement

    c_key, v2_key, exact = exact_keys(recs)
    out = {
        "records": len(recs),
        "seeds": sorted({r["seed"] for r in recs}),
        "steps": sorted({r["step"] for r in recs}),
        "exact": exact,
        "rho_c": stats.clustered_spearman(recs, "c_hat", c_key, cluster=cluster),
        "rho_v2": stats.clustered_spearman(recs, "v2_hat", v2_key, cluster=cluster),
        "alignment": stats.one_sample(stats.per_seed(recs, lambda r: _alignment(r, c_key))),
    }
    if exact == "cross-fitted":  # the same-sample statistics, kept for comparison only
        out["rho_c_same_sample"] = stats.clustered_spearman(recs, "c_hat", "c", cluster=cluster)
        out["alignment_same_sample"] = stats.per_seed(recs, lambda r: _alignment(r, "c"))
    signs = sign_agreement([r["c_hat"] for r in recs], [r[c_key] for r in recs])
    out["sign_agreement_c"], out["sign_base_rate_c"] = signs if signs else (None, None)
    out["by_step"] = {}
    for s in out["steps"]:
        at = [r for r in recs if r["step"] == s]
        proxy = [r["c_hat"] / math.sqrt(r["d_rl2"] * r["v2_hat"]) for r in at
                 if r.get("d_rl2") is not None and r["d_rl2"] * r["v2_hat"] > 0]  # fmt: skip
        align = [a for r in at if (a := _alignment(r, c_key)) is not None]
        out["by_step"][str(s)] = {"alignment": _describe(align), "positive": (sum(a > 0 for a in align) / len(align)
                                  if align else None), "proxy_cos": _describe(proxy)}  # fmt: skip
    return out


def analyse(
    runs: dict[str, dict[int, dict]],
    probes: dict[str, list[dict]],
    training: dict[str, list[dict]],
) -> dict:
    """Every comparison, test and claim from the per-run metrics (``runs[variant][seed]`` = :func:`run_metrics`),
    the fixed-checkpoint probe records and the in-training probe records (each record with its ``seed``).

    Returns ``comparisons`` (``"<a> − <b>"`` → outcome → :func:`stats.paired`), ``one_sample`` (test key →
    :func:`stats.one_sample`), ``probes``/``training_probes`` (:func:`probe_statistics`), ``tests`` (every
    test with its raw and BH-adjusted p) and ``claims``."""
    comparisons: dict[str, dict] = {}
    pairs = [(name, BASELINE) for name in runs if name != BASELINE and BASELINE in runs]
    pairs += [(a, b) for a, b in CONTRASTS if a in runs and b in runs]
    for a, b in pairs:
        comparisons[f"{a} − {b}"] = {
            o: stats.paired({s: m[o] for s, m in runs[a].items()}, {s: m[o] for s, m in runs[b].items()})
            for o in OUTCOMES
        }
    one: dict[str, dict] = {}
    if "occ" in runs:
        one["lambda_positive: occ"] = stats.one_sample(
            {s: m["lambda_positive"] for s, m in runs["occ"].items()}, 0.5
        )
    probe_stats = {name: probe_statistics(recs) for name, recs in probes.items()}
    for name, p in probe_stats.items():
        one[f"alignment: {name}"] = p["alignment"]
        one[f"rho_c: {name}"] = p["rho_c"]["across_units"]
        one[f"rho_v2: {name}"] = p["rho_v2"]["across_units"]
    tests = {f"{o}: {k}": c for k, per in comparisons.items() for o, c in per.items()}
    tests.update(one)
    adjusted = stats.adjust_pvalues({k: t["p"] for k, t in tests.items()})
    for k, t in tests.items():
        t["p_adjusted"] = adjusted[k]
    family = sum(p is not None for p in adjusted.values())
    claims = [_judge(c, tests.get(c.test), runs) for c in CLAIMS]
    return {
        "comparisons": comparisons,
        "one_sample": one,
        "probes": probe_stats,
        "training_probes": {name: probe_statistics(recs, cluster=None) for name, recs in training.items()},
        "tests": {
            k: {"test": t["test"], "n": t["n"], "p": t["p"], "p_adjusted": t["p_adjusted"]}
            for k, t in tests.items()
        },  # fmt: skip
        "family_size": family,
        "claims": claims,
    }


def _measured(claim: Claim, runs: dict) -> str:
    """The claim's variants' MTP share and clip fraction (mean over seeds): what its confounds refer to."""
    _, _, pair = claim.test.partition(": ")
    parts = []
    for name in pair.split(" − "):
        per = runs.get(name, {})
        share = [m["mtp_share_median"] for m in per.values() if m.get("mtp_share_median") is not None]
        clip = [m["clipped_mean"] for m in per.values() if m.get("clipped_mean") is not None]
        if share or clip:
            parts.append(f"{name} MTP share {np.mean(share):.3g}, clip fired on {np.mean(clip):.0%} of updates"
                         if share and clip else f"{name} MTP share {np.mean(share):.3g}" if share
                         else f"{name} clip fired on {np.mean(clip):.0%} of updates")  # fmt: skip
    return "; ".join(parts)


def _judge(claim: Claim, t: dict | None, runs: dict) -> dict:
    """The claim's verdict from its test: shown (adjusted p < α, effect in the claimed direction),
    contradicted (adjusted p < α, the other direction) or not shown, with why and what would settle it."""
    base = {"key": claim.key, "claim": claim.text, "figure": claim.figure, "test_key": claim.test}
    if t is None:
        return {**base, "verdict": "not tested", "why": "no finished run or probe of its variants (not in this "
                "study's plan, or see Dropped)"}  # fmt: skip
    entry = {**base, **{k: t.get(k) for k in ("test", "n", "seeds", "mean", "ci", "dz", "dz_ci", "mde",
                                               "mde_dz", "p", "p_adjusted", "null")}}  # fmt: skip
    entry["confounds"] = claim.confounds
    entry["measured"] = _measured(claim, runs)
    p, mean = t.get("p_adjusted"), t.get("mean")
    sign = None if mean is None else (mean - t.get("null", 0.0)) * claim.direction
    if p is None:
        entry["verdict"] = "not tested"
        entry["why"] = t.get("note") or "no p-value"
        return entry
    if p < stats.ALPHA:
        entry["verdict"] = "shown" if sign > 0 else "contradicted"
        entry["why"] = "" if sign > 0 else "the effect is significant in the opposite direction"
        return entry
    entry["verdict"] = "not shown"
    observed = abs(mean - t.get("null", 0.0))
    why = [f"adjusted p = {p:.2g} ≥ {stats.ALPHA}"]
    if t.get("mde") is not None and observed < t["mde"]:
        why.append(f"the observed |effect| {observed:.3g} is below what {t['n']} seeds detect at 80% power "
                   f"({t['mde']:.3g}, d_z {t['mde_dz']:.2f})")  # fmt: skip
    if sign is not None and sign < 0:
        why.append("the point estimate points the other way")
    entry["why"] = "; ".join(why)
    need = stats.seeds_needed(t.get("dz"))
    settle = [f"about {need} seeds would detect the observed d_z = {t['dz']:.2f} at 80% power" if need
              else "no feasible number of seeds detects an effect this small"]  # fmt: skip
    if claim.settle:
        settle.append(claim.settle)
    entry["settle"] = "; ".join(settle)
    return entry


def _commit() -> str | None:
    """HEAD of the checkout the package runs from, with ``+dirty`` when tracked files differ from it."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=here).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _invocations(out: Path) -> list[dict]:
    try:
        return json.loads((out / "study.json").read_text()).get("invocations", [])
    except (OSError, json.JSONDecodeError):
        return []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_study_report(out: Path, jobs: list[Job], done: dict, cfg, nemo_occ_cfg, probe: dict, invocation: dict,
                       skipped: dict, *, say: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Read every finished run and probe of the plan, write summary.json, summary.md, provenance.json and the
    figures; the summary."""
    # long on purpose: reads each kind of run output in turn into one summary; the reading order is the
    # report's order
    from nemo_occ.lab.demo.output import regime_fingerprint
    from nemo_occ.lab.demo.trainer import finished_run

    steps = cfg.rl.steps
    variants, runs, rows_of, planned = {}, {}, {}, {}
    wall: dict[str, dict[str, float | None]] = {}
    for job in jobs:
        if job.kind != "train":
            continue
        v = job.variant
        variants.setdefault(v.name, v)
        runs.setdefault(v.name, {})
        planned.setdefault(v.name, []).append(job.seed)
        if not done[job]:
            continue
        rcfg, rocc = variant_config(cfg, nemo_occ_cfg, v, job.seed, probe["checkpoint_every"])
        folder = run_dir(out, job) / v.regime
        run = finished_run(folder, regime_fingerprint(rcfg, rocc, v.regime), steps)
        rows_of[(v.name, job.seed)] = run.metrics
        runs[v.name][job.seed] = run_metrics(run.metrics, steps)
        wall.setdefault(v.name, {})[str(job.seed)] = run.wall_time_s
    probes: dict[str, list[dict]] = {}
    probe_wall: dict[str, float | None] = {}
    for job in jobs:
        if job.kind == "probe" and done[job]:
            rec = json.loads(probe_path(out, job, job.step, ".json").read_text())
            probes.setdefault(job.variant.name, []).extend({**r, "seed": job.seed} for r in rec["records"])
            probe_wall[job.label] = rec.get("wall_s")
    training: dict[str, list[dict]] = {}
    for (name, seed), rows in rows_of.items():
        recs = training_probes(rows)
        if recs and get_regime(variants[name].regime).trunk_gradient:
            training.setdefault(name, []).extend({**r, "seed": seed} for r in recs)
    result = analyse(runs, probes, training)

    warm, warm_wall = _warm_starts(out, sorted({j.seed for j in jobs}))
    first = next((i for i in _invocations(out) if not i.get("report_only")), {})
    summary: dict = {
        "command": first.get("command", invocation.get("command")),
        "commit": first.get("commit", invocation.get("commit")),
        "versions": first.get("versions", invocation.get("versions")),
        "config": {
            "steps": steps,
            "prompts_per_step": cfg.rl.prompts_per_step,
            "samples_per_prompt": cfg.rl.samples_per_prompt,
            "minibatches": cfg.rl.minibatches,
            "task": cfg.task.model_dump(),
            "model": cfg.model.model_dump(),
            "coef": nemo_occ_cfg.coef,
            "lambda_plus": nemo_occ_cfg.occ.lambda_plus,
            "old_logprobs": nemo_occ_cfg.old_logprobs,
        },  # fmt: skip
        "probe": probe,
        "statistics": {
            "baseline": BASELINE,
            "unit": "seed (every regime of a seed shares its warm start, data order and sampling seeds)",
            "paired_test": stats.PAIRED_TEST,
            "one_sample_test": stats.ONE_SAMPLE_TEST,
            "multiplicity": stats.MULTIPLICITY,
            "family_size": result["family_size"],
            "alpha": stats.ALPHA,
            "intervals": "95% t interval over seeds of the mean (difference); d_z = mean / sd of the per-seed "
            "differences with its 95% noncentral-t interval (t intervals, not a bootstrap: 5 seeds give a bootstrap "
            "126 distinct resamples, and its percentile interval is too narrow)",
            "mde": "minimal detectable |effect| at 80% power, α = 0.05 two-sided (unadjusted), for the paired "
            "t-test with the comparison's n: d_z from scipy.stats.nct, times the observed sd of the differences",
            "correlations": "Spearman ρ within one checkpoint of one seed's run (fixed-checkpoint probes) or within "
            "one seed's run (in-training probes), averaged per seed, then mean over seeds with its 95% t interval "
            "(clipped to [−1, 1]); the ρ pooled over all points is a labelled secondary without interval",
            "outcomes": OUTCOMES,
        },
        "claims": result["claims"],
        "variants": {},
        "comparisons": result["comparisons"],
        "one_sample": result["one_sample"],
        "tests": result["tests"],
        "probes": result["probes"],
        "training_probes": result["training_probes"],
        "confounds": {},
        "matched": _read_json(out / "matched.json"),
        "warm_start": warm,
        "dropped": _dropped(jobs, done, planned, runs, skipped),
    }
    for name, per_seed in runs.items():
        entry = {"regime": variants[name].regime, "settings": variants[name].describe(),
                 "seeds": {str(s): m for s, m in sorted(per_seed.items())}}  # fmt: skip
        for key in PER_RUN:
            entry[key] = _describe([m[key] for m in per_seed.values()])
        summary["variants"][name] = entry
        summary["confounds"][name] = {k: entry[k] for k in ("mtp_share_median", "clipped_mean")}
    summary["figures"], summary["figures_not_drawn"] = _figures(out, summary, rows_of, probes, variants, cfg,
                                                                nemo_occ_cfg)  # fmt: skip

    text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / "summary.json", lambda f: f.write(text.encode()))
    md = summary_markdown(summary)
    atomic_write(out / "summary.md", lambda f: f.write(md.encode()))
    provenance = {
        "report": {
            k: invocation.get(k)
            for k in ("started", "command", "commit", "machine", "load_average", "versions")
        },  # fmt: skip
        "invocations": _invocations(out),
        "run_wall_s": wall,
        "probe_wall_s": probe_wall,
        "warm_start_wall_s": warm_wall,
    }
    text = json.dumps(provenance, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / "provenance.json", lambda f: f.write(text.encode()))
    n_unfinished = len(summary["dropped"]["unfinished"])
    say(f"nemo-occ study: report written to {out / 'summary.md'} ({n_unfinished} jobs unfinished)")
    return summary


def _warm_starts(out: Path, seeds: list[int]) -> tuple[dict, dict]:
    """Each seed's shared warm start as measured at its end (``warm_start/*``) and the range over seeds; and
    apart, its wall time per seed (for provenance.json)."""
    per, wall = {}, {}
    for seed in seeds:
        path = out / "warmstart" / f"seed{seed}.pt"
        if path.exists():
            metrics = load_state(path, what_to_do="add --overwrite to start fresh").get("metrics", {})
            per[str(seed)] = {
                k.removeprefix("warm_start/"): v for k, v in metrics.items() if k != "warm_start/wall_s"
            }
            wall[str(seed)] = metrics.get("warm_start/wall_s")
    ranges = {}
    for key in ("pass_rate", "mtp_agreement_1", "main_ce", "steps"):
        v = [w[key] for w in per.values() if isinstance(w.get(key), (int, float))]
        if v:
            ranges[key] = [min(v), max(v)]
    gates = sorted({str(w.get("gate")) for w in per.values()})
    return {"seeds": per, "range": ranges, "gates": gates}, wall


def _dropped(jobs, done, planned, runs, skipped) -> dict:
    """What the plan held and the report lacks: unfinished jobs, skipped ones with why, and per variant the
    planned seeds without a finished run."""
    missing = {name: sorted(set(seeds) - set(runs.get(name, {}))) for name, seeds in planned.items()}
    return {
        "unfinished": [j.label for j in jobs if not done[j]],
        "skipped": dict(skipped),
        "missing_seeds": {k: v for k, v in missing.items() if v},
    }


def seeds_text(names, pairs) -> str:
    """The seeds behind a figure from its (variant, seed) pairs: one list when every variant drawn has the
    same seeds, else the list of each (a sweep may have run at fewer seeds than the core regimes)."""
    per = {n: sorted({s for (m, s) in pairs if m == n}) for n in names}
    per = {n: s for n, s in per.items() if s}
    if len({tuple(s) for s in per.values()}) <= 1:
        return f"seeds {next(iter(per.values()), [])}"
    return "seeds " + ", ".join(f"{n} {s}" for n, s in per.items())


# the sweep and control panels beside regime_figures': file, the core variants it shows, the prefixes of the
# sweep/control variants it adds (detach and none always, as references), what it shows
SWEEP_FIGURES = (
    ("fig6_policy_coef.png", ("policy",), ("policy_coef",),
     "Reward, accuracy and MTP agreement (paper Fig. 6), policy-loss MTP at fixed coefficients (the paper's sweep)"),
    ("fig6_ce_coef.png", ("ce",), ("ce_coef", "ce_matched"),
     "Reward, accuracy and MTP agreement (paper Fig. 6), the CE controls"),
    ("fig6_occ_lambda_plus.png", ("occ",), ("occ_lp", "occ_probed"),
     "Reward, accuracy and MTP agreement (paper Fig. 6), OCC variants"),
    ("fig6_old_logprobs.png", ("policy", "occ"), ("policy_old", "occ_old"),
     "Reward, accuracy and MTP agreement (paper Fig. 6) under both old-log-prob readings: the *_oldmtp runs read "
     "δ_MTP against the MTP head's own old log-prob (old_logprobs: mtp), the others against the main head's (main, "
     "the default)"),
)  # fmt: skip


# what a control changes, in words, beside its settings
_MEANING = {
    "occ_probed": "λ from the cross-fitted exact probes instead of the proxies",
    "occ_oldmtp": "δ_MTP read against the MTP head's own old log-prob",
    "ce_coef1_clipsep": "the main model and mtp.* clipped each to its own norm",
}


def _described(variant, summary) -> str:
    """The variant as a caption names it, ce_matched with the coefficient it ran at."""
    if variant.name in _MEANING:
        return f"{variant.describe()}: {_MEANING[variant.name]}"
    matched = (summary.get("matched") or {}).get(variant.name)
    if matched and matched.get("coef") is not None:
        return (f"{variant.regime} (coef={matched['coef']:g}, where CE's MTP share, the MTP term's gradient norm "
                "over the main model divided by the RL gradient's, matches occ's mean share)")  # fmt: skip
    return variant.describe()


def _probe_note(probe: dict) -> str:
    """What the fixed-checkpoint probes' captions add: where they are, how many minibatches were planned and
    why a seed may have fewer."""
    steps = " and ".join(str(s) for s in probe["steps"])
    return (f" at steps {steps}, {probe['minibatches']} minibatches planned per seed and checkpoint (fewer where "
            "the model solves nearly every prompt: the probe keeps only groups whose samples' rewards differ, "
            "drawing at most four times the prompts it needs)")  # fmt: skip


def _figures(out: Path, summary, rows_of, probes, variants, cfg, nemo_occ_cfg) -> tuple[list[str], dict]:
    """The figures every run set gets (``nemo_occ.lab.figures.regime_figures``), then the sweeps' panels."""
    from nemo_occ.lab import figures as F
    from nemo_occ.lab.demo.report import setting_text

    pairs = {
        "runs": list(rows_of),
        "probes": sorted({(n, r["seed"]) for n, recs in probes.items() for r in recs}),
        "training_probes": list(rows_of),
    }

    def caption(what, names, source="runs"):
        return f"{what}. {setting_text(cfg, nemo_occ_cfg, 'nemo-occ study')}; {seeds_text(names, pairs[source])}."

    def group(names):
        return {n: {s: rows_of[(n, s)] for s in sorted(s for (m, s) in rows_of if m == n)}
                for n in names if any(m == n for (m, _) in rows_of)}  # fmt: skip

    styles = F.assign_styles(list(variants))
    drawn, failed = F.regime_figures(out, group(variants), caption=caption, probes=probes or None,
                                     eval_k=cfg.eval.samples,
                                     regime_of={n: v.regime for n, v in variants.items()}, styles=styles,
                                     probe_note=_probe_note(summary["probe"]))  # fmt: skip
    for fname, core, prefixes, what in SWEEP_FIGURES:
        added = [n for n in variants if n.startswith(prefixes)]
        if ran := group(added):  # a panel without its sweep's runs would repeat fig6_reward
            try:
                names = [BASELINE, "none", *core, *added]
                what_runs = f"{what}. Runs: " + "; ".join(
                    f"{n} = {_described(variants[n], summary)}" for n in ran
                )
                F.fig6_reward(group(names), out / fname, caption=caption(what_runs, names), styles=styles,
                              eval_k=cfg.eval.samples)  # fmt: skip
                drawn.append(fname)
            except F.FigureDataError as err:  # missing metrics; anything else is a bug and propagates
                failed[fname] = str(err)
                (out / fname).unlink(missing_ok=True)
    return drawn, failed


# -- summary.md ------------------------------------------------------------------------------------------


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pm(d: dict, spec=".3f") -> str:
    if d.get("mean") is None:
        return "—"
    return _fmt(d["mean"], spec) + (
        f" ± {_fmt(d['sd'], spec.lstrip('+'))}" if d.get("sd") is not None else ""
    )


def _iv(ci, spec=".3f") -> str:
    return "" if not ci else f" [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"


def _p(p) -> str:
    return "—" if p is None else (f"{p:.2g}" if p >= 0.001 else f"{p:.1e}")


def _claims_table(claims: list[dict]) -> list[str]:
    rows = ["| claim | figure | test | n | effect [95% CI] | d_z [95% CI] | MDE (80%) | p | p adj. | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in claims:
        if c.get("test") is None:
            rows.append(f"| {c['claim']} | {c['figure']} | `{c['test_key']}` | 0 | — | — | — | — | — | "
                        f"**{c['verdict']}** |")  # fmt: skip
            continue
        kind = "paired t" if "ttest_rel" in c["test"] else "one-sample t"
        null = f" vs {c['null']:g}" if c.get("null") else ""
        rows.append(f"| {c['claim']} | {c['figure']} | `{c['test_key']}`{null} ({kind}) | {c['n']} | "
                    f"{_fmt(c['mean'], '+.3f')}{_iv(c['ci'])} | {_fmt(c['dz'], '+.2f')}{_iv(c['dz_ci'], '.2f')} | "
                    f"{_fmt(c['mde'], '.3f')} | {_p(c['p'])} | {_p(c['p_adjusted'])} | **{c['verdict']}** |")  # fmt: skip
    return rows


def _comparison_rows(s: dict, outcome: str) -> list[str]:
    rows = ["| comparison | seeds | per-seed differences | mean [95% CI] | d_z [95% CI] | MDE (80%) | p | p adj. |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, per in s["comparisons"].items():
        c = per[outcome]
        if not c["seeds"]:
            continue
        drop = f" (dropped {c['dropped_seeds']})" if c["dropped_seeds"] else ""
        rows.append(f"| {name} | {c['n']}{drop} | {', '.join(format(x, '+.3f') for x in c['diffs'])} | "
                    f"{_fmt(c['mean'], '+.4f')}{_iv(c['ci'], '+.4f')} | {_fmt(c['dz'], '+.2f')}"
                    f"{_iv(c['dz_ci'], '.2f')} | {_fmt(c['mde'], '.4f')} | {_p(c['p'])} | "
                    f"{_p(s['tests'][f'{outcome}: {name}']['p_adjusted'])} |")  # fmt: skip
    return rows


def _rho_cell(got: dict) -> str:
    a = got["across_units"]
    if a["mean"] is None:
        return "—"
    return f"{a['mean']:.2f}{_iv(a['ci'], '.2f')} ({a['n']} seeds, {len(got['clusters'])} clusters)"


def _pooled_cell(got: dict) -> str:
    return "—" if got["pooled"] is None else f"{got['pooled']['rho']:.2f} (n={got['pooled']['n']})"


def _probe_rows(probes: dict, tests: dict | None) -> list[str]:
    rows = ["| variant | exact | ρ(ĉ, c) within | p adj. | ρ(v̂², v²) within | p adj. | alignment c/(‖g_RL‖‖g_MTP‖) "
            "[95% CI] | p adj. | sign(ĉ) = sign(c) (chance) | secondary: pooled ρ(ĉ, c), ρ(v̂², v²) | "
            "same-sample ρ(ĉ, c) within |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, p in probes.items():

        def adj(kind, name=name):
            return _p(tests[f"{kind}: {name}"]["p_adjusted"]) if tests and f"{kind}: {name}" in tests else "—"

        a = p["alignment"]
        same = _rho_cell(p["rho_c_same_sample"]) if "rho_c_same_sample" in p else "—"
        rows.append(f"| {name} | {p['exact']} | {_rho_cell(p['rho_c'])} | {adj('rho_c')} | {_rho_cell(p['rho_v2'])} | "
                    f"{adj('rho_v2')} | {_fmt(a['mean'], '+.3f')}{_iv(a['ci'], '+.3f')} | {adj('alignment')} | "
                    f"{_fmt(p['sign_agreement_c'], '.2f')} ({_fmt(p['sign_base_rate_c'], '.2f')}) | "
                    f"{_pooled_cell(p['rho_c'])}, {_pooled_cell(p['rho_v2'])} | {same} |")  # fmt: skip
    return rows


def summary_markdown(s: dict) -> str:
    """The study's summary.md: the setting and the statistics used, the claims table, what is not shown and
    why, the warm start, the confounds, every variant and comparison, the probes, the figures, what was
    dropped. No clocks: the same summary gives the same bytes."""
    # long on purpose: summary.md's sections in the order they print
    c, st = s["config"], s["statistics"]
    L = [
        "# nemo-occ study — results as measured",
        "",
        f"Command: `{s['command']}` (commit {s['commit']}).  ",
        f"Setting: {c['steps']} RL steps x {c['prompts_per_step']} prompts x {c['samples_per_prompt']} samples, "
        f"{c['minibatches']} updates/step; task {c['task']}; model {c['model']}; base coef {c['coef']}, "
        f"λ+ {c['lambda_plus']}, old_logprobs {c['old_logprobs']}.  ",
        f"Probes: {s['probe']['minibatches']} minibatches at each of steps {s['probe']['steps']} of the core "
        f"{'/'.join(s['probe']['regimes'])} runs. Timings, machine and load: `provenance.json`.",
        "",
        "## Statistics",
        "",
        f"- Unit of replication: the {st['unit']}. Baseline of every comparison: `{st['baseline']}` (the paper's).",
        f"- Tests: {st['paired_test']}; for a quantity against a fixed value, {st['one_sample_test']}.",
        f"- Multiplicity: {st['multiplicity']} ({st['family_size']} tests); a claim is shown only when its "
        f"adjusted p < {st['alpha']} and the effect points the claimed way.",
        f"- Intervals: {st['intervals']}.",
        f"- MDE: {st['mde']}.",
        f"- Correlations: {st['correlations']}.",
        "- Descriptive only (no test): MTP share of the update, clip fraction, warm-start measurements, sign "
        "agreement, per-checkpoint means.",
        "",
        "## The paper's claims",
        "",
        *_claims_table(s["claims"]),
        "",
    ]
    missed = [cl for cl in s["claims"] if cl["verdict"] != "shown"]
    if missed:
        L += ["### Not reproduced here, and why", ""]
        for cl in missed:
            line = f"- **{cl['claim']}** — {cl['verdict']}"
            line += f": {cl['why']}." if cl.get("why") else "."
            if cl.get("confounds"):
                line += f" Confounds: {cl['confounds']}."
            if cl.get("measured"):
                line += f" Measured (mean over seeds): {cl['measured']}."
            if cl.get("settle"):
                line += f" What would settle it: {cl['settle']}."
            L.append(line)
        L += ["", f"Throughout: {ADAM}; and this is {SCALE}.", ""]
    ws = s["warm_start"]
    L += ["## Warm start per seed (a fixed number of SFT steps, shared by every run of the seed)", "",
          "| seed | SFT steps | targets | pass rate | MTP agreement | main CE |", "|---|---|---|---|---|---|"]  # fmt: skip
    for seed, w in ws["seeds"].items():
        L.append(f"| {seed} | {w.get('steps')} | {w.get('gate')} | {_fmt(w.get('pass_rate'))} | "
                 f"{_fmt(w.get('mtp_agreement_1'))} | {_fmt(w.get('main_ce'))} |")  # fmt: skip
    if ws["range"]:

        def span(v):
            return f"{v[0]}–{v[1]}" if isinstance(v[0], int) else f"{_fmt(v[0], '.3g')}–{_fmt(v[1], '.3g')}"

        L += ["", "Range over seeds: " + "; ".join(f"{k} {span(v)}" for k, v in ws["range"].items()) + "."]
    L += ["", "## Confounds (descriptive: mean over seeds, [min, max])", "",
          "MTP share = median over steps of ‖λ·g_MTP‖ / ‖g_RL‖ over the main model; clipped = share of updates "
          "the gradient clip scaled.", "", "| variant | settings | MTP share | clipped |", "|---|---|---|---|"]  # fmt: skip
    for name, e in s["variants"].items():
        sh, cl = e["mtp_share_median"], e["clipped_mean"]
        L.append(f"| {name} | {e['settings']} | {_fmt(sh['mean'], '.3g')}{_iv([sh['min'], sh['max']], '.3g') if sh['n'] else ''} "
                 f"| {_fmt(cl['mean'], '.2f')}{_iv([cl['min'], cl['max']], '.2f') if cl['n'] else ''} |")  # fmt: skip
    if s.get("matched"):
        m = s["matched"].get("ce_matched", {})
        got = s["variants"].get("ce_matched", {}).get("mtp_share_median", {})
        occ = s["variants"].get("occ", {}).get("mtp_share_median", {})
        per, base = m.get("ce_share_per_coef"), m.get("ce_coef", c["coef"])
        ce_share = per * base if per is not None else None
        L += ["", f"ce_matched: coef {m.get('coef')} = {base} × occ's mean MTP share over all steps "
              f"{_fmt(m.get('occ_share'), '.4f')} / ce's at coef {base} ({_fmt(ce_share, '.4f')}), from "
              f"{len(m.get('runs', []))} runs. In the table above (per-run medians, mean over seeds): ce_matched "
              f"{_fmt(got.get('mean'), '.4f')}, occ {_fmt(occ.get('mean'), '.4f')}."]  # fmt: skip
    L += ["", "## Per variant (mean ± sd over seeds)", "",
          "| variant | settings | seeds | eval start | eval final | reward | agreement | λ>0 |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in s["variants"].items():
        L.append(f"| {name} | {e['settings']} | {len(e['seeds'])} | {_pm(e['eval_start'])} | {_pm(e['eval_final'])} | "
                 f"{_pm(e['reward_final'])} | {_pm(e['agreement_final'])} | {_pm(e['lambda_positive'], '.2f')} |")  # fmt: skip
    L += ["", "Every seed:", "", "| variant | seed | eval final | reward | agreement | λ>0 | λ median | MTP share | clipped |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in s["variants"].items():
        for seed, m in e["seeds"].items():
            L.append(f"| {name} | {seed} | {_fmt(m['eval_final'])} | {_fmt(m['reward_final'])} | "
                     f"{_fmt(m['agreement_final'])} | {_fmt(m['lambda_positive'], '.2f')} | "
                     f"{_fmt(m['lambda_median'], '.3g')} | {_fmt(m['mtp_share_median'], '.3g')} | "
                     f"{_fmt(m['clipped_mean'], '.2f')} |")  # fmt: skip
    for outcome, what in st["outcomes"].items():
        L += ["", f"## Comparisons: {outcome} ({what}), paired by seed", ""]
        L += _comparison_rows(s, outcome)
    if s["probes"]:
        L += ["", "## Fixed-checkpoint probes (proxy vs exact over the main model's parameters)", "",
              "ρ within one checkpoint of one seed, mean over seeds [95% t interval]; p adj. from the family above. "
              "Alignment: the exact c over the minibatch's own norms, per seed the mean over its probes. Pooled ρ: "
              "every point of every checkpoint and seed, a secondary that mixes drift in (no interval). Same-sample: "
              "g_RL and g_MTP from one minibatch, kept for comparison only.", ""]  # fmt: skip
        L += _probe_rows(s["probes"], s["tests"])
        L += ["", "Per checkpoint (all seeds' minibatches; mean ± sd, descriptive):", "",
              "| variant | step | alignment | > 0 | proxy cosine |", "|---|---|---|---|---|"]  # fmt: skip
        for name, p in s["probes"].items():
            for step, b in p["by_step"].items():
                L.append(f"| {name} | {step} | {_pm(b['alignment'], '+.3f')} | {_fmt(b['positive'], '.2f')} | "
                         f"{_pm(b['proxy_cos'], '+.3f')} |")  # fmt: skip
    if s.get("training_probes"):
        L += ["", "## In-training probes (one update every fidelity_every steps; ρ within each seed's run, across "
              "its steps, so drift is included; descriptive, not in the test family)", ""]  # fmt: skip
        L += _probe_rows(s["training_probes"], None)
    L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in s["figures"]]
    if s["figures_not_drawn"]:
        L += ["", "Not drawn: " + "; ".join(f"{k}: {v}" for k, v in s["figures_not_drawn"].items())]
    d = s["dropped"]
    L += ["", "## Dropped and unfinished", ""]
    L += [f"- unfinished: {u}" for u in d["unfinished"]]
    L += [f"- skipped {k}: {v}" for k, v in d["skipped"].items()]
    L += [f"- {k}: no finished run for seeds {v}" for k, v in d["missing_seeds"].items()]
    if not (d["unfinished"] or d["skipped"] or d["missing_seeds"]):
        L.append("None: every job of the plan finished.")
    elif d["unfinished"]:
        L.append("\nRerun the command above to continue them (finished jobs are kept).")
    return "\n".join(L) + "\n"
