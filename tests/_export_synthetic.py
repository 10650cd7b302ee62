"""Tiny GLM-4.5- and MiMo-shaped HF checkpoints (random tensors, a few KB) for tests and dry runs.

The tensor names are written out by hand from the released checkpoints' indexes (a few tensors per
layer kind, not all of them), in three shards, with an MTP layer after ``num_hidden_layers=2`` decoder
layers. ``train_like`` moves every tensor a little, as training would; ``bridge_like_stream`` yields
what Megatron-Bridge's GLM45Bridge / MimoBridge would yield for such tensors, MTP aliases left out, so
the whole export pipeline can run without Megatron-Bridge.

Letters: V vocab (16), H hidden (8), E experts (2).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

V, H, E = 16, 8, 2


def _glm_tensors() -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """name -> (shard, shape, dtype) of the toy GLM-4.5 checkpoint."""
    s1, s2, s3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    bf16, f32 = torch.bfloat16, torch.float32
    spec = {
        "model.embed_tokens.weight": (s1, (V, H), bf16),
        "model.layers.0.input_layernorm.weight": (s1, (H,), bf16),
        "model.layers.0.self_attn.q_proj.weight": (s1, (H, H), bf16),
        "model.layers.0.self_attn.q_proj.bias": (s1, (H,), bf16),
        "model.layers.0.mlp.down_proj.weight": (s1, (H, 2 * H), bf16),
        "model.layers.1.input_layernorm.weight": (s2, (H,), bf16),
        "model.layers.1.self_attn.q_proj.weight": (s2, (H, H), bf16),
        "model.layers.1.mlp.gate.weight": (s2, (E, H), bf16),
        "model.layers.1.mlp.gate.e_score_correction_bias": (s2, (E,), f32),
        "model.layers.1.mlp.experts.0.down_proj.weight": (s2, (H, H), bf16),
        "model.layers.1.mlp.experts.1.down_proj.weight": (s2, (H, H), bf16),
        "model.norm.weight": (s2, (H,), bf16),
        "lm_head.weight": (s2, (V, H), bf16),
        # MTP layer = decoder layer 2
        "model.layers.2.enorm.weight": (s3, (H,), bf16),
        "model.layers.2.hnorm.weight": (s3, (H,), bf16),
        "model.layers.2.eh_proj.weight": (s3, (H, 2 * H), bf16),
        "model.layers.2.input_layernorm.weight": (s3, (H,), bf16),
        "model.layers.2.self_attn.q_proj.weight": (s3, (H, H), bf16),
        "model.layers.2.mlp.gate.weight": (s3, (E, H), bf16),
        "model.layers.2.mlp.gate.e_score_correction_bias": (s3, (E,), f32),
        "model.layers.2.mlp.experts.0.down_proj.weight": (s3, (H, H), bf16),
        "model.layers.2.mlp.experts.1.down_proj.weight": (s3, (H, H), bf16),
        "model.layers.2.shared_head.norm.weight": (s3, (H,), bf16),
        "model.layers.2.embed_tokens.weight": (s3, (V, H), bf16),
        "model.layers.2.shared_head.head.weight": (s3, (V, H), bf16),
    }
    return spec


def _mimo_tensors() -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    s1, s2, s3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    bf16 = torch.bfloat16
    spec = {
        "model.embed_tokens.weight": (s1, (V, H), bf16),
        "model.layers.0.input_layernorm.weight": (s1, (H,), bf16),
        "model.layers.0.self_attn.q_proj.weight": (s1, (H, H), bf16),
        "model.layers.0.self_attn.q_proj.bias": (s1, (H,), bf16),
        "model.layers.1.input_layernorm.weight": (s2, (H,), bf16),
        "model.layers.1.mlp.down_proj.weight": (s2, (H, 2 * H), bf16),
        "model.norm.weight": (s2, (H,), bf16),
        "lm_head.weight": (s2, (V, H), bf16),
        "model.mtp_layers.0.token_layernorm.weight": (s3, (H,), bf16),
        "model.mtp_layers.0.hidden_layernorm.weight": (s3, (H,), bf16),
        "model.mtp_layers.0.input_proj.weight": (s3, (H, 2 * H), bf16),
        "model.mtp_layers.0.input_layernorm.weight": (s3, (H,), bf16),
        "model.mtp_layers.0.self_attn.q_proj.weight": (s3, (H, H), bf16),
        "model.mtp_layers.0.self_attn.q_proj.bias": (s3, (H,), bf16),
        "model.mtp_layers.0.mlp.down_proj.weight": (s3, (H, 2 * H), bf16),
        "model.mtp_layers.0.final_layernorm.weight": (s3, (H,), bf16),
    }
    return spec


GLM_ALIAS_SOURCES = {
    "model.layers.2.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.2.shared_head.head.weight": "lm_head.weight",
}
GLM_ALIASES = tuple(GLM_ALIAS_SOURCES)


def _copy_glm_aliases(tensors: dict[str, torch.Tensor]) -> None:
    """The checkpoint's MTP copies equal the shared embedding and head."""
    if GLM_ALIASES[0] in tensors:
        for alias, source in GLM_ALIAS_SOURCES.items():
            tensors[alias] = tensors[source].clone()


def make_reference_checkpoint(
    directory: str | Path, model_type: str, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write a toy reference checkpoint (config, 3 shards, index, tokenizer files); return its tensors."""
    if model_type not in ("glm4_moe", "mimo"):
        raise ValueError(f"model_type must be 'glm4_moe' or 'mimo', got {model_type!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = _glm_tensors() if model_type == "glm4_moe" else _mimo_tensors()
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen).to(dtype) for name, (_, shape, dtype) in spec.items()}
    _copy_glm_aliases(tensors)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, (shard, _, _) in spec.items():
        shards.setdefault(shard, {})[name] = tensors[name]
    for shard, content in shards.items():
        save_file(content, str(directory / shard), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: shard for name, (shard, _, _) in spec.items()},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "model_type": model_type,
        "architectures": ["Glm4MoeForCausalLM" if model_type == "glm4_moe" else "MiMoForCausalLM"],
        "num_hidden_layers": 2,
        "num_nextn_predict_layers": 1,
        "hidden_size": H,
        "vocab_size": V,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return tensors


def train_like(
    tensors: dict[str, torch.Tensor], *, seed: int = 1, scale: float = 0.01
) -> dict[str, torch.Tensor]:
    """A "trained" copy: each tensor plus ``scale`` times its RMS times N(0, 1) noise, in its own dtype.

    The GLM MTP copies stay bit-identical to the (moved) embedding and head they copy, as in a real
    checkpoint. ``scale=0.01`` is a relative change of about 0.01 per tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    trained = {}
    for name, tensor in tensors.items():
        rms = tensor.float().square().mean().sqrt()
        noise = torch.randn(tensor.shape, generator=gen)
        trained[name] = (tensor.float() + scale * rms * noise).to(tensor.dtype)
    _copy_glm_aliases(trained)
    return trained


def bridge_like_stream(
    tensors: dict[str, torch.Tensor], model_type: str, *, swap_input_proj: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``tensors`` like Megatron-Bridge would: GLM MTP aliases omitted, fp32 where Megatron is.

    ``swap_input_proj=False`` mimics a Bridge that passes MiMo's ``input_proj`` through in Megatron's
    ``[emb, hidden]`` order (i.e. yields the half-swapped HF weight).
    """
    for name, tensor in tensors.items():
        if model_type == "glm4_moe" and name in GLM_ALIASES:
            continue
        if name.endswith("input_proj.weight") and not swap_input_proj:
            first, second = tensor.chunk(2, dim=1)
            tensor = torch.cat((second, first), dim=1)
        yield name, tensor.float()  # Megatron's master copy; the writer casts back to the reference dtype
