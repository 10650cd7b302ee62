"""Run megatron-core on a CPU-only torch: ``with cpu_compat():`` patches it for the block, then undoes it.

Entered once where a program starts (the CPU demo's ``run_demo``, the benches, the tests' fixtures);
library code never applies it. Megatron-core assumes CUDA in a handful of places that have nothing to
do with the maths of a tiny model. Each patch below replaces one such assumption with its CPU
equivalent; each runs on megatron-core 0.16.1 and 0.20.0 with gloo, in one process and in several:

=================================================  ================================================
megatron-core assumption                           CPU replacement
=================================================  ================================================
``torch.cuda.current_device()`` (~50 sites)        returns ``torch.device("cpu")``
``CudaRNGStatesTracker.add/fork`` (CUDA RNG)       ``add`` is a no-op, ``fork`` a null context
                                                   (dropout is 0 in every CPU model we build)
``get_default_causal_mask`` allocates on cuda      same mask on the CPU
``moe_utils.te_general_gemm`` undefined w/o TE     set to ``None`` (0.16.1 bug: NameError)
torch LayerNorm refuses sequence parallelism       built with SP off; params tagged
                                                   ``sequence_parallel=True`` like the TE norm
local ``DotProductAttention`` rejects THD          packed ``[T, 1, ...]`` input runs as one row with
packed sequences                                   a block-diagonal causal mask from ``cu_seqlens``
``weight.data.cuda()`` in ``LanguageModule.``      ``Tensor.cuda()`` returns the tensor itself, so
``setup_embeddings_and_output_layer`` (PP > 1)     the first and last stage's embedding copies are
                                                   still all-reduced (on the CPU)
``torch.cuda.synchronize()`` after pipeline p2p    a no-op (gloo point-to-point is synchronous
(``pipeline_parallel.p2p_communication``)          once its requests are waited on)
``torch.zeros(..., device="cuda")`` opening        while one of those functions runs, tensor
every ``schedules.forward_backward_*``             factories asked for "cuda" allocate on the CPU
``is_inference_column_parallel_linear``            returns ``False``, only when Transformer Engine
(>= 0.20, ``tensor_parallel.inference_layers``)    is absent: its ``isinstance`` names classes built
                                                   on TE layers, a ``MagicMock`` without TE, so
                                                   building any MTP layer raised ``TypeError``
=================================================  ================================================

What is simplified: the THD shim ignores ``cu_seqlens_*_padded`` beyond using it for the mask,
and there is no context parallelism (the local attention has none; CP needs TE's attention).

The CPU patches are never applied when CUDA is available (the block then yields False), so the same
test or demo code runs unchanged on a GPU machine. The last row is about Transformer Engine, not CUDA:
it applies wherever TE is missing. A nested ``with cpu_compat():`` inside an active one changes
nothing; on exit each block restores exactly the attributes it replaced, in reverse order, also when
applying them failed half way. The patches are process-wide: blocks nest, they do not overlap across
threads.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_MISSING = object()


class _Patches:
    """The attributes one ``cpu_compat()`` block replaced: (owner, name, original or _MISSING)."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        # Save the raw namespace entry (not getattr) so a class's staticmethod __new__ is restored as is.
        self.saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def restore(self) -> None:
        while self.saved:
            owner, name, original = self.saved.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def is_enabled() -> bool:
    """True while the CPU patches are in effect (inside a ``cpu_compat()`` block on a CPU-only torch)."""
    return torch.cuda.current_device is _cpu_current_device


@contextlib.contextmanager
def _no_fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
    # The CUDA RNG tracker only matters for dropout/initialisation under TP; CPU models use
    # dropout 0 and CPU initialisation (the full weight is drawn, then split), so no fork needed.
    yield


def _no_add(self, name: str, seed: int) -> None:
    return None


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    # True = masked, same convention as megatron.core.transformer.utils.get_default_causal_mask.
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Block-diagonal causal mask [1, 1, T, T] (True = masked) for documents packed in one row.

    Token t may attend to token u iff both lie in the same segment [cu[i], cu[i+1]) and u <= t.
    Positions at or after ``cu_seqlens[-1]`` (padding) form their own causal segment.
    """
    positions = torch.arange(total, device=cu_seqlens.device)
    # Segment id of each position: number of boundaries <= position.
    segment = torch.bucketize(positions, cu_seqlens.to(positions.dtype), right=True)  # [T]
    same = segment[:, None] == segment[None, :]
    causal = positions[None, :] <= positions[:, None]
    return ~(same & causal)[None, None]


def _make_thd_attention_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, query, key, value, attention_mask, *args, packed_seq_params=None, **kwargs):
        if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", None) != "thd":
            return original(
                self, query, key, value, attention_mask, *args, packed_seq_params=packed_seq_params, **kwargs
            )
        # Attention squeezed the dummy batch dim for THD: [T, heads, dim] -> [T, 1, heads, dim].
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        total = query.shape[0]
        mask = packed_causal_mask(cu.to(torch.long), total)
        out = original(
            self,
            query.unsqueeze(1),
            key.unsqueeze(1),
            value.unsqueeze(1),
            mask,
            *args,
            packed_seq_params=None,
            **kwargs,
        )
        return out  # [T, 1, heads*dim]; Attention reshapes it to (t, 1, h) itself.

    return forward


def _tensor_stays_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _no_synchronize(device: Any = None) -> None:
    return None


class _CudaFactoriesOnCpu(TorchFunctionMode):
    """Calls that pass ``device="cuda"`` (or a CUDA ``torch.device``) allocate on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and not isinstance(device, int) and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _make_schedule_on_cpu(original: Callable) -> Callable:
    # megatron's forward_backward_* functions open with
    # `total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`: a literal device string,
    # which the current_device patch cannot reach. The mode is active only while the schedule runs.
    @functools.wraps(original)
    def schedule(*args, **kwargs):
        with _CudaFactoriesOnCpu():
            return original(*args, **kwargs)

    return schedule


_SCHEDULES = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
)


def _not_an_inference_linear(module: Any) -> bool:
    # The inference-optimized linears subclass Transformer Engine layers: without TE none can exist.
    return False


def _patch_inference_linear_check(patches: _Patches) -> None:
    # megatron-core >= 0.20: MultiTokenPredictionLayer.__init__ calls
    # tensor_parallel.inference_layers.is_inference_column_parallel_linear(self.eh_proj), imported by
    # name into transformer.multi_token_prediction. Its isinstance names InferenceColumnParallelLinear,
    # whose base TEColumnParallelLinear is built on the MagicMock that extensions/transformer_engine
    # substitutes for TE, so isinstance raises TypeError. Older cores have no such function.
    try:
        from megatron.core.tensor_parallel import inference_layers
    except ImportError:
        return
    if getattr(inference_layers, "HAVE_TE", True) or not hasattr(
        inference_layers, "is_inference_column_parallel_linear"
    ):
        return
    from megatron.core.transformer import multi_token_prediction

    for module in (inference_layers, multi_token_prediction):
        check = getattr(module, "is_inference_column_parallel_linear", None)
        if check is not None and check is not _not_an_inference_linear:  # not yet replaced by an outer block
            patches.set(module, "is_inference_column_parallel_linear", _not_an_inference_linear)


def _make_torch_norm_new(original_new: Callable) -> Callable:
    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(cls, plain, hidden_size, *args, **kwargs)
        # Under SP each TP rank sees a different slice of the sequence, so the norm's weight
        # gradients are partial; megatron's finalize_model_grads all-reduces tensors tagged so.
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(__new__)


def _apply_cpu_patches(patches: _Patches) -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import dot_product_attention, torch_norm
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.moe import moe_utils

    patches.set(torch.cuda, "current_device", _cpu_current_device)
    patches.set(torch.cuda, "synchronize", _no_synchronize)
    patches.set(torch.Tensor, "cuda", _tensor_stays_on_cpu)
    for name in _SCHEDULES:
        if hasattr(schedules, name):
            patches.set(schedules, name, _make_schedule_on_cpu(getattr(schedules, name)))
    patches.set(tp_random.CudaRNGStatesTracker, "fork", _no_fork)
    patches.set(tp_random.CudaRNGStatesTracker, "add", _no_add)
    patches.set(transformer_utils, "get_default_causal_mask", _cpu_default_causal_mask)
    patches.set(fused_softmax, "get_default_causal_mask", _cpu_default_causal_mask)
    if getattr(moe_utils, "te_general_gemm", None) is None:
        patches.set(moe_utils, "te_general_gemm", None)
    attention_cls = dot_product_attention.DotProductAttention
    patches.set(attention_cls, "forward", _make_thd_attention_forward(attention_cls.forward))
    norm_cls = torch_norm.WrappedTorchNorm
    patches.set(norm_cls, "__new__", _make_torch_norm_new(norm_cls.__new__))


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """``with cpu_compat() as applied:`` megatron-core runs on this CPU-only torch inside the block.

    ``applied`` is False, and no CPU patch is made, when CUDA is available (module docstring).
    """
    patches = _Patches()
    try:
        if not torch.cuda.is_available() and not is_enabled():
            _apply_cpu_patches(patches)
        _patch_inference_linear_check(patches)
        yield is_enabled()
    finally:
        patches.restore()
