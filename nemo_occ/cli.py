"""The ``nemo-occ`` command line.

Each layer owns its sub-commands: a module listed in ``_COMMAND_MODULES`` exposes
``register(subparsers)``, which adds its parsers and sets ``func(args) -> int`` as the default.
Registration must stay import-light (no megatron, Bridge or Ray at import time) so that
``nemo-occ --help`` is instant and works without GPU packages.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = (
    "nemo_occ.lab.demo.cli",  # demo (the [lab] extra)
    "nemo_occ.lab.study.cli",  # study (the [lab] extra)
    "nemo_occ.nemo_rl.cli",  # train
    "nemo_occ.export.cli",  # export, verify-export
    "nemo_occ.info",  # info
)


def build_parser() -> argparse.ArgumentParser:
    """The ``nemo-occ`` parser: one sub-command per module of ``_COMMAND_MODULES`` that imports."""
    from nemo_occ import __version__

    parser = argparse.ArgumentParser(
        prog="nemo-occ",
        description="Joint MTP + RL training with Optimal Coefficient Calibration (OCC).",
    )
    parser.add_argument("--version", action="version", version=f"nemo-occ {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a layer not written yet must not break the others
            if err.name and err.name.startswith("nemo_occ"):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names (default ``sys.argv``); its exit code (2, with help, for none)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
