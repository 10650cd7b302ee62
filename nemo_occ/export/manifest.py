"""``nemo_occ_export.json``: what an export did, and the mark that a folder is a nemo-occ export.

The manifest is written last into an export folder. Its presence is what allows ``--overwrite`` to
replace that folder; its per-tensor checksums are what ``verify-export`` recomputes, and the training
step and source checkpoint it records are what ``verify-export --expect-step`` checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_FILE = "nemo_occ_export.json"
CHECKSUM_ALGORITHM = "sha256 of each tensor's raw bytes as stored in its safetensors file"


@dataclass(frozen=True)
class TrainingStep:
    """The training step an exported checkpoint was saved at (None: unknown), and where it was read."""

    step: int | None
    read_from: str


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` as a dict, or None if it has none; a manifest that is not one raises."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); was the export interrupted or edited?") from err
    if not isinstance(data, dict) or "nemo_occ_version" not in data:
        raise ValueError(f"{path} is not a nemo-occ export manifest (no 'nemo_occ_version').")
    return data


def is_nemo_occ_export(folder: str | Path) -> bool:
    """Is ``folder`` a complete earlier nemo-occ export (it holds a readable manifest)?"""
    try:
        return read_manifest(folder) is not None
    except ValueError:
        return False


def recorded_checksums(manifest: dict[str, Any]) -> dict[str, str] | None:
    """``{tensor name: hex digest}`` from a manifest, or None if it predates checksums."""
    checksums = manifest.get("checksums")
    if checksums is None:
        return None
    tensors = checksums.get("tensors") if isinstance(checksums, dict) else None
    if not isinstance(tensors, dict) or checksums.get("algorithm") != CHECKSUM_ALGORITHM:
        raise ValueError(
            f"{MANIFEST_FILE}: 'checksums' must hold 'algorithm' ({CHECKSUM_ALGORITHM!r}) and 'tensors'."
        )
    return {str(name): str(digest) for name, digest in tensors.items()}


def recorded_training_step(manifest: dict[str, Any]) -> TrainingStep | None:
    """The training step a manifest records, or None if it records none (written by an older nemo-occ)."""
    if "training_step" not in manifest:
        return None
    step = manifest["training_step"]
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"{MANIFEST_FILE}: 'training_step' must be a non-negative integer or null, got {step!r}.")
    return TrainingStep(step, str(manifest.get("training_step_from", "not recorded")))
