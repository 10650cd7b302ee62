"""Summary tables and plots of a demo run (``summary.json``, ``summary.md``, ``*.png``).

Everything here reads the per-regime ``metrics.jsonl`` files, so a report can be rebuilt from a
finished (or resumed) run without re-training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nemo_occ.demo.output import atomic_write

__all__ = ["build_report", "pearson_r", "spearman_r"]

_COLORS = {"none": "#7f7f7f", "detach": "#1f77b4", "ce": "#2ca02c", "policy": "#9467bd", "occ": "#d62728"}


def pearson_r(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or a constant series."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their average rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman_r(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (Pearson r of the ranks): robust to the heavy tails of gradient norms."""
    return pearson_r(_ranks(xs), _ranks(ys))


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


def summarize(runs: dict[str, dict]) -> dict:
    """runs: regime -> {"metrics": rows, "wall_time_s": float, "step_time_s": float}."""
    out: dict = {"regimes": {}}
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
        if regime != "none":
            entry["lambda_1_final"] = _last(rows, f"{pre}/lambda_1") if regime == "occ" else None
            xs_c, ys_c, xs_v, ys_v = [], [], [], []
            for r in rows:
                if r.get("exact/c_1") is not None and r.get(f"{pre}/c_hat_1") is not None:
                    xs_c.append(r[f"{pre}/c_hat_1"])
                    ys_c.append(r["exact/c_1"])
                    xs_v.append(r[f"{pre}/v2_hat_1"])
                    ys_v.append(r["exact/v2_1"])
            if xs_c:
                entry["fidelity"] = {
                    "points": len(xs_c),
                    "pearson_r_c": pearson_r(xs_c, ys_c),
                    "pearson_r_v2": pearson_r(xs_v, ys_v),
                    "spearman_r_c": spearman_r(xs_c, ys_c),
                    "spearman_r_v2": spearman_r(xs_v, ys_v),
                }
        out["regimes"][regime] = entry
    if "occ" in runs and "detach" in runs and runs["detach"]["step_time_s"] > 0:
        out["step_time_ratio_occ_over_detach"] = runs["occ"]["step_time_s"] / runs["detach"]["step_time_s"]
    return out


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


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
    fid = {r: e["fidelity"] for r, e in summary["regimes"].items() if "fidelity" in e}
    if fid:
        lines += [
            "",
            "Proxy fidelity: correlation over the run between each proxy and the exact gradient statistic "
            "(the paper's Fig. 8), Pearson r and Spearman ρ:",
            "",
        ]
        lines += [
            "| regime | points | r(ĉ, c) | ρ(ĉ, c) | r(v̂², v²) | ρ(v̂², v²) |",
            "|---|---|---|---|---|---|",
        ]
        for r, f in fid.items():
            lines.append(
                f"| {r} | {f['points']} | {_fmt(f['pearson_r_c'])} | {_fmt(f['spearman_r_c'])} | "
                f"{_fmt(f['pearson_r_v2'])} | {_fmt(f['spearman_r_v2'])} |"
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
                (axes[0], "lambda_applied_mean_1", "λ applied (mean over the step's updates)"),
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
        pre = _proxy_prefix(regime)
        pts = [(r[f"{pre}/c_hat_1"], r["exact/c_1"], r[f"{pre}/v2_hat_1"], r["exact/v2_1"]) for r in run["metrics"]
               if r.get("exact/c_1") is not None and r.get(f"{pre}/c_hat_1") is not None]  # fmt: skip
        if pts:
            fid[regime] = pts
    if fid:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for regime, pts in fid.items():
            c = _COLORS.get(regime)
            xc, yc, xv, yv = ([p[i] for p in pts] for i in range(4))
            lc = f"{regime} r={_fmt(pearson_r(xc, yc), '.2f')} ρ={_fmt(spearman_r(xc, yc), '.2f')}"
            lv = f"{regime} r={_fmt(pearson_r(xv, yv), '.2f')} ρ={_fmt(spearman_r(xv, yv), '.2f')}"
            axes[0].scatter(xc, yc, color=c, s=12, label=lc)
            axes[1].scatter(xv, yv, color=c, s=12, label=lv)
        axes[0].set(
            title="alignment: proxy ĉ vs exact c", xlabel="ĉ = Σ δ_RL·δ_MTP", ylabel="c = <g_RL, g_MTP>"
        )
        axes[1].set(title="variance: proxy v̂² vs exact v²", xlabel="v̂² = Σ δ_MTP²", ylabel="v² = ||g_MTP||²")
        for ax in axes:  # gradient statistics are heavy-tailed: keep the bulk of the points visible
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(fontsize=8)
        save(fig, "fidelity.png")
    return written


def build_report(runs: dict[str, dict], out_dir: Path, header: str) -> dict:
    summary = summarize(runs)
    summary["plots"] = [p.name for p in plot(runs, out_dir)]
    text_json, text_md = json.dumps(summary, indent=2) + "\n", summary_markdown(summary, header)
    atomic_write(out_dir / "summary.json", lambda f: f.write(text_json.encode()))
    atomic_write(out_dir / "summary.md", lambda f: f.write(text_md.encode()))
    return summary
