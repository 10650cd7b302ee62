"""``nemo-occ study``: the demo's runs over seeds, coefficient sweeps and old-log-prob readings, with
fixed-checkpoint fidelity probes. Built on the demo's machinery; resumable job by job.

Output folder layout::

    OUT/study.json                         study marker: configuration, plan settings, invocations
    OUT/warmstart/seed<S>.pt               the demo's warm start of seed S, shared by every run of S
    OUT/runs/<variant>/seed<S>/            a demo output folder (run.json, warmstart.pt,
                                           <regime>/metrics.jsonl, checkpoint.pt, tb/): one regime
    OUT/probes/<variant>/seed<S>/step<K>.pt     the run's checkpoint at RL step K (model, Adam, λ)
    OUT/probes/<variant>/seed<S>/step<K>.json   the probe records at that checkpoint (probe.py)
    OUT/summary.json, OUT/summary.md, OUT/fig*.png   the report (report.py)

Each training job is a demo run of one regime (``nemo_occ.lab.demo``: warm start, ``run_regime``,
checkpoints every ``rl.checkpoint_every`` steps, atomic writes), so a rerun resumes it from its
last checkpoint, and a finished job is skipped. The checkpoints at the probe steps are copied aside
while the run passes them (the demo keeps only its last). Jobs run in the plan's priority order
(``plan.py``); ``max_minutes`` stops starting new jobs after that long and reports what finished.

**Same configuration.** ``study.json`` holds the demo configuration (``results_config``: everything
but regimes, threads and checkpoint_every) and the probe settings. A rerun with a different one is
refused unless ``overwrite``, which deletes only what the study writes (the entries listed above).
Seeds and sweep seeds may change between reruns: every run folder carries its own configuration.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nemo_occ.atomic_io import atomic_link_or_copy, atomic_write
from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.lab.demo.config import DemoConfig
from nemo_occ.lab.demo.output import (
    DemoOutputError,
    prepare_output,
    regime_fingerprint,
    results_config,
)
from nemo_occ.lab.study.plan import Job, build_plan, probe_path, probe_steps, run_dir, variant_config
from nemo_occ.safe_load import load_state

__all__ = ["StudyError", "run_study", "study_identity", "variant_config", "job_done"]

KIND = "nemo-occ study"
STUDY_FILE = "study.json"
OWNED = (STUDY_FILE, "warmstart", "runs", "probes", "summary.json", "summary.md")

_FRESH = "add --overwrite to start fresh or choose another --out"


LOCK_FILE = ".study.lock"
_LOCKS: dict[str, int] = {}  # folder -> fd of its held lock (this process)


def _lock(out: Path) -> None:
    """An exclusive advisory lock on ``OUT/.study.lock`` for this process (the OS drops it when the process
    dies): two studies writing one folder would interleave the same run's metrics."""
    import fcntl

    key = str(out.resolve())
    if key in _LOCKS:
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StudyError(
            f"--out {out}: another nemo-occ study is running in it; wait for it to finish or stop it"
        ) from None
    _LOCKS[key] = fd


def _unlock(out: Path) -> None:
    fd = _LOCKS.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


class StudyError(ValueError):
    """``--out`` cannot be used as asked; the message says what to do instead."""


def study_identity(cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, probe: dict) -> dict:
    """What decides the study's numbers (module docstring, "Same configuration")."""
    ident = results_config(cfg, nemo_occ_cfg)
    ident["demo"].pop("seed", None)  # seeds are per run
    return {"base": ident, "probe": probe}


def job_done(out: Path, job: Job, cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, probe: dict) -> bool:
    """Whether ``job``'s result is in ``out`` already, made with the same configuration (then it is not rerun)."""
    from nemo_occ.lab.demo.trainer import regime_progress

    if job.kind == "probe":
        p = probe_path(out, job, job.step, ".json")
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return rec.get("settings") == probe
    rcfg, rocc = variant_config(cfg, nemo_occ_cfg, job.variant, job.seed, probe["checkpoint_every"])
    folder = run_dir(out, job) / job.variant.regime
    return regime_progress(folder, regime_fingerprint(rcfg, rocc, job.variant.regime)) == cfg.rl.steps


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("kind") == KIND else None


def prepare_study(out: Path, identity: dict, invocation: dict, *, overwrite: bool) -> bool:
    """Make ``out`` ready; returns whether an earlier study of the same configuration is resumed.
    Raises :class:`StudyError` before touching anything when ``out`` may not be used."""
    out = Path(out)
    flag = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise StudyError(f"{flag} is a file; give a folder (it is created if missing)")
    record = _read_record(out / STUDY_FILE) if (out / STUDY_FILE).exists() else None
    if (out / STUDY_FILE).exists() and record is None:
        raise StudyError(f"{flag} has a study.json that is not a nemo-occ study record; choose another --out")
    if record is None and out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise StudyError(
            f"{flag} is not empty and is not a study folder (no study.json); choose another --out"
        )
    resume = record is not None and not overwrite
    if resume and record.get("config") != identity:
        from nemo_occ.lab.demo.output import _differences

        raise StudyError(
            f"{flag} holds a study with another configuration ({_differences(record['config'], identity)}); "
            "rerun with its settings to resume, add --overwrite to start fresh, or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    _lock(out)  # before anything is written; held until run_study returns
    if overwrite and record is not None:  # only what the study writes; study.json last
        for name in OWNED[1:]:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        for p in out.glob("fig*.png"):
            p.unlink()
        (out / STUDY_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        record = {"kind": KIND, "format": 1, "config": identity, "invocations": []}
    record["invocations"].append(invocation)
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out / STUDY_FILE, lambda f: f.write(text.encode()))
    return resume


class _Snapshots:
    """Progress hook of ``run_regime``: after step K+1 starts reporting, the run's checkpoint.pt holds
    step K (the trainer logs a step, updates the progress, then checkpoints); copy it aside when K is a
    probe step. Also forwards to a progress bar and counts steps for the ETA."""

    def __init__(self, ckpt: Path, start: int, wanted: dict[int, Path], steps: int, bar=None):
        self.ckpt, self.step, self.wanted, self.steps, self.bar = ckpt, start, wanted, steps, bar

    def update(self, n: int = 1) -> None:
        self.step += n
        self.grab(self.step - 1)
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, *args, **kwargs) -> None:
        if self.bar is not None:
            self.bar.set_postfix(*args, **kwargs)

    def grab(self, k: int) -> None:
        dst = self.wanted.get(k)
        if dst is None or dst.exists() or not self.ckpt.exists():
            return
        state = load_state(self.ckpt, what_to_do=_FRESH)
        if int(state["step"]) == k:
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dst, lambda f: torch.save(state, f))


def _train(out: Path, job: Job, cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, probe: dict, invocation: dict,
           show_progress: bool) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    from nemo_occ.lab.demo.trainer import regime_progress, run_regime
    from nemo_occ.lab.demo.warmstart import warm_start

    rcfg, rocc = variant_config(cfg, nemo_occ_cfg, job.variant, job.seed, probe["checkpoint_every"])
    folder = run_dir(out, job)
    try:
        prepare_output(folder, results_config(rcfg, rocc), invocation, overwrite=False)
    except DemoOutputError as err:
        raise StudyError(str(err)) from None
    shared = out / "warmstart" / f"seed{job.seed}.pt"
    if shared.exists() and not (folder / "warmstart.pt").exists():
        atomic_link_or_copy(shared, folder / "warmstart.pt")
    warm_state, _ = warm_start(rcfg, folder / "warmstart.pt")
    if not shared.exists():
        shared.parent.mkdir(parents=True, exist_ok=True)
        atomic_link_or_copy(folder / "warmstart.pt", shared)
    regime = job.variant.regime
    ckpt = folder / regime / "checkpoint.pt"
    start = regime_progress(folder / regime, regime_fingerprint(rcfg, rocc, regime))
    wanted = {}
    if job.variant.core and probe["minibatches"] > 0 and regime in probe["regimes"]:
        wanted = {k: probe_path(out, job, k, ".pt") for k in probe["steps"]}
    with tqdm(
        total=cfg.rl.steps, initial=start, desc=job.label, disable=not show_progress, leave=False
    ) as bar:
        hook = _Snapshots(ckpt, start, wanted, cfg.rl.steps, bar)
        hook.grab(start)  # a run resumed right after a probe step's checkpoint
        run_regime(regime, rcfg, rocc, warm_state, folder / regime, progress=hook)
        hook.grab(cfg.rl.steps)


def _probe(out: Path, job: Job, cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, probe: dict) -> str | None:
    """Probe one checkpoint; returns why it could not run (None when it ran)."""
    from nemo_occ.lab.study.probe import probe_checkpoint

    snap = probe_path(out, job, job.step, ".pt")
    if not snap.exists():
        return f"no checkpoint of step {job.step} was kept (the run finished before the study kept them)"
    rcfg, rocc = variant_config(cfg, nemo_occ_cfg, job.variant, job.seed, probe["checkpoint_every"])
    state = load_state(snap, what_to_do=_FRESH)
    t0 = time.perf_counter()
    records = probe_checkpoint(rcfg, rocc, job.variant.regime, state, minibatches=probe["minibatches"])
    result = {"settings": probe, "variant": job.variant.name, "seed": job.seed, "step": job.step,
              "wall_s": time.perf_counter() - t0, "records": records}  # fmt: skip
    text = json.dumps(result) + "\n"
    atomic_write(probe_path(out, job, job.step, ".json"), lambda f: f.write(text.encode()))
    return None


def run_study(
    cfg: DemoConfig,
    nemo_occ_cfg: NemoOCCConfig,
    out: Path,
    *,
    seeds: list[int],
    sweep_seeds: list[int],
    only: list[str] | None = None,
    probe_minibatches: int = 32,
    probe_checkpoints: int = 3,
    max_minutes: float | None = None,
    overwrite: bool = False,
    report_only: bool = False,
    command: str | None = None,
    show_progress: bool = False,
    say: Callable[[str], None] = print,
) -> dict:
    """Run the plan's unfinished jobs in order (or none with ``report_only``), then write the report."""
    # long on purpose: the study's lifecycle (plan, what is done, run the unfinished jobs, report) in one
    # place so its resume rules read together
    from nemo_occ.core.regimes import REGIMES, get_regime
    from nemo_occ.lab.demo.run import _machine, package_versions
    from nemo_occ.lab.study.report import _commit

    steps = probe_steps(cfg.rl.steps, probe_checkpoints) if probe_minibatches > 0 else []
    every = math.gcd(cfg.rl.steps, *steps)  # checkpoints land on every probe step
    probe = {"minibatches": probe_minibatches, "checkpoints": probe_checkpoints, "steps": steps,
             "checkpoint_every": every, "regimes": [r for r in REGIMES if get_regime(r).trunk_gradient]}  # fmt: skip
    identity = study_identity(cfg, nemo_occ_cfg, probe)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    invocation = {
        "command": command,
        "cwd": os.getcwd(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seeds": seeds,
        "sweep_seeds": sweep_seeds,
        "versions": package_versions(),
        "machine": _machine(),
        "load_average": list(os.getloadavg()),
        "report_only": report_only,
        "commit": _commit(),
    }
    jobs = build_plan(seeds=seeds, sweep_seeds=sweep_seeds, coef=nemo_occ_cfg.coef,
                      lambda_plus=nemo_occ_cfg.occ.lambda_plus, old_logprobs=nemo_occ_cfg.old_logprobs,
                      steps=cfg.rl.steps, checkpoints=probe_checkpoints, probes=probe_minibatches > 0)  # fmt: skip
    if only:
        jobs = [j for j in jobs if j.variant.name in only]
    record = _read_record(out / STUDY_FILE)
    if report_only:
        if record is None:
            raise StudyError(f"--out {out} holds no study (no study.json); run the study first")
        if record.get("config") != identity:
            raise StudyError(f"--out {out} holds a study with another configuration; give its settings")
    # what finished, read before anything is written: a foreign run folder is refused with --out untouched
    # (--overwrite deletes the runs; another configuration is refused by prepare_study)
    resume = not overwrite and record is not None and record.get("config") == identity
    done = _done(out, jobs, cfg, nemo_occ_cfg, probe) if resume else {j: False for j in jobs}
    if not report_only:
        prepare_study(out, identity, invocation, overwrite=overwrite)
    try:
        return _run_jobs(out, cfg, nemo_occ_cfg, probe, invocation, jobs, done, max_minutes=max_minutes,
                         report_only=report_only, show_progress=show_progress, say=say)  # fmt: skip
    finally:
        _unlock(out)


def _done(out, jobs, cfg, nemo_occ_cfg, probe) -> dict[Job, bool]:
    try:
        return {j: job_done(out, j, cfg, nemo_occ_cfg, probe) for j in jobs}
    except DemoOutputError as err:  # a run folder assembled by hand, or written by another configuration
        raise StudyError(str(err)) from None


def _run_jobs(out, cfg, nemo_occ_cfg, probe, invocation, jobs, done, *, max_minutes, report_only, show_progress,
              say) -> dict:  # fmt: skip
    todo = [j for j in jobs if not done[j]]
    say(
        f"nemo-occ study: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run in {out}"
    )
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    if todo and not report_only:
        from nemo_occ.lab.cpu_compat import cpu_compat
        from nemo_occ.lab.parallel import model_parallel

        # as run_demo: single-process megatron-core on a CPU-only torch for every job, undone on the way out
        with cpu_compat(), model_parallel(tensor_parallel=1):
            spent: dict[str, list[float]] = {"train": [], "probe": []}
            for i, job in enumerate(todo, start=1):
                elapsed = (time.perf_counter() - t0) / 60
                if max_minutes is not None and elapsed >= max_minutes:
                    say(f"nemo-occ study: stopping after {elapsed:.1f} min (--max-minutes {max_minutes:g}); "
                        f"{len(todo) - i + 1} jobs left; rerun the same command to continue")  # fmt: skip
                    break
                left = {k: sum(1 for j in todo[i - 1 :] if j.kind == k) for k in spent}
                eta = sum(left[k] * (sum(v) / len(v)) for k, v in spent.items() if v) / 60
                say(f"[{i}/{len(todo)}] tier {job.tier} {job.label} (elapsed {elapsed:.1f} min"
                    + (f", ETA ~{eta:.0f} min" if all(spent[k] or not left[k] for k in spent) else "") + ")")  # fmt: skip
                tj, cj = time.perf_counter(), time.process_time()
                if job.kind == "train":
                    _train(out, job, cfg, nemo_occ_cfg, probe, invocation, show_progress)
                else:
                    why = _probe(out, job, cfg, nemo_occ_cfg, probe)
                    if why:
                        skipped[job.label] = why
                        say(f"    skipped: {why}")
                spent[job.kind].append(time.perf_counter() - tj)
                # CPU seconds next to wall seconds: on a shared machine the ratio says how much of it we got
                say(f"    done in {spent[job.kind][-1]:.0f} s wall, {time.process_time() - cj:.0f} s CPU "
                    f"(load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    from nemo_occ.lab.study.report import build_study_report

    if todo and not report_only:
        done = _done(out, jobs, cfg, nemo_occ_cfg, probe)
    return build_study_report(out, jobs, done, cfg, nemo_occ_cfg, probe, invocation, skipped, say=say)
