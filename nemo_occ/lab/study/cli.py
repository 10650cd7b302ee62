"""``nemo-occ study`` sub-command (import-light: the study's modules load only when it runs).

Exit status: 0 done (or stopped by ``--max-minutes``; the report lists what is unfinished), 2 a user
error (one line on stderr; nothing in ``--out`` touched) or an ``--out`` it cannot write (full or read-only
disk: one line from ``nemo_occ.cli``), 130 interrupted (rerun the same command to
resume: every finished job and every run's last checkpoint are kept).
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add ``nemo-occ study`` to the CLI's sub-commands (import-light)."""
    p = subparsers.add_parser(
        "study",
        help="the demo over seeds, the paper's coefficient sweeps and fidelity probes (resumable)",
        description="Run the demo's regimes over several seeds against detach (paired by seed), with the "
        "controls that separate CE's direction from its size and from the gradient clip, OCC's old-log-prob "
        "reading and probed estimator, fixed-checkpoint probes (cross-fitted exact c, v² vs ĉ, v̂²), optional "
        "coefficient sweeps, and write corrected statistics, tables and figures. Jobs run in priority order, "
        "several at a time (--jobs).",
        epilog="A rerun into the same --out continues (finished jobs are skipped, an interrupted run resumes "
        "from its last checkpoint); a different configuration is refused unless --overwrite.",
    )
    p.add_argument("--quick", action="store_true", help="the demo's --quick setting (tests)")
    p.add_argument("--config", type=Path, help="YAML with 'demo:' and/or 'nemo_occ:' blocks (as for demo)")
    p.add_argument("--steps", type=int, help="RL steps per run (default: the demo's)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], metavar="S", help="seeds (default 0 1 2 3 4)"
    )
    p.add_argument(
        "--sweep-seeds", type=int, nargs="*", default=[], metavar="S",
        help="seeds of the sweeps (none, policy old_logprobs mtp, policy coef, occ λ+): default none, as they "
        "do not fit the default hour on 2 cores; e.g. --sweep-seeds 0 1 2 --max-minutes 120",
    )  # fmt: skip
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (e.g. none occ)")
    p.add_argument("--probe-minibatches", type=int, default=16, metavar="M",
                   help="minibatches probed per checkpoint (0: no probes; default 16)")  # fmt: skip
    p.add_argument("--probe-checkpoints", type=int, default=2, metavar="C",
                   help="probed checkpoints per core ce/policy/occ run, evenly spaced (default 2)")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=60.0, metavar="MIN",
                   help="start no job that would end after MIN minutes, judged by the finished jobs of its kind "
                   "(default 60; the rest is left for a rerun)")  # fmt: skip
    p.add_argument("--jobs", type=int, metavar="N",
                   help="jobs at a time, each a process with one torch thread (default: one per core)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("study-out"), help="output folder (default ./study-out)")
    p.add_argument("--overwrite", action="store_true", help="start fresh: delete the study's earlier output")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from what finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=_main)


def _cores() -> int:
    """The cores this process may run on (the affinity mask where the OS has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _error(message: str) -> int:
    print(f"nemo-occ study: {message}", file=sys.stderr)
    return 2


def _main(args) -> int:
    from nemo_occ.lab import require_lab

    require_lab("study")
    try:
        return _study(args)
    except KeyboardInterrupt:
        print("nemo-occ study: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _study(args) -> int:
    from nemo_occ.cli import quiet_expected_megatron_warnings

    quiet_expected_megatron_warnings()
    from nemo_occ.core.config import ConfigError
    from nemo_occ.lab.demo.config import load_demo_config

    if args.steps is not None and args.steps < 1:
        return _error(f"--steps {args.steps}: give at least 1")
    if args.probe_minibatches < 0 or args.probe_checkpoints < 1:
        return _error("--probe-minibatches must be >= 0 and --probe-checkpoints >= 1")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        return _error(f"--max-minutes {args.max_minutes:g}: give a number of minutes > 0")
    if args.jobs is not None and args.jobs < 1:
        return _error(f"--jobs {args.jobs}: give at least 1")
    if len(set(args.seeds)) != len(args.seeds):
        return _error(f"--seeds {' '.join(map(str, args.seeds))}: name each seed once")
    sweep = args.sweep_seeds
    if any(s not in args.seeds for s in sweep):
        return _error(f"--sweep-seeds {' '.join(map(str, sweep))}: each must be one of --seeds")
    overrides = {"rl": {"steps": args.steps}} if args.steps is not None else {}
    try:
        cfg, nemo_occ_cfg = load_demo_config(args.config, quick=args.quick, overrides=overrides)
    except ConfigError as err:
        flat = " ".join(line.strip() for line in str(err).splitlines())
        return _error(f"--config {flat}" if args.config is not None else flat)
    if args.probe_minibatches and args.probe_checkpoints > cfg.rl.steps:
        return _error(f"--probe-checkpoints {args.probe_checkpoints} exceeds the {cfg.rl.steps} RL steps")

    from nemo_occ.lab.study.plan import variants
    from nemo_occ.lab.study.run import StudyError, run_study

    known = [v.name for v in variants(nemo_occ_cfg.coef, nemo_occ_cfg.occ.lambda_plus)]
    if args.only and any(n.replace("_oldmain", "_oldmtp") not in known for n in args.only):
        return _error(f"--only {' '.join(args.only)}: choose from {', '.join(known)}")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        summary = run_study(
            cfg, nemo_occ_cfg, args.out, seeds=args.seeds, sweep_seeds=sweep, only=args.only,
            probe_minibatches=args.probe_minibatches, probe_checkpoints=args.probe_checkpoints,
            max_minutes=args.max_minutes, workers=args.jobs or _cores(), overwrite=args.overwrite, report_only=args.report_only,
            command=shlex.join(["nemo-occ", *sys.argv[1:]]) if sys.argv[1:2] == ["study"] else None,
            show_progress=not args.no_progress, say=say,
        )  # fmt: skip
    except StudyError as err:
        return _error(str(err))
    print((args.out / "summary.md").read_text())
    print(f"Results are in {args.out.resolve()} (summary.md, summary.json, fig*.png, runs/, probes/)")
    return 0 if summary is not None else 1
