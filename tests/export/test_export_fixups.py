"""GLM MTP aliases and the MiMo input_proj half swap (no Megatron-Bridge needed)."""

from __future__ import annotations

import pytest
import torch

from nemo_occ.export.fixups import FixupLog, apply_fixups, orient_input_proj, swap_input_halves
from nemo_occ.export.models import mtp_layout, mtp_predicate

GLM_CONFIG = {"model_type": "glm4_moe", "num_hidden_layers": 46, "num_nextn_predict_layers": 1}
MIMO_CONFIG = {"model_type": "mimo", "num_hidden_layers": 36, "num_nextn_predict_layers": 1}


# ---- per-model facts -------------------------------------------------------------------------


def test_glm_layout_names_layer_46_and_its_two_aliases():
    layout = mtp_layout(GLM_CONFIG)
    assert layout.num_mtp_layers == 1
    assert dict(layout.aliases) == {
        "model.layers.46.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.46.shared_head.head.weight": "lm_head.weight",
    }
    assert layout.is_mtp("model.layers.46.eh_proj.weight")
    assert not layout.is_mtp("model.layers.45.mlp.gate.weight")
    assert not layout.is_mtp("model.layers.4.mlp.gate.weight")  # prefix match must not catch layer 4 for 46
    assert layout.input_proj == ()


def test_glm_layout_with_two_mtp_layers_aliases_both():
    layout = mtp_layout({**GLM_CONFIG, "num_nextn_predict_layers": 2})
    assert {a for a, _ in layout.aliases} == {
        "model.layers.46.embed_tokens.weight",
        "model.layers.46.shared_head.head.weight",
        "model.layers.47.embed_tokens.weight",
        "model.layers.47.shared_head.head.weight",
    }


def test_mimo_layout_uses_mtp_layers_prefix_and_input_proj():
    layout = mtp_layout(MIMO_CONFIG)
    assert layout.is_mtp("model.mtp_layers.0.input_proj.weight")
    assert not layout.is_mtp("model.layers.35.mlp.up_proj.weight")
    assert dict(layout.input_proj) == {"model.mtp_layers.0.input_proj.weight": 0}
    assert layout.aliases == ()


@pytest.mark.parametrize(
    "config, words",
    [
        ({"model_type": "llama", "num_hidden_layers": 2}, "model_type='llama'"),
        ({**GLM_CONFIG, "num_nextn_predict_layers": 0}, "num_nextn_predict_layers=0"),
        ({"model_type": "mimo", "num_nextn_predict_layers": 1}, "num_hidden_layers"),
        ({**MIMO_CONFIG, "num_hidden_layers": "36"}, "non-negative integer"),
    ],
)
def test_layout_errors_say_what_is_wrong(config, words):
    with pytest.raises(ValueError, match=words):
        mtp_layout(config)


def test_mtp_predicate_heuristic_for_other_models():
    is_mtp = mtp_predicate({"model_type": "deepseek_v3", "num_hidden_layers": 61})
    assert is_mtp("model.layers.61.eh_proj.weight")
    assert not is_mtp("model.layers.60.mlp.gate.weight")
    assert is_mtp("mtp.layers.0.enorm.weight")


# ---- MiMo input_proj halves --------------------------------------------------------------------


def test_swap_input_halves_on_a_hand_built_tensor():
    h = 3
    emb_block = torch.arange(h * h, dtype=torch.float32).reshape(h, h)  # columns acting on emb
    hid_block = -1.0 - torch.arange(h * h, dtype=torch.float32).reshape(h, h)  # columns acting on hidden
    megatron = torch.empty(h, 2 * h)
    hf_expected = torch.empty(h, 2 * h)
    for r in range(h):
        for c in range(h):
            megatron[r, c], megatron[r, h + c] = emb_block[r, c], hid_block[r, c]  # [emb, hidden]
            hf_expected[r, c], hf_expected[r, h + c] = hid_block[r, c], emb_block[r, c]  # [hidden, emb]
    assert torch.equal(swap_input_halves(megatron), hf_expected)
    assert torch.equal(swap_input_halves(hf_expected), megatron)


def test_swap_is_its_own_inverse_and_keeps_the_linear_map():
    gen = torch.Generator().manual_seed(0)
    h = 5
    w_megatron = torch.randn(h, 2 * h, generator=gen)
    emb, hidden = torch.randn(4, h, generator=gen), torch.randn(4, h, generator=gen)
    assert torch.equal(swap_input_halves(swap_input_halves(w_megatron)), w_megatron)
    # Megatron: eh_proj(cat[emb, hidden]); HF MiMo: input_proj(cat[hidden, emb]) must give the same output.
    y_megatron = torch.cat([emb, hidden], dim=-1) @ w_megatron.T
    y_hf = torch.cat([hidden, emb], dim=-1) @ swap_input_halves(w_megatron).T
    torch.testing.assert_close(y_hf, y_megatron)


@pytest.mark.parametrize("shape", [(4,), (4, 7), (2, 4, 8)])
def test_swap_rejects_shapes_that_are_not_h_by_2h(shape):
    with pytest.raises(ValueError, match=r"\[H, 2H\]"):
        swap_input_halves(torch.zeros(shape))


def test_orient_swaps_when_bridge_passed_the_weight_through():
    w_megatron = torch.randn(4, 8)
    out, action = orient_input_proj(w_megatron.clone(), w_megatron)
    assert action == "swapped by nemo-occ"
    assert torch.equal(out[:, :4], w_megatron[:, 4:]) and torch.equal(out[:, 4:], w_megatron[:, :4])


def test_orient_keeps_what_bridge_already_swapped():
    w_megatron = torch.randn(4, 8).to(torch.bfloat16)
    bridge_out = torch.cat([w_megatron[:, 4:], w_megatron[:, :4]], dim=1)
    out, action = orient_input_proj(bridge_out, w_megatron)
    assert action == "already swapped by Megatron-Bridge"
    assert out is bridge_out


def test_orient_refuses_to_guess_on_unrelated_or_sharded_weights():
    with pytest.raises(ValueError, match="Refusing to guess"):
        orient_input_proj(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="tensor parallel size 1"):
        orient_input_proj(torch.randn(4, 8), torch.randn(2, 8))


# ---- the stream ----------------------------------------------------------------------------------


def _glm_stream(with_aliases: bool = False):
    gen = torch.Generator().manual_seed(1)
    main = {
        "model.embed_tokens.weight": torch.randn(6, 2, generator=gen),
        "model.layers.46.eh_proj.weight": torch.randn(2, 4, generator=gen),
        "lm_head.weight": torch.randn(6, 2, generator=gen),
    }
    if with_aliases:
        main["model.layers.46.embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
        main["model.layers.46.shared_head.head.weight"] = main["lm_head.weight"].clone()
    return main


def test_glm_aliases_are_added_once_and_equal_their_sources():
    tensors = _glm_stream()
    layout = mtp_layout(GLM_CONFIG)
    reference = [*tensors, "model.layers.46.embed_tokens.weight", "model.layers.46.shared_head.head.weight"]
    log = FixupLog()
    out = list(apply_fixups(tensors.items(), layout, reference_names=reference, log=log))
    names = [n for n, _ in out]
    assert sorted(names) == sorted(reference) and len(names) == len(set(names))
    got = dict(out)
    assert torch.equal(got["model.layers.46.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(got["model.layers.46.shared_head.head.weight"], tensors["lm_head.weight"])
    assert [e["action"] for e in log.entries] == ["added by nemo-occ", "added by nemo-occ"]


def test_glm_aliases_already_yielded_by_bridge_are_not_duplicated():
    tensors = _glm_stream(with_aliases=True)
    log = FixupLog()
    out = list(apply_fixups(tensors.items(), mtp_layout(GLM_CONFIG), reference_names=list(tensors), log=log))
    assert [n for n, _ in out] == list(tensors)
    assert {e["action"] for e in log.entries} == {"yielded by Megatron-Bridge"}


def test_glm_aliases_absent_from_the_reference_are_not_invented():
    tensors = _glm_stream()
    log = FixupLog()
    out = list(apply_fixups(tensors.items(), mtp_layout(GLM_CONFIG), reference_names=list(tensors), log=log))
    assert [n for n, _ in out] == list(tensors)
    assert all(e["action"].startswith("skipped") for e in log.entries)


def test_alias_whose_source_never_came_is_left_for_verification():
    tensors = _glm_stream()
    del tensors["lm_head.weight"]
    reference = [*tensors, "lm_head.weight", "model.layers.46.shared_head.head.weight"]
    out = dict(apply_fixups(tensors.items(), mtp_layout(GLM_CONFIG), reference_names=reference))
    assert "model.layers.46.shared_head.head.weight" not in out


def test_mimo_stream_orients_input_proj_and_needs_the_megatron_weight():
    w_megatron = torch.randn(4, 8)
    stream = [
        ("model.mtp_layers.0.input_proj.weight", w_megatron.clone()),
        ("lm_head.weight", torch.randn(3, 4)),
    ]
    layout = mtp_layout(MIMO_CONFIG)
    out = dict(
        apply_fixups(stream, layout, reference_names=[n for n, _ in stream], megatron_eh_proj={0: w_megatron})
    )
    assert torch.equal(
        out["model.mtp_layers.0.input_proj.weight"], torch.cat([w_megatron[:, 4:], w_megatron[:, :4]], 1)
    )
    with pytest.raises(ValueError, match="eh_proj weight of MTP layer 0 was not provided"):
        list(apply_fixups(stream, layout, reference_names=[n for n, _ in stream]))
