"""The NeMo-RL driver side of nemo-occ imports no megatron, Bridge, Transformer Engine or NeMo-RL worker.

NeMo-RL's driver runs in the container's default venv, built without the ``mcore`` extra: importing any
of those there ends the launch right after ``init_ray()``. ``tests/_driver_imports.py`` runs the driver
side (``nemo-occ train --check``, the entry point, worker registration, the loss and its pickle) in a
fresh interpreter that refuses them, against a stand-in registry module here and against NeMo-RL's own
code under the ``nemo_rl`` marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/dapo-occ-mimo-7b-rl-4n8g-h100-tp2.yaml"
# The class Ray instantiates, named by where it is defined (nemo_occ/nemo_rl/megatron_worker.py).
EXPECTED_FQN = "nemo_occ.nemo_rl.megatron_worker.OCCMegatronPolicyWorker"
DEFAULT_FQN = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"
MCORE_PYTHON = (
    "/opt/ray_venvs/nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker/bin/python"
)

# NeMo-RL's nemo_rl/distributed/ray_actor_environment_registry.py reduced to the two names we read.
STAND_IN_REGISTRY = f"""
MCORE_EXECUTABLE = {MCORE_PYTHON!r}
ACTOR_ENVIRONMENT_REGISTRY = {{{DEFAULT_FQN!r}: MCORE_EXECUTABLE}}
"""


def _run_driver(mode: str, extra_path: list[Path], env_updates: dict[str, str]) -> dict:
    env = dict(os.environ)
    env.update(env_updates)
    env["PYTHONPATH"] = os.pathsep.join(
        [*map(str, extra_path), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    result = subprocess.run(
        [sys.executable, "-m", "tests._driver_imports", mode, RECIPE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def _assert_light(report: dict) -> None:
    assert report["refused"] == [], f"the driver side tried to import {report['refused']}"
    assert report["heavy_loaded"] == []
    assert report["check_rc"] == 0
    assert report["fqn"] == EXPECTED_FQN
    # our worker runs in the interpreter of NeMo-RL's own Megatron worker (no new venv is built)
    assert report["executable"] == report["default_executable"] is not None
    heavy = ("megatron", "transformer_engine", "nemo_rl.models.policy.workers")
    assert not [m for m in report["pickled_modules"] if m.startswith(heavy)], report["pickled_modules"]
    assert report["unpickled_regime"] == "occ"


def test_driver_side_imports_nothing_heavy_with_a_stand_in_registry(tmp_path):
    package = tmp_path / "nemo_rl"
    (package / "distributed").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "distributed" / "__init__.py").write_text("")
    (package / "distributed" / "ray_actor_environment_registry.py").write_text(STAND_IN_REGISTRY)
    report = _run_driver("stand-in", [tmp_path], {"NEMO_RL_ROOT": ""})
    _assert_light(report)
    assert report["executable"] == MCORE_PYTHON


@pytest.mark.nemo_rl
def test_driver_side_imports_nothing_heavy_with_real_nemo_rl():
    pytest.importorskip(
        "nemo_rl.distributed.ray_actor_environment_registry",
        reason="needs NeMo-RL's driver-side code (its container, or a checkout on PYTHONPATH, Python >= 3.13)",
    )
    pytest.importorskip("nemo_rl.algorithms.grpo", reason="needs NeMo-RL's grpo module (Python >= 3.12)")
    # NEMO_RL_PY_EXECUTABLES_SYSTEM=1: NeMo-RL maps its workers to this interpreter instead of `uv run`
    # (which would build venvs through Ray); the registration path is otherwise the same.
    report = _run_driver("real", [], {"NEMO_RL_PY_EXECUTABLES_SYSTEM": "1"})
    _assert_light(report)
    assert report["train_imports"] == "ok"
    assert report["executable"] == sys.executable


def test_worker_fqn_names_the_ray_actor_class(monkeypatch):
    """WORKER_FQN (a light constant the driver reads) is where megatron_worker defines the actor class."""

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    # Stand-ins for the worker-venv imports of megatron_worker (ray and NeMo-RL's Megatron worker).
    module("ray", remote=lambda **kwargs: lambda cls: cls)
    for name in ("nemo_rl", "nemo_rl.models", "nemo_rl.models.policy", "nemo_rl.models.policy.workers"):
        module(name, __path__=[])
    module("nemo_rl.models.policy.utils", get_runtime_env_for_policy_worker=lambda name: {})
    impl = type("MegatronPolicyWorkerImpl", (), {"__init__": lambda self, *a, **k: None})
    module("nemo_rl.models.policy.workers.megatron_policy_worker", MegatronPolicyWorkerImpl=impl)
    monkeypatch.delitem(sys.modules, "nemo_occ.nemo_rl.megatron_worker", raising=False)

    from nemo_occ.nemo_rl import megatron_worker
    from nemo_occ.nemo_rl.worker import WORKER_FQN

    monkeypatch.delitem(sys.modules, "nemo_occ.nemo_rl.megatron_worker")
    cls = megatron_worker.OCCMegatronPolicyWorker
    assert WORKER_FQN == f"{cls.__module__}.{cls.__qualname__}" == EXPECTED_FQN
    assert issubclass(cls, impl)
