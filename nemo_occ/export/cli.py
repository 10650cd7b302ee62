"""``nemo-occ export`` and ``nemo-occ verify-export``.

Registration imports nothing heavy; handlers import their modules when they run. Exit codes: 0 done,
1 the export does not match its reference (the report lists what), 2 a user mistake (missing or
wrong folders, an ``--out`` that may not be written or replaced, Megatron-Bridge absent), printed as
one line, 130 Ctrl-C (one line: the unfinished folder is deleted, as on SIGTERM, so nothing was written,
unless the export was already being moved into place: then it is finished and the line says so).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_USER_ERRORS = (ValueError, TypeError, OSError, ImportError)
USER_ERROR, VERIFICATION_FAILED, INTERRUPTED = 2, 1, 130


def _interrupted(err: KeyboardInterrupt) -> int:
    """Ctrl-C: one line. The export's unfinished folder is already deleted (``nemo_occ.atomic_io.atomic_directory``)."""
    from nemo_occ.atomic_io import InterruptedAfterCommit

    if isinstance(err, InterruptedAfterCommit):  # Ctrl-C came while the export was moved into place
        print(
            f"nemo-occ: interrupted; the export was finished first and is complete in {err.out}",
            file=sys.stderr,
        )
    else:
        print("nemo-occ: interrupted; nothing was written", file=sys.stderr)
    return INTERRUPTED


def _fail(err: BaseException) -> int:
    """Print ``err`` as one ``nemo-occ: error:`` line (an OSError without its ``[Errno N]`` prefix)."""
    text = err.strerror if isinstance(err, OSError) and err.strerror and not err.filename else str(err)
    message = " ".join(text.split("\n"))
    print(f"nemo-occ: error: {message}", file=sys.stderr)
    return USER_ERROR


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Print the export's own warnings (leftover folders) as ``nemo-occ: warning: ...`` when they occur."""
    from nemo_occ.export.target import ExportWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ExportWarning):
            print(f"nemo-occ: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ExportWarning)
        warnings.showwarning = show
        yield


def _limits(args: argparse.Namespace):
    from nemo_occ.export.verify import ValueLimits

    given = {} if args.max_mtp_change is None else {"max_mtp_change": args.max_mtp_change}
    return ValueLimits(allow_unchanged_mtp=args.allow_unchanged_mtp, **given)


def _export(args: argparse.Namespace) -> int:
    from nemo_occ.export.bridge_export import export_megatron_to_hf
    from nemo_occ.export.verify import ExportVerificationError
    from nemo_occ.safe_load import weights_only_loads

    try:
        # weights_only_loads: the checkpoint's common.pt, read by megatron-core, cannot run code either
        with _one_line_warnings(), weights_only_loads():
            result = export_megatron_to_hf(
                args.megatron_ckpt,
                args.hf_model,
                args.out,
                overwrite=args.overwrite,
                show_progress=not args.no_progress,
                trust_remote_code=args.trust_remote_code,
                limits=_limits(args),
                remove_stale_partials=args.remove_stale_partial,
            )
    except ExportVerificationError as err:
        print(err.report.format(), file=sys.stderr)
        print(f"nemo-occ: error: export NOT written to {args.out} (verification failed).", file=sys.stderr)
        return VERIFICATION_FAILED
    except _USER_ERRORS as err:
        return _fail(err)
    except pickle.UnpicklingError:
        return _fail(
            f"--megatron-ckpt {args.megatron_ckpt} holds a pickled object other than numbers, lists, dicts and "
            "tensors; it was not loaded, because loading it could run code it contains"
        )
    except KeyboardInterrupt as err:
        return _interrupted(err)
    print(result.report.format())
    print(
        f"Exported {result.manifest['num_tensors']} tensors ({result.manifest['num_mtp_tensors']} MTP) from "
        f"{result.manifest['megatron_iteration_dir']} to {result.out}; details in {result.out}/nemo_occ_export.json"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from nemo_occ.export.verify import ManifestCheck, verify_export

    try:
        manifest = ManifestCheck(required=not args.no_manifest, expect_step=args.expect_step)
        report = verify_export(
            args.export_dir, args.reference, limits=_limits(args), manifest=manifest, raise_on_failure=False
        )
    except _USER_ERRORS as err:
        return _fail(err)
    except KeyboardInterrupt as err:
        return _interrupted(err)
    text = report.format(limit=None if args.show_all else 50)
    print(text, file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else VERIFICATION_FAILED


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _add_value_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-mtp-change",
        type=_positive_float,
        metavar="R",
        help="Largest allowed relative change ||W - W_ref|| / ||W_ref|| of any MTP tensor against the reference "
        "(default 0.5; a zeroed tensor gives 1, swapped eh_proj halves or an unrelated tensor about 1.41).",
    )
    parser.add_argument(
        "--allow-unchanged-mtp",
        action="store_true",
        help="Accept an MTP layer identical to the reference's (trained with the MTP layer frozen).",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nemo-occ export`` (Megatron checkpoint to Hugging Face with its MTP layers) to ``subparsers``."""
    # long on purpose: the command's argparse options, one after another
    export = subparsers.add_parser(
        "export",
        help="Export a Megatron checkpoint to Hugging Face with its MTP layers (Megatron-Bridge), verified.",
        description=(
            "Convert a Megatron (torch_dist) checkpoint to Hugging Face safetensors with Megatron-Bridge, "
            "add the MTP tensors Bridge misses (GLM-4.5 embed/head aliases and a dense MTP layer's gate/up; MiMo "
            "input_proj orientation), "
            "verify against the reference checkpoint and move the folder into place only when complete. "
            "Supported: GLM-4.5, GLM-4.5-Air (glm4_moe), MiMo-7B (mimo)."
        ),
    )
    export.add_argument(
        "--megatron-ckpt", required=True, metavar="DIR", help="Megatron checkpoint (iter_* or parent)."
    )
    export.add_argument(
        "--hf-model",
        required=True,
        metavar="NAME_OR_PATH",
        help="The Hugging Face checkpoint the model was trained from (local folder preferred, or Hub id).",
    )
    export.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="Output folder: must not exist, nor be or lie inside --hf-model or --megatron-ckpt.",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace --out if it is an earlier nemo-occ export (it holds nemo_occ_export.json) or empty; "
        "the old one is deleted only after the new one succeeded.",
    )
    export.add_argument(
        "--remove-stale-partial",
        action="store_true",
        help="Delete unfinished export folders (.<out>.partial-*) that killed runs left next to --out "
        "(reported either way; one whose export still runs on this host is never deleted).",
    )
    export.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    export.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow the reference's remote code (required for MiMo).",
    )
    _add_value_limits(export)
    export.set_defaults(func=_export)

    verify = subparsers.add_parser(
        "verify-export",
        help="Check an exported HF checkpoint (names, shapes, dtypes, values, checksums) against a reference.",
        description=(
            "Compare an exported checkpoint with the reference checkpoint: tensor names, shapes, dtypes and "
            "shards; config.json and tokenizer files; every tensor finite; GLM MTP alias copies bit-identical; "
            "each tensor's SHA-256 against nemo_occ_export.json; the MTP layer's change against the reference. "
            "The export must hold its nemo_occ_export.json (else it fails, unless --no-manifest). "
            "Lists what is wrong, MTP tensors first. Exit code 1 on any mismatch, 2 on unusable input."
        ),
    )
    verify.add_argument("export_dir", metavar="DIR", help="The exported checkpoint folder.")
    verify.add_argument(
        "--reference",
        required=True,
        metavar="NAME_OR_PATH",
        help="Reference HF checkpoint: local folder, or Hub id (needs huggingface_hub and network).",
    )
    verify.add_argument(
        "--show-all", action="store_true", help="List every mismatching tensor, not the first 50."
    )
    verify.add_argument(
        "--expect-step",
        type=_non_negative_int,
        metavar="N",
        help="Fail unless the manifest says the export comes from training step N (NeMo-RL's step_N folder).",
    )
    verify.add_argument(
        "--no-manifest",
        action="store_true",
        help="Verify a folder without nemo_occ_export.json (e.g. written by another tool). Its per-tensor "
        "checksums, training step and source checkpoint are then NOT checked, and the report says so.",
    )
    _add_value_limits(verify)
    verify.set_defaults(func=_verify)
