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

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import signal
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
from nemo_occ.lab.study.plan import (
    MATCHED,
    Job,
    build_plan,
    matched_coefficient,
    probe_path,
    probe_steps,
    run_dir,
    variant_config,
)
from nemo_occ.safe_load import load_state

__all__ = ["StudyError", "run_study", "study_identity", "variant_config", "job_done"]

KIND = "nemo-occ study"
STUDY_FILE = "study.json"
OWNED = (STUDY_FILE, "warmstart", "runs", "probes", "summary.json", "summary.md", "matched.json", "provenance.json")

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
    if any(v is None for v in job.variant.overrides.values()):  # ce_matched before its coefficient is measured
        return False
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


def _warm_path(out: Path, seed: int) -> Path:
    return out / "warmstart" / f"seed{seed}.pt"


def _warm_ready(out: Path, seed: int) -> bool:
    """Whether seed's shared warm start exists (``warm_start`` checks its fingerprint when it is read)."""
    return _warm_path(out, seed).exists()


def _warm(out: Path, cfg: DemoConfig, seed: int) -> None:
    """Build seed's warm start, shared by every run of that seed."""
    from nemo_occ.lab.demo.warmstart import warm_start

    path = _warm_path(out, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    warm_start(cfg.model_copy(update={"seed": seed}), path)


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
    shared = _warm_path(out, job.seed)
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
    workers: int = 1,
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
        "workers": workers,
        "commit": _commit(),
    }
    jobs = build_plan(seeds=seeds, sweep_seeds=sweep_seeds, coef=nemo_occ_cfg.coef,
                      lambda_plus=nemo_occ_cfg.occ.lambda_plus, old_logprobs=nemo_occ_cfg.old_logprobs,
                      steps=cfg.rl.steps, checkpoints=probe_checkpoints, probes=probe_minibatches > 0)  # fmt: skip
    if only:
        jobs = [j for j in jobs if j.variant.name in only]
    record = _read_record(out / STUDY_FILE)
    if record is not None and record.get("config") == identity and not overwrite:
        jobs = [_with_matched(out, j) for j in jobs]  # ce_matched's coefficient, if measured already
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
                         report_only=report_only, show_progress=show_progress, say=say, workers=workers)  # fmt: skip
    finally:
        _unlock(out)


def _done(out, jobs, cfg, nemo_occ_cfg, probe) -> dict[Job, bool]:
    try:
        return {j: job_done(out, j, cfg, nemo_occ_cfg, probe) for j in jobs}
    except DemoOutputError as err:  # a run folder assembled by hand, or written by another configuration
        raise StudyError(str(err)) from None


def _run_jobs(out, cfg, nemo_occ_cfg, probe, invocation, jobs, done, *, max_minutes, report_only, show_progress,
              say, workers=1) -> dict:  # fmt: skip
    todo = [j for j in jobs if not done[j]]
    say(
        f"nemo-occ study: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run in {out}"
        + (f" ({workers} at a time)" if todo and not report_only and workers > 1 else "")
    )
    skipped: dict[str, str] = {}
    if todo and not report_only:
        runner = _Runner(out, cfg, nemo_occ_cfg, probe, invocation, workers, max_minutes, show_progress, say)
        with runner:
            runner.warm_starts(sorted({j.seed for j in todo if j.kind == "train"}))
            for tier in sorted({j.tier for j in todo}):
                tier_jobs = [j for j in todo if j.tier == tier]
                tier_jobs = _resolve_matched(out, jobs, tier_jobs, done, cfg, nemo_occ_cfg, probe, skipped, say)
                if not runner.run(tier_jobs, skipped, left=len([j for j in todo if j.tier > tier])):
                    break
    from nemo_occ.lab.study.report import build_study_report

    if todo and not report_only:
        jobs = [_with_matched(out, j) for j in jobs]
        done = _done(out, jobs, cfg, nemo_occ_cfg, probe)
    return build_study_report(out, jobs, done, cfg, nemo_occ_cfg, probe, invocation, skipped, say=say)


MATCHED_FILE = "matched.json"


def _with_matched(out: Path, job: Job) -> Job:
    """``job`` with ``ce_matched``'s measured coefficient filled in from ``OUT/matched.json`` (if measured)."""
    if job.variant.name != MATCHED or job.variant.overrides.get("coef") is not None:
        return job
    try:
        coef = json.loads((out / MATCHED_FILE).read_text())[MATCHED]["coef"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return job
    variant = dataclasses.replace(job.variant, overrides={**job.variant.overrides, "coef": coef})
    return dataclasses.replace(job, variant=variant)


def _resolve_matched(out, jobs, tier_jobs, done, cfg, nemo_occ_cfg, probe, skipped, say) -> list[Job]:
    """Measure ``ce_matched``'s coefficient (``plan.matched_coefficient``) from the finished core ``occ`` and
    ``ce`` runs of every seed, once, into ``OUT/matched.json``; its jobs are skipped, with the reason, while
    those runs are unfinished."""
    if not any(j.variant.name == MATCHED for j in tier_jobs):
        return tier_jobs
    if not (out / MATCHED_FILE).exists():
        from nemo_occ.lab.demo.trainer import _read_metrics

        sources = [j for j in jobs if j.kind == "train" and j.variant.name in ("occ", "ce")]
        unfinished = [j.label for j in sources if not job_done(out, j, cfg, nemo_occ_cfg, probe)]
        if unfinished or {j.variant.name for j in sources} != {"occ", "ce"}:
            why = "its coefficient is measured on the finished occ and ce runs; " + (
                f"unfinished: {', '.join(unfinished)}" if unfinished else "the plan has none (--only)"
            )
            for j in tier_jobs:
                if j.variant.name == MATCHED:
                    skipped[j.label] = why
            say(f"    {MATCHED} skipped: {why}")
            return [j for j in tier_jobs if j.variant.name != MATCHED]
        shares = {"occ": [], "ce": []}
        for j in sources:
            rows = _read_metrics(run_dir(out, j) / j.variant.regime / "metrics.jsonl", cfg.rl.steps)
            shares[j.variant.name] += [float(r["update/mtp_share"]) for r in rows if r.get("update/mtp_share") is not None]
        record = matched_coefficient(shares["occ"], shares["ce"], nemo_occ_cfg.coef)
        record["runs"] = sorted(f"{j.variant.name}/seed{j.seed}" for j in sources)
        text = json.dumps({MATCHED: record}, indent=2) + "\n"
        atomic_write(out / MATCHED_FILE, lambda f: f.write(text.encode()))
        say(f"    {MATCHED}: CE coefficient {record['coef']:g} matches occ's MTP share {record['occ_share']:.3f} "
            f"(CE's share per unit coefficient {record['ce_share_per_coef']:.3f})")  # fmt: skip
    return [_with_matched(out, j) for j in tier_jobs]


def _job_worker_init(threads: int) -> None:
    """A worker process of the study: one torch thread, single-process megatron-core on CPU for its life."""
    from nemo_occ.cli import quiet_expected_megatron_warnings
    from nemo_occ.lab.cpu_compat import cpu_compat
    from nemo_occ.lab.parallel import model_parallel

    quiet_expected_megatron_warnings()  # a spawned process starts with the default warning filters
    # Ctrl-C: the parent started this process with SIGINT blocked (inherited through exec), so an interrupt
    # during its start-up is not a traceback on the terminal; between jobs it is ignored, during one it
    # raises KeyboardInterrupt in the job (``_job``), whose writes are atomic, and the parent reports it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    with contextlib.suppress(OSError, AttributeError):  # Linux: end with the parent, even a killed one
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    torch.set_num_threads(threads)
    stack = contextlib.ExitStack()
    stack.enter_context(cpu_compat())
    stack.enter_context(model_parallel(tensor_parallel=1))
    globals()["_WORKER_STACK"] = stack  # held until the process exits


def _job(kind, out, job_or_seed, cfg, nemo_occ_cfg, probe, invocation, show_progress):
    """One job (run in this process or a worker); returns (wall s, CPU s, why it was skipped or None)."""
    tj, cj = time.perf_counter(), time.process_time()
    why = None
    worker = signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # a worker between jobs (_job_worker_init)
    if worker:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if kind == "warm":
            _warm(out, cfg, job_or_seed)
        elif job_or_seed.kind == "train":
            _train(out, job_or_seed, cfg, nemo_occ_cfg, probe, invocation, show_progress)
        else:
            why = _probe(out, job_or_seed, cfg, nemo_occ_cfg, probe)
    finally:
        if worker:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return time.perf_counter() - tj, time.process_time() - cj, why


class _Runner:
    """Runs jobs ``workers`` at a time (worker processes of one torch thread each; in this process when
    ``workers`` is 1), in order, and stops starting new ones when ``max_minutes`` would be passed: a job
    starts only if the elapsed time plus the mean duration of the finished jobs of its kind fits."""

    def __init__(self, out, cfg, nemo_occ_cfg, probe, invocation, workers, max_minutes, show_progress, say):
        self.args = (out, cfg, nemo_occ_cfg, probe, invocation)
        self.workers, self.max_minutes, self.say = workers, max_minutes, say
        self.show_progress = show_progress and workers == 1  # bars of parallel jobs would interleave
        self.t0 = time.perf_counter()
        self.spent: dict[str, list[float]] = {"warm": [], "train": [], "probe": []}
        self.started = 0
        self.pool = None
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if self.workers == 1:  # as run_demo: single-process megatron-core on a CPU-only torch, undone on the way out
            from nemo_occ.lab.cpu_compat import cpu_compat
            from nemo_occ.lab.parallel import model_parallel

            self._stack.enter_context(cpu_compat())
            self._stack.enter_context(model_parallel(tensor_parallel=1))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_job_worker_init, initargs=(1,))  # fmt: skip
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.pool is not None:
            if exc_type is not None:  # Ctrl-C or an error: stop the jobs in flight (a SIGINT sent to this
                # process alone does not reach them), start no queued one
                for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGINT)
            self.pool.shutdown(wait=True, cancel_futures=True)
        self._stack.close()
        return False

    def _submit(self, *args):
        """Submit a job to the pool with SIGINT blocked: a worker it starts inherits the mask (see
        ``_job_worker_init``), and an interrupt cannot land half-way through the pool's own start-up."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return self.pool.submit(_job, *args)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def minutes(self) -> float:
        return (time.perf_counter() - self.t0) / 60

    def _fits(self, kind: str) -> bool:
        if self.max_minutes is None:
            return True
        past = self.spent[kind]
        expected = sum(past) / len(past) / 60 if past else 0.0
        return self.minutes() + expected <= self.max_minutes

    def warm_starts(self, seeds: list[int]) -> None:
        """The shared warm start of each seed, before the runs that read it (two runs of a seed in parallel
        would otherwise both build it)."""
        out = self.args[0]
        need = [s for s in seeds if not _warm_ready(out, s)]
        self._execute([("warm", s, f"warm start seed {s}") for s in need], {}, left=0)

    def run(self, jobs: list[Job], skipped: dict, *, left: int) -> bool:
        """Run ``jobs``; False when ``max_minutes`` stopped it (the rest is left for a rerun)."""
        return self._execute([(j.kind, j, f"tier {j.tier} {j.label}") for j in jobs], skipped, left=left)

    def _execute(self, items, skipped, *, left: int) -> bool:
        """Run ``items`` ((kind, job or seed, label)) in order, ``workers`` at a time."""
        from concurrent.futures import FIRST_COMPLETED, wait

        pending = list(items)
        running: dict = {}  # future -> (kind, what, label)
        stopped = False
        while pending or running:
            while pending and not stopped and len(running) < self.workers:
                kind, what, label = pending[0]
                if not self._fits(kind):
                    stopped = True
                    self.say(f"nemo-occ study: stopping after {self.minutes():.1f} min (--max-minutes "
                             f"{self.max_minutes:g}): {len(pending) + left} jobs left; rerun the same command "
                             "to continue")  # fmt: skip
                    break
                pending.pop(0)
                self.started += 1
                eta = self._eta(len(pending) + len(running) + 1 + left)
                self.say(f"[{self.started}] {label} (elapsed {self.minutes():.1f} min{eta})")
                out, cfg, nemo_occ_cfg, probe, invocation = self.args
                args = (kind, out, what, cfg, nemo_occ_cfg, probe, invocation, self.show_progress)
                future = _Done(_job(*args)) if self.pool is None else self._submit(*args)
                running[future] = (kind, what, label)
            if not running:
                break
            finished = list(running) if self.pool is None else wait(running, return_when=FIRST_COMPLETED)[0]
            for future in [f for f in running if f in finished]:
                kind, what, label = running.pop(future)
                wall, cpu, why = future.result()
                self.spent[kind].append(wall)
                if why:
                    skipped[what.label] = why
                    self.say(f"    {label}: skipped: {why}")
                # CPU seconds next to wall seconds: on a shared machine the ratio says how much of it we got
                self.say(f"    {label}: done in {wall:.0f} s wall, {cpu:.0f} s CPU "
                         f"(load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        return not stopped

    def _eta(self, n_left: int) -> str:
        durations = [d for v in self.spent.values() for d in v]
        if not durations:
            return ""
        return f", ETA ~{n_left * (sum(durations) / len(durations)) / self.workers / 60:.0f} min"


class _Done:
    """A finished result where a future is expected (jobs run in this process)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
