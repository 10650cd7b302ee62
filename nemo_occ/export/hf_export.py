"""Turn an HF-named tensor stream into a verified HF checkpoint folder, atomically.

    stream (Megatron-Bridge export_hf_weights) -> fix-ups (GLM aliases and dense-MTP fc1, MiMo input_proj halves)
      -> cast to the reference dtype -> shards laid out like the reference index
      -> config/tokenizer/remote-code files copied from the reference
      -> verification against the reference, values read back from disk (``verify.verify_folder``)
      -> nemo_occ_export.json with every tensor's checksum -> rename into place

Nothing here imports Megatron-Bridge: ``bridge_export`` feeds the stream, tests feed synthetic ones.
If any step fails, including verification, the output folder does not appear.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nemo_occ import __version__
from nemo_occ.atomic_io import atomic_directory
from nemo_occ.export.fixups import FixupLog, apply_fixups
from nemo_occ.export.hf_checkpoint import CheckpointInfo, TensorMeta
from nemo_occ.export.manifest import CHECKSUM_ALGORITHM, MANIFEST_FILE, TrainingStep
from nemo_occ.export.models import mtp_layout
from nemo_occ.export.target import check_export_target, check_replaceable
from nemo_occ.export.verify import ExportVerificationError, ValueLimits, VerificationReport, verify_folder
from nemo_occ.export.writer import ShardedSafetensorsWriter

# safetensors dtype strings of the floating formats a plain cast may convert between.
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ExportResult:
    out: Path
    report: VerificationReport
    manifest: dict[str, Any]


def cast_to_reference(tensor: torch.Tensor, ref: TensorMeta | None) -> torch.Tensor:
    """Cast a floating tensor to the reference's floating dtype; leave anything else to verification.

    Megatron keeps e.g. the GLM router's expert bias in FP32 and most weights in BF16; matching the
    reference per tensor keeps the export loadable exactly like the checkpoint it came from. Casts to
    quantized formats (FP8 with scales) are not plain casts and are not attempted.
    """
    target = _FLOAT_DTYPES.get(ref.dtype) if ref is not None else None
    if target is None or not tensor.is_floating_point() or tensor.dtype == target:
        return tensor
    return tensor.to(target)


def write_hf_export(
    stream: Iterable[tuple[str, torch.Tensor]],
    reference: CheckpointInfo,
    out: str | Path,
    *,
    source: str,
    megatron_eh_proj: Mapping[int, torch.Tensor] | None = None,
    megatron_fc1: Mapping[int, torch.Tensor] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    limits: ValueLimits | None = None,
    inputs: Mapping[str, str | Path | None] | None = None,
    training_step: TrainingStep | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write ``stream`` as an HF checkpoint shaped like ``reference`` into ``out``; verify; commit.

    Refuses (before touching ``stream``) an incomplete reference and an ``out`` that would endanger the
    reference or the ``inputs`` folders (``target.check_export_target``); the front end checks space.
    Raises ``ExportVerificationError`` (listing what is wrong, MTP first) when the result does not match
    the reference; ``out`` is then left untouched. ``source`` (the checkpoint the stream comes from)
    and ``training_step`` go into the manifest, where ``verify-export --expect-step`` reads them.
    """
    # long on purpose: the write is one transaction inside atomic_directory (shards, copied files,
    # verification, manifest, commit); split, its steps would leave the temporary folder's scope
    step = training_step or TrainingStep(None, "not given to the export")
    layout = mtp_layout(reference.config)
    limits = limits or ValueLimits()
    reference.check_complete("reference")
    inputs = {"--hf-model": reference.directory, **dict(inputs or {})}
    out = check_export_target(out, inputs=inputs, overwrite=overwrite)
    log = FixupLog()
    casts: dict[str, list[str]] = {}
    num_mtp_streamed = 0  # MTP tensors that came from the converter, not from our aliases
    with atomic_directory(out, overwrite=overwrite, check_replaceable=check_replaceable) as tmp:
        writer = ShardedSafetensorsWriter(tmp, reference.weight_map)
        fixed = apply_fixups(
            stream,
            layout,
            reference_names=reference.weight_map,
            megatron_eh_proj=megatron_eh_proj,
            megatron_fc1=megatron_fc1,
            log=log,
        )
        bar = tqdm(
            fixed, total=len(reference.weight_map), unit="tensor", desc="export", disable=not show_progress
        )
        for name, tensor in bar:
            num_mtp_streamed += layout.is_mtp(name)
            cast = cast_to_reference(tensor, reference.tensors.get(name))
            if cast.dtype != tensor.dtype:
                casts.setdefault(f"{tensor.dtype} -> {cast.dtype}", []).append(name)
            writer.add(name, cast)
        writer.close()
        for path in reference.side_files:
            shutil.copy2(path, tmp / path.name)

        report, scan = verify_folder(tmp, reference, limits=limits, manifest_check=None)
        report.export = str(out)
        if not report.ok:
            report.export = f"{out} (not written)"
            num_added = sum(e["action"] == "added by nemo-occ" for e in log.entries)
            if num_mtp_streamed == num_added:
                report.hints.append(
                    "the converter produced no MTP tensor at all: was the Megatron checkpoint trained with MTP "
                    "layers (mtp_num_layers set), and does the Megatron-Bridge version map them?"
                )
            raise ExportVerificationError(report)

        manifest = {
            "nemo_occ_version": __version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_checkpoint": source,
            "training_step": step.step,
            "training_step_from": step.read_from,
            "hf_reference": reference.source,
            "model_type": layout.model_type,
            "num_mtp_layers": layout.num_mtp_layers,
            "num_tensors": report.num_exported,
            "num_mtp_tensors": sum(map(layout.is_mtp, scan.digests)),
            "fixups": log.entries,
            "dtype_casts": {kind: len(names) for kind, names in sorted(casts.items())},
            **dict(extra_manifest or {}),
            "verification": {
                "passed": True,
                "checks": "names, shapes, dtypes, shards, config.json, tokenizer files, finite values, "
                "GLM alias copies bit-identical, MTP change against the reference",
                "mtp_change_limits": {
                    "max_per_tensor": limits.max_mtp_change,
                    "allow_unchanged": limits.allow_unchanged_mtp,
                },
                "mtp_relative_change": report.mtp_changes or None,
                "notes": report.notes,
            },
            "checksums": {"algorithm": CHECKSUM_ALGORITHM, "tensors": scan.digests},
        }
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    return ExportResult(out=out, report=report, manifest=manifest)
