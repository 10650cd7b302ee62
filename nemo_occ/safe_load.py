"""Read back a torch file nemo-occ wrote without letting it run code: the one place nemo-occ loads one.

Every state nemo-occ saves with ``torch.save`` (the NeMo-RL worker's OCC state, the demo's and the
study's checkpoints and probe snapshots) holds numbers, strings, lists, dicts and tensors only. So
it is read with ``torch.load(..., weights_only=True)``, whose unpickler builds exactly those types and
refuses any other object, instead of the pickle default that calls whatever a file names: a checkpoint
folder copied from someone else cannot execute code here. A file that is refused, or that is not a
complete torch file, raises :class:`UnreadableStateError` with one line naming the file.

Files written by other programs are read by those programs: ``nemo-occ export`` has megatron-core load a
Megatron checkpoint's ``common.pt`` with ``torch.load`` and torch's default ``weights_only``, which is
True from torch 2.6 on unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set. The export's entry point
enters :func:`weights_only_loads`, which makes every ``torch.load`` in its block read with
``weights_only=True`` whatever its caller passes or the environment says (torch's
``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read by ``torch.serialization.load``).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["UnreadableStateError", "load_state", "weights_only_loads"]

_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnreadableStateError(ValueError):
    """A state file that holds foreign objects or is not a complete torch file (one line, names the file)."""


def load_state(path: str | Path, *, what_to_do: str = "move it away") -> Any:
    """``torch.load(path)`` on the CPU, accepting numbers, strings, lists, dicts and tensors only.

    ``what_to_do`` ends the error message: the way out for the caller's user.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        text = str(err)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:  # a well-formed pickle that names a function or class to call
            raise UnreadableStateError(
                f"{path} holds objects other than numbers, lists, dicts and tensors ({refused.group(1)}), so "
                f"nemo-occ did not write it; it was not loaded, because loading it could run code ({what_to_do})"
            ) from err
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = (detail.group(1) if detail else text.splitlines()[0] if text else type(err).__name__).strip()
        raise UnreadableStateError(
            f"{path} is not a complete torch file ({reason}); it was not loaded ({what_to_do})"
        ) from err


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block reads with ``weights_only=True`` (process-wide; restored after)."""
    saved = {name: os.environ.get(name) for name in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)  # torch refuses the two together
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
