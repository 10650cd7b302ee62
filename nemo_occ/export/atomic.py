"""Make an output folder appear only when it is complete.

Files are written into a temporary sibling folder (same file system, so the final ``rename`` is
atomic); on success it is renamed into place, on any exception it is deleted. An existing output is
never touched unless ``overwrite=True``, in which case it is moved aside, replaced, then deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors writes 0600 files; give them the usual umask modes."""
    mask = _current_umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def check_output_free(out: str | Path, *, overwrite: bool) -> Path:
    """Fail early, before any expensive work, when ``out`` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another --out or pass --overwrite to replace it."
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; remove it or choose another --out.")
    return out


@contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; it becomes ``out`` only if the block succeeds."""
    out = check_output_free(out, overwrite=overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        check_output_free(out, overwrite=overwrite)  # someone may have created it meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
