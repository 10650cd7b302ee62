"""Summary tables and plots of a demo run (``summary.json``, ``summary.md``, ``*.png``).

Everything here reads the per-regime ``metrics.jsonl`` files, so a report can be rebuilt from a
finished (or resumed) run without re-training. Proxy fidelity is not recomputed here: the summary
quotes the ``fidelity/*`` metrics that the run's ``nemo_occ.core.fidelity.ProbeHistory`` logged at
its last probe (per-token proxies of the probed update against the exact c and v² over the main
model; Spearman ρ with its 95% interval, sign agreement, the trust verdict), the same numbers
NeMo-RL logs under ``train/mtp/fidelity/``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from nemo_occ.demo.output import atomic_write

__all__ = ["build_report", "conditions_summary", "fidelity_summary"]

_COLORS = {"none": "#7f7f7f", "detach": "#1f77b4", "ce": "#2ca02c", "policy": "#9467bd", "occ": "#d62728"}
# ProbeHistory.metrics: the running statistics over all probes so far (the rest of fidelity/* is per probe)
_RUNNING = ("spearman_", "sign_", "trusted")


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
    return "occ" if regime == "occ" else "proxy"


def _depths(rows: list[dict]) -> list[int]:
    return sorted({int(k.rpartition("_")[2]) for r in rows for k in r if k.startswith("fidelity/trusted_")})


def fidelity_summary(rows: list[dict]) -> dict | None:
    """The run's proxy fidelity as its ``ProbeHistory`` reported it at the last probe (None: no probe).

    ``probes`` and, per depth ``d`` (keys ``"1"``, ...), every running ``fidelity/*`` statistic under
    its own name without the depth (``spearman_c``, ``spearman_c_low``, ..., ``trusted``; a statistic
    the core left undefined is absent), plus ``update_share_median``, the median over the probes of
    ``fidelity/update_share_d``.
    """
    probed = [r for r in rows if r.get("fidelity/probes") is not None]
    if not probed:
        return None
    last = probed[-1]
    out: dict = {"probes": int(last["fidelity/probes"]), "depths": {}}
    for d in _depths(probed):
        entry = {}
        for key, value in last.items():
            name, _, depth = key.removeprefix("fidelity/").rpartition("_")
            if key.startswith("fidelity/") and name.startswith(_RUNNING) and depth == str(d):
                entry[name] = value
        shares = [
            r[f"fidelity/update_share_{d}"] for r in probed if r.get(f"fidelity/update_share_{d}") is not None
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
            "mtp_accuracy_1_final_mean5": _tail_mean(rows, "mtp/accuracy_1"),
            "wall_time_s": run["wall_time_s"],
            "step_time_s": run["step_time_s"],
            "steps": max((r["step"] for r in rows), default=0),
        }
        entry["conditions"] = conditions_summary(rows)
        if regime != "none":
            entry["lambda_1_final"] = _last(rows, f"{pre}/lambda_1") if regime == "occ" else None
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
    model (``update/*``, λ applied); the median over probes of cos(g_RL, g_MTP,1) (unscaled) and of the
    cosine between the RL gradients of a minibatch's two halves (``exact/*``)."""
    first = next((r for r in rows if r["step"] == 1), {})
    return {
        "mtp_agreement_1_step1": first.get("mtp/accuracy_1"),
        "reward_step1": first.get("reward/mean"),
        "clip_fired_share": _mean(rows, "update/clipped"),
        "mtp_share_median": _median(rows, "update/mtp_share"),
        "mtp_cos_applied_median": _median(rows, "update/mtp_cos"),
        "cos_rl_mtp_1_median": _median(rows, "exact/cos_1"),
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
        "Conditions (`nemo_occ.demo.report.conditions_summary`): MTP top-1 agreement with the sampled tokens and "
        "reward at RL step 1; share of updates whose gradient norm exceeded the clip; median over steps of the MTP "
        "term's share of the update ‖g_term‖/‖g_RL‖ and of cos(g_RL, g_term), λ applied, over the main model; "
        "median over probes of cos(g_RL, g_MTP) (unscaled) and of the cosine between the RL gradients of one "
        "minibatch's two halves (1: all signal, 0: all sampling noise).",
        "",
        "| regime | agreement (step 1) | reward (step 1) | clip fired | MTP share | cos(g_RL, g_term) "
        "| cos(g_RL, g_MTP) | half-batch cos |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for regime, e in summary["regimes"].items():
        c = e["conditions"]
        lines.append(
            f"| {regime} | {_fmt(c['mtp_agreement_1_step1'])} | {_fmt(c['reward_step1'])} | "
            f"{_fmt(c['clip_fired_share'], '.2f')} | {_fmt(c['mtp_share_median'], '.3g')} | "
            f"{_fmt(c['mtp_cos_applied_median'], '.2f')} | {_fmt(c['cos_rl_mtp_1_median'], '.2f')} | "
            f"{_fmt(c['half_batch_cos_median'], '.2f')} |"
        )
    fid = {r: e["fidelity"] for r, e in summary["regimes"].items() if "fidelity" in e}
    if fid:
        lines += [
            "",
            "Proxy fidelity (`fidelity/*` at the last probe, `nemo_occ.core.fidelity`): per-token proxies of the "
            "probed update against the exact c and v² over the main model's parameters (the paper's Fig. 8). "
            "Spearman ρ with its 95% interval; how often sign(ĉ) = sign(c), against chance; median "
            "|λ|·‖g_MTP‖/‖g_RL‖; trusted = both intervals above 0 and the sign beats chance. "
            "— : undefined (a constant series).",
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
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        p = out_dir / name
        fig.tight_layout()
        try:  # the temporary file's name ends in .tmp: the format must be named
            atomic_write(p, lambda f: fig.savefig(f, format="png", dpi=110))
        finally:
            plt.close(fig)
        written.append(p)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for regime, run in runs.items():
        c = _COLORS.get(regime)
        for ax, key, title in (
            (axes[0], "reward/mean", "training reward"),
            (axes[1], "eval/accuracy", "held-out accuracy (avg@k)"),
            (axes[2], "mtp/accuracy_1", "MTP top-1 agreement (draft acceptance proxy)"),
        ):
            xs, ys = _series(run["metrics"], key)
            ax.plot(xs, ys, label=regime, color=c, marker="o" if key == "eval/accuracy" else None, ms=3)
            ax.set_title(title)
            ax.set_xlabel("RL step")
    axes[0].legend()
    save(fig, "curves.png")

    proxies = {r: run for r, run in runs.items() if r != "none"}
    if proxies:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        for regime, run in proxies.items():
            pre = _proxy_prefix(regime)
            c = _COLORS.get(regime)
            for ax, key, title in (
                (axes[0], f"{pre}/lambda_applied_1", "λ applied (mean over the step's updates)"),
                (axes[1], f"{pre}/c_hat_mean_1", "alignment proxy ĉ (per token)"),
                (axes[2], f"{pre}/v2_hat_mean_1", "variance proxy v̂² (per token)"),
            ):
                xs, ys = _series(run["metrics"], key)
                ax.plot(xs, ys, label=regime, color=c)
                ax.set_title(title)
                ax.set_xlabel("RL step")
            xs, first = _series(run["metrics"], f"{pre}/first_order_1")
            _, second = _series(run["metrics"], f"{pre}/second_order_1")
            axes[3].plot(xs, [a - b for a, b in zip(first, second, strict=True)], label=regime, color=c)
            axes[3].set_title("Eq. 10 gain proxy λĉ − λ²v̂²")
            axes[3].set_xlabel("RL step")
        axes[0].legend()
        save(fig, "occ_proxies.png")

    fid = {}
    for regime, run in runs.items():
        summary = fidelity_summary(run["metrics"])
        if summary is None or "1" not in summary["depths"]:
            continue
        keys = ("fidelity/c_hat_per_token_1", "fidelity/c_1", "fidelity/v2_hat_per_token_1", "fidelity/v2_1")
        pts = [[r[k] for k in keys] for r in run["metrics"] if all(r.get(k) is not None for k in keys)]
        fid[regime] = (pts, summary["depths"]["1"])
    if fid:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for regime, (pts, stats) in fid.items():
            c = _COLORS.get(regime)
            xc, yc, xv, yv = ([p[i] for p in pts] for i in range(4))
            axes[0].scatter(xc, yc, color=c, s=12, label=f"{regime} ρ={_rho(stats, 'c')}")
            axes[1].scatter(xv, yv, color=c, s=12, label=f"{regime} ρ={_rho(stats, 'v2')}")
        axes[0].set(
            title="alignment: proxy vs exact (depth 1)",
            xlabel="ĉ / n = Σ δ_RL·δ_MTP / tokens",
            ylabel="c = <g_RL, g_MTP> (main model)",
        )
        axes[1].set(
            title="variance: proxy vs exact (depth 1)",
            xlabel="v̂² / n = Σ δ_MTP² / tokens",
            ylabel="v² = ||g_MTP||² (main model)",
        )
        for ax in axes:  # gradient statistics are heavy-tailed: keep the bulk of the points visible
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(fontsize=8)
        save(fig, "fidelity.png")
    return written


def build_report(runs: dict[str, dict], out_dir: Path, header: str, warm_start: dict | None = None) -> dict:
    summary = summarize(runs, warm_start)
    summary["plots"] = [p.name for p in plot(runs, out_dir)]
    text_json, text_md = json.dumps(summary, indent=2) + "\n", summary_markdown(summary, header)
    atomic_write(out_dir / "summary.json", lambda f: f.write(text_json.encode()))
    atomic_write(out_dir / "summary.md", lambda f: f.write(text_md.encode()))
    return summary
