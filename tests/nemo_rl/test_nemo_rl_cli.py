"""`nemo-occ train` / `python -m nemo_occ.nemo_rl.run_grpo`: registration and --check without NeMo-RL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nemo_occ.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/dapo-occ-glm4.5-air-8n8g-h100-tp4pp2ep8-fp8.yaml"


def test_train_check_accepts_a_recipe_and_overrides(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (
        main(["train", "--config", RECIPE, "--check", "policy.megatron_cfg.expert_model_parallel_size=16"])
        == 0
    )
    out = capsys.readouterr().out
    assert "recipe OK" in out and "EP 16" in out and "GPUs 64 = DP 8 x TP 4 x PP 2" in out


def test_train_check_reports_what_to_set(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", RECIPE, "--check", "policy.megatron_cfg.mtp_num_layers=0"]) == 2
    assert "mtp_num_layers: 1" in capsys.readouterr().err


def test_registration_imports_no_nemo_rl_ray_or_megatron():
    code = (
        "import sys, argparse, nemo_occ.nemo_rl.cli as c; "
        "c.register(argparse.ArgumentParser().add_subparsers()); "
        "bad = [m for m in ('ray', 'nemo_rl', 'megatron') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
