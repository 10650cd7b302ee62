"""Exact gradient statistics, the quantities the OCC proxies estimate (the paper's Eq. 7 and Fig. 8).

    c_k = <g_RL, g_MTP,k>     v²_k = ||g_MTP,k||²     ||g_RL||²

over the main model's parameters (the paper's definition: the MTP term's effect on the main model),
and, reported separately, over the MTP layers' own parameters (``mtp.*``), which the RL loss never
reaches. g_RL and g_MTP,k are the gradients of the main RL loss and of depth k's *unscaled* MTP loss
over the global batch. Loss-to-minimise gradients are the negatives of the paper's ascent gradients;
c and v² are unchanged by that sign flip.

How it scales. Nothing is ever flattened into one whole-model vector: each parameter tensor's
gradients are dotted with each other on the rank that holds them (accumulated in float64, a bounded
chunk at a time), giving a handful of scalars per rank. Every rank then holds

    local = Σ_p (1 / copies_p) · <g_a,p, g_b,p>

for its own parameters, and ONE all-reduce of those scalars over the world gives the exact
whole-model value: a tensor-, pipeline- or expert-parallel shard is held by one rank of its
model-parallel position (and by ``copies_p`` ranks in all, its data-parallel replicas), a parameter
replicated over tensor parallelism (layer norms, row-parallel biases) by ``copies_p`` ranks, each
of which counts 1/copies_p of it. Before the dot products, each parameter's locally computed
gradient is summed over the groups that training sums it over (data parallelism, then tensor
parallelism for sequence-parallel parameters, the embedding group for the word embedding that the
first and last pipeline stages share): :class:`ProbeParameter` carries that per parameter, and
``nemo_occ.megatron.probe_layout`` builds it for a megatron-core model.

Cost: the gradients come from separate backward passes, one of the RL loss and one per MTP depth
(:func:`exact_gradient_statistics` reuses the training forward with ``retain_graph``), plus
1 + K gradient-sized reductions and one scalar all-reduce. Memory: 1 + K gradient copies of this
rank's parameters (float32 for float32 parameters), never a float64 copy of the model.

Letters: K MTP depths, P parameter tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from nemo_occ.core.distributed import all_reduce_sum_, collective_device

__all__ = [
    "GradientStatistics",
    "ProbeParameter",
    "as_probe_parameters",
    "exact_gradient_statistics",
    "gradient_statistics",
]

Part = Literal["main", "mtp"]
_PARTS: tuple[Part, ...] = ("main", "mtp")
_CHUNK = 1 << 22  # elements converted to float64 at a time: bounds the dot product's scratch memory


@dataclass(frozen=True)
class ProbeParameter:
    """One parameter tensor as the probes see it.

    ``part``: ``"main"`` (the main model, the paper's c and v²) or ``"mtp"`` (an MTP layer's own).
    ``copies``: how many ranks of the statistics group hold an identical copy of this tensor's reduced
    gradient (its data-parallel replicas, times the tensor-parallel size if it is replicated there, ...);
    each counts 1/copies of it. ``grad_reductions``: ``(process group, "sum" | "mean")`` pairs, in order,
    that turn this rank's locally computed gradient into the training gradient; empty when the
    gradients given are already reduced (e.g. read from megatron's finalized ``main_grad``).
    """

    param: torch.Tensor
    part: Part = "main"
    copies: int = 1
    grad_reductions: tuple[tuple[Any, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.part not in _PARTS:
            raise ValueError(f"part must be one of {_PARTS}, got {self.part!r}")
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        for _, op in self.grad_reductions:
            if op not in ("sum", "mean"):
                raise ValueError(f"a gradient reduction is 'sum' or 'mean', got {op!r}")


@dataclass
class GradientStatistics:
    """Per depth k (index 0 is depth 1): c_k, v²_k and ||g_RL||², over the main model's parameters,
    and the same three over the MTP layers' own parameters (``mtp_*``; c and ||g_RL||² are 0 there
    whenever the RL loss does not reach the MTP layers, as it should not)."""

    c: list[float]
    v2: list[float]
    rl_norm2: float
    mtp_c: list[float] = field(default_factory=list)
    mtp_v2: list[float] = field(default_factory=list)
    mtp_rl_norm2: float = 0.0

    def metrics(self, prefix: str = "exact") -> dict[str, float]:
        """``{prefix}/c_k``, ``v2_k``, ``rl_norm2`` (main model) and ``{prefix}/mtp_params/v2_k`` (MTP layers)."""
        out = {f"{prefix}/rl_norm2": self.rl_norm2}
        for k, (c, v2) in enumerate(zip(self.c, self.v2, strict=True), start=1):
            out[f"{prefix}/c_{k}"] = c
            out[f"{prefix}/v2_{k}"] = v2
        for k, v2 in enumerate(self.mtp_v2, start=1):
            out[f"{prefix}/mtp_params/v2_{k}"] = v2
        return out


def as_probe_parameters(
    params: Sequence[torch.Tensor | ProbeParameter], *, group=None
) -> list[ProbeParameter]:
    """Plain tensors become main-model parameters whose gradient is summed over ``group`` (data parallel)."""
    out = []
    for p in params:
        if isinstance(p, ProbeParameter):
            out.append(p)
        elif isinstance(p, torch.Tensor):
            out.append(ProbeParameter(p, "main", 1, ((group, "sum"),) if group is not None else ()))
        else:
            raise TypeError(f"params must be tensors or ProbeParameter, got {type(p).__name__}")
    return out


def _group_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _reduce_(grad: torch.Tensor, reductions: tuple[tuple[Any, str], ...]) -> torch.Tensor:
    for group, op in reductions:
        size = _group_size(group)
        if size == 1:
            continue
        all_reduce_sum_(grad, group)
        if op == "mean":
            grad.div_(size)
    return grad


def _dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> accumulated in float64, a bounded chunk at a time (no full float64 copy of a or b)."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), _CHUNK):
        total += torch.dot(a[start : start + _CHUNK].double(), b[start : start + _CHUNK].double())
    return total


# Over 60 lines on purpose: the checks, the per-parameter reductions and the one collective run in this
# order on every rank (a collective split across helpers is easier to call out of order on one rank).
def gradient_statistics(
    rl_grads: Sequence[torch.Tensor | None],
    mtp_grads: Sequence[Sequence[torch.Tensor | None]],
    params: Sequence[ProbeParameter],
    *,
    stats_group=None,
) -> GradientStatistics:
    """c, v², ||g_RL||² from per-parameter gradients (see the module docstring).

    ``rl_grads[i]`` and ``mtp_grads[k][i]`` are this rank's gradients of ``params[i]`` (None = not
    reached, counted as zero). They are reduced **in place** over each parameter's
    ``grad_reductions``: pass tensors you own. ``stats_group`` spans every rank that holds a part of
    the model (the world, for one model per world); the scalars are summed over it once. Every rank of
    every group involved must call this with its parameters in the same order as its peers.
    """
    # long on purpose: one pass over the parameters accumulates c, v² and ‖g_RL‖² of every depth, then the
    # scalars are summed over the group once; split, each part would walk the parameters and their missing
    # gradients again
    K = len(mtp_grads)
    if K < 1:
        raise ValueError("no MTP depth: pass one gradient list per MTP depth")
    for k, grads in enumerate(mtp_grads):
        if len(grads) != len(params):
            raise ValueError(f"mtp_grads[{k}] has {len(grads)} entries for {len(params)} parameters")
    if len(rl_grads) != len(params):
        raise ValueError(f"rl_grads has {len(rl_grads)} entries for {len(params)} parameters")
    device = params[0].param.device if params else torch.device("cpu")
    # local[part] = [||g_RL||², c_1..c_K, v²_1..v²_K, parameters], each parameter weighted by 1/copies;
    # the last column tells every rank whether the part exists anywhere (MTP lives on the last stage)
    local = torch.zeros(len(_PARTS), 2 + 2 * K, dtype=torch.float64, device=device)
    for i, pp in enumerate(params):
        row = _PARTS.index(pp.part)
        local[row, -1] += 1.0 / pp.copies
        grads = [rl_grads[i]] + [mtp_grads[k][i] for k in range(K)]
        if all(g is None for g in grads) and not pp.grad_reductions:
            continue
        # a rank whose loss did not reach the parameter still joins its peers' reductions, with zeros
        grads = [torch.zeros_like(pp.param) if g is None else g for g in grads]
        for g in grads:
            if g.shape != pp.param.shape:
                raise ValueError(
                    f"a gradient of shape {tuple(g.shape)} for a parameter of {tuple(pp.param.shape)}"
                )
            _reduce_(g, pp.grad_reductions)
        g_rl, g_mtp = grads[0], grads[1:]
        w = 1.0 / pp.copies
        local[row, 0] += w * _dot64(g_rl, g_rl).to(device)
        for k in range(K):
            local[row, 1 + k] += w * _dot64(g_rl, g_mtp[k]).to(device)
            local[row, 1 + K + k] += w * _dot64(g_mtp[k], g_mtp[k]).to(device)
    if stats_group is not None and _group_size(stats_group) > 1:
        local = all_reduce_sum_(local.to(collective_device(stats_group)), stats_group)
    values = local.cpu().tolist()
    for row in values:
        if not all(math.isfinite(x) for x in row):
            raise ValueError(
                "a gradient has NaN/Inf entries: the exact statistics are undefined for this update"
            )
    main, mtp = values
    has_mtp = mtp[-1] > 0
    return GradientStatistics(
        c=main[1 : 1 + K],
        v2=main[1 + K : 1 + 2 * K],
        rl_norm2=main[0],
        mtp_c=mtp[1 : 1 + K] if has_mtp else [],
        mtp_v2=mtp[1 + K : 1 + 2 * K] if has_mtp else [],
        mtp_rl_norm2=mtp[0],
    )


def exact_gradient_statistics(
    rl_loss: torch.Tensor,
    mtp_losses: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor | ProbeParameter],
    *,
    group=None,
    stats_group=None,
) -> GradientStatistics:
    """Exact c, v² over ``params`` from separate backward passes of the losses (the graph stays alive).

    Pass each rank's share of the global losses (already divided by the global denominators). Plain
    tensors are main-model parameters whose gradient is summed over the data-parallel ``group``;
    :class:`ProbeParameter` entries (``nemo_occ.megatron.probe_layout``) say for themselves how their
    gradient is reduced and counted, with ``stats_group`` the group the scalars are summed over.
    Parameters that do not require grad are skipped. Costs 1 + K backward passes.
    """
    probe = [pp for pp in as_probe_parameters(params, group=group) if pp.param.requires_grad]
    if not probe:
        raise ValueError("no parameter in the chosen set requires grad")
    tensors = [pp.param for pp in probe]
    rl = list(torch.autograd.grad(rl_loss, tensors, retain_graph=True, allow_unused=True))
    mtp = [
        list(torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)) for loss in mtp_losses
    ]
    return gradient_statistics(rl, mtp, probe, stats_group=stats_group)
