"""Atomic checkpoints of a demo run: a crash mid-save never leaves a corrupt or half-written file.

The state is written to a temporary file in the same folder, flushed to disk, then renamed over the
previous checkpoint (``os.replace`` is atomic on POSIX). A fingerprint of the run's configuration
is stored with it, so a checkpoint of a different configuration is never resumed by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "fingerprint_of"]


def fingerprint_of(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict, config: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint_of(config), **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, config: dict) -> dict | None:
    """The checkpoint at ``path`` if it exists and belongs to ``config``; None otherwise."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint_of(config):
        warnings.warn(
            f"{path} was written by a run with another configuration; starting this regime from scratch "
            "(use a new --out folder to keep both)",
            stacklevel=2,
        )
        return None
    return state
