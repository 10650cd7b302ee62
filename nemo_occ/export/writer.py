"""Stream ``(name, tensor)`` pairs into safetensors shards laid out like a reference index.

Each tensor goes to the shard the reference index names for it; a shard is written as soon as all
its tensors have arrived and its buffer is freed, so peak memory is that of the shards still being
filled. Tensors the reference does not know go to ``EXTRA_SHARD`` (verification then reports them as
unexpected). ``close()`` writes whatever is still buffered (incomplete shards included: the verifier,
not the writer, decides whether the result is acceptable) and the index with ``total_size``.

Before each shard is written, the free space of its file system is checked against the shard's size
(plus ``SPACE_MARGIN``): a disk that filled up since the export started fails with one line naming the
shortfall, not with safetensors' traceback, and a write that fails anyway is re-raised as ``OSError``.
The writer only writes into the folder it is given; making the result appear atomically (and removing
the unfinished folder on any error) is ``nemo_occ.atomic_io.atomic_directory``'s job.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from nemo_occ.export.hf_checkpoint import INDEX_FILE, check_shard_name

EXTRA_SHARD = "model-extra-not-in-reference.safetensors"
SPACE_MARGIN = 16 * 2**20
"""Bytes kept free beyond a shard's tensors: its header, the index, the manifest, the side files."""


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_free_space(directory: Path, need: int, what: str) -> None:
    """Raise a one-line ``OSError`` (ENOSPC) unless ``directory``'s file system has ``need`` bytes free."""
    free = shutil.disk_usage(directory).free
    if need > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space for {what}: it needs {human_bytes(need)}, {directory} has {human_bytes(free)} "
            f"free ({human_bytes(need - free)} short). Nothing was written; free some space or choose another --out",
        )


def _standalone(tensor: torch.Tensor, taken: set[int]) -> torch.Tensor:
    """A contiguous CPU tensor owning its own storage, not one of ``taken`` (storages already in the shard).

    safetensors refuses to save two tensors of one file that share memory: the same tensor yielded
    under two names (an alias), or overlapping views of one buffer.
    """
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.untyped_storage().data_ptr() in taken:
        tensor = tensor.clone()
    taken.add(tensor.untyped_storage().data_ptr())
    return tensor


class ShardedSafetensorsWriter:
    """Write tensors into the shard files of ``layout`` (tensor name -> shard file name)."""

    def __init__(self, directory: str | Path, layout: Mapping[str, str]):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} does not exist.")
        self.layout = {name: check_shard_name(file, where="reference index") for name, file in layout.items()}
        self._pending: dict[str, set[str]] = defaultdict(set)  # shard -> names not yet received
        for name, file in self.layout.items():
            self._pending[file].add(name)
        self._buffers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._storages: dict[str, set[int]] = defaultdict(set)  # shard -> storage pointers buffered
        self._written: dict[str, str] = {}  # name -> shard actually written
        self._seen: set[str] = set()
        self._total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name`` for the shards (each name once; not after :meth:`close`)."""
        if self._closed:
            raise RuntimeError("ShardedSafetensorsWriter.add() after close().")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor.")
        if name in self._seen:
            raise ValueError(f"Tensor '{name}' was produced twice by the export stream.")
        self._seen.add(name)
        shard = self.layout.get(name, EXTRA_SHARD)
        self._buffers[shard][name] = _standalone(tensor, self._storages[shard])
        pending = self._pending.get(shard)
        if pending is not None:
            pending.discard(name)
            if not pending:
                self._flush(shard)

    def _flush(self, shard: str) -> None:
        tensors = self._buffers.pop(shard, {})
        self._storages.pop(shard, None)
        self._pending.pop(shard, None)
        if not tensors:
            return
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        check_free_space(self.directory, size + SPACE_MARGIN, f"shard {shard}")
        try:
            save_file(tensors, str(self.directory / shard), metadata={"format": "pt"})
        except SafetensorError as err:  # the disk filled up meanwhile, or the file system refused
            raise OSError(f"writing {self.directory / shard} failed ({err}). Nothing was written") from err
        self._total_bytes += size
        self._written.update(dict.fromkeys(tensors, shard))

    def close(self) -> dict[str, str]:
        """Write the remaining buffers and the index; return the written weight map."""
        for shard in list(self._buffers):
            self._flush(shard)
        self._closed = True
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": dict(sorted(self._written.items())),
        }
        with open(self.directory / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return dict(self._written)
