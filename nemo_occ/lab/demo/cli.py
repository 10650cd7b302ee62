"""``nemo-occ demo`` sub-command (import-light: the demo's modules load only when it runs).

Exit status: 0 done (or already complete), 2 a user error (one line on stderr naming the flag to
change; nothing in ``--out`` touched) or an ``--out`` the run cannot write (full or read-only disk: one
line from ``nemo_occ.cli``), 130 interrupted by Ctrl-C (rerun the same command to resume).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

_EPILOG = (
    "A rerun into the same --out resumes it when the configuration is the same (all of it except "
    "--regimes, threads and rl.checkpoint_every); a different configuration is refused unless --overwrite."
)


def register(subparsers) -> None:
    """Add ``nemo-occ demo`` to the CLI's sub-commands (import-light)."""
    p = subparsers.add_parser(
        "demo",
        help="the OCC paper's experiment in miniature on a CPU (all five regimes)",
        description="Warm-start a small megatron-core GPT with an MTP layer on multi-digit addition, then run "
        "GRPO/DAPO RL once per MTP regime with identical seeds and data, and write metrics, TensorBoard "
        "logs, a summary and plots.",
        epilog=_EPILOG,
    )
    p.add_argument("--quick", action="store_true",
                   help="a ~1-minute smoke run of every code path (what the tests run): too small to reach the "
                   "paper's starting point, so it sets no warm-start targets and its numbers mean nothing")  # fmt: skip
    p.add_argument("--regimes", nargs="+", metavar="REGIME", help="subset of: none detach ce policy occ")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: ./demo-out)")
    p.add_argument(
        "--overwrite", action="store_true", help="start fresh: delete the demo's earlier output in --out"
    )
    p.add_argument("--steps", type=int, help="RL steps per regime")
    p.add_argument("--seed", type=int, help="seed of model init, data order and sampling")
    p.add_argument("--config", type=Path, help="YAML with 'demo:' and/or 'nemo_occ:' blocks")
    p.add_argument(
        "--fidelity-every", type=int, metavar="N", help="exact c and v² every N steps (Fig. 8 check)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


# flag -> its key in the demo: block
_FLAGS = {
    "--regimes": "regimes",
    "--seed": "seed",
    "--steps": "rl.steps",
    "--fidelity-every": "fidelity_every",
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _nested(key: str, value) -> dict:
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _error(message: str) -> int:
    print(f"nemo-occ demo: {message}", file=sys.stderr)
    return 2


def _command(args) -> str:
    """The command line of this invocation, as a user would type it again."""
    argv = ["nemo-occ", "demo"] + (["--quick"] if args.quick else [])
    if args.config is not None:
        argv += ["--config", str(args.config)]
    for flag in _FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            argv += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    argv += ["--out", str(args.out)]
    argv += [f for f, on in (("--overwrite", args.overwrite), ("--no-progress", args.no_progress)) if on]
    return shlex.join(argv)


def _main(args) -> int:
    from nemo_occ.lab import require_lab

    require_lab("demo")
    try:
        return _demo(args)
    except KeyboardInterrupt:  # every file is written atomically and checkpoints are resumable
        print("nemo-occ demo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _demo(args) -> int:
    from nemo_occ.cli import quiet_expected_megatron_warnings

    quiet_expected_megatron_warnings()

    import warnings

    from pydantic import ValidationError

    from nemo_occ.core.config import ConfigError
    from nemo_occ.lab.demo.config import DemoConfig, _merge, load_demo_config

    overrides: dict = {}
    for flag, key in _FLAGS.items():
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        try:  # the flag alone against the field's own constraints, so that the message can name it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                DemoConfig.model_validate(_nested(key, value))
        except ValidationError as err:
            return _error(f"{flag} {_shown(value)}: {err.errors()[0]['msg'].removeprefix('Value error, ')}")
        overrides = _merge(overrides, _nested(key, value))
    try:
        cfg, nemo_occ_cfg = load_demo_config(args.config, quick=args.quick, overrides=overrides)
    except ConfigError as err:
        flat = " ".join(line.strip() for line in str(err).splitlines())
        return _error(f"--config {flat}" if args.config is not None else flat)

    from nemo_occ.lab.demo.output import DemoOutputError
    from nemo_occ.lab.demo.run import run_demo

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        summary = run_demo(
            cfg,
            nemo_occ_cfg,
            args.out,
            overwrite=args.overwrite,
            command=_command(args),
            show_progress=not args.no_progress,
            say=say,
        )
    except DemoOutputError as err:
        return _error(str(err))
    print((args.out / "summary.md").read_text())
    if summary.get("plots"):
        print("plots: " + ", ".join(str(args.out / p) for p in summary["plots"]))
    print(
        f"Results are in {args.out.resolve()} (summary.md, summary.json, run.json, <regime>/metrics.jsonl, "
        f"TensorBoard: tensorboard --logdir {args.out})"
    )
    return 0
