"""scripts/bridge_check.sh refuses to start without its two checkouts and never builds inside the
repository or a checkout (the parts that need no network; the check itself is run by hand, docs/export.md).
Its bash syntax and shellcheck are covered with every script by test_scripts.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bridge_check.sh"
ROOTS = ("MEGATRON_BRIDGE_ROOT", "MEGATRON_LM_ROOT")


def _fake_checkouts(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bridge" / "src" / "megatron" / "bridge").mkdir(parents=True)
    (tmp_path / "mlm" / "megatron" / "core").mkdir(parents=True)
    return {"MEGATRON_BRIDGE_ROOT": str(tmp_path / "bridge"), "MEGATRON_LM_ROOT": str(tmp_path / "mlm")}


def _bridge_check(env_updates: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (*ROOTS, "BRIDGE_VENV", "UPSTREAM_VENV_DIR")}
    env.update(env_updates)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("missing", ROOTS)
def test_bridge_check_needs_both_checkouts(tmp_path, missing):
    env = _fake_checkouts(tmp_path)
    env[missing] = str(tmp_path / "nowhere")
    result = _bridge_check(env)
    assert result.returncode == 2 and f"set {missing}" in result.stderr


@pytest.mark.parametrize("where", ["repository", "bridge checkout", "megatron checkout"])
def test_bridge_check_never_builds_inside_the_repo_or_a_checkout(tmp_path, where):
    env = _fake_checkouts(tmp_path)
    inside = {
        "repository": ROOT / "venvs",
        "bridge checkout": Path(env["MEGATRON_BRIDGE_ROOT"]) / "venvs",
        "megatron checkout": Path(env["MEGATRON_LM_ROOT"]) / "venvs",
    }[where]
    env["UPSTREAM_VENV_DIR"] = str(inside)
    result = _bridge_check(env)
    expected = "is inside the repository" if where == "repository" else "is inside a checkout"
    assert result.returncode == 2 and expected in result.stderr
    assert not inside.exists()
