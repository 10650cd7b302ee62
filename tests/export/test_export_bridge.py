"""The Megatron-Bridge front end.

On CPU: the glue runs against a stand-in ``megatron.bridge`` whose methods have the real signatures
(read from Megatron-Bridge's ``AutoBridge``), so a wrong call fails here. With Megatron-Bridge
installed (marker ``megatron_bridge``): the real signatures and MTP mappings this code relies on.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from nemo_occ.export.bridge_export import export_megatron_to_hf, megatron_eh_proj_weights
from tests._export_stand_in import ToyMegatron, install_stand_in_bridge, make_megatron_folder
from tests._export_synthetic import make_reference_checkpoint, train_like


def test_eh_proj_weights_are_found_by_name_through_wrappers():
    w = torch.randn(4, 8)
    found = megatron_eh_proj_weights([ToyMegatron(w)])
    assert list(found) == [0] and torch.equal(found[0], w)


def test_export_glue_with_a_stand_in_bridge(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    trained = train_like(make_reference_checkpoint(ref, "mimo"))
    hf_w = trained["model.mtp_layers.0.input_proj.weight"]
    h = hf_w.shape[0]
    megatron_w = torch.cat([hf_w[:, h:], hf_w[:, :h]], dim=1).float()
    calls = install_stand_in_bridge(monkeypatch, trained, "mimo", eh_proj=megatron_w)
    # iteration 9 sorts after 10 as text, and "iter_best" is not a number: 10 is the newest
    ckpt = make_megatron_folder(tmp_path / "ckpt", iterations=(9, 10))
    (ckpt / "iter_best").mkdir()
    out = tmp_path / "hf"

    result = export_megatron_to_hf(ckpt, ref, out, trust_remote_code=True, show_progress=False)

    assert calls["from_hf_pretrained"] == (str(ref), {"trust_remote_code": True})
    assert calls["load_megatron_model"] == str(ckpt / "iter_0000010")
    assert calls["export_hf_weights"] == {"cpu": True, "show_progress": False}
    assert calls["backend"] == "gloo"
    assert result.report.ok
    saved = {}
    for shard in out.glob("*.safetensors"):
        saved.update(load_file(shard))
    assert torch.equal(saved["model.mtp_layers.0.input_proj.weight"], hf_w)
    manifest = json.loads((out / "nemo_occ_export.json").read_text())
    assert manifest["fixups"][0]["action"] == "swapped by nemo-occ"
    assert "megatron_bridge_version" in manifest
    assert manifest["megatron_iteration_dir"] == "iter_0000010"
    assert manifest["source_checkpoint"] == str((ckpt / "iter_0000010").absolute())


# ---- real Megatron-Bridge --------------------------------------------------------------------------


@pytest.mark.megatron_bridge
def test_real_bridge_has_the_interface_we_call():
    bridge = pytest.importorskip(
        "megatron.bridge", reason="Megatron-Bridge (with Transformer Engine) not installed"
    )
    from megatron.bridge.training.model_load_save import temporary_distributed_context  # noqa: F401

    auto = bridge.AutoBridge
    assert (
        "path" in inspect.signature(auto.from_hf_pretrained).parameters
    )  # trust_remote_code goes via **kwargs
    assert {"cpu", "show_progress"} <= set(inspect.signature(auto.export_hf_weights).parameters)
    assert "path" in inspect.signature(auto.load_megatron_model).parameters


@pytest.mark.megatron_bridge
def test_real_bridges_map_the_mtp_layers_we_expect():
    pytest.importorskip("megatron.bridge", reason="Megatron-Bridge (with Transformer Engine) not installed")
    from megatron.bridge.models.glm.glm45_bridge import GLM45Bridge

    source = inspect.getsource(GLM45Bridge)
    for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "num_nextn_predict_layers"):
        assert part in source, part
    mimo = pytest.importorskip(
        "megatron.bridge.models.mimo.mimo_bridge", reason="MimoBridge needs Megatron-Bridge >= 0.4"
    )
    source = inspect.getsource(mimo.MimoBridge)
    assert "model.mtp_layers.*.input_proj.weight" in source
