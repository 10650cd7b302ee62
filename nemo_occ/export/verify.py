"""Check an exported HF checkpoint against the reference checkpoint it should match.

Checks (each failure is listed by name, MTP tensors first):

- key set: every reference tensor is exported (``missing``) and nothing else is (``unexpected``);
- shape and dtype of every tensor whose reference metadata is known;
- the export is self-consistent: every shard its index lists exists (``missing_shards``), every
  indexed tensor is in the shard the index names (``misplaced``), and no shard holds tensors the
  index does not list (``unindexed``; a loader would never see them).

Reference tensors whose shard headers could not be read are counted as ``unchecked`` (key set
still checked) and reported, never silently passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nemo_occ.export.checkpoint import CheckpointInfo, TensorMeta, read_local_checkpoint, read_reference
from nemo_occ.export.models import mtp_predicate


class ExportVerificationError(RuntimeError):
    """The exported checkpoint does not match its reference; ``report`` holds the details."""

    def __init__(self, report: VerificationReport):
        super().__init__(report.format())
        self.report = report


@dataclass
class VerificationReport:
    export: str
    reference: str
    num_exported: int
    num_reference: int
    num_mtp_reference: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dtype_mismatches: list[tuple[str, str, str]] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)
    misplaced: list[tuple[str, str]] = field(default_factory=list)
    unindexed: list[tuple[str, str]] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    """Likely causes, added by the caller that knows more (e.g. the export pipeline)."""
    is_mtp: Callable[[str], bool] = field(default=lambda name: False, repr=False)

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.unexpected
            or self.shape_mismatches
            or self.dtype_mismatches
            or self.missing_shards
            or self.misplaced
            or self.unindexed
        )

    def _names(self, title: str, items: list, render: Callable, limit: int | None) -> list[str]:
        if not items:
            return []
        n_mtp = sum(self.is_mtp(item if isinstance(item, str) else item[0]) for item in items)
        lines = [f"  {len(items)} {title} ({n_mtp} in MTP layers):"]
        shown = items if limit is None else items[:limit]
        lines += [f"    - {render(item)}" for item in shown]
        if len(shown) < len(items):
            lines.append(f"    ... and {len(items) - len(shown)} more (verify-export --show-all lists them)")
        return lines

    def format(self, limit: int | None = 50) -> str:
        """A readable summary; lists are cut at ``limit`` names (MTP ones come first)."""
        mtp = self.is_mtp

        def tag(name: str) -> str:
            return f"{name}  [MTP]" if mtp(name) else name

        head = "PASSED" if self.ok else "FAILED"
        lines = [
            f"Export verification {head}: {self.export} against {self.reference}",
            f"  {self.num_exported} tensors exported, {self.num_reference} in the reference "
            f"({self.num_mtp_reference} in MTP layers).",
        ]
        lines += self._names("tensors missing from the export", self.missing, tag, limit)
        lines += self._names("unexpected tensors (not in the reference)", self.unexpected, tag, limit)
        lines += self._names(
            "shape mismatches",
            self.shape_mismatches,
            lambda x: f"{tag(x[0])}: {x[1]} != reference {x[2]}",
            limit,
        )
        lines += self._names(
            "dtype mismatches",
            self.dtype_mismatches,
            lambda x: f"{tag(x[0])}: {x[1]} != reference {x[2]}",
            limit,
        )
        if self.missing_shards:
            lines.append(f"  {len(self.missing_shards)} shard files listed in the index do not exist:")
            lines += [f"    - {s}" for s in self.missing_shards]
        lines += self._names(
            "indexed tensors absent from their shard",
            self.misplaced,
            lambda x: f"{tag(x[0])} (index: {x[1]})",
            limit,
        )
        lines += self._names(
            "tensors stored in shards but not in the index",
            self.unindexed,
            lambda x: f"{tag(x[0])} in {x[1]}",
            limit,
        )
        if self.unchecked:
            lines.append(
                f"  note: shape/dtype not checked for {len(self.unchecked)} tensors whose reference shard "
                "headers were not available (key set still checked)."
            )
        lines += [f"  hint: {hint}" for hint in self.hints]
        return "\n".join(lines)


def _mtp_first(names, is_mtp: Callable[[str], bool]) -> list:
    def key(item):
        name = item if isinstance(item, str) else item[0]
        return (not is_mtp(name), name)

    return sorted(names, key=key)


def compare_checkpoints(exported: CheckpointInfo, reference: CheckpointInfo) -> VerificationReport:
    """Compare two checkpoint descriptions (pure: no file access)."""
    is_mtp = mtp_predicate(reference.config or exported.config)
    exported_names, reference_names = set(exported.weight_map), set(reference.weight_map)
    report = VerificationReport(
        export=exported.source,
        reference=reference.source,
        num_exported=len(exported_names),
        num_reference=len(reference_names),
        num_mtp_reference=sum(map(is_mtp, reference_names)),
        is_mtp=is_mtp,
    )
    report.missing = _mtp_first(reference_names - exported_names, is_mtp)
    report.unexpected = _mtp_first(exported_names - reference_names, is_mtp)
    shapes, dtypes, unchecked = [], [], []
    for name in exported_names & reference_names:
        ref: TensorMeta | None = reference.tensors.get(name)
        got: TensorMeta | None = exported.tensors.get(name)
        if ref is None:
            unchecked.append(name)
            continue
        if got is None:
            continue  # its shard is missing or lacks it: reported below
        if got.shape != ref.shape:
            shapes.append((name, got.shape, ref.shape))
        if got.dtype != ref.dtype:
            dtypes.append((name, got.dtype, ref.dtype))
    report.shape_mismatches = _mtp_first(shapes, is_mtp)
    report.dtype_mismatches = _mtp_first(dtypes, is_mtp)
    report.unchecked = sorted(unchecked)

    report.missing_shards = sorted(exported.missing_shards)
    misplaced, unindexed = [], []
    for name, shard in exported.weight_map.items():
        keys = exported.shard_keys.get(shard)
        if keys is not None and name not in keys:
            misplaced.append((name, shard))
    for shard, keys in exported.shard_keys.items():
        unindexed += [(name, shard) for name in keys if exported.weight_map.get(name) != shard]
    report.misplaced = _mtp_first(misplaced, is_mtp)
    report.unindexed = _mtp_first(unindexed, is_mtp)
    return report


def _stray_shards(export_dir: Path, exported: CheckpointInfo) -> CheckpointInfo:
    """Also read ``*.safetensors`` files the index does not mention, to report their tensors."""
    from safetensors import safe_open

    listed = set(exported.weight_map.values())
    for path in sorted(export_dir.glob("*.safetensors")):
        if path.name not in listed:
            with safe_open(path, framework="pt") as f:
                exported.shard_keys[path.name] = set(f.keys())
    return exported


def verify_export(
    export_dir: str | Path, reference: str | Path | CheckpointInfo, *, raise_on_failure: bool = True
) -> VerificationReport:
    """Verify ``export_dir`` against ``reference`` (folder, Hub id or a description already read).

    Raises ``ExportVerificationError`` when a check fails (unless ``raise_on_failure=False``).
    """
    export_dir = Path(export_dir)
    exported = _stray_shards(export_dir, read_local_checkpoint(export_dir, require_config=False))
    ref = reference if isinstance(reference, CheckpointInfo) else read_reference(reference)
    report = compare_checkpoints(exported, ref)
    if raise_on_failure and not report.ok:
        raise ExportVerificationError(report)
    return report
