"""Tiny GLM-4.5-Air- and MiMo-shaped checkpoints and the real Megatron-Bridge on a CPU (marker ``megatron_bridge``).

Used by ``test_export_real_bridge.py`` only, in the environment ``scripts/bridge_check.sh`` builds
(Megatron-Bridge and megatron-core from their checkouts, transformers, no Transformer Engine).

- ``make_reference``: a tiny HF checkpoint built with transformers (GLM: ``Glm4MoeForCausalLM``; MiMo:
  Qwen2, whose trunk MiMo is, under a small remote-code ``MiMoForCausalLM`` written here), with its MTP
  layer added by hand (transformers' ``save_pretrained`` does not write it), and the HF logits of a
  fixed batch. Every weight is moved off its initial value so that a mapping that loads the wrong
  tensor, or none, changes the logits.
- ``BridgeGap``: the three gaps of Megatron-Bridge 067f987 on the local (non-TE) spec that the tests
  patch, and its bug in GLM's dense-MTP ``linear_fc1`` names. Each knows how to show that it is still
  there (``present``) and how to patch it. The bug is patched only where HF -> Megatron runs (the
  worker ranks), never where ``nemo-occ export`` runs: there nemo-occ's own fix-up must repair it.
- ``build_and_save``: one rank of HF -> Megatron (Bridge), Megatron logits against HF's, and Bridge's
  Megatron checkpoint, at any tensor-parallel size (run by ``_megatron_dist.run_ranks``).

Layouts: local spec, all-gather MoE dispatcher, no fusions, FP32. Letters: L decoder layers, H hidden.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

VOCAB, HIDDEN, SEQ = 128, 64, 12

MIMO_CONFIG_PY = textwrap.dedent(
    '''
    """A tiny stand-in for MiMo's remote-code config: Qwen2's, with the MTP depth."""
    from transformers import Qwen2Config


    class MiMoConfig(Qwen2Config):
        model_type = "mimo"
    '''
)
MIMO_MODEL_PY = textwrap.dedent(
    '''
    """A tiny stand-in for MiMo's remote code: its trunk is Qwen2's (the MTP layer is not run by HF)."""
    from transformers import Qwen2ForCausalLM

    from .configuration_mimo import MiMoConfig


    class MiMoForCausalLM(Qwen2ForCausalLM):
        config_class = MiMoConfig
    '''
)


@dataclass(frozen=True)
class Reference:
    path: Path
    model_type: str
    input_ids: torch.Tensor
    hf_logits: torch.Tensor
    num_mtp_tensors: int

    @property
    def trust_remote_code(self) -> bool:
        return self.model_type == "mimo"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight (norms of 1, biases of 0, the router's expert bias of 0 included) off its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))


def _save_trunk(model, folder: Path) -> dict[str, torch.Tensor]:
    """``save_pretrained``; the tensors as the checkpoint names them (transformers fuses experts in memory)."""
    from safetensors.torch import load_file

    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def _write_mtp(folder: Path, trunk: dict[str, torch.Tensor], mtp: dict[str, torch.Tensor]) -> int:
    """The MTP tensors in a shard of their own, listed with the trunk's in a fresh index."""
    from safetensors.torch import save_file

    save_file(mtp, str(folder / "model-mtp.safetensors"), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(trunk, "model.safetensors"), **dict.fromkeys(mtp, "model-mtp.safetensors")}
    size = sum(t.numel() * t.element_size() for t in [*trunk.values(), *mtp.values()])
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return len(mtp)


def _noise(shape, gen, base: float = 0.0) -> torch.Tensor:
    return base + 0.05 * torch.randn(shape, generator=gen)


def make_reference(folder: Path, model_type: str) -> Reference:
    """``glm`` (MoE trunk and MoE MTP layer, like GLM-4.5-Air), ``glm-dense-mtp`` (dense layers and MTP
    layer: GLM45Bridge's naming bug) or ``mimo``."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if model_type.startswith("glm"):
        from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

        dense = model_type == "glm-dense-mtp"
        config = Glm4MoeConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=96,
            num_hidden_layers=2,
            first_k_dense_replace=2 if dense else 1,  # the MTP layer is built like the last decoder layer
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            max_position_embeddings=64,
            num_nextn_predict_layers=1,
            attention_bias=True,
            partial_rotary_factor=0.5,
            dtype="float32",
            tie_word_embeddings=False,
        )
        model = Glm4MoeForCausalLM(config).eval()
        _perturb(model, seed=2)
        state = _save_trunk(model, folder)
        last = "model.layers.1."
        mtp = {  # layer L = 2: the last decoder layer's tensors (moved), plus GLM's MTP parts
            name.replace(last, "model.layers.2."): tensor + _noise(tensor.shape, gen)
            for name, tensor in state.items()
            if name.startswith(last)
        }
        mtp |= {
            "model.layers.2.enorm.weight": _noise(HIDDEN, gen, 1.0),
            "model.layers.2.hnorm.weight": _noise(HIDDEN, gen, 1.0),
            "model.layers.2.eh_proj.weight": _noise((HIDDEN, 2 * HIDDEN), gen),
            "model.layers.2.shared_head.norm.weight": _noise(HIDDEN, gen, 1.0),
            "model.layers.2.embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
            "model.layers.2.shared_head.head.weight": state["lm_head.weight"].clone(),
        }
    elif model_type == "mimo":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            dtype="float32",
            tie_word_embeddings=False,
        )
        model = Qwen2ForCausalLM(config).eval()
        _perturb(model, seed=2)
        state = _save_trunk(model, folder)
        mtp = {
            name.replace("model.layers.1.", "model.mtp_layers.0."): tensor + _noise(tensor.shape, gen)
            for name, tensor in state.items()
            if name.startswith("model.layers.1.")
        }
        mtp |= {
            "model.mtp_layers.0.token_layernorm.weight": _noise(HIDDEN, gen, 1.0),
            "model.mtp_layers.0.hidden_layernorm.weight": _noise(HIDDEN, gen, 1.0),
            "model.mtp_layers.0.input_proj.weight": _noise((HIDDEN, 2 * HIDDEN), gen),
            "model.mtp_layers.0.final_layernorm.weight": _noise(HIDDEN, gen, 1.0),
        }
    else:
        raise ValueError(model_type)

    num_mtp = _write_mtp(folder, state, mtp)
    if model_type == "mimo":
        config = json.loads((folder / "config.json").read_text())
        config.update(
            model_type="mimo",
            architectures=["MiMoForCausalLM"],
            num_nextn_predict_layers=1,
            auto_map={
                "AutoConfig": "configuration_mimo.MiMoConfig",
                "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM",
            },
        )
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "configuration_mimo.py").write_text(MIMO_CONFIG_PY)
        (folder / "modeling_mimo.py").write_text(MIMO_MODEL_PY)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    with torch.no_grad():
        logits = model(input_ids).logits
    return Reference(folder, model_type, input_ids, logits, num_mtp)


# ---- the gaps of Megatron-Bridge on the local spec ------------------------------------------------------


def _registry(reference: Path, trust_remote_code: bool):
    from megatron.bridge import AutoBridge

    return AutoBridge.from_hf_pretrained(str(reference), trust_remote_code=trust_remote_code)._model_bridge


class BridgeGap:
    """One gap: ``present()`` shows it is still in the installed Bridge; ``patch(monkeypatch)`` closes it."""

    name = ""
    upstream = ""  # what Bridge would have to change


def _local_mtp_block_spec(config, vp_stage=None):
    """Bridge's ``mtp_block_spec`` with the layer backend the decoder uses (local), not TE hard-coded."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    if not getattr(config, "mtp_num_layers", None):
        return None
    spec = config.transformer_layer_spec
    if callable(spec):
        spec = (
            spec(config, vp_stage=vp_stage)
            if "vp_stage" in inspect.signature(spec).parameters
            else spec(config)
        )
    return get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage)


class MTPSpecHardCodesTE(BridgeGap):
    name = "mtp_block_spec hard-codes Transformer Engine"
    upstream = (
        "megatron.bridge.models.gpt_provider.mtp_block_spec calls get_gpt_mtp_block_spec(..., "
        "use_transformer_engine=True) whatever the decoder's spec"
    )

    @staticmethod
    def present() -> bool:
        from megatron.bridge.models import gpt_provider

        calls = []

        def record(config, spec, use_transformer_engine, vp_stage=None):
            calls.append(use_transformer_engine)

        import megatron.core.models.gpt.gpt_layer_specs as specs

        original = specs.get_gpt_mtp_block_spec
        specs.get_gpt_mtp_block_spec = record
        try:
            config = SimpleNamespace(
                mtp_num_layers=1,
                transformer_layer_spec=gpt_provider.local_layer_spec,
                num_moe_experts=None,
                moe_grouped_gemm=False,
                qk_layernorm=False,
                normalization="RMSNorm",
            )
            gpt_provider.mtp_block_spec(config)
        finally:
            specs.get_gpt_mtp_block_spec = original
        return calls == [True]  # asked for TE although the decoder is built from the local spec

    @staticmethod
    def patch(monkeypatch) -> None:
        from megatron.bridge.models import gpt_provider

        monkeypatch.setattr(gpt_provider, "mtp_block_spec", _local_mtp_block_spec)


def _local_expert_mappings(num_hidden_layers: int, num_mtp_layers: int) -> list:
    from megatron.bridge.models.conversion.param_mapping import AutoMapping, GatedMLPMapping

    pairs = [("decoder.layers.*", "model.layers.*")]
    pairs += [
        (f"mtp.layers.{i}.{prefix}", f"model.layers.{num_hidden_layers + i}")
        for i in range(num_mtp_layers)
        for prefix in ("mtp_model_layer", "transformer_layer")
    ]
    mappings = []
    for megatron, hf in pairs:
        mappings += [
            GatedMLPMapping(
                megatron_param=f"{megatron}.mlp.experts.local_experts.*.linear_fc1.weight",
                gate=f"{hf}.mlp.experts.*.gate_proj.weight",
                up=f"{hf}.mlp.experts.*.up_proj.weight",
            ),
            AutoMapping(
                megatron_param=f"{megatron}.mlp.experts.local_experts.*.linear_fc2.weight",
                hf_param=f"{hf}.mlp.experts.*.down_proj.weight",
            ),
        ]
    return mappings


class GLMLocalExperts(BridgeGap):
    name = "GLM45Bridge has no mapping for local-spec SequentialMLP experts"
    upstream = (
        "GLM45Bridge.mapping_registry maps only TEGroupedMLP experts (mlp.experts.linear_fc1.weight*); the local "
        "spec's mlp.experts.local_experts.<e>.linear_fc1/linear_fc2.weight have no mapping"
    )
    probe = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"

    @classmethod
    def present(cls, reference: Path) -> bool:
        return _registry(reference, False).mapping_registry().megatron_to_hf_lookup(cls.probe) is None

    @staticmethod
    def patch(monkeypatch) -> None:
        from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
        from megatron.bridge.models.glm.glm45_bridge import GLM45Bridge

        original = GLM45Bridge.mapping_registry

        def mapping_registry(self):
            config = self.hf_config
            extra = _local_expert_mappings(
                config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0)
            )
            return MegatronMappingRegistry(*original(self).mappings, *extra)

        monkeypatch.setattr(GLM45Bridge, "mapping_registry", mapping_registry)


class MimoLocalMTPNorms(BridgeGap):
    name = "MimoBridge has no mapping for the local-spec MTP layer norms"
    upstream = (
        "MimoBridge.mapping_registry maps the MTP layer's norms only under TE's fused names "
        "(self_attention.linear_qkv.layer_norm_weight, mlp.linear_fc1.layer_norm_weight); the local spec's "
        "mtp.layers.*.<layer>.input_layernorm.weight and pre_mlp_layernorm.weight have no mapping"
    )
    probe = "mtp.layers.0.mtp_model_layer.input_layernorm.weight"

    @classmethod
    def present(cls, reference: Path) -> bool:
        return _registry(reference, True).mapping_registry().megatron_to_hf_lookup(cls.probe) is None

    @staticmethod
    def patch(monkeypatch) -> None:
        from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
        from megatron.bridge.models.conversion.param_mapping import AutoMapping
        from megatron.bridge.models.mimo.mimo_bridge import MimoBridge

        original = MimoBridge.mapping_registry

        def mapping_registry(self):
            extra = [
                AutoMapping(
                    megatron_param=f"mtp.layers.*.{prefix}.{megatron}", hf_param=f"model.mtp_layers.*.{hf}"
                )
                for prefix in ("mtp_model_layer", "transformer_layer")
                for megatron, hf in (
                    ("input_layernorm.weight", "input_layernorm.weight"),
                    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
                )
            ]
            return MegatronMappingRegistry(*original(self).mappings, *extra)

        monkeypatch.setattr(MimoBridge, "mapping_registry", mapping_registry)


class GLMDenseMTPNames(BridgeGap):
    name = "GLM45Bridge maps a dense MTP layer's linear_fc1 to names the checkpoint does not have"
    upstream = (
        "GLM45Bridge.mapping_registry maps mtp.layers.<i>.<layer>.mlp.linear_fc1.weight to "
        "model.layers.<L+i>.mlp.linear_fc1.gate.weight / .up.weight instead of mlp.gate_proj.weight / "
        "mlp.up_proj.weight: import leaves the weight unloaded, export drops it"
    )
    probe = "mtp.layers.0.mtp_model_layer.mlp.linear_fc1.weight"

    @classmethod
    def present(cls, reference: Path) -> bool:
        mapping = _registry(reference, False).mapping_registry().megatron_to_hf_lookup(cls.probe)
        return mapping is not None and mapping.hf_param == {
            "gate": "model.layers.2.mlp.linear_fc1.gate.weight",
            "up": "model.layers.2.mlp.linear_fc1.up.weight",
        }

    @staticmethod
    def patch(monkeypatch) -> None:
        """Correct names for HF -> Megatron (the tests' worker ranks only)."""
        from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
        from megatron.bridge.models.conversion.param_mapping import GatedMLPMapping
        from megatron.bridge.models.glm.glm45_bridge import GLM45Bridge

        original = GLM45Bridge.mapping_registry

        def mapping_registry(self):
            config = self.hf_config
            layers = config.num_hidden_layers
            fixed = [
                GatedMLPMapping(
                    megatron_param=f"mtp.layers.{i}.{prefix}.mlp.linear_fc1.weight",
                    gate=f"model.layers.{layers + i}.mlp.gate_proj.weight",
                    up=f"model.layers.{layers + i}.mlp.up_proj.weight",
                )
                for i in range(config.num_nextn_predict_layers)
                for prefix in ("mtp_model_layer", "transformer_layer")
            ]
            replaced = {m.megatron_param for m in fixed}
            kept = [m for m in original(self).mappings if m.megatron_param not in replaced]
            return MegatronMappingRegistry(*kept, *fixed)

        monkeypatch.setattr(GLM45Bridge, "mapping_registry", mapping_registry)


class _Patcher:
    """``monkeypatch``'s ``setattr`` for the worker processes, where no pytest fixture runs."""

    def setattr(self, owner, name, value):
        setattr(owner, name, value)


def patch_all_gaps(model_type: str, monkeypatch=None, *, import_side: bool = False) -> None:
    """Patch the gaps; ``import_side`` also patches GLM's dense-MTP names (for HF -> Megatron only)."""
    monkeypatch = monkeypatch or _Patcher()
    MTPSpecHardCodesTE.patch(monkeypatch)
    if model_type.startswith("glm"):
        GLMLocalExperts.patch(monkeypatch)
        if import_side:
            GLMDenseMTPNames.patch(monkeypatch)
    else:
        MimoLocalMTPNorms.patch(monkeypatch)


# ---- HF -> Megatron, logits, Megatron checkpoint -------------------------------------------------------

CPU_FIELDS = {  # the local spec on a CPU: no TE, no fused kernels, all-gather MoE dispatcher, FP32
    "moe_token_dispatcher_type": "allgather",
    "moe_shared_expert_overlap": False,
    "moe_grouped_gemm": False,
    "moe_permute_fusion": False,
    "moe_router_fusion": False,
    "gradient_accumulation_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "masked_softmax_fusion": False,
    "persist_layer_norm": False,
    "apply_rope_fusion": False,
    "cross_entropy_loss_fusion": False,
    "params_dtype": torch.float32,
    "bf16": False,
    "fp16": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}


def megatron_from_hf(reference: Reference, tensor_parallel: int):
    """The Megatron model Bridge builds from the HF checkpoint (weights loaded), and the bridge."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    bridge = AutoBridge.from_hf_pretrained(str(reference.path), trust_remote_code=reference.trust_remote_code)
    provider = bridge.to_megatron_provider(load_weights=True)
    if reference.model_type.startswith("glm"):
        provider.transformer_layer_spec = partial(get_gpt_decoder_block_spec, use_transformer_engine=False)
    else:
        provider.transformer_layer_spec = local_layer_spec
    for name, value in CPU_FIELDS.items():
        setattr(provider, name, value)
    provider.tensor_model_parallel_size = tensor_parallel
    provider.sequence_parallel = False
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    return bridge, model


def megatron_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits ``[B, S, V]`` of the trunk (MTP layers run too, as in training's forward)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    gpt = model[0]
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    gpt.eval()
    with torch.no_grad():
        logits = gpt(input_ids=input_ids, position_ids=position_ids, attention_mask=causal)
    return gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]


def build_and_save(rank: int, world_size: int, reference: Reference, checkpoint: Path, out: Path) -> None:
    """One rank: patch the gaps, HF -> Megatron at TP=world_size, logits, Bridge's Megatron checkpoint.

    Writes ``out/rank<r>.pt`` with the largest |Megatron - HF| logit difference and the names of the
    Megatron parameters (for the parent to check and report).
    """
    from nemo_occ.lab.parallel import init_model_parallel

    patch_all_gaps(reference.model_type, import_side=True)
    init_model_parallel(rank=rank, world_size=world_size, tensor_parallel=world_size)
    bridge, model = megatron_from_hf(reference, world_size)
    logits = megatron_logits(model, reference.input_ids)
    names = [name for name, _ in model[0].named_parameters()]
    bridge.save_megatron_model(model, str(checkpoint))
    torch.save(
        {
            "max_abs_diff": (logits - reference.hf_logits).abs().max().item(),
            "names": names,
            "shape": logits.shape,
        },
        out / f"rank{rank}.pt",
    )
