"""The ``nemo-occ`` command line.

Each layer owns its sub-commands: a module listed in ``_COMMAND_MODULES`` exposes
``register(subparsers)``, which adds its parsers and sets ``func(args) -> int`` as the default.
Registration must stay import-light (no megatron, Bridge or Ray at import time) so that
``nemo-occ --help`` is instant and works without GPU packages. A command module that cannot be
imported (a package it needs is missing or broken) costs only its own commands: they answer with one
line naming the failed import, and every other command, ``nemo-occ info`` included, still runs.

Every misuse ends in one line on stderr and a known exit status, never a traceback:
2 for a mistake in the command line (argparse's message, without the usage block: ``--help`` has it),
a file the command may not read or write, a full or read-only disk, a state file it refuses to load
(``nemo_occ.safe_load``), or a Python package it needs that is not installed; 130 for Ctrl-C. A folder ``--out`` that the failed command created and left
without data (nothing but folders and empty files) is removed again. Each command documents its own
exit statuses on top of these.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import shutil
import sys
import warnings
from pathlib import Path

# module -> the commands it registers
_COMMAND_MODULES = {
    "nemo_occ.lab.demo.cli": ("demo",),  # the [lab] extra
    "nemo_occ.lab.study.cli": ("study",),  # the [lab] extra
    "nemo_occ.nemo_rl.cli": ("train",),
    "nemo_occ.export.cli": ("export", "verify-export"),
    "nemo_occ.info": ("info",),
}
USER_ERROR, INTERRUPTED = 2, 130
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)

# Warnings megatron-core gives at import on a machine without Transformer Engine or Apex: expected
# there (megatron falls back to torch), and nothing a user can act on.
_EXPECTED_MEGATRON_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
)


def quiet_expected_megatron_warnings() -> None:
    """Hide the warnings of ``_EXPECTED_MEGATRON_WARNINGS`` (every other warning still shows)."""
    for pattern in _EXPECTED_MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


class _OneLineParser(argparse.ArgumentParser):
    """argparse's error as one line, pointing at ``--help`` instead of printing the usage block."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def unavailable_commands() -> dict[str, str]:
    """``{command: why it cannot run here}`` for each command whose module fails to import."""
    broken = {}
    for name, commands in _COMMAND_MODULES.items():
        try:
            importlib.import_module(name)
        except Exception as err:  # any import failure: a missing package, or one that breaks on import
            missing = err.name if isinstance(err, ModuleNotFoundError) and err.name else None
            if missing and (name == missing or name.startswith(missing + ".")):
                continue  # the command module itself is absent (not written, or moved): no command to offer
            broken.update(dict.fromkeys(commands, f"{type(err).__name__}: {err}"))
    return broken


def build_parser() -> argparse.ArgumentParser:
    """The ``nemo-occ`` parser: one sub-command per module of ``_COMMAND_MODULES`` that imports."""
    from nemo_occ import __version__

    parser = _OneLineParser(
        prog="nemo-occ",
        description="Joint MTP + RL training with Optimal Coefficient Calibration (OCC).",
    )
    parser.add_argument("--version", action="version", version=f"nemo-occ {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    broken = unavailable_commands()
    for name, commands in _COMMAND_MODULES.items():
        if name not in sys.modules:
            continue
        if any(c in broken for c in commands):
            for command in commands:
                subparsers.add_parser(command, help=f"unavailable here ({broken[command]})", add_help=False)
            continue
        sys.modules[name].register(subparsers)
    return parser


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (None when ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            return missing
        missing = folder
    return missing


def _remove_if_empty(root: Path) -> None:
    """Remove ``root``, a folder the failed command created, if no file in it holds a byte.

    Empty files (a lock file) and folders are what a command leaves when it fails before writing;
    a folder with data (a checkpoint a rerun resumes from) stays.
    """
    try:
        if any(p.is_file() and p.stat().st_size > 0 for p in root.rglob("*")):
            return
        shutil.rmtree(root)
    except OSError:  # not ours to force: leave whatever could not be removed
        pass


def _os_error_line(err: OSError, out: Path | None) -> str:
    where = err.filename or (f"--out {out}" if out is not None else None)
    line = f"{where}: {err.strerror or err}" if where else str(err.strerror or err)
    if err.errno in _NO_ROOM:
        line += "; free space" + (" or choose another --out" if out is not None else "")
    elif err.errno in _NOT_WRITABLE and out is not None:
        line += "; choose an --out you may write to"
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_expected_megatron_warnings()
    parser = build_parser()
    broken = unavailable_commands()
    if argv and argv[0] in broken:  # before parsing: its options are unknown
        print(
            f"nemo-occ {argv[0]}: unavailable here ({broken[argv[0]]}); `nemo-occ info` reports the environment",
            file=sys.stderr,
        )
        return USER_ERROR
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USER_ERROR
    out = Path(args.out) if getattr(args, "out", None) is not None else None
    created = _first_missing(out) if out is not None else None
    who = f"nemo-occ {args.command}"
    rc = USER_ERROR
    try:
        rc = int(args.func(args) or 0)
    except KeyboardInterrupt:  # the commands that write say what they kept; this is everyone else's
        print(f"{who}: interrupted", file=sys.stderr)
        rc = INTERRUPTED
    except ModuleNotFoundError as err:  # a package the command needs is not installed here
        print(
            f"{who}: error: needs the Python package {err.name or err}, which is not installed here "
            "(`nemo-occ info` reports the environment)",
            file=sys.stderr,
        )
    except OSError as err:
        print(f"{who}: error: {_os_error_line(err, out)}", file=sys.stderr)
    except ValueError as err:
        from nemo_occ.safe_load import UnreadableStateError

        if not isinstance(err, UnreadableStateError):
            raise
        print(f"{who}: error: {err}", file=sys.stderr)
    finally:
        if rc != 0 and created is not None and created.is_dir():
            _remove_if_empty(created)
    return rc


if __name__ == "__main__":
    sys.exit(main())
