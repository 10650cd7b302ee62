"""``nemo-occ demo`` sub-command (import-light: the demo's modules load only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the OCC paper's experiment in miniature on a CPU (all five regimes)",
        description="Warm-start a small megatron-core GPT with an MTP layer on multi-digit addition, then run "
        "GRPO/DAPO RL once per MTP regime with identical seeds and data, and write metrics, TensorBoard "
        "logs, a summary and plots. A rerun with the same --out resumes unfinished regimes.",
    )
    p.add_argument("--quick", action="store_true", help="a ~1-minute run (what the tests run)")
    p.add_argument("--regimes", nargs="+", metavar="REGIME", help="subset of: none detach ce policy occ")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: ./demo-out)")
    p.add_argument("--steps", type=int, help="RL steps per regime")
    p.add_argument("--seed", type=int, help="seed of model init, data order and sampling")
    p.add_argument("--config", type=Path, help="YAML with 'demo:' and/or 'nemo_occ:' blocks")
    p.add_argument(
        "--fidelity-every", type=int, metavar="N", help="exact c and v² every N steps (Fig. 8 check)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--interrupt-at", type=int, help=argparse.SUPPRESS
    )  # tests: crash after this step's checkpoint
    p.set_defaults(func=_main)


def _quiet_expected_megatron_warnings() -> None:
    """On a CPU, megatron-core warns at import that TE/Apex are absent: expected here, not actionable."""
    import warnings

    for pattern in (
        r"Transformer Engine and Apex are not installed",
        r"Apex is not installed",
        r"full scope is deprecated",
    ):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def _main(args) -> int:
    import sys

    _quiet_expected_megatron_warnings()

    from nemo_occ.core.config import ConfigError
    from nemo_occ.demo.config import load_demo_config

    overrides: dict = {}
    if args.regimes:
        overrides["regimes"] = args.regimes
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.steps is not None:
        overrides["rl"] = {"steps": args.steps}
    if args.fidelity_every is not None:
        overrides["fidelity_every"] = args.fidelity_every
    try:
        cfg, occ_cfg = load_demo_config(args.config, quick=args.quick, overrides=overrides)
    except ConfigError as err:
        print(f"nemo-occ demo: {err}", file=sys.stderr)
        return 2
    from nemo_occ.demo.run import run_demo

    summary = run_demo(
        cfg, occ_cfg, args.out, interrupt_at=args.interrupt_at, show_progress=not args.no_progress
    )
    print((args.out / "summary.md").read_text())
    if summary.get("plots"):
        print("plots: " + ", ".join(str(args.out / p) for p in summary["plots"]))
    print(
        f"Results are in {args.out.resolve()} (summary.md, summary.json, <regime>/metrics.jsonl, TensorBoard: "
        f"tensorboard --logdir {args.out})"
    )
    return 0
