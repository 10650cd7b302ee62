"""`nemo-occ demo` run again into a folder, or with bad input: nothing of earlier results is lost.

A tiny configuration (3 warm-start steps, 2 RL steps of 4 prompts, one regime) keeps each run to a
few seconds; every call goes through the CLI's ``main(argv)`` in-process.
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch

import nemo_occ
from nemo_occ.cli import build_parser, main

TINY = """\
demo:
  warm_start: {steps: 3, batch_size: 16, check_problems: 8}
  rl: {steps: 2, prompts_per_step: 4, samples_per_prompt: 2}
  eval: {problems: 4, samples: 1}
"""


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return path


def _argv(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["demo", "--quick", "--config", str(tiny), "--regimes", "occ", "--seed", "3", "--out", str(out),
            "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished tiny run of the occ regime; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(_argv(tiny, out)) == 0
    return out


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(finished, dst)
    return dst


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- rerunning into a demo folder -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "changed"),
    [
        (["--steps", "3"], "demo.rl.steps 2 → 3"),
        (["--seed", "4"], "demo.seed 3 → 4"),
        (["--fidelity-every", "1"], "demo.fidelity_every 2 → 1"),  # the exact statistics are results too
    ],
)
def test_rerun_with_another_config_is_refused_and_keeps_every_file(tiny, copy, capsys, extra, changed):
    before = _snapshot(copy)
    argv = _argv(tiny, copy)
    if extra[0] in argv:
        argv[argv.index(extra[0]) + 1] = extra[1]
    else:
        argv += extra
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--out {copy}" in line and changed in line and "--overwrite" in line
    assert _snapshot(copy) == before


def test_rerun_of_a_finished_run_says_already_complete_and_rewrites_nothing(tiny, copy, capsys):
    before = _snapshot(copy)
    assert main(_argv(tiny, copy)) == 0
    captured = capsys.readouterr()
    assert "already complete" in _one_line(captured.err)
    assert (copy / "summary.md").read_text() in captured.out
    after = _snapshot(copy)
    assert {k: v for k, v in after.items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }
    invocations = json.loads(after["run.json"])["invocations"]
    assert len(invocations) == 2  # the rerun is recorded


def test_rerun_of_a_run_reported_by_an_earlier_version_redraws_the_figures_only(tiny, copy, capsys):
    # an earlier version drew curves.png: its summary names that and none of today's figures exist
    summary = json.loads((copy / "summary.json").read_text())
    for name in summary["plots"]:
        (copy / name).unlink()
    (copy / "curves.png").write_bytes(b"\x89PNG old")
    (copy / "summary.json").write_text(json.dumps({**summary, "plots": ["curves.png"]}))
    checkpoints = {p: p.read_bytes() for p in copy.glob("*/checkpoint.pt")}
    assert main(_argv(tiny, copy)) == 0
    assert "already complete" not in capsys.readouterr().err
    redrawn = json.loads((copy / "summary.json").read_text())
    assert redrawn["plots"] == summary["plots"] and all((copy / p).exists() for p in redrawn["plots"])
    assert {p: p.read_bytes() for p in copy.glob("*/checkpoint.pt")} == checkpoints  # nothing retrained
    assert (copy / "curves.png").exists()  # not the demo's to delete without --overwrite


def test_rerun_with_other_regimes_adds_them_and_reports_every_finished_one(tiny, copy, capsys):
    occ_before = _snapshot(copy / "occ")
    argv = _argv(tiny, copy)
    argv[argv.index("occ")] = "detach"
    assert main(argv) == 0
    assert "detach: not started" in capsys.readouterr().err
    assert _snapshot(copy / "occ") == occ_before
    assert _steps(copy / "detach" / "metrics.jsonl") == [0, 1, 2]
    assert list(json.loads((copy / "summary.json").read_text())["regimes"]) == ["detach", "occ"]


def test_overwrite_starts_fresh_and_deletes_only_what_the_demo_wrote(tiny, copy, capsys):
    (copy / "notes.txt").write_text("mine")
    (copy / "occ" / "notes.txt").write_text("mine too")
    assert main([*_argv(tiny, copy, "--overwrite"), "--steps", "3"]) == 0
    assert (copy / "notes.txt").read_text() == "mine"
    assert (copy / "occ" / "notes.txt").read_text() == "mine too"
    assert _steps(copy / "occ" / "metrics.jsonl") == [0, 1, 2, 3]
    record = json.loads((copy / "run.json").read_text())
    assert record["config"]["demo"]["rl"]["steps"] == 3 and len(record["invocations"]) == 1


def test_demo_files_without_run_json_need_overwrite(tiny, copy, capsys):
    (copy / "run.json").unlink()  # e.g. written by a nemo-occ before run.json existed
    before = _snapshot(copy)
    assert main(_argv(tiny, copy)) == 2
    assert "no run.json" in _one_line(capsys.readouterr().err)
    assert _snapshot(copy) == before
    assert main(_argv(tiny, copy, "--overwrite")) == 0
    assert json.loads((copy / "run.json").read_text())["kind"] == "nemo-occ demo"


@pytest.mark.parametrize(
    "files",
    [
        {"notes.txt": "mine"},
        {"summary.md": "my own summary", "data.csv": "1,2"},  # a demo-like name does not make it the demo's
        {"run.json": '{"kind": "another tool"}'},
        {"run.json": "{not json"},
        {"occ/model.bin": "weights"},
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_demo_output_is_never_touched(tiny, tmp_path, capsys, files, overwrite):
    out = tmp_path / "theirs"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _snapshot(out)
    assert main(_argv(tiny, out, *(["--overwrite"] if overwrite else []))) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"nemo-occ demo: --out {out}")
    assert _snapshot(out) == before and sorted(p.name for p in out.rglob("*")) == sorted(
        {Path(n).name for n in files} | {Path(n).parent.name for n in files if "/" in n}
    )


# -- Ctrl-C -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_the_rerun_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, capsys
):
    import nemo_occ.lab.demo.trainer as trainer

    # --quick: 4 RL steps with checkpoints at steps 2 and 4, enough for OCC updates
    full, cut = tmp_path / "full", tmp_path / "cut"
    argv = ["demo", "--quick", "--regimes", "occ", "--seed", "5", "--no-progress", "--out"]
    assert main([*argv, str(full)]) == 0
    cut.mkdir()
    for name in ("run.json", "warmstart.pt"):  # the same configuration's warm start, nothing trained yet
        shutil.copy(full / name, cut / name)
    real_save = trainer.save_checkpoint

    def save_then_ctrl_c(path, state, config):
        real_save(path, state, config)
        if state.get("step") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_ctrl_c)
    capsys.readouterr()
    assert main([*argv, str(cut)]) == 130
    # the resume notice, what the (cached) warm start measured, then one line for Ctrl-C
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("(occ: not started)") and err[1].startswith("warm start: 80 SFT steps")
    assert err[2:] == ["nemo-occ demo: interrupted; rerun the same command to resume"]
    assert _steps(cut / "occ" / "metrics.jsonl") == [0, 1, 2]
    with (cut / "occ" / "metrics.jsonl").open("a") as f:  # a kill in the middle of the next row
        f.write('{"step": 3, "reward/me')
    monkeypatch.undo()
    assert main([*argv, str(cut)]) == 0
    assert "occ: resuming from step 2 of 4" in capsys.readouterr().err

    def rows(out):
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (out / "occ" / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(cut) == rows(full)
    a = torch.load(full / "occ" / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "occ" / "checkpoint.pt", weights_only=True)
    assert a["objective"]["calibrator"]["lambdas"] == b["objective"]["calibrator"]["lambdas"]
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)


# -- what a run records -----------------------------------------------------------------------------


def test_run_json_records_config_seed_versions_and_command(tiny, finished):
    record = json.loads((finished / "run.json").read_text())
    assert record["kind"] == "nemo-occ demo" and record["seed"] == 3
    demo = record["config"]["demo"]
    assert demo["seed"] == 3 and demo["warm_start"]["steps"] == 3  # --seed, and the YAML
    assert demo["task"]["digits"] == 1 and demo["rl"]["minibatches"] == 2  # the --quick preset
    assert record["config"]["nemo_occ"]["num_depths"] == 1
    (inv,) = record["invocations"]
    assert inv["settings"]["regimes"] == ["occ"]
    assert inv["versions"] == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": metadata.version("megatron-core"),
        "nemo-occ": nemo_occ.__version__,
    }
    words = shlex.split(inv["command"])
    assert words[:2] == ["nemo-occ", "demo"]
    parser = build_parser()
    assert vars(parser.parse_args(words[1:])) == vars(parser.parse_args(_argv(tiny, finished)))


def _runs() -> dict:
    rows = [
        {"step": s, "reward/mean": 0.1 * s, "eval/accuracy": 0.2, "train/mtp/accuracy_1": 0.3}
        for s in range(4)
    ]
    return {"none": {"metrics": rows, "wall_time_s": 1.0, "step_time_s": 0.25}}


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    from nemo_occ.lab.demo.report import build_report

    build_report(_runs(), tmp_path, "# first", "setting")
    before = _snapshot(tmp_path)
    assert before["fig6_reward.png"][:8] == b"\x89PNG\r\n\x1a\n"
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig_dies_halfway(self, fname, *args, **kwargs):
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG half")
        else:
            Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        build_report(_runs(), tmp_path, "# second", "setting")
    assert _snapshot(tmp_path) == before  # no half-written plot, no temporary file
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real_savefig)

    import os

    def fsync_fails(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="disk full"):
        build_report(_runs(), tmp_path, "# second", "setting")
    assert _snapshot(tmp_path) == before


# -- bad input: one line naming what to change, exit 2 ----------------------------------------------


def test_out_that_is_a_file(tiny, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert main(_argv(tiny, out)) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--out {out} is a file" in line
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("demo:\n  rl: {steps: 3}\n   seed: 2\n", "line 3, column 4: invalid YAML"),
        ("demo:\n  rl:\n    steps: [3\n", "invalid YAML"),
        ("- demo\n- nemo_occ\n", "got a list"),
        ("demo: 3\n", "'demo:' must be a mapping"),
        ("demo:\n  rl:\n    stepz: 3\n", "demo.rl.stepz: unknown key"),
    ],
)
def test_config_file_errors_name_the_file_and_line(tmp_path, capsys, text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["demo", "--quick", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"nemo-occ demo: --config {cfg}: ") and expected in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--regimes", "foo"], "--regimes foo: unknown regime(s) ['foo']"),
        (["--regimes", "occ", "occ"], "--regimes occ occ: regime(s) ['occ'] listed more than once"),
        (["--steps", "0"], "--steps 0: "),
        (["--fidelity-every", "-1"], "--fidelity-every -1: "),
    ],
)
def test_flag_errors_name_the_flag(tiny, tmp_path, capsys, flags, expected):
    argv = ["demo", "--quick", "--config", str(tiny), "--out", str(tmp_path / "o"), "--no-progress", *flags]
    assert main(argv) == 2
    assert expected in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_a_figure_whose_metrics_are_missing_is_named_and_its_old_file_removed(tmp_path):
    from nemo_occ.lab.demo.report import build_report

    runs = {"occ": _runs()["none"]}  # an occ run without any λ metric
    (tmp_path / "fig4_lambda.png").write_bytes(b"\x89PNG from an earlier report")
    summary = build_report(runs, tmp_path, "# h", "setting")
    assert summary["plots"] == ["fig6_reward.png"]
    assert set(summary["plots_not_drawn"]) == {"fig4_lambda.png", "fig_lambda_agreement.png"}
    assert "'occ'" in summary["plots_not_drawn"]["fig4_lambda.png"]
    assert not (tmp_path / "fig4_lambda.png").exists()
    md = (tmp_path / "summary.md").read_text()
    assert (
        "![fig6_reward.png](fig6_reward.png)" in md and "Figures not drawn" in md and "fig4_lambda.png:" in md
    )
