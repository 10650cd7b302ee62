"""Check ``--out`` before an export loads anything: it must not endanger the inputs, and must fit.

- ``--out`` may not be, or lie inside, the reference checkpoint or the Megatron checkpoint, nor contain
  them (``--overwrite`` would delete them); paths are compared with symlinks resolved.
- An existing ``--out`` is replaced only with ``--overwrite``, and only if it is an earlier nemo-occ
  export (it holds ``nemo_occ_export.json``) or empty: anything else may be someone's data.
- Leftovers of interrupted earlier runs next to ``--out`` are reported; unfinished ones are removed
  only when asked (never one whose export still runs on this host).
- The folder that will hold ``--out`` must be writable and have room for the reference's tensors
  (its index's ``total_size``) and side files: better to learn it now than after loading a 100-GB
  model. (The writer checks again before each shard: the disk may fill up meanwhile.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

from nemo_occ.atomic_io import check_output_free, find_leftovers
from nemo_occ.export.hf_checkpoint import CheckpointInfo
from nemo_occ.export.manifest import MANIFEST_FILE, is_nemo_occ_export
from nemo_occ.export.writer import SPACE_MARGIN, check_free_space


class ExportWarning(UserWarning):
    """Something the user should know before a long export (the CLI prints it as one line)."""


def check_replaceable(out: Path) -> None:
    """``--overwrite`` may replace an earlier nemo-occ export or an empty folder, nothing else."""
    if is_nemo_occ_export(out) or not any(out.iterdir()):
        return
    raise FileExistsError(
        f"--overwrite only replaces an earlier nemo-occ export (a folder holding {MANIFEST_FILE}); {out} is "
        "not one, so nothing was deleted. Choose another --out, or remove that folder yourself."
    )


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_export_target(
    out: str | Path, *, inputs: Mapping[str, str | Path | None], overwrite: bool = False
) -> Path:
    """Raise unless writing (with ``overwrite``, replacing) ``out`` leaves every input untouched.

    ``inputs`` maps a flag name (``--hf-model``, ``--megatron-ckpt``) to a local folder the export reads
    (None for one that is not local).
    """
    out = Path(out)
    resolved = out.resolve()
    for flag, folder in inputs.items():
        if folder is None:
            continue
        source = Path(folder).resolve()
        if resolved == source or source in resolved.parents:
            where = "" if resolved == source else "inside "
            raise ValueError(
                f"--out {out} is {where}the {flag} checkpoint {folder}; choose a folder outside it."
            )
        if resolved in source.parents:
            raise ValueError(f"--out {out} contains the {flag} checkpoint {folder}; choose another --out.")
    return check_output_free(out, overwrite=overwrite, check_replaceable=check_replaceable)


def check_room(out: str | Path, *, reference: CheckpointInfo, remove_stale_partials: bool = False) -> None:
    """Report (warn) leftovers of earlier runs next to ``out``; raise unless ``out`` is writable and fits."""
    out = Path(out)
    for leftover in find_leftovers(out):
        removable = leftover.kind == "partial" and not leftover.running()
        description = leftover.describe()
        if removable and remove_stale_partials:
            shutil.rmtree(leftover.path)
            warnings.warn(f"removed {description}", ExportWarning, stacklevel=2)
        else:
            hint = "; --remove-stale-partial deletes it" if removable else ""
            warnings.warn(f"found {description}{hint}", ExportWarning, stacklevel=2)

    parent = _existing_ancestor(out.absolute().parent)
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nemo-occ-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write in {parent} ({err.strerror or err}).") from err
    side_files = sum(path.stat().st_size for path in reference.side_files if path.is_file())
    check_free_space(parent, reference.total_bytes() + side_files + SPACE_MARGIN, f"--out {out}")
