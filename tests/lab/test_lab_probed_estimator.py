"""``occ.estimator: probed`` in the CPU demo: λ comes from the probes' cross-fitted statistics and is held
between them, and a run interrupted after its checkpoint resumes to the uninterrupted run's metrics and λ,
bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nemo_occ.cli import main

pytestmark = pytest.mark.slow

CONFIG = """\
nemo_occ:
  occ: {estimator: probed, lambda_plus: 0.5}
"""


def _rows(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
        for line in (out / "occ" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]


def test_probed_lambda_is_held_between_probes_and_resumes_bit_identically(tmp_path, monkeypatch):
    import nemo_occ.lab.demo.trainer as trainer

    config = tmp_path / "probed.yaml"
    config.write_text(CONFIG)
    # --quick: 4 RL steps, 2 updates each, checkpoints at steps 2 and 4; probes at steps 1, 2, 3, 4
    argv = ["demo", "--quick", "--config", str(config), "--regimes", "occ", "--seed", "5", "--no-progress",
            "--fidelity-every", "1", "--out"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*argv, str(full)]) == 0
    rows = [r for r in _rows(full) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for before, after in zip(rows[:-1], rows[1:], strict=True):
        # the probe of step t (its second update) sets the λ both updates of step t+1 apply
        c, v2 = before["train/mtp/fidelity/c_cross_fit_1"], before["train/mtp/fidelity/v2_cross_fit_1"]
        expected = 0.5 * c / (v2 + 1e-8) if v2 > 0 else before["train/mtp/occ/lambda_applied_1"]
        assert after["train/mtp/occ/lambda_applied_1"] == pytest.approx(expected, rel=1e-12)
    assert rows[0]["train/mtp/occ/lambda_applied_1"] == 0.0  # the initial λ until the first probe
    assert len({r["train/mtp/occ/lambda_applied_1"] for r in rows}) > 2

    cut.mkdir()
    for name in ("run.json", "warmstart.pt"):
        shutil.copy(full / name, cut / name)
    real_save = trainer.save_checkpoint

    def save_then_ctrl_c(path, state, cfg):
        real_save(path, state, cfg)
        if state.get("step") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_ctrl_c)
    assert main([*argv, str(cut)]) == 130
    monkeypatch.undo()
    assert main([*argv, str(cut)]) == 0
    assert _rows(cut) == _rows(full)
    a = torch.load(full / "occ" / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "occ" / "checkpoint.pt", weights_only=True)
    assert a["objective"]["calibrator"]["lambdas"] == b["objective"]["calibrator"]["lambdas"]
    assert a["probes"] == b["probes"]
