"""``nemo-occ info``: the versions, CUDA, megatron capabilities and import checks a bug report needs.

Versions come from package metadata (nothing is imported for them). Everything that imports a heavy
package (torch, megatron-core, NeMo-RL) runs in a child interpreter with a time limit, so a missing
package, a failing import or even a crash in a CUDA library shows up as a line of the report instead of
ending it. The worker-side import check runs in the interpreter of NeMo-RL's own Megatron worker venv
when it exists (``$NEMO_RL_VENV_DIR`` or ``/opt/ray_venvs``), which is where the worker runs. A nemo-occ
command whose module cannot be imported here is listed with the import error
(``nemo_occ.cli.unavailable_commands``); ``nemo-occ info`` itself runs regardless.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["PACKAGES", "collect", "register"]

# Shown name -> distribution names to try (the first one installed wins).
PACKAGES = {
    "torch": ("torch",),
    "megatron-core": ("megatron-core", "megatron_core"),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch"),
    "vllm": ("vllm",),
    "nemo-rl": ("nemo-rl", "nemo_rl"),
    "megatron-bridge": ("megatron-bridge", "megatron_bridge"),
    "ray": ("ray",),
}
MEGATRON_WORKER_FQN = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"
TIMEOUT_S = 120

_CUDA = """
import json, torch
out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": torch.cuda.is_available()}
if out["available"]:
    out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps(out))
"""
# The MTP-related features of the installed megatron-core, read from its code (for the report only: the
# package checks each feature where it uses it, e.g. MTPCapture reads config.mtp_detach_heads).
_CAPABILITIES = """
import dataclasses, inspect, json
from megatron.core import package_info
from megatron.core.models.gpt import gpt_model
from megatron.core.transformer.transformer_config import TransformerConfig
process = getattr(gpt_model, "process_mtp_loss", None)  # newer cores; 0.16.x computes the MTP loss inline
fields = {f.name for f in dataclasses.fields(TransformerConfig)}
print(json.dumps({
    "version": str(package_info.__version__),
    "process_mtp_loss": process is not None,
    "labels_from_input_ids": process is not None and "input_ids" in inspect.signature(process).parameters,
    "mtp_detach_heads": "mtp_detach_heads" in fields,
    "mtp_use_repeated_layer": "mtp_use_repeated_layer" in fields,
}))
"""
_DRIVER = "import nemo_occ.nemo_rl.run_grpo, nemo_rl.algorithms.grpo; print('{}')"
_WORKER = "import nemo_occ.nemo_rl.megatron_worker; print('{}')"


def _version(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _probe(code: str, python: str = sys.executable) -> tuple[bool, object]:
    """Run ``code`` in a child ``python`` (the package importable); (ok, parsed last stdout line | error)."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    )
    try:
        result = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"{type(err).__name__}: {err}"
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        try:
            return True, json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    errors = [line for line in result.stderr.strip().splitlines() if line.strip()]
    reason = errors[-1] if errors else f"exit code {result.returncode}"
    if result.returncode < 0:
        reason = f"crashed with signal {-result.returncode}"
    return False, reason


def _worker_python() -> str | None:
    venvs = os.environ.get("NEMO_RL_VENV_DIR", "/opt/ray_venvs")
    python = Path(venvs) / MEGATRON_WORKER_FQN / "bin" / "python"
    return str(python) if python.is_file() else None


def collect() -> dict:
    """Everything ``nemo-occ info`` prints, as a dict (JSON-serialisable)."""
    from nemo_occ import __version__

    report: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": {
            "nemo-occ": f"{__version__} ({Path(__file__).resolve().parent})",
            **{shown: _version(names) for shown, names in PACKAGES.items()},
        },
    }
    ok, cuda = _probe(_CUDA)
    report["cuda"] = cuda if ok else {"error": cuda}
    ok, caps = _probe(_CAPABILITIES)
    report["megatron_capabilities"] = caps if ok else {"error": caps}
    ok, err = _probe(_DRIVER)
    report["driver_imports"] = "ok" if ok else err
    worker_python = _worker_python()
    ok, err = _probe(_WORKER, worker_python or sys.executable)
    report["worker_imports"] = {"python": worker_python or sys.executable, "result": "ok" if ok else err}
    report["nemo_rl_root"] = os.environ.get("NEMO_RL_ROOT") or None
    from nemo_occ.cli import unavailable_commands

    report["unavailable_commands"] = unavailable_commands()
    return report


def _print(report: dict) -> None:
    print(f"python              {report['python']} ({report['executable']})")
    for name, version in report["versions"].items():
        print(f"{name:<20}{version}")
    cuda = report["cuda"]
    if "error" in cuda:
        print(f"cuda                unknown ({cuda['error']})")
    else:
        devices = ", ".join(cuda.get("devices", [])) or "no device"
        print(f"cuda                available={cuda['available']} build={cuda['cuda_build']} ({devices})")
    caps = report["megatron_capabilities"]
    if "error" in caps:
        print(f"megatron caps       unknown ({caps['error']})")
    else:
        flags = " ".join(f"{k}={v}" for k, v in caps.items() if k != "version")
        print(f"megatron caps       {flags}")
    print(f"driver imports      {report['driver_imports']}")
    worker = report["worker_imports"]
    print(f"worker imports      {worker['result']} ({worker['python']})")
    print(f"NEMO_RL_ROOT        {report['nemo_rl_root'] or 'not set'}")
    for command, why in report["unavailable_commands"].items():
        print(f"{'nemo-occ ' + command:<20}unavailable ({why})")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nemo-occ info`` (what is installed and which layers work) to ``subparsers``."""
    parser = subparsers.add_parser(
        "info",
        help="versions, CUDA, megatron capabilities and import checks (paste it into bug reports)",
        description="Report the environment nemo-occ runs in. Never fails on a missing package.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0
