"""Summary tables and plots of a demo run (``summary.json``, ``summary.md``, ``*.png``).

Everything here reads the per-regime ``metrics.jsonl`` files, so a report can be rebuilt from a
finished (or resumed) run without re-training. Proxy fidelity is not recomputed here: the summary
quotes the ``train/mtp/fidelity/*`` metrics that the run's ``nemo_occ.core.fidelity.ProbeHistory``
logged at its last probe (per-token proxies of the probed update against the exact c and v² over the
main model; Spearman ρ with its 95% interval, sign agreement, the trust verdict), the same numbers
under the same names as NeMo-RL logs them (``nemo_occ.core.metrics.logged_name``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from nemo_occ.atomic_io import atomic_write
from nemo_occ.core.metrics import logged_name, metric_prefix
from nemo_occ.core.regimes import get_regime

__all__ = ["build_report", "conditions_summary", "fidelity_summary"]

# ProbeHistory.metrics: the running statistics over all probes so far (the rest of
# train/mtp/fidelity/* is per probe)
_RUNNING = ("spearman_", "sign_", "trusted", "windows")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _last(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else None


def _tail_mean(rows: list[dict], key: str, n: int = 5) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None][-n:]
    return sum(vals) / len(vals) if vals else None


def _proxy_prefix(regime: str) -> str:
    return logged_name(metric_prefix(get_regime(regime).calibrated) + "/")


_FIDELITY = logged_name("fidelity/")  # the probes' metrics, named as NeMo-RL logs them
_AGREEMENT_1 = logged_name("accuracy_1")


def _depths(rows: list[dict]) -> list[int]:
    return sorted(
        {int(k.rpartition("_")[2]) for r in rows for k in r if k.startswith(f"{_FIDELITY}trusted_")}
    )


def fidelity_summary(rows: list[dict]) -> dict | None:
    """The run's proxy fidelity as its ``ProbeHistory`` reported it at the last probe (None: no probe).

    ``probes`` and, per depth ``d`` (keys ``"1"``, ...), every running ``train/mtp/fidelity/*`` statistic
    under its own name without the depth (``spearman_c``, ``spearman_c_low``, ..., ``trusted``; a statistic
    the core left undefined is absent), plus ``update_share_median``, the median over the probes of
    ``train/mtp/fidelity/update_share_d``.
    """
    probed = [r for r in rows if r.get(f"{_FIDELITY}probes") is not None]
    if not probed:
        return None
    last = probed[-1]
    out: dict = {"probes": int(last[f"{_FIDELITY}probes"]), "depths": {}}
    for d in _depths(probed):
        entry = {}
        for key, value in last.items():
            name, _, depth = key.removeprefix(_FIDELITY).rpartition("_")
            if key.startswith(_FIDELITY) and name.startswith(_RUNNING) and depth == str(d):
                entry[name] = value
        shares = [
            r[f"{_FIDELITY}update_share_{d}"]
            for r in probed
            if r.get(f"{_FIDELITY}update_share_{d}") is not None
        ]
        entry["update_share_median"] = statistics.median(shares) if shares else None
        out["depths"][str(d)] = entry
    return out


def summarize(runs: dict[str, dict], warm_start: dict | None = None) -> dict:
    """runs: regime -> {"metrics": rows, "wall_time_s": float, "step_time_s": float}; ``warm_start``: the
    warm start's metrics (its gate's measurements), quoted as they are."""
    out: dict = {"regimes": {}}
    if warm_start is not None:
        out["warm_start"] = warm_start
    for regime, run in runs.items():
        rows = run["metrics"]
        pre = _proxy_prefix(regime)
        entry = {
            "eval_accuracy_start": _series(rows, "eval/accuracy")[1][0]
            if _series(rows, "eval/accuracy")[1]
            else None,
            "eval_accuracy_final": _last(rows, "eval/accuracy"),
            "reward_final_mean5": _tail_mean(rows, "reward/mean"),
            "mtp_accuracy_1_final_mean5": _tail_mean(rows, _AGREEMENT_1),
            "wall_time_s": run["wall_time_s"],
            "step_time_s": run["step_time_s"],
            "steps": max((r["step"] for r in rows), default=0),
        }
        entry["conditions"] = conditions_summary(rows)
        spec = get_regime(regime)
        if spec.has_mtp_term:
            entry["lambda_1_final"] = _last(rows, f"{pre}lambda_1") if spec.calibrated else None
            fidelity = fidelity_summary(rows)
            if fidelity is not None:
                entry["fidelity"] = fidelity
        out["regimes"][regime] = entry
    if "occ" in runs and "detach" in runs and runs["detach"]["step_time_s"] > 0:
        out["step_time_ratio_occ_over_detach"] = runs["occ"]["step_time_s"] / runs["detach"]["step_time_s"]
    return out


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def conditions_summary(rows: list[dict]) -> dict:
    """The conditions under which the paper's mechanism can show, as the run measured them (None: not
    measured): MTP agreement at the first RL step; the share of updates the gradient clip scaled; the
    median over steps of the MTP term's share of the update and of cos(g_RL, g_term) over the main
    model (``update/*``, λ applied); the median over probes of cos(g_RL, g_MTP,1) (unscaled; same-sample
    and cross-fitted, ``fidelity/cos_*_1``) and of the cosine between the RL gradients of a minibatch's
    two halves (``exact/half_batch_cos``). A cross-fitted cosine divides by cross-fitted squares, which can
    be <= 0: it is defined at some probes only, and ``cos_rl_mtp_1_cross_fit_defined`` says at how many of
    the ``probes`` (a median over a subset the data chose)."""
    first = next((r for r in rows if r["step"] == 1), {})
    probed = [r for r in rows if r.get(f"{_FIDELITY}c_cross_fit_1") is not None]
    defined = [r for r in probed if r.get(f"{_FIDELITY}cos_cross_fit_1") is not None]
    return {
        "mtp_agreement_1_step1": first.get(_AGREEMENT_1),
        "reward_step1": first.get("reward/mean"),
        "clip_fired_share": _mean(rows, "update/clipped"),
        "mtp_share_median": _median(rows, "update/mtp_share"),
        "mtp_cos_applied_median": _median(rows, "update/mtp_cos"),
        "cos_rl_mtp_1_median": _median(rows, f"{_FIDELITY}cos_same_sample_1"),
        "cos_rl_mtp_1_cross_fit_median": _median(rows, f"{_FIDELITY}cos_cross_fit_1"),
        "cos_rl_mtp_1_cross_fit_defined": len(defined),
        "probes": len(probed),
        "half_batch_cos_median": _median(rows, "exact/half_batch_cos"),
    }


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def _rho(entry: dict, name: str) -> str:
    if entry.get(f"spearman_{name}") is None:
        return "—"
    lo, hi = entry[f"spearman_{name}_low"], entry[f"spearman_{name}_high"]
    return f"{entry[f'spearman_{name}']:.2f} [{lo:.2f}, {hi:.2f}]"


def summary_markdown(summary: dict, header: str) -> str:
    """summary.md: ``header``, then one table row per regime and the notes on what the numbers mean."""
    lines = [
        header,
        "",
        "| regime | eval acc. start | eval acc. final | reward (last 5 steps) | MTP top-1 acc. (last 5) | s / step | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for regime, e in summary["regimes"].items():
        lines.append(
            f"| {regime} | {_fmt(e['eval_accuracy_start'])} | {_fmt(e['eval_accuracy_final'])} | "
            f"{_fmt(e['reward_final_mean5'])} | {_fmt(e['mtp_accuracy_1_final_mean5'])} | "
            f"{_fmt(e['step_time_s'], '.2f')} | {_fmt(e['wall_time_s'], '.1f')} |"
        )
    if "step_time_ratio_occ_over_detach" in summary:
        lines += ["", f"Step-time ratio occ / detach: {summary['step_time_ratio_occ_over_detach']:.3f}"]
    lines += [
        "",
        "Conditions (`nemo_occ.lab.demo.report.conditions_summary`): MTP top-1 agreement with the sampled tokens and "
        "reward at RL step 1; share of updates whose gradient norm exceeded the clip; median over steps of the MTP "
        "term's share of the update ‖g_term‖/‖g_RL‖ and of cos(g_RL, g_term), λ applied, over the main model; "
        "median over probes of cos(g_RL, g_MTP) (unscaled; cross-fitted between the probed minibatch's two halves, "
        "over the probes where the cross-fitted squares are positive, k of n in brackets, so a median over a subset "
        "the data chose; and same-sample, which includes each sequence's covariance with itself) and of the cosine between the RL "
        "gradients of one minibatch's two halves (1: all signal, 0: all sampling noise). One seed: no interval, "
        "no test; differences between regimes here are not evidence (the study has seeds and tests).",
        "",
        "| regime | agreement (step 1) | reward (step 1) | clip fired | MTP share | cos(g_RL, g_term) "
        "| cos(g_RL, g_MTP) cross-fitted | same-sample | half-batch cos |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for regime, e in summary["regimes"].items():
        c = e["conditions"]
        lines.append(
            f"| {regime} | {_fmt(c['mtp_agreement_1_step1'])} | {_fmt(c['reward_step1'])} | "
            f"{_fmt(c['clip_fired_share'], '.2f')} | {_fmt(c['mtp_share_median'], '.3g')} | "
            f"{_fmt(c['mtp_cos_applied_median'], '.2f')} | {_fmt(c['cos_rl_mtp_1_cross_fit_median'], '.2f')}"
            + (
                f" ({c['cos_rl_mtp_1_cross_fit_defined']} of {c['probes']})"
                if c.get("probes") and c["cos_rl_mtp_1_cross_fit_median"] is not None
                else ""
            )
            + f" | {_fmt(c['cos_rl_mtp_1_median'], '.2f')} | {_fmt(c['half_batch_cos_median'], '.2f')} |"
        )
    fid = {r: e["fidelity"] for r, e in summary["regimes"].items() if "fidelity" in e}
    if fid:
        lines += _fidelity_table(fid)
    if summary.get("plots"):
        lines += [
            "",
            "Figures (`nemo_occ.lab.figures`; each caption names the setting, n, the unit and what its "
            "bands are; one colour and marker per regime, the same in every figure):",
            "",
        ]
        lines += [f"![{name}]({name})" for name in summary["plots"]]
    if summary.get("plots_not_drawn"):
        lines += ["", "Figures not drawn, their metrics missing: "
                  + "; ".join(f"{k}: {v}" for k, v in summary["plots_not_drawn"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def _fidelity_table(fid: dict) -> list[str]:
    """summary.md's proxy-fidelity notes and table: one row per regime and MTP depth."""
    lines = [
        "",
        "Proxy fidelity (`train/mtp/fidelity/*` at the last probe, `nemo_occ.core.fidelity`): per-token "
        "proxies of the probed update against the cross-fitted exact c and v² over the main model's "
        "parameters. Spearman ρ within windows of consecutive probes, averaged, with a 95% interval that "
        "resamples windows; how often sign(ĉ) = sign(c), against its base rate; median "
        "|λ|·‖g_MTP‖/‖g_RL‖; trusted = the verdict of `nemo_occ.core.fidelity.trust_verdict`. — : undefined "
        "(too few windows or a constant series).",
        "",
        "| regime | depth | probes | ρ(ĉ, c) [95%] | ρ(v̂², v²) [95%] | sign(ĉ) = sign(c) (chance) "
        "| update share | trusted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, f in fid.items():
        for d, e in f["depths"].items():
            lines.append(
                f"| {r} | {d} | {f['probes']} | {_rho(e, 'c')} | {_rho(e, 'v2')} | "
                f"{_fmt(e.get('sign_agreement_c'), '.2f')} ({_fmt(e.get('sign_base_rate_c'), '.2f')}) | "
                f"{_fmt(e.get('update_share_median'), '.3g')} | {'yes' if e.get('trusted') else 'no'} |"
            )
    return lines


def setting_text(cfg, nemo_occ_cfg, tool: str = "nemo-occ demo") -> str:
    """One line naming the run's setting, for figure captions."""
    return (
        f"{tool}, {cfg.rl.steps} RL steps x {cfg.rl.prompts_per_step} prompts x {cfg.rl.samples_per_prompt} "
        f"samples, {cfg.rl.minibatches} updates/step, {cfg.task.digits}-digit addition (held-out accuracy avg@"
        f"{cfg.eval.samples}: the share of {cfg.eval.samples} samples correct, mean over {cfg.eval.problems} "
        f"problems), GPT "
        f"{cfg.model.num_layers}x{cfg.model.hidden_size} + {cfg.model.mtp_num_layers} MTP layer; coef "
        f"{nemo_occ_cfg.coef:g}, λ+ {nemo_occ_cfg.occ.lambda_plus:g}, old_logprobs {nemo_occ_cfg.old_logprobs}; "
        f"in-training exact probes every {cfg.fidelity_every} RL steps"
    )


def plot(
    runs: dict[str, dict], out_dir: Path, setting: str, eval_k: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """The paper-style figures of the finished regimes (``nemo_occ.lab.figures.regime_figures``, one seed):
    the file names drawn, and why any figure was not."""
    from nemo_occ.lab.figures import regime_figures

    def caption(what: str, labels: list[str], source: str) -> str:
        return f"{what}. {setting}; one seed per regime ({', '.join(labels)}): no interval across seeds."

    return regime_figures(
        out_dir, {r: [run["metrics"]] for r, run in runs.items()}, caption=caption, eval_k=eval_k
    )


def build_report(
    runs: dict[str, dict],
    out_dir: Path,
    header: str,
    setting: str,
    warm_start: dict | None = None,
    eval_k: int | None = None,
) -> dict:
    """Summarize ``runs``, write summary.json, summary.md and the plots into ``out_dir`` (``eval_k``: the
    k of the held-out avg@k, for the figures' labels); the summary."""
    summary = summarize(runs, warm_start)
    summary["plots"], not_drawn = plot(runs, out_dir, setting, eval_k)
    if not_drawn:
        summary["plots_not_drawn"] = not_drawn
    text_json, text_md = json.dumps(summary, indent=2) + "\n", summary_markdown(summary, header)
    atomic_write(out_dir / "summary.json", lambda f: f.write(text_json.encode()))
    atomic_write(out_dir / "summary.md", lambda f: f.write(text_md.encode()))
    return summary
