"""The Megatron-Bridge front end.

On CPU: the glue runs against a stand-in ``megatron.bridge`` whose methods have the real signatures
(read from Megatron-Bridge's ``AutoBridge``), so a wrong call fails here. With Megatron-Bridge
installed (marker ``megatron_bridge``): the real signatures and MTP mappings this code relies on.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from nemo_occ.export.bridge_export import export_megatron_to_hf, megatron_eh_proj_weights
from nemo_occ.export.synthetic import bridge_like_stream, make_reference_checkpoint


class _MTPLayer(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.eh_proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.eh_proj.weight.copy_(weight)


class _ToyMegatron(torch.nn.Module):
    """Holds ``module.mtp.layers.0.eh_proj.weight`` like a Float16Module-wrapped GPTModel."""

    def __init__(self, eh_proj: torch.Tensor):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.mtp = torch.nn.Module()
        self.module.mtp.layers = torch.nn.ModuleList([_MTPLayer(eh_proj)])
        self.module.output_layer = torch.nn.Linear(2, 2)


def test_eh_proj_weights_are_found_by_name_through_wrappers():
    w = torch.randn(4, 8)
    found = megatron_eh_proj_weights([_ToyMegatron(w)])
    assert list(found) == [0] and torch.equal(found[0], w)


def _fake_bridge(tensors, model_type, eh_proj, calls):
    """A stand-in ``megatron.bridge`` with AutoBridge's real method signatures (Megatron-Bridge 0.4+)."""

    class AutoBridge:
        @classmethod
        def from_hf_pretrained(cls, path, **kwargs):
            calls["from_hf_pretrained"] = (path, kwargs)
            return cls()

        def load_megatron_model(self, path, *, mp_overrides=None, **kwargs):
            calls["load_megatron_model"] = path
            return [_ToyMegatron(eh_proj)]

        def export_hf_weights(
            self,
            model,
            cpu=False,
            show_progress=True,
            conversion_tasks=None,
            merge_adapter_weights=True,
            weight_dtype=None,
        ):
            calls["export_hf_weights"] = {"cpu": cpu, "show_progress": show_progress}
            # the real bridge passes input_proj through unchanged in this scenario
            return bridge_like_stream(tensors, model_type, swap_input_proj=False)

    @contextlib.contextmanager
    def temporary_distributed_context(backend="gloo"):
        calls["backend"] = backend
        yield

    bridge = types.ModuleType("megatron.bridge")
    bridge.AutoBridge = AutoBridge
    training = types.ModuleType("megatron.bridge.training")
    load_save = types.ModuleType("megatron.bridge.training.model_load_save")
    load_save.temporary_distributed_context = temporary_distributed_context
    return {
        "megatron.bridge": bridge,
        "megatron.bridge.training": training,
        "megatron.bridge.training.model_load_save": load_save,
    }


def test_export_glue_with_a_stand_in_bridge(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    tensors = make_reference_checkpoint(ref, "mimo")
    hf_w = tensors["model.mtp_layers.0.input_proj.weight"]
    h = hf_w.shape[0]
    megatron_w = torch.cat([hf_w[:, h:], hf_w[:, :h]], dim=1).float()
    calls: dict = {}
    for name, module in _fake_bridge(tensors, "mimo", megatron_w, calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = tmp_path / "hf"

    result = export_megatron_to_hf(ckpt, ref, out, trust_remote_code=True, show_progress=False)

    assert calls["from_hf_pretrained"] == (str(ref), {"trust_remote_code": True})
    assert calls["load_megatron_model"] == str(ckpt)
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
