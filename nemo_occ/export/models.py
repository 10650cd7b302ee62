"""Where each supported architecture keeps its MTP layers in a Hugging Face checkpoint.

Sources: Megatron-Bridge ``GLM45Bridge`` and ``MimoBridge`` mappings, the released HF checkpoints
(zai-org/GLM-4.5-Air, XiaomiMiMo/MiMo-7B-RL) and the vLLM/SGLang MTP loaders.

GLM-4.5 / GLM-4.5-Air (``model_type: glm4_moe``)
    MTP layer ``i`` is stored as an extra decoder layer ``model.layers.{L+i}.*`` with
    ``L = num_hidden_layers`` (46 for Air), next to ``enorm``, ``hnorm``, ``eh_proj`` and
    ``shared_head.norm``. The checkpoint also stores its own copies of the shared embedding and
    output head, ``model.layers.{L+i}.embed_tokens.weight`` (= ``model.embed_tokens.weight``) and
    ``model.layers.{L+i}.shared_head.head.weight`` (= ``lm_head.weight``); GLM45Bridge has no mapping
    for these two, so they are the aliases nemo-occ adds. ``eh_proj`` takes ``[enorm(emb), hnorm(h)]``
    exactly like Megatron's, so no reordering. A dense MTP layer (the last decoder layer dense, so
    Megatron builds the MTP layer dense too) keeps its gated MLP as ``mlp.gate_proj`` /
    ``mlp.up_proj``, but GLM45Bridge (067f987) maps Megatron's ``linear_fc1`` to
    ``mlp.linear_fc1.gate`` / ``mlp.linear_fc1.up``: its export then drops the two tensors (those
    names are not in the checkpoint), or yields them under the wrong names (``bridge_renames`` puts the
    right ones back); ``gated_fc1`` says where to rebuild them from the Megatron weight.

MiMo-7B (``model_type: mimo``, remote code)
    MTP layer ``i`` is ``model.mtp_layers.{i}.*`` and shares the main embedding and head (no copies).
    Its ``input_proj`` consumes ``cat([hidden_layernorm(h), token_layernorm(emb)])``, i.e. the input
    halves ``[hidden, emb]``, the reverse of Megatron's ``eh_proj`` input ``[enorm(emb), hnorm(h)]``.

Both configs name the MTP depth ``num_nextn_predict_layers``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("glm4_moe", "mimo")


@dataclass(frozen=True)
class MTPLayout:
    """The MTP tensors of one HF architecture, derived from its ``config.json``."""

    model_type: str
    num_hidden_layers: int
    num_mtp_layers: int
    mtp_prefixes: tuple[str, ...]
    """HF name prefixes that belong to MTP layers, one per MTP layer."""
    aliases: tuple[tuple[str, str], ...]
    """``(alias, source)``: the checkpoint stores ``alias`` as a copy of ``source``."""
    input_proj: tuple[tuple[str, int], ...]
    """``(hf_name, mtp_layer)`` of projections whose input halves are ``[hidden, emb]``."""
    bridge_renames: tuple[tuple[str, str], ...] = ()
    """``(name Megatron-Bridge yields, HF name)`` for MTP tensors a Bridge mapping names wrongly."""
    gated_fc1: tuple[tuple[int, str, str], ...] = ()
    """``(mtp_layer, gate name, up name)``: the HF halves of a dense MTP layer's Megatron ``linear_fc1``."""

    def is_mtp(self, name: str) -> bool:
        """Whether Hugging Face tensor ``name`` belongs to an MTP layer."""
        return name.startswith(self.mtp_prefixes)


def _int_field(config: Mapping[str, Any], field: str, default: int | None = None) -> int:
    value = config.get(field, default)
    if value is None:
        raise ValueError(
            f"config.json has no '{field}'; is this the Hugging Face config of the trained model?"
        )
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config.json field '{field}' must be a non-negative integer, got {value!r}.")
    return value


def mtp_layout(config: Mapping[str, Any]) -> MTPLayout:
    """The MTP layout of a supported model, from its HF ``config.json`` as a dict."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"nemo-occ export supports model_type {' / '.join(SUPPORTED_MODEL_TYPES)} "
            f"(GLM-4.5, GLM-4.5-Air, MiMo-7B); the reference config has model_type={model_type!r}. "
            "Pass the Hugging Face checkpoint the model was trained from as --hf-model."
        )
    num_hidden = _int_field(config, "num_hidden_layers")
    num_mtp = _int_field(config, "num_nextn_predict_layers", 0)
    if num_mtp == 0:
        raise ValueError(
            f"The reference config ({model_type}) has num_nextn_predict_layers=0, so it describes no MTP "
            "layer to export. Use the Hugging Face checkpoint that ships the MTP layer as --hf-model."
        )
    if model_type == "glm4_moe":
        layers = range(num_hidden, num_hidden + num_mtp)
        return MTPLayout(
            model_type=model_type,
            num_hidden_layers=num_hidden,
            num_mtp_layers=num_mtp,
            mtp_prefixes=tuple(f"model.layers.{i}." for i in layers),
            aliases=tuple(
                pair
                for i in layers
                for pair in (
                    (f"model.layers.{i}.embed_tokens.weight", "model.embed_tokens.weight"),
                    (f"model.layers.{i}.shared_head.head.weight", "lm_head.weight"),
                )
            ),
            input_proj=(),
            bridge_renames=tuple(
                (f"model.layers.{i}.mlp.linear_fc1.{part}.weight", f"model.layers.{i}.mlp.{part}_proj.weight")
                for i in layers
                for part in ("gate", "up")
            ),
            gated_fc1=tuple(
                (i - num_hidden, f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight")
                for i in layers
            ),
        )
    return MTPLayout(  # mimo
        model_type=model_type,
        num_hidden_layers=num_hidden,
        num_mtp_layers=num_mtp,
        mtp_prefixes=tuple(f"model.mtp_layers.{i}." for i in range(num_mtp)),
        aliases=(),
        input_proj=tuple((f"model.mtp_layers.{i}.input_proj.weight", i) for i in range(num_mtp)),
    )


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def mtp_predicate(config: Mapping[str, Any]) -> Callable[[str], bool]:
    """Is an HF tensor name part of an MTP layer? Exact for supported models, a heuristic otherwise.

    The heuristic (used only to order verification messages for other architectures) counts names
    containing ``mtp`` or a decoder layer index ``>= num_hidden_layers`` as MTP.
    """
    try:
        return mtp_layout(config).is_mtp
    except ValueError:
        pass
    num_hidden = config.get("num_hidden_layers")

    def is_mtp(name: str) -> bool:
        if "mtp" in name:
            return True
        match = _LAYER_INDEX.search(name)
        return bool(match and isinstance(num_hidden, int) and int(match.group(1)) >= num_hidden)

    return is_mtp
