"""``nemo-occ demo``: warm start once, then every regime with identical seeds and data order.

Output folder layout::

    OUT/run.json                        demo marker: resolved configuration, seed, and per invocation
                                        the command, package versions and machine (output.py)
    OUT/warmstart.pt                    shared supervised warm start (cached)
    OUT/<regime>/metrics.jsonl          one JSON object per RL step (step 0: evaluation before RL)
    OUT/<regime>/tb/                    TensorBoard event files
    OUT/<regime>/checkpoint.pt          last checkpoint (atomic); a rerun resumes from it
    OUT/summary.json, OUT/summary.md    final numbers per finished regime, step-time ratio occ/detach
    OUT/fig*.png                        paper-style figures (nemo_occ.lab.figures.regime_figures)

Every file is written atomically. A rerun of the same configuration resumes; ``output.py`` says
what "same" means and what ``--overwrite`` deletes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nemo_occ.core.config import REGIMES, NemoOCCConfig
from nemo_occ.lab.demo.config import DemoConfig
from nemo_occ.lab.demo.output import prepare_output, regime_fingerprint, results_config, run_settings

__all__ = ["run_demo", "package_versions"]


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} (threads {torch.get_num_threads()})"


def package_versions() -> dict[str, str | None]:
    """Versions of what decides the numbers: python, torch, megatron-core, nemo-occ."""
    from importlib import metadata

    import nemo_occ

    try:
        mcore = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        from megatron.core import package_info

        mcore = package_info.__version__
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": mcore,
        "nemo-occ": nemo_occ.__version__,
    }


def run_demo(
    cfg: DemoConfig,
    nemo_occ_cfg: NemoOCCConfig,
    out: Path,
    *,
    overwrite: bool = False,
    command: str | None = None,
    show_progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict:
    """Train the unfinished regimes of ``cfg.regimes`` into ``out`` and report every finished regime.

    Raises ``DemoOutputError`` (nothing touched) when ``out`` may not be used; see ``output.py``.
    ``say`` receives one line on what happens to earlier results (resumed, already complete).
    The torch thread count is ``cfg.threads`` while it runs and restored afterwards.
    """
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg, nemo_occ_cfg, out, overwrite, command, show_progress, say)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    cfg: DemoConfig,
    nemo_occ_cfg: NemoOCCConfig,
    out: Path,
    overwrite: bool,
    command: str | None,
    show_progress: bool,
    say: Callable[[str], None],
) -> dict:
    from nemo_occ.lab.demo.trainer import regime_progress

    invocation = {
        "command": command,
        "cwd": os.getcwd(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": run_settings(cfg),
        "versions": package_versions(),
        "machine": _machine(),
    }
    _, resumed = prepare_output(out, results_config(cfg, nemo_occ_cfg), invocation, overwrite=overwrite)
    done = {r: regime_progress(out / r, regime_fingerprint(cfg, nemo_occ_cfg, r)) for r in REGIMES}
    steps = cfg.rl.steps
    if resumed and all(done[r] == steps for r in cfg.regimes) and _summary_covers(out, done, steps):
        say(
            f"nemo-occ demo: already complete in {out} ({', '.join(cfg.regimes)}: {steps} of {steps} steps); "
            "add --overwrite to start fresh"
        )
        return json.loads((out / "summary.json").read_text())
    if resumed:
        states = [
            f"{r}: "
            + ("complete" if s == steps else f"resuming from step {s} of {steps}" if s else "not started")
            for r, s in done.items()
            if r in cfg.regimes
        ]
        say(f"nemo-occ demo: resuming in {out} ({'; '.join(states)})")
    from nemo_occ.lab.cpu_compat import cpu_compat
    from nemo_occ.lab.parallel import model_parallel

    # Single-process megatron-core on a CPU-only torch (gloo world of 1), for every model of the run;
    # both are process-wide and undone on the way out, so the process is left as it was.
    with cpu_compat(), model_parallel(tensor_parallel=1):
        return _run(cfg, nemo_occ_cfg, out, {r for r in cfg.regimes if done[r] < steps}, show_progress, say)


def _summary_covers(out: Path, done: dict[str, int], steps: int) -> bool:
    """Whether summary.json reports exactly the folder's finished regimes (a kill may have cut the report)
    and its figures are this version's (an earlier version drew others: the report is rebuilt, nothing is
    retrained)."""
    from nemo_occ.lab.figures import FIGURE_FILES

    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    plots = summary.get("plots", [])
    return list(summary.get("regimes", {})) == [r for r, s in done.items() if s == steps] and all(
        p in FIGURE_FILES and (out / p).exists() for p in plots
    )


def _run(
    cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, out: Path, todo: set[str], show_progress: bool, say
) -> dict:
    from tqdm.auto import tqdm

    from nemo_occ.lab.demo.report import build_report, setting_text
    from nemo_occ.lab.demo.trainer import finished_run, run_regime
    from nemo_occ.lab.demo.warmstart import gate_message, warm_start

    t0 = time.perf_counter()
    with tqdm(
        total=cfg.warm_start.steps, desc="warm start", disable=not show_progress, leave=False
    ) as bar:
        warm_state, warm_metrics = warm_start(cfg, out / "warmstart.pt", progress=bar)
    gate = gate_message(warm_metrics, cfg.warm_start)
    say(gate)
    todo_in_order = [r for r in cfg.regimes if r in todo]
    with tqdm(
        total=cfg.rl.steps * len(todo_in_order), desc="RL", disable=not show_progress, unit="step"
    ) as bar:
        for regime in todo_in_order:
            run_regime(regime, cfg, nemo_occ_cfg, warm_state, out / regime, progress=bar)
    runs = {}
    for regime in REGIMES:  # every finished regime of this folder, from what it recorded
        run = finished_run(out / regime, regime_fingerprint(cfg, nemo_occ_cfg, regime), cfg.rl.steps)
        if run is not None:
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
        f"{gate}; main CE {warm_metrics.get('warm_start/main_ce', float('nan')):.3f}. "
        f"Training wall time {warm_wall + sum(r['wall_time_s'] for r in runs.values()):.0f} s "
        f"(warm start + regimes, across resumes; this invocation {time.perf_counter() - t0:.0f} s)."
    )
    setting = f"{setting_text(cfg, nemo_occ_cfg)}, seed {cfg.seed}"
    return build_report(runs, out, header, setting, warm_metrics, eval_k=cfg.eval.samples)
