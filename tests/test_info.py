"""`nemo-occ info`: the report a bug report needs, and it survives missing, broken and crashing packages."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _info(env_extra: dict | None = None) -> tuple[int, dict, str]:
    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run(
        [sys.executable, "-m", "nemo_occ.cli", "info", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    return result.returncode, (json.loads(result.stdout) if result.stdout.strip() else {}), result.stderr


def test_info_reports_versions_cuda_and_imports():
    """Runs in every venv, NeMo-RL's driver venv (no megatron-core) included."""
    rc, report, err = _info()
    assert rc == 0, err
    assert set(report["versions"]) >= {
        "nemo-occ", "torch", "megatron-core", "transformer-engine", "vllm", "nemo-rl", "megatron-bridge",
    }  # fmt: skip
    assert report["versions"]["torch"] == importlib.metadata.version("torch")
    import torch

    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert report["cuda"]["cuda_build"] == torch.version.cuda
    try:
        import nemo_rl.algorithms.grpo  # noqa: F401
    except Exception as err:  # the report names what failed (NeMo-RL, or a dependency it imports)
        assert report["driver_imports"] != "ok"
        assert (getattr(err, "name", None) or "nemo_rl") in report["driver_imports"]
    else:
        assert report["driver_imports"] == "ok"


def test_info_reports_megatron_capabilities():
    megatron_core = pytest.importorskip(
        "megatron.core", reason="megatron-core is not importable here (NeMo-RL's driver venv has none)"
    )
    rc, report, err = _info()
    assert rc == 0, err
    caps = report["megatron_capabilities"]
    assert caps["version"] == megatron_core.__version__ and "process_mtp_loss" in caps


def test_info_survives_a_crashing_torch(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("import os\nos.abort()\n")  # a CUDA library crash
    rc, report, err = _info({"PYTHONPATH": str(tmp_path)})
    assert rc == 0, err
    assert "crashed with signal" in report["cuda"]["error"]
    assert "error" in report["megatron_capabilities"]
    assert report["driver_imports"] != "ok" and report["worker_imports"]["result"] != "ok"


def test_info_survives_a_broken_megatron(tmp_path):
    (tmp_path / "megatron").mkdir()
    (tmp_path / "megatron" / "__init__.py").write_text("raise ImportError('libcudart.so.13: cannot open')\n")
    rc, report, err = _info({"PYTHONPATH": str(tmp_path)})
    assert rc == 0, err
    assert "libcudart" in report["megatron_capabilities"]["error"]
    assert "cuda_build" in report["cuda"]  # torch itself still reports
