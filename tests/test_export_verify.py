"""verify-export against small synthetic safetensors checkpoints and index files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_occ.export.checkpoint import read_local_checkpoint, read_reference
from nemo_occ.export.synthetic import make_reference_checkpoint
from nemo_occ.export.verify import ExportVerificationError, compare_checkpoints, verify_export

INDEX = "model.safetensors.index.json"
MTP_SHARD = "model-00003-of-00003.safetensors"


@pytest.fixture()
def ref_and_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A toy GLM reference and an identical 'export' of it, to be broken by each test."""
    ref = tmp_path / "ref"
    make_reference_checkpoint(ref, "glm4_moe")
    export = tmp_path / "export"
    shutil.copytree(ref, export)
    return ref, export


def _rewrite_shard(folder: Path, shard: str, edit) -> None:
    tensors = load_file(folder / shard)
    edit(tensors)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})


def _edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def test_identical_copy_passes(ref_and_copy):
    ref, export = ref_and_copy
    report = verify_export(export, ref)
    assert report.ok and report.num_exported == report.num_reference == 25
    assert report.num_mtp_reference == 12  # counted by hand from the toy layout: layer 2 has 12 tensors
    assert "PASSED" in report.format()


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


def test_reference_without_shards_checks_key_set_and_says_what_it_skipped(ref_and_copy, tmp_path):
    ref, export = ref_and_copy
    index_only = tmp_path / "index_only"
    index_only.mkdir()
    for name in (INDEX, "config.json"):
        shutil.copy(ref / name, index_only / name)
    report = verify_export(export, index_only)
    assert report.ok and len(report.unchecked) == 25
    assert "shape/dtype not checked for 25 tensors" in report.format()


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
    assert verify_export(export, "zai-org/GLM-4.5-Air").ok
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
