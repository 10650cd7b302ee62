"""``nemo_occ_export.json``: what an export did, and the mark that a folder is a nemo-occ export.

The manifest is written last into an export folder. Its presence is what allows ``--overwrite`` to
replace that folder, and its per-tensor checksums are what ``verify-export`` recomputes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "nemo_occ_export.json"
CHECKSUM_ALGORITHM = "sha256 of each tensor's raw bytes as stored in its safetensors file"


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
