"""``nemo-occ train``: the NeMo-RL entry point as a sub-command (registration imports nothing heavy)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nemo-occ train`` (GRPO/DAPO/GSPO on NeMo-RL with nemo-occ's MTP training) to ``subparsers``."""
    parser = subparsers.add_parser(
        "train",
        help="run GRPO/DAPO/GSPO on NeMo-RL with nemo-occ's MTP training (inside the NeMo-RL container)",
        description=(
            "Same as `python -m nemo_occ.nemo_rl.run_grpo`: --config <recipe> [--check [--print-config] "
            "[--strict]] [override ...]. Overrides use NeMo-RL's Hydra syntax: key=value sets an existing "
            "key, +key=value adds one, ++key=value sets or adds, ~key deletes."
        ),
    )
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    parser.add_argument("--check", action="store_true", help="only load and check the recipe, then exit")
    parser.add_argument(
        "--print-config", action="store_true", help="with --check: print the whole resolved config"
    )
    parser.add_argument(
        "--strict", action="store_true", help="with --check: fail on keys NeMo-RL's config types do not know"
    )
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="NeMo-RL Hydra overrides (key=value)")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from nemo_occ.nemo_rl.run_grpo import main

    flags = [
        f
        for f, on in (
            ("--check", args.check),
            ("--print-config", args.print_config),
            ("--strict", args.strict),
        )
        if on
    ]
    return main(["--config", args.config, *flags, *args.overrides])
