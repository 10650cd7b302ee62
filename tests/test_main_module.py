"""``python -m nemo_occ`` is the ``nemo-occ`` command: same help, same sub-commands, same exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_python_m_nemo_occ_is_the_cli():
    module = _run("-m", "nemo_occ", "--help")
    cli = _run("-m", "nemo_occ.cli", "--help")
    assert module.returncode == 0, module.stderr
    assert module.stdout == cli.stdout
    for command in ("demo", "train", "export", "verify-export", "info"):
        assert command in module.stdout


def test_python_m_nemo_occ_passes_on_the_exit_code():
    no_command = _run("-m", "nemo_occ")
    assert no_command.returncode == 2 and "usage: nemo-occ" in no_command.stdout
    bad = _run("-m", "nemo_occ", "demo", "--steps", "0")
    assert bad.returncode == 2 and bad.stderr.strip(), bad.stdout
