"""``nemo-occ export`` against the real Megatron-Bridge, on a CPU (marker ``megatron_bridge``).

Run by ``scripts/bridge_check.sh`` (Bridge and megatron-core from their checkouts, no Transformer
Engine). For tiny GLM-4.5-Air-shaped (MoE trunk and MoE MTP layer), GLM with a dense MTP layer, and
MiMo-shaped checkpoints, each built here with transformers, at tensor-parallel sizes 1 and 2 (gloo):

1. HF -> Megatron with Bridge (local spec), and Megatron's logits equal HF's;
2. Bridge's Megatron checkpoint -> ``nemo-occ export`` -> ``nemo-occ verify-export``, and every tensor
   of the export bit-identical to the HF checkpoint it came from, MTP layer included (the model was
   not trained, so the round trip must return the same values: ``--allow-unchanged-mtp``).

Each gap of Bridge these tests patch is a fixture that first asserts the gap is still there: when
upstream fixes one, its fixture fails, saying which patch to remove. GLM45Bridge's wrong names for a
dense MTP layer's ``linear_fc1`` are patched only for HF -> Megatron (so that the Megatron model holds
the checkpoint's values); ``nemo-occ export`` runs on the unpatched mapping and must repair its export.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.megatron_bridge, pytest.mark.slow]
pytest.importorskip("megatron.bridge", reason="needs Megatron-Bridge (scripts/bridge_check.sh builds it)")
pytest.importorskip("transformers", reason="needs transformers")

from safetensors.torch import load_file  # noqa: E402

from nemo_occ.export import cli  # noqa: E402
from nemo_occ.export.manifest import MANIFEST_FILE  # noqa: E402
from tests._bridge_real import (  # noqa: E402
    GLMDenseMTPNames,
    GLMLocalExperts,
    MimoLocalMTPNorms,
    MTPSpecHardCodesTE,
    build_and_save,
    make_reference,
    patch_all_gaps,
)
from tests._megatron_dist import run_ranks  # noqa: E402

# |Megatron - HF| logits in FP32 (logits of size ~1): summation order differs, nothing else may.
LOGITS_ATOL = 1e-5
MODELS = ("glm", "glm-dense-mtp", "mimo")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nemo-occ")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    return {model: make_reference(root / model, model) for model in MODELS}


def _gap_still_there(gap, present: bool) -> None:
    if not present:
        pytest.fail(
            f"Megatron-Bridge no longer has the gap '{gap.name}' ({gap.upstream}): remove its patch "
            f"({gap.__name__} in tests/_bridge_real.py) and its fixture."
        )


# One fixture per gap of Bridge: each asserts that its gap is still there, so it fails once fixed upstream.


@pytest.fixture()
def gap_mtp_spec_hard_codes_te():
    _gap_still_there(MTPSpecHardCodesTE, MTPSpecHardCodesTE.present())


@pytest.fixture()
def gap_glm_local_experts(references):
    _gap_still_there(GLMLocalExperts, GLMLocalExperts.present(references["glm"].path))


@pytest.fixture()
def gap_glm_dense_mtp_names(references):
    _gap_still_there(GLMDenseMTPNames, GLMDenseMTPNames.present(references["glm-dense-mtp"].path))


@pytest.fixture()
def gap_mimo_local_mtp_norms(references):
    _gap_still_there(MimoLocalMTPNorms, MimoLocalMTPNorms.present(references["mimo"].path))


GAPS = {
    "glm": ("gap_mtp_spec_hard_codes_te", "gap_glm_local_experts"),
    "glm-dense-mtp": ("gap_mtp_spec_hard_codes_te", "gap_glm_local_experts", "gap_glm_dense_mtp_names"),
    "mimo": ("gap_mtp_spec_hard_codes_te", "gap_mimo_local_mtp_norms"),
}


@pytest.fixture()
def patched_bridge(request, references, monkeypatch):
    """The reference of one model, with the gaps of Bridge its conversion meets asserted, then patched here."""
    model = request.param
    for gap in GAPS[model]:
        request.getfixturevalue(gap)
    patch_all_gaps(model, monkeypatch)
    return references[model]


@pytest.mark.parametrize(
    "tensor_parallel", [1, pytest.param(2, marks=pytest.mark.distributed)], ids=["tp1", "tp2"]
)
@pytest.mark.parametrize("patched_bridge", MODELS, indirect=True)
def test_hf_to_megatron_to_nemo_occ_export_round_trip(
    patched_bridge, tensor_parallel, tmp_path, record_property
):
    from nemo_occ.lab.cpu_compat import cpu_compat

    reference = patched_bridge
    checkpoint, ranks = tmp_path / "megatron", tmp_path / "ranks"
    ranks.mkdir()
    run_ranks(build_and_save, tensor_parallel, reference, checkpoint, ranks, timeout_s=600.0)

    # 1. HF -> Megatron: every rank's gathered logits equal HF's
    results = [torch.load(ranks / f"rank{r}.pt") for r in range(tensor_parallel)]
    worst = max(result["max_abs_diff"] for result in results)
    assert worst <= LOGITS_ATOL, f"Megatron logits differ from HF's by {worst:.3g}"
    assert any(".mtp.layers.0." in f".{name}" for name in results[0]["names"]), "no MTP layer was built"

    # 2. Megatron checkpoint -> nemo-occ export -> verify-export, in this process (gaps patched here too)
    out = tmp_path / "hf-export"
    argv = [
        "export",
        "--megatron-ckpt",
        str(checkpoint),
        "--hf-model",
        str(reference.path),
        "--out",
        str(out),
    ]
    argv += ["--no-progress", "--allow-unchanged-mtp"]
    if reference.trust_remote_code:
        argv.append("--trust-remote-code")
    with cpu_compat():
        assert _run(argv) == 0
    verify = ["verify-export", str(out), "--reference", str(reference.path), "--allow-unchanged-mtp"]
    assert _run(verify) == 0

    exported, original = _tensors(out), _tensors(reference.path)
    assert sorted(exported) == sorted(original)
    different = [name for name in original if not torch.equal(exported[name], original[name])]
    assert different == [], f"{len(different)} tensors differ after the round trip: {different[:5]}"

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    fixups = {(entry["kind"], entry["action"]) for entry in manifest["fixups"]}
    rebuilt = sorted(e["name"] for e in manifest["fixups"] if e["kind"] in ("dense_mtp_fc1", "bridge_name"))
    if reference.model_type == "glm-dense-mtp":  # Bridge drops the dense MTP fc1 (wrong names): rebuilt here
        assert rebuilt == ["model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    else:
        assert rebuilt == []
    if reference.model_type.startswith("glm"):  # GLM45Bridge has no mapping for the two MTP copies
        assert ("alias", "added by nemo-occ") in fixups
    else:  # MiMo: whichever side swaps input_proj's halves, the value came back bit-exact above
        assert {kind for kind, _ in fixups} == {"input_proj_halves"}

    num_mtp = manifest["num_mtp_tensors"]
    assert num_mtp == reference.num_mtp_tensors
    for key, value in {
        "tensors": len(original),
        "mtp_tensors": num_mtp,
        "tensors_equal": len(original) - len(different),
        "rebuilt_by_nemo_occ": len(rebuilt),
        "logits_max_abs_diff": f"{worst:.2g}",
    }.items():
        record_property(key, value)


@pytest.mark.parametrize(
    "gap, reference",
    [
        (MTPSpecHardCodesTE, None),
        (GLMLocalExperts, "glm"),
        (GLMDenseMTPNames, "glm-dense-mtp"),
        (MimoLocalMTPNorms, "mimo"),
    ],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_each_gap_check_sees_a_fixed_bridge_as_fixed(gap, reference, references, monkeypatch):
    """A gap fixture can fail: with its patch applied (Bridge as if fixed upstream), ``present`` is False."""
    args = () if reference is None else (references[reference].path,)
    assert gap.present(*args)
    gap.patch(monkeypatch)
    assert not gap.present(*args)
