"""Check an exported HF checkpoint against the reference checkpoint it should match.

Checks (each failure is listed by name, MTP tensors first):

- key set: every reference tensor is exported (``missing``) and nothing else is (``unexpected``);
- shape and dtype of every tensor;
- the export is self-consistent: every shard its index lists exists (``missing_shards``), every
  indexed tensor is in the shard the index names (``misplaced``), and no shard holds tensors the
  index does not list (``unindexed``; a loader would never see them);
- ``config.json`` agrees with the reference on ``model_type``, ``architectures``,
  ``num_nextn_predict_layers`` and the dtype field, and every tokenizer file is there, byte-identical;
- values (every tensor read once, ``values.scan_values``): every floating tensor is finite; GLM's
  MTP alias copies are bit-identical to the embedding/head they copy; each tensor's SHA-256 equals
  the one the export recorded in ``nemo_occ_export.json``; and the MTP layer moved by a plausible
  amount from the reference (``ValueLimits``);
- the manifest (``ManifestCheck``): it must exist, be readable and record checksums, unless the caller
  says explicitly not to read it (``--no-manifest``; the report then says what went unchecked); the
  training step it records must be the expected one (``--expect-step``).

The reference must be complete (every shard of its index present): it is what the export is judged
against, so a missing shard is an error, not a tensor quietly left unchecked.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_occ.export.hf_checkpoint import (
    CheckpointInfo,
    TensorMeta,
    is_tokenizer_file,
    open_safetensors,
    read_local_checkpoint,
    read_reference,
)
from nemo_occ.export.manifest import (
    MANIFEST_FILE,
    TrainingStep,
    read_manifest,
    recorded_checksums,
    recorded_training_step,
)
from nemo_occ.export.models import mtp_layout, mtp_predicate
from nemo_occ.export.values import ValueScan, file_digest, scan_values

# config.json fields an export must share with its reference (the dtype lives under either name).
CONFIG_FIELDS = ("model_type", "architectures", "num_nextn_predict_layers", "torch_dtype", "dtype")


@dataclass(frozen=True)
class ValueLimits:
    """The plausible range of the MTP layer's change ``r = ||W - W_ref||_F / ||W_ref||_F`` per tensor.

    - ``0 < r`` for the layer: at least one MTP tensor differs from the reference. A layer identical to
      the reference was not trained (or the export took the reference's weights). Training that leaves
      the MTP layer untouched on purpose (OCC regime ``none``) sets ``allow_unchanged_mtp``.
    - ``r <= max_mtp_change`` (default 0.5) for every MTP tensor. Reference points: a zeroed tensor has
      ``r = 1``; a tensor replaced by an unrelated one of similar norm, or a ``[H, 2H]`` projection whose
      two input halves were swapped, has ``r`` near ``sqrt(2) = 1.41`` (two uncorrelated halves). Adam
      moves an element by at most about the learning rate per step, so 200 RL steps at 1e-6 change
      weights of typical size 1e-2 by ``r`` of a few percent at most (an estimate, not a measurement):
      0.5 lies far from both. A tensor whose reference norm is near zero (a bias) can exceed it
      legitimately; raise the limit then (``--max-mtp-change``).
    """

    max_mtp_change: float = 0.5
    allow_unchanged_mtp: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.max_mtp_change, (int, float)) and math.isfinite(self.max_mtp_change)):
            raise ValueError(f"max_mtp_change must be a finite number, got {self.max_mtp_change!r}.")
        if self.max_mtp_change <= 0:
            raise ValueError(f"max_mtp_change must be > 0, got {self.max_mtp_change}.")


@dataclass(frozen=True)
class ManifestCheck:
    """What ``verify-export`` demands of the export's ``nemo_occ_export.json``.

    ``required`` (the default) makes a missing manifest, or one without checksums, a failure: without
    it an edited or corrupted tensor, or an export of another run, would pass. ``required=False``
    (``--no-manifest``) does not read it at all, and the report says what was not checked.
    ``expect_step`` is the training step the export must come from (``--expect-step``).
    """

    required: bool = True
    expect_step: int | None = None

    def __post_init__(self) -> None:
        if self.expect_step is not None and not self.required:
            raise ValueError(
                "--expect-step is checked against the manifest, which --no-manifest says not to read: give one."
            )
        if self.expect_step is not None and (isinstance(self.expect_step, bool) or self.expect_step < 0):
            raise ValueError(f"--expect-step must be a non-negative integer, got {self.expect_step!r}.")


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
    config_mismatches: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(config field, exported value, reference value); ('config.json', None, 'present') if absent."""
    side_file_problems: list[tuple[str, str]] = field(default_factory=list)
    """(tokenizer file of the reference, 'missing' or 'differs from the reference')."""
    non_finite: list[str] = field(default_factory=list)
    alias_mismatches: list[tuple[str, str]] = field(default_factory=list)
    """(alias, source) pairs of GLM MTP copies that are not bit-identical."""
    checksum_problems: list[tuple[str, str]] = field(default_factory=list)
    """(tensor, what is wrong) against the checksums recorded in the export's manifest."""
    manifest_problems: list[str] = field(default_factory=list)
    """The manifest is missing, records no checksums, or names another training step than expected."""
    provenance: str | None = None
    """Where the manifest says the export came from (training step, source checkpoint)."""
    mtp_changes: dict[str, float] = field(default_factory=dict)
    """MTP tensor -> relative change against the reference (empty if the reference values are remote)."""
    mtp_too_far: list[tuple[str, float]] = field(default_factory=list)
    mtp_unchanged: bool = False
    """Every MTP tensor equals the reference's (a failure unless ``limits.allow_unchanged_mtp``)."""
    limits: ValueLimits = field(default_factory=ValueLimits)
    notes: list[str] = field(default_factory=list)
    """Checks that could not run, and why (shown, never silently passed)."""
    hints: list[str] = field(default_factory=list)
    """Likely causes, added by the caller that knows more (e.g. the export pipeline)."""
    is_mtp: Callable[[str], bool] = field(default=lambda name: False, repr=False)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected, misshaped or different from the reference."""
        return not (
            self.missing
            or self.unexpected
            or self.shape_mismatches
            or self.dtype_mismatches
            or self.missing_shards
            or self.misplaced
            or self.unindexed
            or self.config_mismatches
            or self.side_file_problems
            or self.non_finite
            or self.alias_mismatches
            or self.checksum_problems
            or self.manifest_problems
            or self.mtp_too_far
            or (self.mtp_unchanged and not self.limits.allow_unchanged_mtp)
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

    def mtp_change_summary(self) -> str | None:
        """One line on how far the MTP layer moved from the reference (median and largest relative
        change); None without MTP changes."""
        if not self.mtp_changes:
            return None
        worst = max(self.mtp_changes, key=self.mtp_changes.__getitem__)
        return (
            f"MTP layer vs reference: relative change median {statistics.median(self.mtp_changes.values()):.3g}, "
            f"max {self.mtp_changes[worst]:.3g} ({worst}) over {len(self.mtp_changes)} tensors; "
            f"allowed: > 0 for the layer{' (or 0)' if self.limits.allow_unchanged_mtp else ''}, "
            f"<= {self.limits.max_mtp_change:g} per tensor."
        )

    def format(self, limit: int | None = 50) -> str:
        """A readable summary; lists are cut at ``limit`` names (MTP ones come first)."""
        # long on purpose: one section per kind of finding, in the order the report prints them
        mtp = self.is_mtp

        def tag(name: str) -> str:
            return f"{name}  [MTP]" if mtp(name) else name

        def pair(x) -> str:
            return f"{tag(x[0])}: {x[1]} != reference {x[2]}"

        head = "PASSED" if self.ok else "FAILED"
        lines = [
            f"Export verification {head}: {self.export} against {self.reference}",
            f"  {self.num_exported} tensors exported, {self.num_reference} in the reference "
            f"({self.num_mtp_reference} in MTP layers).",
        ]
        if self.provenance:
            lines.append(f"  {self.provenance}")
        summary = self.mtp_change_summary()
        if summary:
            lines.append(f"  {summary}")
        if self.manifest_problems:
            count = len(self.manifest_problems)
            lines.append(f"  {count} problem{'s' if count > 1 else ''} with {MANIFEST_FILE}:")
            lines += [f"    - {problem}" for problem in self.manifest_problems]
        lines += self._names("tensors missing from the export", self.missing, tag, limit)
        lines += self._names("unexpected tensors (not in the reference)", self.unexpected, tag, limit)
        lines += self._names("shape mismatches", self.shape_mismatches, pair, limit)
        lines += self._names("dtype mismatches", self.dtype_mismatches, pair, limit)
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
        if self.config_mismatches:
            lines.append(f"  {len(self.config_mismatches)} config.json fields differ from the reference:")
            lines += [
                f"    - {k} is missing"
                if got is None and k == "config.json"
                else f"    - {k}: {got!r} != reference {ref!r}"
                for k, got, ref in self.config_mismatches
            ]
        if self.side_file_problems:
            lines.append(f"  {len(self.side_file_problems)} tokenizer files not as in the reference:")
            lines += [f"    - {name}: {what}" for name, what in self.side_file_problems]
        lines += self._names("tensors with NaN or inf values", self.non_finite, tag, limit)
        lines += self._names(
            "MTP alias copies not bit-identical to their source",
            self.alias_mismatches,
            lambda x: f"{tag(x[0])} != {x[1]}",
            limit,
        )
        lines += self._names(
            f"tensors failing the checksums of {MANIFEST_FILE}",
            self.checksum_problems,
            lambda x: f"{tag(x[0])}: {x[1]}",
            limit,
        )
        lines += self._names(
            f"MTP tensors changed by more than {self.limits.max_mtp_change:g} of their reference norm",
            self.mtp_too_far,
            lambda x: f"{tag(x[0])}: relative change {x[1]:.3g}",
            limit,
        )
        if self.mtp_too_far:
            lines.append(
                "  hint: 1.0 is a zeroed tensor; about 1.41 an unrelated tensor or swapped input halves of "
                "eh_proj/input_proj. If the change is real (e.g. a bias near zero), raise --max-mtp-change."
            )
        if self.mtp_unchanged and not self.limits.allow_unchanged_mtp:
            lines.append(
                "  every MTP tensor equals the reference's: the MTP layer was not trained, or the export took "
                "the reference's weights. If it was frozen on purpose, pass --allow-unchanged-mtp."
            )
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  hint: {hint}" for hint in self.hints]
        return "\n".join(lines)


def _mtp_first(names, is_mtp: Callable[[str], bool]) -> list:
    def key(item):
        name = item if isinstance(item, str) else item[0]
        return (not is_mtp(name), name)

    return sorted(names, key=key)


def compare_checkpoints(exported: CheckpointInfo, reference: CheckpointInfo) -> VerificationReport:
    """Compare two checkpoint descriptions: names, shapes, dtypes, shards, config (pure: no file access)."""
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
    shapes, dtypes = [], []
    for name in exported_names & reference_names:
        ref: TensorMeta | None = reference.tensors.get(name)
        got: TensorMeta | None = exported.tensors.get(name)
        if ref is None or got is None:
            continue  # the reference is checked complete by the caller; the export's gaps are below
        if got.shape != ref.shape:
            shapes.append((name, got.shape, ref.shape))
        if got.dtype != ref.dtype:
            dtypes.append((name, got.dtype, ref.dtype))
    report.shape_mismatches = _mtp_first(shapes, is_mtp)
    report.dtype_mismatches = _mtp_first(dtypes, is_mtp)

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

    if not exported.config:
        report.config_mismatches.append(("config.json", None, "present"))
    else:
        report.config_mismatches = [
            (key, exported.config.get(key), reference.config[key])
            for key in CONFIG_FIELDS
            if key in reference.config and exported.config.get(key) != reference.config[key]
        ]
    return report


def _stray_shards(export_dir: Path, exported: CheckpointInfo) -> CheckpointInfo:
    """Also read ``*.safetensors`` files the index does not mention, to report their tensors."""
    listed = set(exported.weight_map.values())
    for path in sorted(export_dir.glob("*.safetensors")):
        if path.name not in listed:
            with open_safetensors(path) as f:
                exported.shard_keys[path.name] = set(f.keys())
    return exported


def _check_side_files(report: VerificationReport, export_dir: Path, reference: CheckpointInfo) -> None:
    for path in reference.side_files:
        if not is_tokenizer_file(path.name):
            continue
        exported = export_dir / path.name
        if not exported.is_file():
            report.side_file_problems.append((path.name, "missing"))
        elif file_digest(exported) != file_digest(path):
            report.side_file_problems.append((path.name, "differs from the reference"))


def _aliases(reference: CheckpointInfo) -> tuple[tuple[str, str], ...]:
    """(alias, source) copies the reference's architecture stores (none for one nemo-occ does not export)."""
    try:
        return mtp_layout(reference.config).aliases
    except ValueError:
        return ()


def _judge_values(
    report: VerificationReport,
    scan: ValueScan,
    exported: CheckpointInfo,
    reference: CheckpointInfo,
    recorded: dict[str, str] | None,
) -> None:
    is_mtp = report.is_mtp
    report.non_finite = _mtp_first(scan.non_finite, is_mtp)
    for alias, source in _aliases(reference):
        if alias in scan.digests and source in scan.digests:
            same_meta = exported.tensors.get(alias) == exported.tensors.get(source)
            if not same_meta or scan.digests[alias] != scan.digests[source]:
                report.alias_mismatches.append((alias, source))

    if recorded is not None:
        problems = []
        for name, digest in scan.digests.items():
            if name not in recorded:
                problems.append((name, "not recorded in the manifest"))
            elif recorded[name] != digest:
                problems.append((name, "bytes differ from the checksum recorded at export"))
        problems += [
            (n, "recorded in the manifest but not in the export") for n in recorded.keys() - scan.digests
        ]
        report.checksum_problems = _mtp_first(problems, is_mtp)

    report.mtp_changes = dict(sorted(scan.changes.items()))
    limit = report.limits.max_mtp_change
    report.mtp_too_far = _mtp_first([(n, r) for n, r in scan.changes.items() if not r <= limit], is_mtp)
    report.mtp_unchanged = bool(scan.changes) and all(r == 0.0 for r in scan.changes.values())
    if reference.directory is None:
        report.notes.append(
            f"MTP change against the reference not checked: {reference.source} is read from the Hub, where its "
            "values are not at hand. Pass the local reference folder to check it."
        )
    elif report.mtp_unchanged and report.limits.allow_unchanged_mtp:
        report.notes.append("every MTP tensor equals the reference's (allowed by --allow-unchanged-mtp).")


def _check_manifest(
    report: VerificationReport, manifest: dict[str, Any] | None, check: ManifestCheck
) -> dict[str, str] | None:
    """Judge the manifest itself (presence, checksums, training step); return its recorded checksums."""
    if not check.required:
        report.notes.append(
            f"{MANIFEST_FILE} not read (--no-manifest): the per-tensor checksums, the training step and the "
            "source checkpoint were NOT checked."
        )
        return None
    if manifest is None:
        report.manifest_problems.append(
            f"no {MANIFEST_FILE}: not a nemo-occ export, or its manifest was deleted, so the per-tensor "
            "checksums, the training step and the source checkpoint cannot be checked (--no-manifest verifies "
            "without them, on purpose)"
        )
        return None
    recorded = recorded_checksums(manifest)
    if recorded is None:
        report.manifest_problems.append(
            f"{MANIFEST_FILE} records no checksums (written by an older nemo-occ): the tensors cannot be checked "
            "against what was exported (--no-manifest verifies without them, on purpose)"
        )
    step = recorded_training_step(manifest) or TrainingStep(None, "not recorded (older nemo-occ)")
    source = manifest.get("source_checkpoint", "not recorded")
    report.provenance = (
        f"exported from training step {step.step if step.step is not None else 'unknown'} "
        f"(read from {step.read_from}); source checkpoint {source}"
    )
    if check.expect_step is not None and step.step != check.expect_step:
        found = "records no training step" if step.step is None else f"records training step {step.step}"
        report.manifest_problems.append(
            f"expected training step {check.expect_step}, but the manifest {found} (read from {step.read_from}; "
            f"source checkpoint {source})"
        )
    return recorded


def verify_folder(
    export_dir: str | Path,
    reference: CheckpointInfo,
    *,
    limits: ValueLimits | None = None,
    manifest_check: ManifestCheck | None = ManifestCheck(),
) -> tuple[VerificationReport, ValueScan]:
    """Run every check on ``export_dir`` against a reference already read (and checked complete).

    ``manifest_check=None`` is for the export pipeline, which is about to write the manifest.
    """
    export_dir = Path(export_dir)
    limits = limits or ValueLimits()
    exported = _stray_shards(export_dir, read_local_checkpoint(export_dir, require_config=False))
    # read first: a broken manifest fails before the long read of every tensor
    read = manifest_check is not None and manifest_check.required
    manifest = read_manifest(export_dir) if read else None
    report = compare_checkpoints(exported, reference)
    report.limits = limits
    recorded = _check_manifest(report, manifest, manifest_check) if manifest_check is not None else None
    _check_side_files(report, export_dir, reference)
    readable: dict[str, set[str]] = {}
    for name, shard in exported.weight_map.items():
        if name in exported.shard_keys.get(shard, ()):
            readable.setdefault(shard, set()).add(name)
    # The MTP layer's own tensors; GLM's copies of the embedding/head are checked against their source.
    aliases = {alias for alias, _ in _aliases(reference)}
    scan = scan_values(
        export_dir, readable, reference=reference, compare=lambda n: report.is_mtp(n) and n not in aliases
    )
    _judge_values(report, scan, exported, reference, recorded)
    return report, scan


def verify_export(
    export_dir: str | Path,
    reference: str | Path | CheckpointInfo,
    *,
    limits: ValueLimits | None = None,
    manifest: ManifestCheck | None = None,
    raise_on_failure: bool = True,
) -> VerificationReport:
    """Verify ``export_dir`` against ``reference`` (folder, Hub id or a description already read).

    ``manifest`` says what the export's manifest must hold (default: it must exist, with checksums).
    Raises ``ExportVerificationError`` when a check fails (unless ``raise_on_failure=False``), and
    ``ValueError`` when the reference itself is incomplete or the manifest unreadable.
    """
    ref = reference if isinstance(reference, CheckpointInfo) else read_reference(reference)
    ref.check_complete("reference")
    report, _ = verify_folder(export_dir, ref, limits=limits, manifest_check=manifest or ManifestCheck())
    if raise_on_failure and not report.ok:
        raise ExportVerificationError(report)
    return report
