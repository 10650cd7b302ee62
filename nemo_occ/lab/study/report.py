"""The study's report: ``summary.json``, ``summary.md`` and the figures (``nemo_occ.lab.figures``).

Everything is read back from the run folders and probe files, so ``nemo-occ study --report-only``
rebuilds it from whatever finished. Per run (variant, seed):

- ``reward_final``: mean training reward over the last ``tail`` RL steps (tail = max(5, steps/5));
- ``eval_start`` / ``eval_final``: held-out avg@k before RL and at the last step;
- ``agreement_final``: mean MTP top-1 agreement with the sampled token over the same tail;
- ``lambda_positive``: fraction of RL steps whose λ from the update's own statistics is > 0 (every
  MTP regime monitors it; it is the applied λ's source only under ``occ``), ``lambda_median``;
- ``wall_s``: training wall time (shared machine: it measures the load too).

Per variant: mean ± sd over seeds (sd with ddof=1) and every seed's value. Differences of mean final
reward against ``none`` and against ``policy`` come with Welch's t-test (``scipy.stats.ttest_ind``,
equal_var=False); a difference is called "within seed noise" when p ≥ 0.05 or a side has fewer than two
seeds. With three seeds the test has little power: "within noise" does not mean "equal".

Probes: per probed run and pooled per regime, Spearman ρ (ĉ/n vs c, v̂²/n vs v²) with its 95% Fisher-z
interval (``nemo_occ.lab.figures.spearman_ci``), the sign agreement of ĉ with c against its base rate
(``nemo_occ.core.fidelity.sign_agreement``), and cos(g_RL, g_MTP) per checkpoint.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nemo_occ.atomic_io import atomic_write
from nemo_occ.core.regimes import get_regime
from nemo_occ.lab.figures import training_probes
from nemo_occ.lab.study.plan import Job, probe_path, run_dir, variant_config
from nemo_occ.safe_load import load_state

__all__ = ["build_study_report", "run_metrics", "compare"]

PER_RUN = (
    "reward_final", "eval_start", "eval_final", "agreement_final", "lambda_positive", "lambda_median",
    "mtp_share_median", "clipped_mean", "wall_s",
)  # fmt: skip


def _vals(rows, key):
    return [r[key] for r in rows if r.get(key) is not None]


def run_metrics(rows: list[dict], steps: int, wall_s: float | None = None) -> dict:
    """The per-run numbers of the module docstring from a run's metric rows."""
    from nemo_occ.lab.figures import KEYS

    tail = max(5, steps // 5)
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
    # the miniature's update diagnostics: ||λ g_MTP|| / ||g_RL|| over the main model, and how often the clip fired
    share, clipped = _vals(rows, "update/mtp_share"), _vals(rows, "update/clipped")
    out["mtp_share_median"] = statistics.median(share) if share else None
    out["clipped_mean"] = sum(clipped) / len(clipped) if clipped else None
    out["wall_s"] = wall_s
    return out


def _mean_sd(vals: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return sum(vals) / len(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def compare(a: list[float], b: list[float]) -> dict:
    """Mean of a minus mean of b, the larger seed sd, Welch's t-test p, and whether it is within noise."""
    from scipy.stats import ttest_ind

    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b:
        return {"diff": None, "p": None, "within_noise": True, "n": [len(a), len(b)]}
    diff = sum(a) / len(a) - sum(b) / len(b)
    sds = [statistics.stdev(x) for x in (a, b) if len(x) > 1]
    p = None
    if len(a) > 1 and len(b) > 1 and (np.ptp(a) > 0 or np.ptp(b) > 0):
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return {"diff": diff, "seed_sd": max(sds) if sds else None, "p": p,
            "within_noise": p is None or not math.isfinite(p) or p >= 0.05, "n": [len(a), len(b)]}  # fmt: skip


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pm(m, s, spec=".3f") -> str:
    return f"{_fmt(m, spec)} ± {_fmt(s, spec)}" if s is not None else _fmt(m, spec)


def _ci(ci) -> str:
    return "—" if ci is None else f"{ci['rho']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}] (n={ci['n']})"


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


def _probe_stats(recs: list[dict]) -> dict:
    from nemo_occ.core.fidelity import sign_agreement
    from nemo_occ.lab.figures import spearman_ci

    c_hat, c = [r["c_hat"] for r in recs], [r["c"] for r in recs]
    signs = sign_agreement(c_hat, c)
    cos = [r["c"] / math.sqrt(r["rl_norm2"] * r["v2"]) for r in recs if r["rl_norm2"] * r["v2"] > 0]
    by_step = {}
    for s in sorted({r["step"] for r in recs}):
        cs = [
            r["c"] / math.sqrt(r["rl_norm2"] * r["v2"])
            for r in recs
            if r["step"] == s and r["rl_norm2"] * r["v2"] > 0
        ]
        ph = [r["c_hat"] / math.sqrt(r["d_rl2"] * r["v2_hat"]) for r in recs
              if r["step"] == s and r.get("d_rl2") is not None and r["d_rl2"] * r["v2_hat"] > 0]  # fmt: skip
        by_step[str(s)] = {"cos_mean": _mean_sd(cs)[0], "cos_sd": _mean_sd(cs)[1],
                           "cos_positive": sum(x > 0 for x in cs) / len(cs) if cs else None,
                           "proxy_cos_mean": _mean_sd(ph)[0], "n": len(cs)}  # fmt: skip
    return {
        "n": len(recs),
        "spearman_c": spearman_ci(c_hat, c),
        "spearman_v2": spearman_ci([r["v2_hat"] for r in recs], [r["v2"] for r in recs]),
        "sign_agreement_c": signs[0] if signs else None,
        "sign_base_rate_c": signs[1] if signs else None,
        "cos_mean": _mean_sd(cos)[0],
        "cos_positive": sum(x > 0 for x in cos) / len(cos) if cos else None,
        "by_step": by_step,
    }


def _probe_summary(per_seed: dict[int, list[dict]]) -> dict:
    """A variant's probe statistics pooled over its seeds, then per seed."""
    pooled = [r for recs in per_seed.values() for r in recs]
    return {
        "pooled": _probe_stats(pooled),
        "seeds": {str(s): _probe_stats(r) for s, r in sorted(per_seed.items())},
    }


def _probe_table(probes: dict) -> list[str]:
    """The markdown rows of ``_probe_summary`` entries: per variant, pooled then each seed."""
    rows = ["| variant | seed | ρ(ĉ, c) | ρ(v̂², v²) | sign agreement (chance) | mean cos | cos > 0 |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, p in probes.items():
        for seed, st in [("pooled", p["pooled"])] + list(p["seeds"].items()):
            rows.append(f"| {name} | {seed} | {_ci(st['spearman_c'])} | {_ci(st['spearman_v2'])} | "
                        f"{_fmt(st['sign_agreement_c'], '.2f')} ({_fmt(st['sign_base_rate_c'], '.2f')}) | "
                        f"{_fmt(st['cos_mean'], '.3f')} | {_fmt(st['cos_positive'], '.2f')} |")  # fmt: skip
    return rows


def build_study_report(out: Path, jobs: list[Job], done: dict, cfg, nemo_occ_cfg, probe: dict, invocation: dict,
                       skipped: dict, *, say: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Read every finished run and probe of the plan, write summary.json, summary.md and the figures; the summary."""
    # long on purpose: reads each kind of run output in turn into one summary; the reading order is the
    # report's order
    from nemo_occ.lab.demo.output import regime_fingerprint
    from nemo_occ.lab.demo.trainer import finished_run

    steps = cfg.rl.steps
    variants, runs, rows_of = {}, {}, {}
    for job in jobs:
        if job.kind != "train":
            continue
        v = job.variant
        variants.setdefault(v.name, v)
        runs.setdefault(v.name, {})
        if not done[job]:
            continue
        rcfg, rocc = variant_config(cfg, nemo_occ_cfg, v, job.seed, probe["checkpoint_every"])
        folder = run_dir(out, job) / v.regime
        run = finished_run(folder, regime_fingerprint(rcfg, rocc, v.regime), steps)
        rows_of[(v.name, job.seed)] = run.metrics
        runs[v.name][job.seed] = run_metrics(run.metrics, steps, run.wall_time_s)
    probes: dict[str, dict[int, list[dict]]] = {}
    for job in jobs:
        if job.kind == "probe" and done[job]:
            rec = json.loads(probe_path(out, job, job.step, ".json").read_text())
            probes.setdefault(job.variant.name, {}).setdefault(job.seed, []).extend(rec["records"])
    unfinished = [j.label for j in jobs if not done[j]]

    summary: dict = {
        "command": invocation.get("command"),
        "commit": invocation.get("commit"),
        "training_invocations": [
            {k: inv.get(k) for k in ("started", "command", "commit", "machine", "load_average")}
            for inv in _invocations(out)
            if not inv.get("report_only")
        ],
        "machine": invocation.get("machine"),
        "load_average_at_start": invocation.get("load_average"),
        "versions": invocation.get("versions"),
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
        "variants": {},
        "comparisons": {},
        "probes": {},
        "unfinished": unfinished,
        "skipped": skipped,
    }
    for name, per_seed in runs.items():
        entry = {"regime": variants[name].regime, "settings": variants[name].describe(),
                 "seeds": {str(s): m for s, m in sorted(per_seed.items())}}  # fmt: skip
        for key in PER_RUN:
            m, s = _mean_sd([x[key] for x in per_seed.values()])
            entry[key] = {"mean": m, "sd": s}
        summary["variants"][name] = entry

    def rewards(name):
        return [m["reward_final"] for m in runs.get(name, {}).values()]

    def paired(a_name, b_name) -> dict | None:
        """Per-seed differences (same warm start, data order and sampling seeds) and the paired t-test."""
        from scipy.stats import ttest_rel

        a, b = runs.get(a_name, {}), runs.get(b_name, {})
        seeds = sorted(set(a) & set(b))
        d = [a[s]["reward_final"] - b[s]["reward_final"] for s in seeds]
        if len(d) < 2:
            return {"seeds": seeds, "diffs": d, "p": None}
        p = float(
            ttest_rel([a[s]["reward_final"] for s in seeds], [b[s]["reward_final"] for s in seeds]).pvalue
        )
        return {"seeds": seeds, "diffs": d, "mean": sum(d) / len(d), "sd": statistics.stdev(d),
                "p": p if math.isfinite(p) else None}  # fmt: skip

    for name in runs:
        if name != "none":
            summary["comparisons"][f"{name} - none"] = compare(rewards(name), rewards("none"))
        if name not in ("none", "policy") and variants[name].regime in ("policy", "occ", "ce"):
            summary["comparisons"][f"{name} - policy"] = compare(rewards(name), rewards("policy"))
    if "ce_coef1" in runs:
        summary["comparisons"]["ce_coef1 - ce"] = compare(rewards("ce_coef1"), rewards("ce"))
    for key, cmp in summary["comparisons"].items():
        a_name, _, b_name = key.partition(" - ")
        cmp["paired"] = paired(a_name, b_name)
    summary["probes"] = {name: _probe_summary(per_seed) for name, per_seed in probes.items()}
    in_training: dict[str, dict[int, list[dict]]] = {}
    for (name, seed), rows in rows_of.items():
        recs = training_probes(rows)
        if recs and get_regime(variants[name].regime).trunk_gradient:
            in_training.setdefault(name, {})[seed] = recs
    summary["training_probes"] = {name: _probe_summary(per_seed) for name, per_seed in in_training.items()}
    summary["warm_start"] = {}
    for seed in sorted({j.seed for j in jobs}):  # the shared warm start's gate, per seed
        path = out / "warmstart" / f"seed{seed}.pt"
        if path.exists():
            metrics = load_state(path, what_to_do="add --overwrite to start fresh").get("metrics", {})
            summary["warm_start"][str(seed)] = {k.removeprefix("warm_start/"): v for k, v in metrics.items()}
    summary["mechanism"] = _mechanism(summary)
    summary["figures"], summary["figures_not_drawn"] = _figures(
        out, summary, rows_of, probes, in_training, variants, cfg, nemo_occ_cfg
    )

    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda f: f.write(text.encode()))
    md = summary_markdown(summary)
    atomic_write(out / "summary.md", lambda f: f.write(md.encode()))
    say(f"nemo-occ study: report written to {out / 'summary.md'} ({len(unfinished)} jobs unfinished)")
    return summary


def _mechanism(summary: dict) -> dict:
    """The paper's mechanism, claim by claim, with the numbers that decide each. Probe-based claims use
    the fixed-checkpoint probes when there are any, else the runs' own in-training probes (``source``)."""
    # long on purpose: one entry per claim of the paper, each with the numbers that decide it
    out = {}
    source, probes = ("fixed-checkpoint probes", summary["probes"])
    if not probes:
        source, probes = ("in-training probes", summary.get("training_probes", {}))
    policy_like = [n for n in probes if summary["variants"][n]["regime"] != "ce"]
    if policy_like:
        seed_means = [s["cos_mean"] for n in policy_like for s in probes[n]["seeds"].values()
                      if s["cos_mean"] is not None]  # fmt: skip
        out["cos_positive"] = {
            "claim": "cos(g_RL, g_MTP) over the main model is positive (policy-loss MTP objective: policy, occ); "
            "rule: every run's mean cosine over its probes > 0",
            "source": source,
            "per_run_mean_cos": seed_means,
            "holds": bool(seed_means) and all(c > 0 for c in seed_means),
        }
    occ = summary["variants"].get("occ")
    if occ and occ["lambda_positive"]["mean"] is not None:
        fid = probes.get("occ", {}).get("pooled")
        informative = fid is not None and fid["spearman_c"] is not None and fid["spearman_c"]["low"] > 0
        out["lambda_positive"] = {
            "claim": "λ is mostly positive and informative; rule: λ from the statistics > 0 on more than half "
            "the steps (mean over seeds) and the 95% interval of ρ(ĉ, c) under occ above 0",
            "source": source,
            "fraction_positive_mean": occ["lambda_positive"]["mean"],
            "spearman_c_occ": fid["spearman_c"] if fid else None,
            "holds": occ["lambda_positive"]["mean"] > 0.5 and informative,
        }
    cmp = summary["comparisons"].get("ce_coef1 - none")
    if cmp and cmp["diff"] is not None:
        out["ce_hurts"] = {
            "claim": "CE at coef 1.0 lowers the final training reward; rule: below none, beyond seed noise",
            **cmp,
            "holds": cmp["diff"] < 0 and not cmp["within_noise"],
        }
    above = {k: summary["comparisons"].get(k) for k in ("occ - none", "occ - policy")}
    if all(c and c["diff"] is not None for c in above.values()):
        out["occ_helps"] = {
            "claim": "OCC raises the final training reward above no MTP loss (none; detach's main model trains "
            "alike) and above the policy loss at its fixed coefficient, the paper's headline; rule: both "
            "differences > 0, beyond seed noise",
            **{
                k: {"diff": c["diff"], "p": c["p"], "within_noise": c["within_noise"]}
                for k, c in above.items()
            },
            "holds": all(c["diff"] > 0 and not c["within_noise"] for c in above.values()),
        }
    tracked = []
    for n, p in probes.items():
        pc, pv = p["pooled"]["spearman_c"], p["pooled"]["spearman_v2"]
        tracked.append((n, pc is not None and pc["low"] > 0, pv is not None and pv["low"] > 0))
    if tracked:
        out["proxies_track"] = {
            "claim": "the proxies track the exact statistics; rule: the 95% intervals of ρ(ĉ, c) and ρ(v̂², v²) "
            "pooled over seeds lie above 0 for every probed variant",
            "source": source,
            "per_variant": {n: {"c": c, "v2": v} for n, c, v in tracked},
            "holds": all(c and v for _, c, v in tracked),
        }
    return out


def seeds_text(names, pairs) -> str:
    """The seeds behind a figure from its (variant, seed) pairs: one list when every variant drawn has the
    same seeds, else the list of each (a sweep may have run at fewer seeds than the core regimes)."""
    per = {n: sorted({s for (m, s) in pairs if m == n}) for n in names}
    per = {n: s for n, s in per.items() if s}
    if len({tuple(s) for s in per.values()}) <= 1:
        return f"seeds {next(iter(per.values()), [])}"
    return "seeds " + ", ".join(f"{n} {s}" for n, s in per.items())


def _caption(cfg, nemo_occ_cfg, what: str, seeds: str) -> str:
    from nemo_occ.lab.demo.report import setting_text

    return f"{what}. {setting_text(cfg, nemo_occ_cfg, 'nemo-occ study')}; {seeds}."


def _figures(
    out: Path, summary, rows_of, probes, in_training, variants, cfg, nemo_occ_cfg
) -> tuple[list[str], dict]:
    """The figures every run set gets (``nemo_occ.lab.figures.regime_figures``), then the sweeps' reward panels."""
    from nemo_occ.lab import figures as F

    pairs = {
        "runs": list(rows_of),
        "probes": [(n, s) for n, per_seed in probes.items() for s in per_seed],
        "training_probes": [(n, s) for n, per_seed in in_training.items() for s in per_seed],
    }

    def caption(what, names, source="runs"):
        if source == "probes+runs":  # Fig. 2: probes in a-c, the runs' training rows in d
            seeds = f"a-c {seeds_text(names, pairs['probes'])}; d {seeds_text(names, pairs['runs'])}"
        else:
            seeds = seeds_text(names, pairs[source])
        return _caption(cfg, nemo_occ_cfg, what, seeds)

    def group(names):
        return {n: [rows_of[(n, s)] for s in sorted(s for (m, s) in rows_of if m == n)]
                for n in names if any(m == n for (m, _) in rows_of)}  # fmt: skip

    pooled = {n: [r for recs in per_seed.values() for r in recs] for n, per_seed in probes.items()}
    drawn, failed = F.regime_figures(out, group(variants), caption=caption, probes=pooled or None,
                                     regime_of={n: v.regime for n, v in variants.items()},
                                     probe_note=f", {summary['probe']['minibatches']} minibatches each")  # fmt: skip
    for fname, names, what in (
        ("fig6_policy_coef.png", ["none", "policy"] + [n for n in variants if n.startswith("policy_coef")],
         "Training reward, policy-loss MTP at fixed coefficients (paper's sweep)"),
        ("fig6_ce_coef.png", ["none", "ce", "ce_coef1"], "Training reward, CE MTP at coef 0.1 and 1.0"),
        ("fig6_occ_lambda_plus.png", ["none", "occ"] + [n for n in variants if n.startswith("occ_lp")],
         "Training reward, OCC at λ+ values"),
        ("fig6_old_logprobs.png", ["policy", "occ"] + [n for n in variants if n.endswith(("_oldmtp", "_oldmain"))],
         "Training reward under both old-log-prob readings"),
    ):  # fmt: skip
        if len(group(names)) > 1:
            try:
                F.fig6_reward(group(names), out / fname, caption=caption(what, names))
                drawn.append(fname)
            except F.FigureDataError as err:  # missing metrics; anything else is a bug and propagates
                failed[fname] = str(err)
                (out / fname).unlink(missing_ok=True)
    return drawn, failed


def summary_markdown(s: dict) -> str:
    """The study's summary.md: the setting, then each comparison as measured, then the paper's claims one by one."""
    # long on purpose: summary.md's sections in the order they print
    c = s["config"]
    L = [
        "# nemo-occ study — results as measured",
        "",
        f"Command: `{(s['training_invocations'] or [{'command': s['command']}])[0]['command']}`"
        + (
            f" (this report: `{s['command']}`)"
            if s["training_invocations"] and s["training_invocations"][0]["command"] != s["command"]
            else ""
        )
        + "  ",
        f"Report written at commit {s['commit']}; machine: {s['machine']}.  ",
        "Invocations that trained or probed (UTC start, commit, load average 1/5/15 min at start): "
        + "; ".join(
            f"{i['started']} {i['commit']} {[round(x, 1) for x in i['load_average'] or []]}"
            for i in s["training_invocations"]
        )
        + ".  ",
        f"Setting: {c['steps']} RL steps x {c['prompts_per_step']} prompts x {c['samples_per_prompt']} samples, "
        f"{c['minibatches']} updates/step; task {c['task']}; model {c['model']}; base coef {c['coef']}, "
        f"λ+ {c['lambda_plus']}, old_logprobs {c['old_logprobs']}.  ",
        f"Probes: {s['probe']['minibatches']} minibatches at each of steps {s['probe']['steps']} of the core "
        f"{'/'.join(s['probe']['regimes'])} runs.",
        "",
        "## Warm start per seed (shared by every run of the seed; the demo's gate)",
        "",
        "| seed | SFT steps | gate | pass rate | MTP agreement | main CE |",
        "|---|---|---|---|---|---|",
        *[
            f"| {seed} | {w.get('steps')} | {w.get('gate')} | {_fmt(w.get('pass_rate'))} | "
            f"{_fmt(w.get('mtp_agreement_1'))} | {_fmt(w.get('main_ce'))} |"
            for seed, w in s.get("warm_start", {}).items()
        ],
        "",
        "## Per variant (mean ± sd over seeds; then every seed)",
        "",
        "reward = mean training reward over the last max(5, steps/5) steps; eval = held-out avg@k; "
        "agreement = MTP top-1 agreement over the same tail; λ>0 = fraction of steps whose λ from the update's "
        "statistics is positive (applied only under occ).",
        "",
        "| variant | settings | seeds | reward | eval start | eval final | agreement | λ>0 | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in s["variants"].items():
        if not e["seeds"]:
            L.append(f"| {name} | {e['settings']} | 0 | not run | | | | | |")
            continue
        L.append(
            f"| {name} | {e['settings']} | {len(e['seeds'])} | {_pm(e['reward_final']['mean'], e['reward_final']['sd'])} "
            f"| {_pm(e['eval_start']['mean'], e['eval_start']['sd'])} | {_pm(e['eval_final']['mean'], e['eval_final']['sd'])} "
            f"| {_pm(e['agreement_final']['mean'], e['agreement_final']['sd'])} "
            f"| {_pm(e['lambda_positive']['mean'], e['lambda_positive']['sd'], '.2f')} "
            f"| {_fmt(e['wall_s']['mean'], '.0f')} |"
        )
    L += ["", "Every seed (MTP share: median over steps of ||λ·g_MTP|| / ||g_RL|| over the main model; clipped: "
          "share of updates the gradient clip scaled):", "",
          "| variant | seed | reward | eval final | agreement | λ>0 | λ median | MTP share | clipped | wall s |",
          "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in s["variants"].items():
        for seed, m in e["seeds"].items():
            L.append(f"| {name} | {seed} | {_fmt(m['reward_final'])} | {_fmt(m['eval_final'])} | "
                     f"{_fmt(m['agreement_final'])} | {_fmt(m['lambda_positive'], '.2f')} | "
                     f"{_fmt(m['lambda_median'], '.3g')} | {_fmt(m.get('mtp_share_median'), '.3g')} | "
                     f"{_fmt(m.get('clipped_mean'), '.2f')} | {_fmt(m['wall_s'], '.0f')} |")  # fmt: skip
    L += ["", "## Differences of final reward (Welch's t-test over seeds)", "",
          "Unpaired: Welch's t-test on the two sets of seeds. Paired: every regime of a seed shares its warm start, "
          "data order and sampling seeds, so the per-seed differences (listed) remove the seed-to-seed spread; "
          "paired t-test (scipy.stats.ttest_rel) over them.", "",
          "| comparison | diff of means | larger seed sd | p (Welch) | seeds | verdict (Welch) | per-seed differences | "
          "paired mean ± sd | p (paired) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, cmp in s["comparisons"].items():
        if cmp["diff"] is None:
            continue  # a side has no finished run: listed under Unfinished
        verdict = (
            "no test: a side has one seed"
            if cmp["p"] is None
            else "within seed noise (p ≥ 0.05)"
            if cmp["within_noise"]
            else "beyond seed noise (p < 0.05)"
        )
        pd = cmp.get("paired") or {}
        L.append(f"| {name} | {_fmt(cmp['diff'], '+.3f')} | {_fmt(cmp.get('seed_sd'))} | {_fmt(cmp['p'], '.3f')} "
                 f"| {cmp['n'][0]} vs {cmp['n'][1]} | {verdict} | "
                 f"{', '.join(format(x, '+.3f') for x in pd.get('diffs', []))} | "
                 f"{_pm(pd.get('mean'), pd.get('sd'), '+.4f')} | {_fmt(pd.get('p'), '.3f')} |")  # fmt: skip
    if s.get("training_probes"):
        L += ["", "## In-training probes (the runs' own: one update every fidelity_every steps)", ""]
        L += _probe_table(s["training_probes"])
    if s["probes"]:
        L += ["", "## Fixed-checkpoint probes (proxy vs exact over the main model's parameters)", "",
              "Spearman ρ [95% Fisher-z interval] (n points); sign(ĉ) = sign(c) against its base rate; cos = "
              "c/sqrt(||g_RL||²·v²) averaged over the probed minibatches, and the fraction of them with cos > 0.",
              ""]  # fmt: skip
        L += _probe_table(s["probes"])
        L += ["", "cos(g_RL, g_MTP) per checkpoint (pooled over seeds: mean ± sd over minibatches; proxy cosine "
              "ĉ/sqrt(Σδ_RL²·v̂²)):", "", "| variant | step | exact cos | cos > 0 | proxy cos | n |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name, p in s["probes"].items():
            for step, b in p["pooled"]["by_step"].items():
                L.append(f"| {name} | {step} | {_pm(b['cos_mean'], b['cos_sd'])} | {_fmt(b['cos_positive'], '.2f')} "
                         f"| {_fmt(b['proxy_cos_mean'])} | {b['n']} |")  # fmt: skip
    L += [
        "",
        "## The paper's mechanism, claim by claim (rule in nemo_occ/lab/study/report.py::_mechanism)",
        "",
    ]
    for m in s["mechanism"].values():
        L.append(f"- {m['claim']}: **{'holds' if m['holds'] else 'not shown'}** — "
                 + json.dumps({k: v for k, v in m.items() if k not in ('claim', 'holds')}, default=str))  # fmt: skip
    L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in s["figures"]]
    if s["figures_not_drawn"]:
        L += ["", "Not drawn: " + "; ".join(f"{k}: {v}" for k, v in s["figures_not_drawn"].items())]
    L += ["", "## Unfinished", ""]
    L += [f"- {u}" for u in s["unfinished"]] or ["None: every job of the plan finished."]
    if s["unfinished"]:
        L.append("\nRerun the command above to continue them (finished jobs are kept).")
    if s["skipped"]:
        L += [f"- skipped {k}: {v}" for k, v in s["skipped"].items()]
    return "\n".join(L) + "\n"
