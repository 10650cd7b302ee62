"""Verification that cannot pass by accident (no Megatron-Bridge needed: stand-in Bridge, toy checkpoints).

- the manifest: missing, unreadable or without checksums fails; ``--no-manifest`` verifies without it
  and says what it did not check;
- the training step: recorded from NeMo-RL's ``step_<N>`` folder (or Megatron's ``iter_<N>``) and
  checked by ``verify-export --expect-step``;
- GLM45Bridge's wrong names for a dense MTP layer's ``linear_fc1`` (``mlp.linear_fc1.gate/up``):
  fixed by the export, caught by verification when an export carries them;
- a disk without room: one line naming the shortfall, nothing left behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nemo_occ.export import cli, writer
from nemo_occ.export.bridge_export import training_step_of
from nemo_occ.export.hf_checkpoint import read_reference
from nemo_occ.export.hf_export import MANIFEST_FILE, write_hf_export
from nemo_occ.export.verify import ManifestCheck, verify_export
from tests._export_stand_in import install_stand_in_bridge, make_megatron_folder
from tests._export_synthetic import bridge_like_stream, make_reference_checkpoint, train_like

INDEX = "model.safetensors.index.json"
MTP_SHARD = "model-00003-of-00003.safetensors"
H = 8  # the toy checkpoints' hidden size
# GLM's dense-MTP gated MLP: the checkpoint's names and the ones GLM45Bridge (067f987) exports.
DENSE_MTP = {
    "model.layers.2.mlp.gate_proj.weight": "model.layers.2.mlp.linear_fc1.gate.weight",
    "model.layers.2.mlp.up_proj.weight": "model.layers.2.mlp.linear_fc1.up.weight",
}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nemo-occ")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture()
def glm_ref(tmp_path: Path) -> Path:
    make_reference_checkpoint(tmp_path / "ref", "glm4_moe")
    return tmp_path / "ref"


@pytest.fixture()
def export(glm_ref: Path, tmp_path: Path) -> Path:
    trained = train_like(_all_tensors(glm_ref))
    out = tmp_path / "export"
    write_hf_export(
        bridge_like_stream(trained, "glm4_moe"), read_reference(glm_ref), out, source="c", show_progress=False
    )
    return out


# ---- the manifest must be there ------------------------------------------------------------------------


def test_an_export_whose_manifest_was_deleted_fails(glm_ref, export, capsys):
    (export / MANIFEST_FILE).unlink()
    report = verify_export(export, glm_ref, raise_on_failure=False)
    assert not report.ok and report.manifest_problems
    assert f"no {MANIFEST_FILE}" in report.format() and "--no-manifest" in report.format()
    assert run(["verify-export", str(export), "--reference", str(glm_ref)]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_no_manifest_verifies_without_it_and_says_what_was_not_checked(glm_ref, export, capsys):
    (export / MANIFEST_FILE).unlink()
    assert run(["verify-export", str(export), "--reference", str(glm_ref), "--no-manifest"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out
    assert (
        "not read (--no-manifest): the per-tensor checksums, the training step and the source checkpoint were NOT checked"
        in out
    )


def test_no_manifest_does_not_read_a_manifest_that_is_there(glm_ref, export):
    """--no-manifest means what it says: even a damaged manifest is not read (the note says so)."""
    (export / MANIFEST_FILE).write_text("{ not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        verify_export(export, glm_ref)
    report = verify_export(export, glm_ref, manifest=ManifestCheck(required=False))
    assert report.ok and any("--no-manifest" in note for note in report.notes)


def test_an_unreadable_manifest_is_one_error_line(glm_ref, export, capsys):
    (export / MANIFEST_FILE).write_text("{ not json")
    assert run(["verify-export", str(export), "--reference", str(glm_ref)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nemo-occ: error:") and err.count("\n") == 1 and MANIFEST_FILE in err


def test_a_manifest_without_checksums_fails(glm_ref, export):
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    del manifest["checksums"]
    (export / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = verify_export(export, glm_ref, raise_on_failure=False)
    assert not report.ok
    assert report.manifest_problems == [
        f"{MANIFEST_FILE} records no checksums (written by an older nemo-occ): the tensors cannot be checked "
        "against what was exported (--no-manifest verifies without them, on purpose)"
    ]


def test_expect_step_needs_the_manifest(glm_ref, export, capsys):
    argv = ["verify-export", str(export), "--reference", str(glm_ref), "--no-manifest", "--expect-step", "3"]
    assert run(argv) == 2
    assert "--expect-step is checked against the manifest" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_expect_step_must_be_a_non_negative_integer(glm_ref, export, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        run(["verify-export", str(export), "--reference", str(glm_ref), "--expect-step", value])
    assert exit_info.value.code == 2 and "must be an integer >= 0" in capsys.readouterr().err


# ---- the training step ---------------------------------------------------------------------------------


def _nemo_rl_step(root: Path, step: int, total_steps: int | None = None) -> Path:
    """``<root>/step_<step>/policy/weights`` holding ``iter_0000000``, as NeMo-RL saves Megatron weights."""
    weights = make_megatron_folder(root / f"step_{step}" / "policy" / "weights", iterations=(0,))
    if total_steps is not None:
        (root / f"step_{step}" / "training_info.json").write_text(json.dumps({"total_steps": total_steps}))
    return weights


def test_the_step_comes_from_nemo_rls_step_folder_not_from_its_iteration_zero(tmp_path):
    weights = _nemo_rl_step(tmp_path, 200, total_steps=200)
    step = training_step_of(weights / "iter_0000000")
    assert step.step == 200 and str(tmp_path / "step_200") in step.read_from


def test_a_step_folder_that_disagrees_with_its_training_info_is_refused(tmp_path):
    weights = _nemo_rl_step(tmp_path, 200, total_steps=150)
    with pytest.raises(ValueError, match="total_steps=150, but its folder is step_200"):
        training_step_of(weights / "iter_0000000")


def test_outside_nemo_rl_the_iteration_is_the_step_and_iteration_zero_says_nothing(tmp_path):
    assert training_step_of(make_megatron_folder(tmp_path / "a", (30,)) / "iter_0000030").step == 30
    unknown = training_step_of(make_megatron_folder(tmp_path / "b", (0,)) / "iter_0000000")
    assert unknown.step is None and unknown.read_from.startswith("unknown")


def _export_via_cli(ref: Path, ckpt: Path, out: Path, monkeypatch) -> None:
    install_stand_in_bridge(monkeypatch, train_like(_all_tensors(ref)), "glm4_moe")
    argv = [
        "export",
        "--megatron-ckpt",
        str(ckpt),
        "--hf-model",
        str(ref),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert run(argv) == 0


def test_the_manifest_records_the_step_and_expect_step_checks_it(glm_ref, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hf"
    _export_via_cli(glm_ref, _nemo_rl_step(tmp_path / "results", 200), out, monkeypatch)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["training_step"] == 200
    assert manifest["source_checkpoint"] == str(tmp_path / "results/step_200/policy/weights/iter_0000000")
    capsys.readouterr()

    assert run(["verify-export", str(out), "--reference", str(glm_ref), "--expect-step", "200"]) == 0
    assert "exported from training step 200" in capsys.readouterr().out
    assert run(["verify-export", str(out), "--reference", str(glm_ref), "--expect-step", "150"]) == 1
    err = capsys.readouterr().err
    assert "expected training step 150, but the manifest records training step 200" in err
    assert "step_200/policy/weights/iter_0000000" in err  # the source checkpoint is named


def test_expect_step_fails_when_the_step_is_unknown(glm_ref, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hf"
    _export_via_cli(glm_ref, make_megatron_folder(tmp_path / "ckpt", (0,)), out, monkeypatch)
    assert json.loads((out / MANIFEST_FILE).read_text())["training_step"] is None
    capsys.readouterr()
    assert run(["verify-export", str(out), "--reference", str(glm_ref), "--expect-step", "0"]) == 1
    assert "expected training step 0, but the manifest records no training step" in capsys.readouterr().err


# ---- GLM45Bridge's names for a dense MTP layer's linear_fc1 ----------------------------------------------


@pytest.fixture()
def dense_mtp_ref(tmp_path: Path) -> Path:
    """The toy GLM reference with a dense gated MLP in its MTP layer (mlp.gate_proj/up_proj)."""
    ref = tmp_path / "dense-ref"
    make_reference_checkpoint(ref, "glm4_moe")
    gen = torch.Generator().manual_seed(7)
    added = {name: torch.randn(2 * H, H, generator=gen).to(torch.bfloat16) for name in DENSE_MTP}
    shard = load_file(ref / MTP_SHARD)
    save_file({**shard, **added}, str(ref / MTP_SHARD), metadata={"format": "pt"})
    index = json.loads((ref / INDEX).read_text())
    index["weight_map"].update(dict.fromkeys(added, MTP_SHARD))
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in added.values())
    (ref / INDEX).write_text(json.dumps(index))
    return ref


def _bridge_stream_with_the_naming_bug(trained: dict[str, torch.Tensor]):
    for name, tensor in bridge_like_stream(trained, "glm4_moe"):
        yield DENSE_MTP.get(name, name), tensor


def test_the_export_puts_back_the_names_glm45bridge_gets_wrong(dense_mtp_ref, tmp_path):
    trained = train_like(_all_tensors(dense_mtp_ref))
    out = tmp_path / "hf"
    result = write_hf_export(
        _bridge_stream_with_the_naming_bug(trained),
        read_reference(dense_mtp_ref),
        out,
        source="c",
        show_progress=False,
    )
    assert result.report.ok
    saved = _all_tensors(out)
    for right, wrong in DENSE_MTP.items():
        assert torch.equal(saved[right], trained[right]) and wrong not in saved
    renamed = [e for e in result.manifest["fixups"] if e["kind"] == "bridge_name"]
    assert [(e["name"], e["bridge_name"]) for e in renamed] == list(DENSE_MTP.items())


def _bridge_stream_dropping_the_dense_fc1(trained: dict[str, torch.Tensor]):
    """What GLM45Bridge 067f987 yields with the checkpoint's key list at hand: the two halves are left out."""
    for name, tensor in bridge_like_stream(trained, "glm4_moe"):
        if name not in DENSE_MTP:
            yield name, tensor


def test_the_export_rebuilds_the_dense_mtp_fc1_glm45bridge_drops(dense_mtp_ref, tmp_path):
    trained = train_like(_all_tensors(dense_mtp_ref))
    gate, up = (trained[name] for name in DENSE_MTP)
    fc1 = torch.cat([gate, up], dim=0).float()  # Megatron's linear_fc1 at TP=1: [gate; up]
    result = write_hf_export(
        _bridge_stream_dropping_the_dense_fc1(trained),
        read_reference(dense_mtp_ref),
        tmp_path / "hf",
        source="c",
        megatron_fc1={0: fc1},
        show_progress=False,
    )
    assert result.report.ok
    saved = _all_tensors(tmp_path / "hf")
    assert torch.equal(saved["model.layers.2.mlp.gate_proj.weight"], gate)
    assert torch.equal(saved["model.layers.2.mlp.up_proj.weight"], up)
    rebuilt = [e["name"] for e in result.manifest["fixups"] if e["kind"] == "dense_mtp_fc1"]
    assert rebuilt == list(DENSE_MTP)


def test_without_the_megatron_weight_the_dropped_halves_fail_the_export(dense_mtp_ref, tmp_path):
    from nemo_occ.export.verify import ExportVerificationError

    trained = train_like(_all_tensors(dense_mtp_ref))
    with pytest.raises(ExportVerificationError) as failure:
        write_hf_export(
            _bridge_stream_dropping_the_dense_fc1(trained),
            read_reference(dense_mtp_ref),
            tmp_path / "hf",
            source="c",
            show_progress=False,
        )
    assert failure.value.report.missing == sorted(DENSE_MTP)
    assert not (tmp_path / "hf").exists()


def test_the_dense_mtp_fc1_is_found_by_name_and_expert_fc1s_are_not():
    from nemo_occ.export.bridge_export import megatron_dense_fc1_weights

    def linear():
        return torch.nn.Linear(2, 4, bias=False)

    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.mlp.linear_fc1 = linear()
    layer.mlp.shared_experts = torch.nn.Module()
    layer.mlp.shared_experts.linear_fc1 = linear()
    mtp_layer = torch.nn.Module()
    mtp_layer.mtp_model_layer = layer
    model = torch.nn.Module()
    model.module = torch.nn.Module()  # Float16Module-like wrapper
    model.module.mtp = torch.nn.Module()
    model.module.mtp.layers = torch.nn.ModuleList([mtp_layer])
    found = megatron_dense_fc1_weights([model])
    assert list(found) == [0] and torch.equal(found[0], layer.mlp.linear_fc1.weight)


def test_verify_export_fails_an_export_that_carries_the_wrong_names(dense_mtp_ref, tmp_path, capsys):
    """An export written without the fix-up (by another tool, or before it): the names are caught."""
    trained = train_like(_all_tensors(dense_mtp_ref))
    out = tmp_path / "hf"
    write_hf_export(
        bridge_like_stream(trained, "glm4_moe"),
        read_reference(dense_mtp_ref),
        out,
        source="c",
        show_progress=False,
    )
    shard = load_file(out / MTP_SHARD)
    save_file(
        {DENSE_MTP.get(k, k): v for k, v in shard.items()}, str(out / MTP_SHARD), metadata={"format": "pt"}
    )
    index = json.loads((out / INDEX).read_text())
    index["weight_map"] = {DENSE_MTP.get(k, k): v for k, v in index["weight_map"].items()}
    (out / INDEX).write_text(json.dumps(index))
    (out / MANIFEST_FILE).unlink()  # as another tool would write it: no manifest

    assert run(["verify-export", str(out), "--reference", str(dense_mtp_ref), "--no-manifest"]) == 1
    err = capsys.readouterr().err
    for right, wrong in DENSE_MTP.items():
        assert f"- {right}  [MTP]" in err and f"- {wrong}  [MTP]" in err


def test_the_rename_is_only_done_where_the_reference_has_the_right_name(glm_ref, tmp_path):
    """The toy GLM reference has an MoE MTP layer: a Bridge name linear_fc1.gate stays unexpected."""
    trained = train_like(_all_tensors(glm_ref))
    stream = list(bridge_like_stream(trained, "glm4_moe"))
    stream.append(("model.layers.2.mlp.linear_fc1.gate.weight", torch.zeros(2 * H, H)))
    from nemo_occ.export.verify import ExportVerificationError

    with pytest.raises(ExportVerificationError) as failure:
        write_hf_export(
            iter(stream), read_reference(glm_ref), tmp_path / "hf", source="c", show_progress=False
        )
    assert failure.value.report.unexpected == ["model.layers.2.mlp.linear_fc1.gate.weight"]


# ---- disk space ----------------------------------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def _no_partial_left(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_disk_that_fills_up_before_a_shard_is_one_line_and_leaves_nothing(
    glm_ref, tmp_path, monkeypatch, capsys
):
    calls = []

    def disk_usage(path):  # room when the export starts (check_room), 1 KiB once the shards are written
        calls.append(path)
        return Usage(10**12, 0, 10**12 if len(calls) == 1 else 1024)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    ckpt = make_megatron_folder(tmp_path / "ckpt")
    install_stand_in_bridge(monkeypatch, train_like(_all_tensors(glm_ref)), "glm4_moe")
    out = tmp_path / "hf"
    argv = [
        "export",
        "--megatron-ckpt",
        str(ckpt),
        "--hf-model",
        str(glm_ref),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nemo-occ: error:") and err.count("\n") == 1, err
    assert "not enough disk space for shard model-0000" in err  # the first shard completed
    assert "has 1.0 KiB free" in err and "short)" in err and "Traceback" not in err
    assert len(calls) == 2  # checked before the first shard, which was then not written
    _no_partial_left(tmp_path, out)


def test_a_write_that_fails_anyway_is_an_os_error_and_leaves_nothing(glm_ref, tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a full disk leaves
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(writer, "save_file", full)
    out = tmp_path / "hf"
    stream = bridge_like_stream(train_like(_all_tensors(glm_ref)), "glm4_moe")
    with pytest.raises(OSError, match="No space left on device"):
        write_hf_export(stream, read_reference(glm_ref), out, source="c", show_progress=False)
    _no_partial_left(tmp_path, out)


def test_room_is_checked_before_the_model_is_loaded_with_the_shortfall(
    glm_ref, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12, 2**20))
    calls = install_stand_in_bridge(monkeypatch, {}, "glm4_moe")
    ckpt = make_megatron_folder(tmp_path / "ckpt")
    out = tmp_path / "hf"
    argv = ["export", "--megatron-ckpt", str(ckpt), "--hf-model", str(glm_ref), "--out", str(out)]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert f"not enough disk space for --out {out}" in err and "has 1.0 MiB free" in err
    assert "load_megatron_model" not in calls
