"""Shard writer, atomic output folder and the Bridge-free export pipeline on toy GLM/MiMo checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nemo_occ.export.atomic import atomic_directory
from nemo_occ.export.checkpoint import read_reference
from nemo_occ.export.hf_export import MANIFEST_FILE, write_hf_export
from nemo_occ.export.synthetic import GLM_ALIASES, bridge_like_stream, make_reference_checkpoint
from nemo_occ.export.verify import ExportVerificationError
from nemo_occ.export.writer import EXTRA_SHARD, ShardedSafetensorsWriter

INDEX = "model.safetensors.index.json"


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


def test_existing_output_is_refused_before_the_stream_is_touched(tmp_path):
    ref = tmp_path / "ref"
    make_reference_checkpoint(ref, "glm4_moe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")

    def must_not_run():
        raise AssertionError("stream consumed")
        yield

    with pytest.raises(FileExistsError, match="--overwrite"):
        write_hf_export(must_not_run(), read_reference(ref), out, source="ckpt", show_progress=False)
    assert (out / "keep.txt").read_text() == "previous export"


def test_overwrite_replaces_only_after_success(tmp_path):
    ref = tmp_path / "ref"
    tensors = make_reference_checkpoint(ref, "glm4_moe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    broken = (
        item for item in bridge_like_stream(tensors, "glm4_moe") if item[0] != "model.layers.2.hnorm.weight"
    )
    with pytest.raises(ExportVerificationError):
        write_hf_export(broken, read_reference(ref), out, source="ckpt", overwrite=True, show_progress=False)
    assert (out / "keep.txt").read_text() == "previous export"  # failed export: old one untouched
    write_hf_export(
        bridge_like_stream(tensors, "glm4_moe"), read_reference(ref), out, source="c", overwrite=True
    )
    assert not (out / "keep.txt").exists() and (out / MANIFEST_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no temp or backup left behind


def test_atomic_directory_gives_usual_permissions(tmp_path):
    with atomic_directory(tmp_path / "o") as tmp:
        (tmp / "f").write_text("x")
        os.chmod(tmp / "f", 0o600)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "o" / "f").stat().st_mode & 0o777 == 0o666 & ~mask


# ---- whole pipeline -------------------------------------------------------------------------------


def test_glm_export_adds_aliases_equal_to_embedding_and_head(tmp_path):
    ref = tmp_path / "ref"
    tensors = make_reference_checkpoint(ref, "glm4_moe")
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
    tensors = make_reference_checkpoint(ref, "mimo")
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
