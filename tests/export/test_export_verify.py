"""verify-export against small synthetic safetensors checkpoints and index files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_occ.export.hf_checkpoint import read_local_checkpoint, read_reference
from nemo_occ.export.hf_export import MANIFEST_FILE, write_hf_export
from nemo_occ.export.verify import (
    ExportVerificationError,
    ManifestCheck,
    ValueLimits,
    compare_checkpoints,
    verify_export,
)
from tests._export_synthetic import bridge_like_stream, make_reference_checkpoint, train_like

INDEX = "model.safetensors.index.json"
MTP_SHARD = "model-00003-of-00003.safetensors"


@pytest.fixture()
def ref_and_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A toy GLM reference and a fresh nemo-occ export of a "trained" copy, to be broken by each test."""
    ref = tmp_path / "ref"
    trained = train_like(make_reference_checkpoint(ref, "glm4_moe"))
    export = tmp_path / "export"
    stream = bridge_like_stream(trained, "glm4_moe")
    write_hf_export(stream, read_reference(ref), export, source="ckpt", show_progress=False)
    return ref, export


def _rewrite_shard(folder: Path, shard: str, edit) -> None:
    tensors = load_file(folder / shard)
    edit(tensors)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})


def _edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def test_a_fresh_export_passes(ref_and_copy):
    ref, export = ref_and_copy
    report = verify_export(export, ref)
    assert report.ok and report.num_exported == report.num_reference == 25
    assert report.num_mtp_reference == 12  # counted by hand from the toy layout: layer 2 has 12 tensors
    assert "PASSED" in report.format() and not report.notes
    assert "MTP layer vs reference: relative change median" in report.format()


def test_a_plain_copy_of_the_reference_is_an_untrained_mtp_layer(ref_and_copy, tmp_path):
    ref, _ = ref_and_copy
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    no_manifest = ManifestCheck(required=False)
    report = verify_export(copy, ref, manifest=no_manifest, raise_on_failure=False)
    assert not report.ok and report.mtp_unchanged
    assert f"{MANIFEST_FILE} not read (--no-manifest)" in report.format()
    assert verify_export(copy, ref, limits=ValueLimits(allow_unchanged_mtp=True), manifest=no_manifest).ok


def test_missing_mtp_tensors_are_named_first(ref_and_copy):
    ref, export = ref_and_copy
    # layers.1 sorts before layers.2, so only MTP-first ordering puts it last
    dropped = [
        "model.layers.2.embed_tokens.weight",
        "model.layers.2.shared_head.head.weight",
        "model.layers.1.input_layernorm.weight",
    ]

    def drop(weight_map):
        for name in dropped:
            del weight_map[name]

    _edit_index(export, drop)
    _rewrite_shard(export, MTP_SHARD, lambda t: [t.pop(n) for n in dropped[:2]])
    _rewrite_shard(export, "model-00002-of-00003.safetensors", lambda t: t.pop(dropped[2]))
    with pytest.raises(ExportVerificationError) as info:
        verify_export(export, ref)
    report = info.value.report
    assert report.missing == dropped
    message = str(info.value)
    assert "3 tensors missing from the export (2 in MTP layers)" in message
    assert message.index("model.layers.2.embed_tokens.weight  [MTP]") < message.index(
        "model.layers.1.input_layernorm.weight"
    )


def test_unexpected_tensor_is_reported(ref_and_copy):
    ref, export = ref_and_copy
    extra = (
        "model.layers.2.mlp.linear_fc1.gate.weight"  # a name GLM45Bridge can produce that HF does not have
    )
    _rewrite_shard(export, MTP_SHARD, lambda t: t.__setitem__(extra, torch.zeros(2)))
    _edit_index(export, lambda w: w.__setitem__(extra, MTP_SHARD))
    report = verify_export(export, ref, raise_on_failure=False)
    assert not report.ok and report.unexpected == [extra] and not report.missing


def test_wrong_shape_and_wrong_dtype_are_reported(ref_and_copy):
    ref, export = ref_and_copy

    def edit(t):
        t["model.layers.2.eh_proj.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)  # reference [8, 16]
        t["model.layers.2.enorm.weight"] = t["model.layers.2.enorm.weight"].float()  # reference BF16

    _rewrite_shard(export, MTP_SHARD, edit)
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.shape_mismatches == [("model.layers.2.eh_proj.weight", (8, 8), (8, 16))]
    assert report.dtype_mismatches == [("model.layers.2.enorm.weight", "F32", "BF16")]
    assert "(8, 8) != reference (8, 16)" in report.format()


def test_shard_listed_in_index_but_absent(ref_and_copy):
    ref, export = ref_and_copy
    (export / MTP_SHARD).unlink()
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.missing_shards == [MTP_SHARD]
    assert not report.ok and f"- {MTP_SHARD}" in report.format()


def test_index_pointing_to_the_wrong_shard_and_unindexed_tensors(ref_and_copy):
    ref, export = ref_and_copy
    _edit_index(export, lambda w: w.__setitem__("model.norm.weight", "model-00001-of-00003.safetensors"))
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.misplaced == [("model.norm.weight", "model-00001-of-00003.safetensors")]
    assert report.unindexed == [("model.norm.weight", "model-00002-of-00003.safetensors")]


def test_stray_shard_not_in_index_is_reported(ref_and_copy):
    ref, export = ref_and_copy
    save_file({"model.layers.2.hidden": torch.zeros(1)}, str(export / "model-extra.safetensors"))
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.unindexed == [("model.layers.2.hidden", "model-extra.safetensors")]


@pytest.mark.parametrize("shards", ["one", "all"])
def test_incomplete_reference_is_an_error_naming_the_shard(ref_and_copy, tmp_path, shards):
    ref, export = ref_and_copy
    partial = tmp_path / "partial"
    shutil.copytree(ref, partial)
    for path in partial.glob("*.safetensors"):
        if shards == "all" or path.name == MTP_SHARD:
            path.unlink()
    # before the fix: the tensors of the absent shards were "not checked" and the export passed
    with pytest.raises(ValueError, match=f"incomplete: shard\\(s\\) .*{MTP_SHARD}"):
        verify_export(export, partial)


def test_single_file_checkpoint_without_index(tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mimo", "num_hidden_layers": 1}))
    save_file(
        {"a": torch.zeros(2), "model.mtp_layers.0.x": torch.zeros(3)}, str(folder / "model.safetensors")
    )
    info = read_local_checkpoint(folder)
    assert info.weight_map == {"a": "model.safetensors", "model.mtp_layers.0.x": "model.safetensors"}
    assert info.tensors["model.mtp_layers.0.x"].shape == (3,)


def test_compare_is_pure_over_descriptions(ref_and_copy):
    ref, export = ref_and_copy
    a, b = read_reference(ref), read_local_checkpoint(export)
    b.weight_map.pop("model.layers.2.hnorm.weight")
    report = compare_checkpoints(b, a)
    assert report.missing == ["model.layers.2.hnorm.weight"]
    assert report.unindexed == [("model.layers.2.hnorm.weight", MTP_SHARD)]


def test_long_lists_are_cut_but_counted(ref_and_copy):
    ref, export = ref_and_copy
    _edit_index(export, lambda w: [w.pop(n) for n in list(w)[:-1]])
    report = verify_export(export, ref, raise_on_failure=False)
    assert len(report.missing) == 24
    assert "... and 19 more" in report.format(limit=5)
    assert "more" not in report.format(limit=None).split("missing")[1].split("stored")[0]


@pytest.mark.parametrize(
    "make_bad, error, words",
    [
        (lambda p: None, FileNotFoundError, "is not a directory"),
        (lambda p: p.mkdir(), FileNotFoundError, r"neither model.safetensors.index.json nor"),
        (lambda p: (p.mkdir(), (p / INDEX).write_text("{not json")), ValueError, "not valid JSON"),
        (lambda p: (p.mkdir(), (p / INDEX).write_text('{"weight_map": {}}')), ValueError, "no 'weight_map'"),
        (
            lambda p: (p.mkdir(), (p / INDEX).write_text('{"weight_map": {"a": "../evil.safetensors"}}')),
            ValueError,
            "plain",
        ),
    ],
)
def test_unreadable_exports_raise_readable_errors(ref_and_copy, tmp_path, make_bad, error, words):
    ref, _ = ref_and_copy
    bad = tmp_path / "bad"
    make_bad(bad)
    with pytest.raises(error, match=words):
        verify_export(bad, ref)


def test_reference_that_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a Hub id"):
        read_reference(tmp_path / "nope")


def test_hub_reference_without_huggingface_hub_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now fails, installed or not
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        read_reference("zai-org/GLM-4.5-Air")


def test_hub_reference_reads_small_files_and_remote_headers_only(ref_and_copy, tmp_path, monkeypatch):
    """A stand-in huggingface_hub with the real shapes of SafetensorsRepoMetadata / TensorInfo."""
    import sys
    import types

    from safetensors import safe_open

    ref, export = ref_and_copy
    small = tmp_path / "hub_cache"
    small.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(ref / name, small / name)
    weight_map = json.loads((ref / INDEX).read_text())["weight_map"]
    files_metadata = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(ref / shard, framework="pt") as f:
            tensors = {
                k: types.SimpleNamespace(
                    dtype=f.get_slice(k).get_dtype(), shape=list(f.get_slice(k).get_shape())
                )
                for k in f.keys()
            }
        files_metadata[shard] = types.SimpleNamespace(metadata={"format": "pt"}, tensors=tensors)
    calls = {}

    def snapshot_download(repo_id, allow_patterns):
        calls["allow_patterns"] = allow_patterns
        return str(small)

    def get_safetensors_metadata(repo_id):
        return types.SimpleNamespace(sharded=True, weight_map=weight_map, files_metadata=files_metadata)

    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download, hub.get_safetensors_metadata = snapshot_download, get_safetensors_metadata
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)

    info = read_reference("zai-org/GLM-4.5-Air")
    assert not any(p.endswith(".safetensors") for p in calls["allow_patterns"])  # no weights downloaded
    assert [p.name for p in info.side_files] == ["config.json", "tokenizer_config.json"]
    report = verify_export(export, "zai-org/GLM-4.5-Air")
    assert report.ok and not report.mtp_changes  # the values are not at hand: said, not passed silently
    assert "MTP change against the reference not checked" in report.format()
    assert info.tensors["model.layers.2.eh_proj.weight"].shape == (8, 16)


def test_hub_errors_become_one_readable_message(monkeypatch):
    import sys
    import types

    def offline(**kwargs):
        raise OSError("network unreachable")

    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download, hub.get_safetensors_metadata = offline, offline
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    with pytest.raises(ValueError, match="network unreachable.*or pass a local checkpoint folder"):
        read_reference("zai-org/GLM-4.5-Air")


# ---- values, config and tokenizer files ----------------------------------------------------------


def _flip_low_bit(folder: Path, shard: str, name: str) -> None:
    """Flip the lowest mantissa bit of a tensor's first element in place (header untouched, still finite)."""
    path = folder / shard
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]
    data[start] ^= 1
    path.write_bytes(bytes(data))


def test_changed_bytes_fail_the_recorded_checksum(ref_and_copy):
    ref, export = ref_and_copy
    name = "model.layers.0.input_layernorm.weight"
    _flip_low_bit(export, "model-00001-of-00003.safetensors", name)
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.checksum_problems == [(name, "bytes differ from the checksum recorded at export")]
    assert not (report.non_finite or report.missing or report.dtype_mismatches)  # nothing else sees it
    assert f"1 tensors failing the checksums of {MANIFEST_FILE}" in report.format()


def test_manifest_and_export_must_list_the_same_tensors(ref_and_copy):
    ref, export = ref_and_copy
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    tensors = manifest["checksums"]["tensors"]
    tensors["model.layers.9.ghost.weight"] = tensors.pop("model.norm.weight")
    (export / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.checksum_problems == [
        ("model.layers.9.ghost.weight", "recorded in the manifest but not in the export"),
        ("model.norm.weight", "not recorded in the manifest"),
    ]


def test_unreadable_manifest_names_the_file(ref_and_copy):
    ref, export = ref_and_copy
    (export / MANIFEST_FILE).write_text('{"nemo_occ_version": "0.1", "checks')
    with pytest.raises(ValueError, match=f"{export / MANIFEST_FILE} is not valid JSON"):
        verify_export(export, ref)


def test_nan_written_into_a_shard_is_reported(ref_and_copy):
    ref, export = ref_and_copy

    def poison(t):
        t["model.layers.2.hnorm.weight"] = t["model.layers.2.hnorm.weight"].clone()
        t["model.layers.2.hnorm.weight"][3] = float("nan")

    _rewrite_shard(export, MTP_SHARD, poison)
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.non_finite == ["model.layers.2.hnorm.weight"]
    assert "model.layers.2.hnorm.weight  [MTP]" in report.format()


def test_alias_copy_that_differs_from_its_source_by_one_bit(ref_and_copy):
    ref, export = ref_and_copy
    _flip_low_bit(export, MTP_SHARD, "model.layers.2.shared_head.head.weight")
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.alias_mismatches == [("model.layers.2.shared_head.head.weight", "lm_head.weight")]


def test_swapped_eh_proj_halves_in_an_export_and_the_configurable_limit(ref_and_copy):
    ref, export = ref_and_copy

    def swap(t):
        t["model.layers.2.eh_proj.weight"] = torch.cat(
            t["model.layers.2.eh_proj.weight"].chunk(2, dim=1)[::-1], dim=1
        )

    _rewrite_shard(export, MTP_SHARD, swap)
    (export / MANIFEST_FILE).unlink()  # an export written by another tool: no checksums to fail
    no_manifest = ManifestCheck(required=False)
    report = verify_export(export, ref, manifest=no_manifest, raise_on_failure=False)
    ((name, change),) = report.mtp_too_far
    assert name == "model.layers.2.eh_proj.weight" and change > 1.0
    assert verify_export(export, ref, limits=ValueLimits(max_mtp_change=2.0), manifest=no_manifest).ok


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_nextn_predict_layers", 0),
        ("model_type", "glm4"),
        ("architectures", ["Glm4ForCausalLM"]),
        ("torch_dtype", "float32"),
    ],
)
def test_config_fields_must_match_the_reference(ref_and_copy, field, value):
    ref, export = ref_and_copy
    config = json.loads((export / "config.json").read_text())
    reference_value = config[field]
    (export / "config.json").write_text(json.dumps({**config, field: value}))
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.config_mismatches == [(field, value, reference_value)]


def test_missing_config_is_reported(ref_and_copy):
    ref, export = ref_and_copy
    (export / "config.json").unlink()
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.config_mismatches == [("config.json", None, "present")]
    assert "config.json is missing" in report.format()


@pytest.mark.parametrize("damage", ["missing", "differs from the reference"])
def test_tokenizer_files_must_be_there_unchanged(ref_and_copy, damage):
    ref, export = ref_and_copy
    if damage == "missing":
        (export / "tokenizer_config.json").unlink()
    else:
        (export / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (export / "generation_config.json").unlink()  # not a tokenizer file: not required
    report = verify_export(export, ref, raise_on_failure=False)
    assert report.side_file_problems == [("tokenizer_config.json", damage)]


@pytest.mark.parametrize("where", ["export", "reference"])
@pytest.mark.parametrize("damage", ["corrupt header", "truncated"])
def test_unreadable_shard_names_the_file(ref_and_copy, where, damage):
    ref, export = ref_and_copy
    path = (export if where == "export" else ref) / MTP_SHARD
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"#" + data[9:] if damage == "corrupt header" else data[:-7])
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
        verify_export(export, ref)
