"""Which parameters of a megatron-core GPT are sharded, replicated or shared, for the exact probes.

:func:`probe_parameters` describes every trainable parameter of this rank as a
:class:`nemo_occ.core.diagnostics.ProbeParameter`: its part (``mtp.*`` or the main model), the
reductions that turn this rank's locally computed gradient into the training gradient, and how
many ranks hold an identical copy of it, so that one scalar all-reduce over the world
(:func:`probe_statistics_group`) counts every parameter element once. The rules follow what
megatron's DDP and ``finalize_model_grads`` do with the gradients:

=====================================================  ============================================  ==========================
parameter                                              gradient reductions, in order                 copies
=====================================================  ============================================  ==========================
dense, split over TP (``tensor_model_parallel``)       sum over data parallel x context parallel     DP·CP
dense, replicated over TP (norms, row-parallel bias)   same                                          DP·CP·TP
  ... tagged ``sequence_parallel`` (with SP on), or a  then sum over TP (each TP rank saw part of
  ``q_layernorm``/``k_layernorm``                      the sequence, or of the heads)
  ... tagged ``average_gradients_across_tp_domain``    then mean over TP
expert (``allreduce=False``), split over expert TP     sum over the expert data-parallel group       EDP
expert, replicated over expert TP                      same                                          EDP·ETP
the word embedding kept on two pipeline stages         then sum over the embedding group             x 2 (first and last stage)
(tied output weight, or the MTP layers' copy)
=====================================================  ============================================  ==========================

Parameters on different pipeline stages or expert-parallel ranks are different tensors: each is
held by its own ranks. ``gradients="finalized"`` (gradients read from megatron's ``main_grad`` after
``finalize_model_grads``) drops the reductions and keeps the counting.

Adam's preconditioner (:func:`adam_preconditioner`, the metric <g_RL, P g_MTP> of
``nemo_occ.core.preconditioner``) is read from megatron's optimizer, whose state is keyed by fp32
*main* copies of the parameters: ``Float16OptimizerWithFloat16Params`` and ``FP32Optimizer`` hold the
whole parameter on every rank (a shard counted 1/copies like its parameter); the
``DistributedOptimizer`` shards it, each data-parallel rank (of the dense or the expert
data-parallel group) holding the state of one contiguous range of each parameter's elements
(``_get_model_param_range_map``), so each range is counted 1/(copies / that group's size): the
ranges of one parameter cover it once over its data-parallel ranks. ``ChainedOptimizer`` (dense +
expert optimizers) is read through each of its optimizers.

The shared word embedding is identified as megatron-core 0.20 does
(``LanguageModule.shared_embedding_or_output_weight``: the MTP stage's embedding copy, else a tied
output weight). Megatron-core 0.16.1 instead returns the last stage's *output layer* when MTP runs
under PP > 1 with untied embeddings, and synchronises that: its training gradient there is not the
model's, which is a megatron bug that the probes do not reproduce.
"""

from __future__ import annotations

from typing import Literal

import torch

from nemo_occ.core.diagnostics import PreconditionerShard, ProbeParameter
from nemo_occ.core.preconditioner import NO_STATE_YET, param_state_inverse
from nemo_occ.megatron.model_access import unwrap_gpt_model

__all__ = ["adam_preconditioner", "probe_parameters", "probe_statistics_group", "shared_word_embedding"]


def shared_word_embedding(gpt: torch.nn.Module) -> torch.nn.Parameter | None:
    """The word-embedding copy this pipeline stage shares with another stage, or None (PP = 1, or none)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    mtp = bool(getattr(gpt.config, "mtp_num_layers", None))
    if not (gpt.share_embeddings_and_output_weights or mtp):
        return None
    if gpt.pre_process or getattr(gpt, "mtp_process", False):
        return gpt.embedding.word_embeddings.weight
    if gpt.post_process and gpt.share_embeddings_and_output_weights:
        return gpt.output_layer.weight
    return None


def probe_parameters(
    model: torch.nn.Module, *, gradients: Literal["local", "finalized"] = "local"
) -> list[ProbeParameter]:
    """This rank's trainable parameters of ``model`` (a GPTModel, optionally wrapped) for the probes.

    ``gradients="local"``: the gradients will be this rank's own autograd gradients (each parameter
    carries the reductions of the table above); ``"finalized"``: they will be read after megatron's
    gradient reduction. Every rank returns its parameters in ``named_parameters`` order.
    """
    if gradients not in ("local", "finalized"):
        raise ValueError(f"gradients must be 'local' or 'finalized', got {gradients!r}")
    from megatron.core import parallel_state as ps

    gpt = unwrap_gpt_model(model)
    config = gpt.config
    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    tp_group = ps.get_tensor_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    edp_group = ps.get_expert_data_parallel_group()
    edp_size = torch.distributed.get_world_size(edp_group)
    etp_size = ps.get_expert_tensor_parallel_world_size()
    shared = shared_word_embedding(gpt)
    embedding_group = ps.get_embedding_group() if shared is not None else None

    out = []
    for name, p in gpt.named_parameters():
        if not p.requires_grad:
            continue
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        if not getattr(p, "allreduce", True):  # megatron's mark of an expert parameter
            reductions = [(edp_group, "sum")]
            copies = edp_size * (1 if sharded else etp_size)
        else:
            reductions = [(dp_group, "sum")]
            copies = dp_size * (1 if sharded else tp_size)
            if getattr(p, "average_gradients_across_tp_domain", False):
                reductions.append((tp_group, "mean"))
            elif (config.sequence_parallel and getattr(p, "sequence_parallel", False)) or (
                getattr(config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name)
            ):
                reductions.append((tp_group, "sum"))
        if p is shared:
            reductions.append((embedding_group, "sum"))
            copies *= torch.distributed.get_world_size(embedding_group)
        out.append(
            ProbeParameter(
                p,
                part="mtp" if name.startswith("mtp.") else "main",
                copies=copies,
                grad_reductions=tuple(reductions) if gradients == "local" else (),
            )
        )
    return out


def probe_statistics_group():
    """The group the probes' scalars are summed over: every rank of the model (the world)."""
    return torch.distributed.group.WORLD


def _state_ranges(optimizer) -> dict[int, tuple[torch.optim.Optimizer, torch.Tensor, int, int, int]]:
    """id(model parameter) -> (torch optimizer, key of its state, start, stop, ranks sharing the state)."""
    out: dict = {}
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "_get_model_param_range_map"):  # DistributedOptimizer: this rank's ranges only
            size = torch.distributed.get_world_size(opt.data_parallel_group)
            models = [p for g in opt.model_float16_groups + opt.model_fp32_groups for p in g]
            shards = [p for g in opt.shard_fp32_from_float16_groups + opt.shard_fp32_groups for p in g]
            for model_param, shard in zip(models, shards, strict=True):
                r = opt._get_model_param_range_map(model_param)["param"]
                out[id(model_param)] = (inner, shard, r.start, r.end, size)
        elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 main copies
            for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True):
                for model_param, main in zip(models, mains, strict=True):
                    out[id(model_param)] = (inner, main, 0, model_param.numel(), 1)
            for group in opt.fp32_from_fp32_groups:
                for p in group:
                    out[id(p)] = (inner, p, 0, p.numel(), 1)
        elif inner is not None:  # FP32Optimizer: the torch optimizer steps the parameters themselves
            for group in inner.param_groups:
                for p in group["params"]:
                    out[id(p)] = (inner, p, 0, p.numel(), 1)
        else:  # a plain torch optimizer
            for group in opt.param_groups:
                for p in group["params"]:
                    out[id(p)] = (opt, p, 0, p.numel(), 1)
    return out


def adam_preconditioner(
    optimizer, params: list[ProbeParameter]
) -> tuple[list[PreconditionerShard | None] | None, str]:
    """This rank's shards of Adam's P = 1/(√v̂ + ε) for ``params`` (module docstring), or (None, why not).

    Every rank answers alike (None before the first step everywhere): megatron steps all ranks
    together. A parameter the optimizer does not hold on this rank gets None (another rank holds it).
    """
    try:
        ranges = _state_ranges(optimizer)
    except AttributeError:
        return None, f"{type(optimizer).__name__} exposes no Adam state: no preconditioned metric"
    out: list[PreconditionerShard | None] = []
    for pp in params:
        entry = ranges.get(id(pp.param))
        if entry is None:
            out.append(None)
            continue
        inner, key, start, stop, sharing = entry
        inverse = param_state_inverse(inner, key)
        if isinstance(inverse, str):
            return None, inverse
        if inverse is None:
            return None, NO_STATE_YET
        if pp.copies % sharing:
            raise ValueError(
                f"a parameter held by {pp.copies} ranks has optimizer state sharded over {sharing}: "
                "the probes' counting and megatron's optimizer disagree"
            )
        out.append(PreconditionerShard(start, stop, inverse, pp.copies // sharing))
    return out, "Adam's second moment"
