"""Read every tensor of a safetensors checkpoint once: checksum, finiteness, change against a reference.

- Checksum: SHA-256 of the tensor's raw bytes as stored (``tensor.view(uint8)`` is exactly the file's
  little-endian data), so it is independent of how tensors are grouped into shards. SHA-256 rather
  than a cheaper non-cryptographic hash: it is in the standard library, hardware-accelerated on
  current CPUs (about as fast as reading the file from disk, which dominates anyway), and its
  digests may be compared across machines and tools (``sha256sum`` over the same bytes agrees).
- Finite: no NaN or ±inf in any floating tensor.
- Relative change ``r = ||W - W_ref||_F / ||W_ref||_F`` of chosen tensors against a reference
  checkpoint's (0 when both are zero, inf when only the reference is).

Tensors are read one at a time and reduced in chunks, so memory stays at about one tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_occ.export.hf_checkpoint import CheckpointInfo, open_safetensors

_CHUNK = 1 << 24  # elements reduced at once (64 MiB in float32)


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes, as stored in a safetensors file."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/inf in a floating tensor (FP8 is widened first: torch has no isfinite for it)."""
    if not tensor.is_floating_point():
        return True
    for chunk in tensor.reshape(-1).split(_CHUNK):
        if not torch.isfinite(chunk if chunk.element_size() > 1 else chunk.float()).all():
            return False
    return True


def relative_change(new: torch.Tensor, ref: torch.Tensor) -> float:
    """``||new - ref||_F / ||ref||_F`` accumulated in float64; 0 if both are 0, inf if only ``ref`` is."""
    if new.shape != ref.shape:
        raise ValueError(
            f"relative_change needs equal shapes, got {tuple(new.shape)} and {tuple(ref.shape)}."
        )
    diff2 = ref2 = 0.0
    for a, b in zip(new.reshape(-1).split(_CHUNK), ref.reshape(-1).split(_CHUNK), strict=True):
        a64, b64 = a.double(), b.double()
        diff2 += (a64 - b64).square().sum().item()
        ref2 += b64.square().sum().item()
    if ref2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2 / ref2)


@dataclass
class ValueScan:
    """What one pass over a checkpoint's tensor values found."""

    digests: dict[str, str] = field(default_factory=dict)
    """tensor name -> SHA-256 of its stored bytes (every tensor of every shard read)."""
    non_finite: list[str] = field(default_factory=list)
    changes: dict[str, float] = field(default_factory=dict)
    """tensor name -> relative change against the reference (only tensors selected for it)."""


def scan_values(
    folder: Path,
    shard_keys: dict[str, set[str]],
    *,
    reference: CheckpointInfo | None = None,
    compare: Callable[[str], bool] = lambda name: False,
) -> ValueScan:
    """Read each tensor of ``shard_keys`` (shard -> keys) in ``folder``; compare ``compare``-d ones.

    A tensor is compared only when ``reference`` is a local checkpoint that holds it with the same shape
    (a shape mismatch is reported by the structural check, not here).
    """
    scan = ValueScan()
    for shard in sorted(shard_keys):
        with open_safetensors(folder / shard) as f:
            for name in sorted(shard_keys[shard]):
                tensor = f.get_tensor(name)
                scan.digests[name] = tensor_digest(tensor)
                if not all_finite(tensor):
                    scan.non_finite.append(name)
                if compare(name) and reference is not None:
                    ref = _reference_tensor(reference, name)
                    if ref is not None and ref.shape == tensor.shape:
                        scan.changes[name] = relative_change(tensor, ref)
    return scan


def _reference_tensor(reference: CheckpointInfo, name: str) -> torch.Tensor | None:
    if reference.directory is None or name not in reference.tensors:
        return None
    with open_safetensors(reference.directory / reference.weight_map[name]) as f:
        return f.get_tensor(name)
