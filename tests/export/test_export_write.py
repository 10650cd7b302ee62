"""Shard writer, atomic output folder and the Bridge-free export pipeline on toy GLM/MiMo checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nemo_occ.atomic_io import atomic_directory
from nemo_occ.export.hf_checkpoint import read_reference
from nemo_occ.export.hf_export import MANIFEST_FILE, write_hf_export
from nemo_occ.export.verify import ExportVerificationError, ValueLimits
from nemo_occ.export.writer import EXTRA_SHARD, ShardedSafetensorsWriter
from tests._export_stand_in import start_stalled_export
from tests._export_synthetic import GLM_ALIASES, bridge_like_stream, make_reference_checkpoint, train_like

INDEX = "model.safetensors.index.json"
MTP_SHARD = "model-00003-of-00003.safetensors"


@pytest.fixture()
def glm(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A toy GLM reference folder, its tensors, and a "trained" version of them to export."""
    ref = tmp_path / "ref"
    tensors = make_reference_checkpoint(ref, "glm4_moe")
    return ref, tensors, train_like(tensors)


def _export(stream, ref: Path, out: Path, **kwargs):
    return write_hf_export(stream, read_reference(ref), out, source="ckpt", show_progress=False, **kwargs)


def _must_not_run():
    raise AssertionError("stream consumed")
    yield


def _load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


# ---- writer -----------------------------------------------------------------------------------


def test_writer_follows_the_layout_and_counts_bytes(tmp_path):
    layout = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16), "c": torch.arange(5)}
    writer = ShardedSafetensorsWriter(tmp_path, layout)
    writer.add("c", tensors["c"])
    assert (tmp_path / "s2.safetensors").exists() and not (tmp_path / "s1.safetensors").exists()  # streamed
    writer.add("a", tensors["a"])
    writer.add("b", tensors["b"])
    writer.add("zzz", torch.ones(1))  # not in the layout
    weight_map = writer.close()
    assert weight_map == {**layout, "zzz": EXTRA_SHARD}
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == weight_map
    assert index["metadata"]["total_size"] == 6 * 4 + 4 * 2 + 5 * 8 + 1 * 4  # by hand: float32, bf16, int64
    for name, tensor in tensors.items():
        with safe_open(tmp_path / layout[name], framework="pt") as f:
            assert torch.equal(f.get_tensor(name), tensor)
            assert f.metadata() == {"format": "pt"}


def test_writer_saves_tensors_sharing_memory_in_one_shard(tmp_path):
    fused = torch.arange(12.0).reshape(6, 2)
    shared = {
        "whole": fused,
        "overlapping_view": fused[2:4],  # a view of a buffer also saved whole
        "alias": fused,  # the same tensor under a second name
    }
    writer = ShardedSafetensorsWriter(tmp_path, dict.fromkeys(shared, "s.safetensors"))
    for name, tensor in shared.items():
        writer.add(name, tensor)
    writer.close()
    saved = load_file(tmp_path / "s.safetensors")
    for name, tensor in shared.items():
        assert torch.equal(saved[name], tensor), name


def test_writer_rejects_duplicates_and_non_tensors(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, {"a": "s.safetensors", "b": "s.safetensors"})
    writer.add("a", torch.ones(1))
    with pytest.raises(ValueError, match="produced twice"):
        writer.add("a", torch.ones(1))
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        writer.add("b", [1.0])


# ---- atomic output folder -------------------------------------------------------------------------


def test_crash_mid_write_leaves_no_output_and_no_partial_files(tmp_path):
    ref = tmp_path / "ref"
    tensors = make_reference_checkpoint(ref, "glm4_moe")
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "glm"

    def crashing_stream():
        for i, item in enumerate(bridge_like_stream(tensors, "glm4_moe")):
            if i == 15:  # shard 1 is complete and written by now
                raise RuntimeError("node lost")
            yield item

    with pytest.raises(RuntimeError, match="node lost"):
        write_hf_export(crashing_stream(), read_reference(ref), out, source="ckpt", show_progress=False)
    assert not out.exists()
    assert os.listdir(parent) == []


def test_existing_output_is_refused_before_the_stream_is_touched(glm, tmp_path):
    ref, _, _ = glm
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _export(_must_not_run(), ref, out)
    assert (out / "keep.txt").read_text() == "previous export"


def test_overwrite_replaces_an_earlier_export_only_after_success(glm, tmp_path):
    ref, _, trained = glm
    out = tmp_path / "out"
    _export(bridge_like_stream(train_like(trained, seed=5), "glm4_moe"), ref, out)
    earlier = (out / MANIFEST_FILE).read_text()
    broken = (
        item for item in bridge_like_stream(trained, "glm4_moe") if item[0] != "model.layers.2.hnorm.weight"
    )
    with pytest.raises(ExportVerificationError):
        _export(broken, ref, out, overwrite=True)
    assert (out / MANIFEST_FILE).read_text() == earlier  # failed export: old one untouched
    _export(bridge_like_stream(trained, "glm4_moe"), ref, out, overwrite=True)
    assert (out / MANIFEST_FILE).read_text() != earlier
    assert torch.equal(_load_all(out)["model.layers.2.hnorm.weight"], trained["model.layers.2.hnorm.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no temp or backup left behind


def test_overwrite_refuses_a_folder_that_is_not_an_earlier_export(glm, tmp_path):
    ref, _, _ = glm
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("someone's data")
    with pytest.raises(FileExistsError, match="only replaces an earlier nemo-occ export"):
        _export(_must_not_run(), ref, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "someone's data"


def test_overwrite_accepts_an_empty_folder(glm, tmp_path):
    ref, _, trained = glm
    (tmp_path / "out").mkdir()
    _export(bridge_like_stream(trained, "glm4_moe"), ref, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()


@pytest.mark.parametrize("where", ["reference", "inside the reference", "symlink to the reference"])
def test_out_may_not_be_or_lie_inside_the_reference_even_with_overwrite(glm, tmp_path, where):
    ref, _, _ = glm
    before = sorted((p.name, p.stat().st_size) for p in ref.iterdir())
    if where == "reference":
        out = ref
    elif where == "inside the reference":
        out = ref / "export"
    else:
        out = tmp_path / "link"
        out.symlink_to(ref)
    with pytest.raises(ValueError, match="--hf-model checkpoint"):
        _export(_must_not_run(), ref, out, overwrite=True)
    assert sorted((p.name, p.stat().st_size) for p in ref.iterdir()) == before


def test_out_may_not_contain_the_reference(glm, tmp_path):
    ref, _, _ = glm
    with pytest.raises(ValueError, match="contains the --hf-model checkpoint"):
        _export(_must_not_run(), ref, tmp_path, overwrite=True)
    assert (ref / INDEX).is_file()


def test_incomplete_reference_is_refused_naming_the_shard(glm, tmp_path):
    ref, _, _ = glm
    (ref / MTP_SHARD).unlink()
    # before the fix: the MTP tensors had no reference dtype, stayed float32 and the export "passed"
    with pytest.raises(ValueError, match=f"shard\\(s\\) {MTP_SHARD} listed in its"):
        _export(_must_not_run(), ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_atomic_directory_gives_usual_permissions(tmp_path):
    with atomic_directory(tmp_path / "o") as tmp:
        (tmp / "f").write_text("x")
        os.chmod(tmp / "f", 0o600)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "o" / "f").stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_that_fails_leaves_the_target_no_temporary_file_and_no_open_descriptor(
    tmp_path, monkeypatch
):
    from nemo_occ import atomic_io

    target = tmp_path / "state.pt"
    target.write_bytes(b"before")
    fds = set(os.listdir("/proc/self/fd"))

    def fchmod_refused(fd, mode):
        raise PermissionError("chmod not allowed here")

    monkeypatch.setattr(atomic_io.os, "fchmod", fchmod_refused)
    with pytest.raises(PermissionError):
        atomic_io.atomic_write(target, lambda f: f.write(b"after"))
    assert target.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert set(os.listdir("/proc/self/fd")) == fds


# ---- whole pipeline -------------------------------------------------------------------------------


def test_glm_export_adds_aliases_equal_to_embedding_and_head(glm, tmp_path):
    ref, _, tensors = glm
    out = tmp_path / "out"
    result = write_hf_export(
        bridge_like_stream(tensors, "glm4_moe"),
        read_reference(ref),
        out,
        source="/ckpt/iter_10",
        show_progress=False,
    )
    saved = _load_all(out)
    assert set(saved) == set(tensors)
    assert torch.equal(saved["model.layers.2.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(saved["model.layers.2.shared_head.head.weight"], tensors["lm_head.weight"])
    for name, tensor in tensors.items():  # the fp32 stream was cast back to each reference dtype exactly
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    # shard layout copied from the reference index
    assert (
        json.loads((out / INDEX).read_text())["weight_map"]
        == json.loads((ref / INDEX).read_text())["weight_map"]
    )
    for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / side).read_text() == (ref / side).read_text()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest == result.manifest
    assert manifest["num_mtp_tensors"] == 12 and manifest["source_checkpoint"] == "/ckpt/iter_10"
    assert {e["name"]: e["action"] for e in manifest["fixups"]} == dict.fromkeys(
        GLM_ALIASES, "added by nemo-occ"
    )
    assert manifest["dtype_casts"] == {"torch.float32 -> torch.bfloat16": 23}  # 25 minus the two F32 biases
    assert result.report.ok and len(result.report.mtp_changes) == 10  # 12 MTP tensors minus the 2 copies


def test_glm_export_without_mtp_layer_fails_loudly_and_writes_nothing(tmp_path):
    ref = tmp_path / "ref"
    tensors = make_reference_checkpoint(ref, "glm4_moe")
    no_mtp = (
        (n, t) for n, t in bridge_like_stream(tensors, "glm4_moe") if not n.startswith("model.layers.2.")
    )
    out = tmp_path / "out"
    with pytest.raises(ExportVerificationError) as info:
        write_hf_export(no_mtp, read_reference(ref), out, source="ckpt", show_progress=False)
    assert not out.exists()
    report = info.value.report
    # the two aliases are still copied from the embedding and head; the other 10 MTP tensors are missing
    assert len(report.missing) == 10 and all(n.startswith("model.layers.2.") for n in report.missing)
    assert not set(GLM_ALIASES) & set(report.missing)
    assert "10 tensors missing from the export (10 in MTP layers)" in str(info.value)
    assert "produced no MTP tensor at all" in str(info.value)
    assert f"{out} (not written)" in str(info.value)


@pytest.mark.parametrize("bridge_swaps", [True, False])
def test_mimo_export_gets_hf_input_proj_whatever_the_bridge_does(tmp_path, bridge_swaps):
    ref = tmp_path / "ref"
    tensors = train_like(make_reference_checkpoint(ref, "mimo"))
    hf_w = tensors["model.mtp_layers.0.input_proj.weight"]  # [H, 2H], halves [hidden, emb]
    h = hf_w.shape[0]
    megatron_w = torch.cat([hf_w[:, h:], hf_w[:, :h]], dim=1)  # halves [emb, hidden]
    out = tmp_path / "out"
    result = write_hf_export(
        bridge_like_stream(tensors, "mimo", swap_input_proj=bridge_swaps),
        read_reference(ref),
        out,
        source="ckpt",
        megatron_eh_proj={0: megatron_w},
        show_progress=False,
    )
    assert torch.equal(_load_all(out)["model.mtp_layers.0.input_proj.weight"], hf_w)
    (entry,) = result.manifest["fixups"]
    assert entry["action"] == (
        "already swapped by Megatron-Bridge" if bridge_swaps else "swapped by nemo-occ"
    )


# ---- values: checksums, finiteness, MTP change ---------------------------------------------------


def _raw_tensor_bytes(shard: Path) -> dict[str, bytes]:
    """Each tensor's stored bytes, read by hand from the format (u64 little-endian header length, JSON
    header with per-tensor ``data_offsets`` into the data that follows): an independent reading."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {
        name: data[8 + n + meta["data_offsets"][0] : 8 + n + meta["data_offsets"][1]]
        for name, meta in header.items()
    }


def test_manifest_records_the_sha256_of_each_tensors_stored_bytes(glm, tmp_path):
    ref, _, trained = glm
    out = tmp_path / "out"
    _export(bridge_like_stream(trained, "glm4_moe"), ref, out)
    raw: dict[str, bytes] = {}
    for shard in out.glob("*.safetensors"):
        raw.update(_raw_tensor_bytes(shard))
    checksums = json.loads((out / MANIFEST_FILE).read_text())["checksums"]
    assert len(raw) == 25
    assert checksums["tensors"] == {name: hashlib.sha256(b).hexdigest() for name, b in raw.items()}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_tensor_fails_the_export(glm, tmp_path, value):
    ref, _, trained = glm
    bad = trained["model.layers.1.mlp.gate.weight"].clone()
    bad[0, 0] = value
    stream = bridge_like_stream({**trained, "model.layers.1.mlp.gate.weight": bad}, "glm4_moe")
    with pytest.raises(ExportVerificationError) as info:
        _export(stream, ref, tmp_path / "out")
    assert info.value.report.non_finite == ["model.layers.1.mlp.gate.weight"]
    assert "1 tensors with NaN or inf values" in str(info.value)
    assert not (tmp_path / "out").exists()


def _relative_change(new: torch.Tensor, ref: torch.Tensor) -> float:
    """||new - ref|| / ||ref|| over Python floats, element by element."""
    pairs = list(zip(new.flatten().tolist(), ref.flatten().tolist(), strict=True))
    return (sum((a - b) ** 2 for a, b in pairs) / sum(b * b for _, b in pairs)) ** 0.5


def _damage(trained, kind) -> tuple[dict, list[str]]:
    """A damaged copy of ``trained`` and the MTP tensors a check must flag."""
    damaged = dict(trained)
    if kind == "swapped eh_proj halves":
        w = trained["model.layers.2.eh_proj.weight"]
        damaged["model.layers.2.eh_proj.weight"] = torch.cat(w.chunk(2, dim=1)[::-1], dim=1)
        return damaged, ["model.layers.2.eh_proj.weight"]
    if kind == "wrong tensor":  # layer 1's attention where layer 2's belongs
        damaged["model.layers.2.self_attn.q_proj.weight"] = trained["model.layers.1.self_attn.q_proj.weight"]
        return damaged, ["model.layers.2.self_attn.q_proj.weight"]
    assert kind == "zeroed MTP layer"
    zeroed = [n for n in trained if n.startswith("model.layers.2.") and n not in GLM_ALIASES]
    damaged.update({n: torch.zeros_like(trained[n]) for n in zeroed})
    return damaged, zeroed


@pytest.mark.parametrize("kind", ["swapped eh_proj halves", "wrong tensor", "zeroed MTP layer"])
def test_a_damaged_mtp_layer_fails_the_export_with_its_relative_change(glm, tmp_path, kind):
    ref, reference, trained = glm
    damaged, flagged = _damage(trained, kind)
    with pytest.raises(ExportVerificationError) as info:
        _export(bridge_like_stream(damaged, "glm4_moe"), ref, tmp_path / "out")
    report = info.value.report
    expected = {
        n: _relative_change(damaged[n].to(reference[n].dtype).double(), reference[n].double())
        for n in flagged
    }
    assert dict(report.mtp_too_far) == pytest.approx(expected)
    assert all(r > 0.5 for r in expected.values())
    assert "raise --max-mtp-change" in str(info.value) and not (tmp_path / "out").exists()


def test_an_untrained_mtp_layer_fails_unless_allowed(glm, tmp_path):
    ref, reference, trained = glm
    # the MTP layer as the reference ships it (the stream leaves out the copies of embedding and head)
    mtp_as_shipped = {n: (reference[n] if n.startswith("model.layers.2.") else t) for n, t in trained.items()}
    with pytest.raises(ExportVerificationError, match="--allow-unchanged-mtp") as info:
        _export(bridge_like_stream(mtp_as_shipped, "glm4_moe"), ref, tmp_path / "out")
    assert info.value.report.mtp_unchanged and not info.value.report.mtp_too_far
    result = _export(
        bridge_like_stream(mtp_as_shipped, "glm4_moe"),
        ref,
        tmp_path / "out",
        limits=ValueLimits(allow_unchanged_mtp=True),
    )
    assert result.report.ok and set(result.report.mtp_changes.values()) == {0.0}
    assert result.manifest["verification"]["mtp_change_limits"]["allow_unchanged"] is True


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_value_limits_reject_a_maximum_that_admits_nothing_or_everything(bad):
    with pytest.raises(ValueError, match="max_mtp_change"):
        ValueLimits(max_mtp_change=bad)


# ---- SIGTERM (Slurm's time limit) -----------------------------------------------------------------


def test_sigterm_removes_the_partial_folder_exits_143_and_restores_the_handler(glm, tmp_path):
    ref, _, trained = glm
    parent = tmp_path / "exports"
    parent.mkdir()
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:

        def stream():
            for i, item in enumerate(bridge_like_stream(trained, "glm4_moe")):
                if i == 15:  # shard 1 is written by now
                    assert [p.name.startswith(".glm.partial-") for p in parent.iterdir()] == [True]
                    os.kill(os.getpid(), signal.SIGTERM)
                yield item

        with pytest.raises(SystemExit) as info:
            _export(stream(), ref, parent / "glm")
        assert info.value.code == 128 + signal.SIGTERM
        assert os.listdir(parent) == [] and received == []
        os.kill(os.getpid(), signal.SIGTERM)  # the handler from before the export is back
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_from_outside_leaves_no_partial_folder(tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    child = start_stalled_export(tmp_path / "ref", exports / "glm")
    try:
        assert len(os.listdir(exports)) == 1  # the partial folder
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert os.listdir(exports) == []
    assert "Traceback" not in child.stderr.read()
