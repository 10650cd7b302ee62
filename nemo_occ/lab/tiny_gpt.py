"""Build small megatron-core ``GPTModel``s with MTP layers that run on a CPU (tests, CPU demo).

The flags are the set that runs megatron-core on a CPU-only torch: local (non-TE) layer specs, CPU
initialisation, every CUDA fusion off, fp32 parameters, no dropout, the all-gather MoE token
dispatcher. Parallel sizes (TP/PP/CP/EP) are read from megatron's ``parallel_state``, which must be
initialised first (``nemo_occ.lab.parallel.init_model_parallel``); the CPU patches of
``nemo_occ.lab.cpu_compat`` must be entered on a CPU-only torch.

Initialisation is reproducible across TP sizes: with ``use_cpu_initialization`` megatron draws each
full weight and then keeps this rank's slice, so TP=1 and TP=2 models built after the same
``torch.manual_seed`` hold the same weights. (Experts under EP>1 do not: each rank only draws its
own experts. Tests copy a reference state dict instead, see ``load_full_state_dict``.)
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TinyGPTConfig(BaseModel):
    """Shape of a small GPT + MTP model; parallel sizes come from megatron's parallel_state."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(64, gt=1, description="Vocabulary size V (divisible by TP).")
    hidden_size: int = Field(64, gt=0, description="Hidden size H.")
    num_layers: int = Field(2, gt=0, description="Decoder layers (divisible by PP).")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads (divisible by TP).")
    ffn_hidden_size: int | None = Field(None, gt=0, description="MLP width; None = 4 H.")
    max_sequence_length: int = Field(256, gt=1, description="Longest sequence (learned positions).")
    mtp_num_layers: int = Field(1, ge=0, description="MTP depths K; 0 builds no MTP block.")
    num_experts: int | None = Field(None, gt=1, description="MoE experts per layer; None = dense MLP.")
    moe_router_topk: int = Field(2, gt=0, description="Experts each token is routed to.")
    moe_ffn_hidden_size: int | None = Field(None, gt=0, description="Expert MLP width; None = H.")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism (needs TP>1).")
    position_embedding_type: Literal["learned_absolute", "rope"] = Field(
        "learned_absolute", description="Position encoding of the decoder and MTP layers."
    )
    share_embeddings_and_output_weights: bool = Field(
        False, description="Tie the output layer to the input embedding (GLM-4.5 does not)."
    )
    init_std: float = Field(0.05, gt=0, description="Std of the normal weight initialisation.")

    @model_validator(mode="after")
    def _check(self) -> TinyGPTConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.moe_router_topk > (self.num_experts or self.moe_router_topk):
            raise ValueError("moe_router_topk must not exceed num_experts")
        return self


def build_transformer_config(cfg: TinyGPTConfig, **fields):
    """The megatron ``TransformerConfig`` of ``cfg`` with the CPU-safe flags and current parallel sizes.

    ``fields`` are further ``TransformerConfig`` fields (e.g. ``use_mup=True`` on newer cores).
    """
    # long on purpose: one TransformerConfig's fields, listed
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    if cfg.vocab_size % tp or cfg.num_attention_heads % tp:
        raise ValueError(f"vocab_size and num_attention_heads must be divisible by tensor parallel size {tp}")
    if cfg.sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor parallel size > 1; set sequence_parallel=False")
    if cfg.num_experts is not None and tp > 1 and not cfg.sequence_parallel:
        raise ValueError("megatron-core's MoE layer needs sequence_parallel=True when tensor parallel > 1")
    if cfg.num_experts is not None and cfg.num_experts % ep:
        raise ValueError(f"num_experts={cfg.num_experts} must be divisible by expert parallel size {ep}")
    if cfg.num_layers % pp:
        raise ValueError(f"num_layers={cfg.num_layers} must be divisible by pipeline parallel size {pp}")
    moe = {}
    if cfg.num_experts is not None:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.hidden_size,
            moe_token_dispatcher_type="allgather",  # the all-to-all dispatcher uses CUDA streams
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_fusion=False,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            # Expert MLPs without biases (as in GLM-4.5/DeepSeek). With a bias, 0.16.1's expert MLP
            # adds it in place to the output of an identity reduce (expert-TP size 1), which autograd
            # forbids ("Output 0 of _ReduceFromModelParallelRegion is a view ... modified inplace").
            add_bias_linear=False,
        )
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        mtp_num_layers=cfg.mtp_num_layers or None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=cfg.sequence_parallel,
        init_method_std=cfg.init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,  # dtype of activations sent between pipeline stages (PP > 1)
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        attention_backend=AttnBackend.local,
        **moe,
        **fields,
    )


def build_tiny_gpt(cfg: TinyGPTConfig | None = None, *, transformer_fields: dict | None = None, **overrides):
    """A megatron-core ``GPTModel`` (+ MTP block on the last pipeline stage) built from ``cfg``.

    ``overrides`` are TinyGPTConfig fields, e.g. ``build_tiny_gpt(mtp_num_layers=2)``;
    ``transformer_fields`` go to megatron's ``TransformerConfig`` as they are.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec

    cfg = (cfg or TinyGPTConfig()).model_copy(update=overrides) if overrides else (cfg or TinyGPTConfig())
    cfg = TinyGPTConfig.model_validate(cfg.model_dump())
    config = build_transformer_config(cfg, **(transformer_fields or {}))
    layer_spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False)
    mtp_spec = None
    if cfg.mtp_num_layers:
        # None on pipeline stages without MTP (all MTP layers live on the last stage).
        mtp_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        mtp_block_spec=mtp_spec,
    )
