"""``nemo-occ export`` and ``nemo-occ verify-export``.

Registration imports nothing heavy; handlers import their modules when they run. User mistakes
(missing folders, unsupported models, a failed verification, Megatron-Bridge absent) are printed as
one readable error and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


def _fail(err: BaseException) -> int:
    print(f"nemo-occ: error: {err}", file=sys.stderr)
    return 1


def _export(args: argparse.Namespace) -> int:
    from nemo_occ.export.bridge_export import export_megatron_to_hf
    from nemo_occ.export.verify import ExportVerificationError

    try:
        result = export_megatron_to_hf(
            args.megatron_ckpt,
            args.hf_model,
            args.out,
            overwrite=args.overwrite,
            show_progress=not args.no_progress,
            trust_remote_code=args.trust_remote_code,
        )
    except ExportVerificationError as err:
        print(err.report.format(), file=sys.stderr)
        print(f"nemo-occ: error: export NOT written to {args.out} (verification failed).", file=sys.stderr)
        return 1
    except _USER_ERRORS as err:
        return _fail(err)
    print(result.report.format())
    print(
        f"Exported {result.manifest['num_tensors']} tensors ({result.manifest['num_mtp_tensors']} MTP) to "
        f"{result.out}; details in {result.out}/nemo_occ_export.json"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from nemo_occ.export.verify import verify_export

    try:
        report = verify_export(args.export_dir, args.reference, raise_on_failure=False)
    except _USER_ERRORS as err:
        return _fail(err)
    text = report.format(limit=None if args.show_all else 50)
    print(text, file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="Export a Megatron checkpoint to Hugging Face with its MTP layers (Megatron-Bridge), verified.",
        description=(
            "Convert a Megatron (torch_dist) checkpoint to Hugging Face safetensors with Megatron-Bridge, "
            "add the MTP tensors Bridge misses (GLM-4.5 embed/head aliases; MiMo input_proj orientation), "
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
    export.add_argument("--out", required=True, metavar="DIR", help="Output folder (must not exist).")
    export.add_argument(
        "--overwrite", action="store_true", help="Replace --out if it exists (after success only)."
    )
    export.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    export.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow the reference's remote code (required for MiMo).",
    )
    export.set_defaults(func=_export)

    verify = subparsers.add_parser(
        "verify-export",
        help="Check an exported HF checkpoint (key set, shapes, dtypes, shards) against a reference.",
        description=(
            "Compare an exported checkpoint's tensors with the reference checkpoint's index and shard headers; "
            "list missing or unexpected tensors (MTP ones first), shape/dtype mismatches and missing shards. "
            "Exit code 1 on any mismatch."
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
    verify.set_defaults(func=_verify)
