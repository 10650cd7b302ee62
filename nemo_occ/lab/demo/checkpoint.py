"""Atomic checkpoints of a demo run: a crash mid-save never leaves a corrupt or half-written file.

The state is written with :func:`nemo_occ.atomic_io.atomic_write` (temporary file in the same
folder, fsync, ``os.replace``). A fingerprint of the run's configuration is stored with it, so a
checkpoint of a different configuration is never resumed by mistake.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nemo_occ.atomic_io import atomic_write
from nemo_occ.lab.demo.output import DemoOutputError
from nemo_occ.safe_load import load_state

__all__ = ["save_checkpoint", "load_checkpoint", "fingerprint_of"]


def fingerprint_of(config: dict) -> str:
    """16 hex digits of SHA-256 over the sorted JSON of ``config``: which configuration a checkpoint belongs to."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict, config: dict) -> None:
    """Write ``state`` with ``config``'s fingerprint to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint_of(config), **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, config: dict) -> dict | None:
    """The checkpoint at ``path`` if it exists (None otherwise); it must belong to ``config``.

    The output folder's run.json already matched the configuration before any checkpoint is read,
    so a mismatch here means the folder was assembled by hand: refuse rather than start over.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = load_state(path, what_to_do="add --overwrite to start fresh or choose another --out")
    if state.get("fingerprint") != fingerprint_of(config):
        raise DemoOutputError(
            f"{path} was written by a run with another configuration than its folder's run.json; "
            "add --overwrite to start fresh or choose another --out"
        )
    return state
