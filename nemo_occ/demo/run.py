"""``nemo-occ demo``: warm start once, then every regime with identical seeds and data order.

Output folder layout::

    OUT/warmstart.pt                    shared supervised warm start (cached)
    OUT/<regime>/metrics.jsonl          one JSON object per RL step (step 0: evaluation before RL)
    OUT/<regime>/tb/                    TensorBoard event files
    OUT/<regime>/checkpoint.pt          last checkpoint (atomic); a rerun resumes from it
    OUT/summary.json, OUT/summary.md    final numbers per regime, step-time ratio occ/detach
    OUT/curves.png, OUT/occ_proxies.png, OUT/fidelity.png
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from pathlib import Path

import torch

from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.demo.config import DemoConfig

__all__ = ["run_demo"]


def _machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} (threads {torch.get_num_threads()})"


def run_demo(
    cfg: DemoConfig, occ_cfg: NemoOCCConfig, out: Path, *, interrupt_at: int | None = None, show_progress=True
) -> dict:
    from nemo_occ.demo.policy import setup_megatron_cpu, teardown_megatron_cpu

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    setup_megatron_cpu()
    try:
        return _run(cfg, occ_cfg, out, interrupt_at=interrupt_at, show_progress=show_progress)
    finally:  # leave the process as it was (the patches and the gloo group are process-wide)
        teardown_megatron_cpu()


def _run(
    cfg: DemoConfig, occ_cfg: NemoOCCConfig, out: Path, *, interrupt_at: int | None, show_progress: bool
) -> dict:
    from tqdm.auto import tqdm

    from nemo_occ.demo.report import build_report
    from nemo_occ.demo.trainer import run_regime
    from nemo_occ.demo.warmstart import warm_start

    t0 = time.perf_counter()
    with tqdm(total=cfg.warm_start.steps, desc="warm start", disable=not show_progress, leave=False) as bar:
        warm_state, warm_metrics = warm_start(cfg, out / "warmstart.pt", progress=bar)
    runs = {}
    total = cfg.rl.steps * len(cfg.regimes)
    with tqdm(total=total, desc="RL", disable=not show_progress, unit="step") as bar:
        for regime in cfg.regimes:
            run = run_regime(
                regime, cfg, occ_cfg, warm_state, out / regime, progress=bar, interrupt_at=interrupt_at
            )
            runs[regime] = {
                "metrics": run.metrics,
                "wall_time_s": run.wall_time_s,
                "step_time_s": run.step_time_s,
            }
    warm_wall = warm_metrics.get("warm_start/wall_s", 0.0)
    header = (
        f"# nemo-occ demo — {_dt.date.today().isoformat()}, {_machine()}\n\n"
        f"{cfg.rl.steps} RL steps x {cfg.rl.prompts_per_step} prompts x {cfg.rl.samples_per_prompt} samples, "
        f"{cfg.rl.minibatches} updates/step, seed {cfg.seed}; task: {cfg.task.digits}-digit addition; "
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, {cfg.model.mtp_num_layers} MTP layer(s); "
        f"warm start main CE {warm_metrics.get('warm_start/main_ce', float('nan')):.3f}. "
        f"Training wall time {warm_wall + sum(r['wall_time_s'] for r in runs.values()):.0f} s "
        f"(warm start + regimes, across resumes; this invocation {time.perf_counter() - t0:.0f} s)."
    )
    return build_report(runs, out, header)
