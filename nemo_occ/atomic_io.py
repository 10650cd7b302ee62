"""Make an output file or folder appear only when it is complete: the one place nemo-occ writes atomically.

Standard library only, so every layer can import it (the demo's results and checkpoints, the NeMo-RL
worker's OCC state file, the export's output folder).

**A file** (:func:`atomic_write`) is written into a temporary sibling ``.{name}.{random}.tmp`` (same file
system), flushed and fsynced, given the usual umask mode and ``os.replace``-d over ``name``: a crash or
Ctrl-C at any point leaves either the old file or the new one, never a partial one, and no temporary
file, except after a hard kill: :func:`temporary_file_target` recognises those leftovers.

**A folder** (:func:`atomic_directory`, the export): files are written into a temporary sibling folder
``.{name}.partial-{host}-{pid}-{random}`` (same file system, so the final ``rename`` is atomic); on
success it is renamed into place. On any exception (Ctrl-C's ``KeyboardInterrupt`` included), and on
SIGTERM (what Slurm sends at a job's time limit), it is deleted. Both signals are held back while the
folder is moved into place and acted on once it is there; a Ctrl-C then raises
:class:`InterruptedAfterCommit`, so the caller can say the output is complete. A process killed outright
(SIGKILL, the out-of-memory killer) cannot clean up: ``find_leftovers`` finds such folders for the next
run, which reports them and removes them only when asked. The host and pid in the name tell a leftover
from the folder of an export still running on this host.

An existing output is never touched unless ``overwrite=True`` (and the caller's ``check_replaceable``
accepts it); it is then moved aside to ``.{name}.old-{random}``, replaced, and deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


_TEMP_FILE = re.compile(r"\.(?P<target>.+?)\.[^.]+\.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file next to ``path``, fsync, then ``os.replace`` it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed however the block ends
            os.fchmod(f.fileno(), 0o666 & ~_current_umask())  # mkstemp's 0600 would hide the file from others
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where the file system refuses links), atomically.

    The link is made at a temporary sibling named like :func:`atomic_write`'s and ``os.replace``-d over
    ``dst``; where linking fails the copy goes through :func:`atomic_write`.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as source:
            atomic_write(dst, lambda f: shutil.copyfileobj(source, f))
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_file_target(name: str) -> str | None:
    """The file name whose :func:`atomic_write` left the temporary file ``name`` behind, else None."""
    match = _TEMP_FILE.fullmatch(name)
    return match.group("target") if match else None


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors writes 0600 files; give them the usual umask modes."""
    mask = _current_umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _partial_prefix(name: str) -> str:
    return f".{name}.partial-"


@dataclass(frozen=True)
class Leftover:
    """A folder an earlier run left next to ``out``: an unfinished export, or an export moved aside."""

    path: Path
    kind: str
    """'partial' (unfinished, safe to delete) or 'moved-aside' (a complete earlier export)."""
    host: str | None = None
    pid: int | None = None

    def running(self) -> bool:
        """Does it belong to an export still running on this host? (Then it must not be touched.)"""
        if self.pid is None or self.host != _host():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's live process
        return self.pid != os.getpid()

    def describe(self) -> str:
        """What this leftover is and what to do with it, in one sentence for the user."""
        if self.kind == "moved-aside":
            return (
                f"{self.path}: an earlier export moved aside by an --overwrite that was interrupted; if --out is "
                "missing, rename this folder back to it, else delete it"
            )
        if self.pid is None:
            owner = "owner unknown"
        elif self.host == _host():
            owner = f"process {self.pid} on this host, {'still running' if self.running() else 'no longer running'}"
        else:
            owner = f"process {self.pid} on host {self.host}; cannot tell from here whether it still runs"
        return f"{self.path}: unfinished export ({owner})"


_PARTIAL = re.compile(r"\.partial-(?:(?P<host>.+)-(?P<pid>\d+)-)?[a-z0-9_]+$")


def find_leftovers(out: str | Path) -> list[Leftover]:
    """Unfinished (``.partial-``) and moved-aside (``.old-``) sibling folders of ``out`` from earlier runs."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    found = []
    for path in sorted(out.parent.iterdir()):
        if not path.is_dir() or not path.name.startswith(f".{out.name}."):
            continue
        rest = path.name[len(out.name) + 1 :]
        match = _PARTIAL.fullmatch(rest)
        if match:
            pid = match.group("pid")
            found.append(Leftover(path, "partial", match.group("host"), int(pid) if pid else None))
        elif re.fullmatch(r"\.old-[0-9a-f]{8}", rest):
            found.append(Leftover(path, "moved-aside"))
    return found


def check_output_free(
    out: str | Path, *, overwrite: bool, check_replaceable: Callable[[Path], None] | None = None
) -> Path:
    """Fail early, before any expensive work, when ``out`` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; remove it or choose another --out.")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another --out or pass --overwrite to replace it."
        )
    if out.exists() and check_replaceable is not None:
        check_replaceable(out)
    return out


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C arrived while the output was being moved into place: it was finished first, ``out`` is complete."""

    def __init__(self, out: Path):
        super().__init__(f"interrupted after {out} was complete")
        self.out = out


class _SignalCleanup:
    """While active (main thread only): SIGTERM deletes ``tmp`` and exits with 128 + 15.

    During the final renames (:meth:`committing`) SIGTERM and SIGINT are held back and acted on
    afterwards, so that an export is never left half moved. The previous handlers are restored.
    """

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.in_commit = False
        self.pending = False  # SIGTERM during the commit
        self.interrupted = False  # SIGINT during the commit
        self.previous = None

    def __enter__(self) -> _SignalCleanup:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not None:  # None: installed outside Python, could not be restored
                self.previous = previous
                signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.in_commit:
            self.pending = True
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise SystemExit(128 + signum)

    def _hold_interrupt(self, signum: int, frame: object) -> None:
        self.interrupted = True

    @contextmanager
    def committing(self) -> Iterator[None]:
        """Hold SIGTERM and SIGINT back for the block (SIGINT only where Python's default handler is set)."""
        hold_int = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
        if hold_int:
            signal.signal(signal.SIGINT, self._hold_interrupt)
        self.in_commit = True
        try:
            yield
        finally:
            self.in_commit = False
            if hold_int:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


@contextmanager
def atomic_directory(
    out: str | Path, *, overwrite: bool = False, check_replaceable: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; it becomes ``out`` only if the block succeeds."""
    out = check_output_free(out, overwrite=overwrite, check_replaceable=check_replaceable).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{_partial_prefix(out.name)}{_host()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    with _SignalCleanup(tmp) as signals:
        try:
            yield tmp
            _normal_permissions(tmp)
            # someone may have created it meanwhile
            check_output_free(out, overwrite=overwrite, check_replaceable=check_replaceable)
            with signals.committing():
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
    # a signal that arrived while the export was being moved into place: it is complete, now stop
    if signals.pending:
        raise SystemExit(128 + signal.SIGTERM)
    if signals.interrupted:
        raise InterruptedAfterCommit(out)
