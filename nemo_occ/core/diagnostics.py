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

Same-sample bias and cross-fitting (:func:`cross_fitted_statistics`). With g_RL and g_MTP from the
same minibatch, E<g_RL, g_MTP> = <E g_RL, E g_MTP> + Σ_i Cov(g_RL,i, g_MTP,i)/n²: each sequence's
covariance with itself. On the study's probes that term dominated (cosine 0.109 on the same tokens,
0.027 between halves). Splitting the minibatch by sequence into halves A and B, each half's gradient
scaled to a mean over that half (ĝ^h = g^h / w_h, w_h its share of the loss's denominator), gives

    c_x  = ½(<ĝ_RL^A, ĝ_MTP^B> + <ĝ_RL^B, ĝ_MTP^A>)     v²_x = <ĝ_MTP^A, ĝ_MTP^B>     ||g_RL||²_x = <ĝ_RL^A, ĝ_RL^B>

products of independent halves, unbiased for <E g_RL, E g_MTP>, ||E g_MTP||², ||E g_RL||² (they can
be negative when the signal is below the noise). The same-sample values of the whole minibatch,
g = g^A + g^B, are reported beside them (``same_sample``), and both again in Adam's metric
<a, P b>, P = diag(1/(√v̂ + ε)) from the optimizer's bias-corrected second moment (read, never
changed; :class:`PreconditionerShard`): the alignment that governs an Adam update is <g_RL, P g_MTP>.

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
    "ExactStatistics",
    "GradientStatistics",
    "PreconditionerShard",
    "cross_fitted_statistics",
    "exact_cross_fitted_statistics",
    "StreamingHalves",
    "half_masks",
    "split_halves",
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


@dataclass(frozen=True)
class PreconditionerShard:
    """Adam's diagonal preconditioner 1/(√v̂ + ε) over elements [start, stop) of one parameter's flattened
    tensor: the part whose optimizer state this rank holds (all of it, unless a distributed optimizer
    shards the state over data-parallel ranks). ``copies``: how many ranks of the statistics group hold
    this same range's state (each counts 1/copies of it)."""

    start: int
    stop: int
    inverse: torch.Tensor  # [stop - start]
    copies: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop or self.inverse.numel() != self.stop - self.start:
            raise ValueError(
                f"a preconditioner shard [{self.start}, {self.stop}) needs {self.stop - self.start} "
                f"entries, got {self.inverse.numel()}"
            )
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")


@dataclass
class ExactStatistics:
    """The exact statistics of one probed minibatch, four ways (module docstring): same-sample and
    cross-fitted, each in the Euclidean metric and in Adam's preconditioned one. The preconditioned
    pair is None when no second-moment state exists (``precond_note`` says why)."""

    same_sample: GradientStatistics
    cross_fit: GradientStatistics
    same_sample_precond: GradientStatistics | None = None
    cross_fit_precond: GradientStatistics | None = None
    precond_note: str = "no preconditioner was given"

    def cross_fit_in(self, metric: str) -> GradientStatistics | None:
        """The cross-fitted statistics in ``metric`` ("euclidean" or "preconditioned"; None if absent)."""
        if metric not in ("euclidean", "preconditioned"):
            raise ValueError(f"metric must be 'euclidean' or 'preconditioned', got {metric!r}")
        return self.cross_fit if metric == "euclidean" else self.cross_fit_precond

    def metrics(self, prefix: str = "fidelity") -> dict[str, float]:
        """``{prefix}/{c,v2,cos}_{same_sample,cross_fit}[_precond]_k``, ``{prefix}/rl_norm2_...`` (main
        model), ``{prefix}/mtp_params_v2_{same_sample,cross_fit}_k`` and ``{prefix}/precond_available``."""
        out: dict[str, float] = {f"{prefix}/precond_available": float(self.same_sample_precond is not None)}
        for name, stats in (
            ("same_sample", self.same_sample),
            ("cross_fit", self.cross_fit),
            ("same_sample_precond", self.same_sample_precond),
            ("cross_fit_precond", self.cross_fit_precond),
        ):
            if stats is None:
                continue
            out[f"{prefix}/rl_norm2_{name}"] = stats.rl_norm2
            for k, (c, v2) in enumerate(zip(stats.c, stats.v2, strict=True), start=1):
                out[f"{prefix}/c_{name}_{k}"] = c
                out[f"{prefix}/v2_{name}_{k}"] = v2
                if stats.rl_norm2 > 0 and v2 > 0:  # cross-fitted squares can be <= 0: cos undefined
                    out[f"{prefix}/cos_{name}_{k}"] = c / math.sqrt(stats.rl_norm2 * v2)
            if not name.endswith("precond"):
                for k, v2 in enumerate(stats.mtp_v2, start=1):
                    out[f"{prefix}/mtp_params_v2_{name}_{k}"] = v2
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



def _reduced_gradients(pp, grads: list) -> list[torch.Tensor]:
    """``grads`` of parameter ``pp``, each reduced over ``pp.grad_reductions`` in place; None becomes zeros.

    A rank whose loss did not reach the parameter still joins its peers' reductions, with zeros.
    """
    grads = [torch.zeros_like(pp.param) if g is None else g for g in grads]
    for g in grads:
        if g.shape != pp.param.shape:
            raise ValueError(f"a gradient of shape {tuple(g.shape)} for a parameter of {tuple(pp.param.shape)}")
        _reduce_(g, pp.grad_reductions)
    return grads

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
        grads = _reduced_gradients(pp, grads)
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


def split_halves(weights: Sequence[float]) -> list[bool]:
    """Which units (sequences, or groups of them) go to half A (True) or B, balanced by ``weights``.

    Greedy: heaviest first, each to the half with less weight so far (ties to A), so the halves'
    weights differ by at most the largest unit's. Deterministic: every pass of a probe and every rank
    that sees the same weights makes the same split. Raises with fewer than two units of weight > 0.
    """
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"unit weights must be finite and >= 0, got {w}")
    if sum(x > 0 for x in w) < 2:
        raise ValueError(
            f"cross-fitting needs at least two sequences with loss tokens in the probed minibatch, got {w}"
        )
    order = sorted(range(len(w)), key=lambda i: (-w[i], i))
    in_a, load = [False] * len(w), [0.0, 0.0]
    for i in order:
        half = 0 if load[0] <= load[1] else 1
        in_a[i] = half == 0
        load[half] += w[i]
    return in_a


class StreamingHalves:
    """:func:`split_halves` for sequences that arrive a micro-batch at a time (a framework's loop).

    Each sequence goes to the half with less weight so far (ties to A). A probe that replays the same
    micro-batches in the same order after :meth:`reset` gets the same split in every pass; ``load``
    is each half's weight on this rank (the shares, once summed over ranks).
    """

    def __init__(self) -> None:
        self.load = [0.0, 0.0]

    def reset(self) -> None:
        self.load = [0.0, 0.0]

    def assign(self, weights: torch.Tensor) -> torch.Tensor:
        """[B] bool, True for half A, for the next sequences with loss weights ``weights`` [B]."""
        in_a = []
        for w in weights.detach().double().cpu().tolist():
            half = 0 if self.load[0] <= self.load[1] else 1
            self.load[half] += w
            in_a.append(half == 0)
        return torch.tensor(in_a, dtype=torch.bool, device=weights.device)


def half_masks(
    mask: torch.Tensor, units: torch.Tensor | None = None, *, by: Literal["tokens", "sequences"] = "tokens"
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """The loss masks [B, S] of halves A and B of a minibatch and their shares of its denominator.

    ``units`` [B]: the unit each sequence belongs to (default: each its own), kept whole in one half:
    pass the GRPO group when advantages are normalised within groups, so the halves are independent.
    Units are balanced by :func:`split_halves` on ``by`` (the loss's denominator: valid tokens, or
    sequences with a valid token for a sequence-level loss); the shares are each half's part of it.
    """
    if by not in ("tokens", "sequences"):
        raise ValueError(f"by must be 'tokens' or 'sequences', got {by!r}")
    valid = mask.bool()
    rows = valid.sum(1).double() if by == "tokens" else valid.any(1).double()  # [B]
    units = torch.arange(mask.shape[0]) if units is None else units.long().cpu()
    ids, inverse = torch.unique(units, return_inverse=True)
    weights = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, rows.cpu())
    in_a = torch.tensor(split_halves(weights.tolist()))[inverse].to(mask.device)  # [B]
    total = float(rows.sum())
    share_a = float(rows[in_a].sum()) / total
    return valid & in_a[:, None], valid & ~in_a[:, None], (share_a, 1.0 - share_a)


# columns of the raw dot products per part (see cross_fitted_statistics): RL x RL, then per depth
_RL_COLS = ("AA", "AB", "BB")
_DEPTH_COLS = ("rA.mA", "rA.mB", "rB.mA", "rB.mB", "mA.mA", "mA.mB", "mB.mB")


def _gram(vectors: list[torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
    """[m, m] float64 Gram matrix <v_i, W v_j> of one parameter's (or shard's) gradients, W = diag(weight):
    each vector is converted to float64 once per bounded chunk and the products are one matmul."""
    flat = [v.reshape(-1) for v in vectors]
    m, n = len(flat), flat[0].numel()
    gram = torch.zeros(m, m, dtype=torch.float64, device=flat[0].device)
    step = max(1, _CHUNK // m)
    for start in range(0, n, step):
        x = torch.stack([v[start : start + step].double() for v in flat])  # [m, chunk]
        wx = x if weight is None else x * weight.reshape(-1)[start : start + step].double()
        gram += wx @ x.T
    return gram


def _dots(rl: tuple[torch.Tensor, torch.Tensor], mtp: list[tuple[torch.Tensor, torch.Tensor]], weight=None):
    """The raw dot products of one parameter (or one shard of it), optionally in the metric ``weight``:
    [rA·rA, rA·rB, rB·rB] then per depth [rA·mA, rA·mB, rB·mA, rB·mB, mA·mA, mA·mB, mB·mB]."""
    g = _gram([rl[0], rl[1], *(x for pair in mtp for x in pair)], weight)
    out = [g[0, 0], g[0, 1], g[1, 1]]
    for k in range(len(mtp)):
        a, b = 2 + 2 * k, 3 + 2 * k
        out += [g[0, a], g[0, b], g[1, a], g[1, b], g[a, a], g[a, b], g[b, b]]
    return torch.stack(out)


def _combine(
    raw: list[float], K: int, shares: tuple[float, float]
) -> tuple[GradientStatistics, GradientStatistics]:
    """(same-sample, cross-fitted) statistics of one part from its reduced raw dot products."""
    scale = 1.0 / (shares[0] * shares[1])  # ĝ^A = g^A / w_A, ĝ^B = g^B / w_B
    aa, ab, bb = raw[:3]
    same = GradientStatistics(c=[], v2=[], rl_norm2=aa + 2 * ab + bb)
    cross = GradientStatistics(c=[], v2=[], rl_norm2=scale * ab)
    for k in range(K):
        ra_ma, ra_mb, rb_ma, rb_mb, ma_ma, ma_mb, mb_mb = raw[3 + 7 * k : 10 + 7 * k]
        same.c.append(ra_ma + ra_mb + rb_ma + rb_mb)
        same.v2.append(ma_ma + 2 * ma_mb + mb_mb)
        cross.c.append(0.5 * scale * (ra_mb + rb_ma))
        cross.v2.append(scale * ma_mb)
    return same, cross


def cross_fitted_statistics(
    rl_grads: Sequence[Sequence[torch.Tensor | None]],
    mtp_grads: Sequence[Sequence[Sequence[torch.Tensor | None]]],
    params: Sequence[ProbeParameter],
    *,
    shares: tuple[float, float] = (0.5, 0.5),
    preconditioner: Sequence[PreconditionerShard | None] | None = None,
    precond_note: str = "no preconditioner was given",
    stats_group=None,
) -> ExactStatistics:
    """Same-sample and cross-fitted c, v², ||g_RL||² of a minibatch split into halves A and B.

    ``rl_grads[h][i]`` and ``mtp_grads[h][k][i]``: half h's gradient of ``params[i]`` (None = not
    reached), each the gradient of the half's part of the minibatch loss (its tokens over the
    minibatch's denominator), so that g = g^A + g^B is the minibatch gradient. ``shares``: (w_A, w_B),
    each half's share of the loss's denominator (its tokens, or sequences for a sequence-level loss).
    The gradients are reduced **in place** over each parameter's ``grad_reductions``, as in
    :func:`gradient_statistics`. ``preconditioner[i]``: this rank's :class:`PreconditionerShard` of
    ``params[i]`` or None where this rank holds no optimizer state of it; ``preconditioner=None`` (no
    state anywhere: before the optimizer's first step, or an optimizer without a second moment) leaves
    the preconditioned statistics out with ``precond_note`` saying why. Raises when the shards given
    over all ranks do not cover every parameter element exactly once. One scalar all-reduce over
    ``stats_group``.
    """
    if len(rl_grads) != 2 or len(mtp_grads) != 2:
        raise ValueError("pass the gradients of two halves, A and B")
    if not all(math.isfinite(w) and w > 0 for w in shares) or len(shares) != 2:
        raise ValueError(f"each half's share of the loss's denominator must be > 0, got {shares}")
    K = len(mtp_grads[0])
    if K < 1 or len(mtp_grads[1]) != K:
        raise ValueError("no MTP depth, or halves with different numbers of depths")
    for h in range(2):
        if len(rl_grads[h]) != len(params) or any(len(g) != len(params) for g in mtp_grads[h]):
            raise ValueError(
                f"half {'AB'[h]} has a gradient list whose length is not {len(params)} (parameters)"
            )
    if preconditioner is not None and len(preconditioner) != len(params):
        raise ValueError(f"preconditioner has {len(preconditioner)} entries for {len(params)} parameters")
    n_raw = len(_RL_COLS) + len(_DEPTH_COLS) * K
    device = params[0].param.device if params else torch.device("cpu")
    # local[part] = [raw dots, raw preconditioned dots, parameter presence, elements, elements preconditioned]
    local = torch.zeros(len(_PARTS), 2 * n_raw + 3, dtype=torch.float64, device=device)
    for i, pp in enumerate(params):
        row = _PARTS.index(pp.part)
        local[row, -3] += 1.0 / pp.copies
        local[row, -2] += pp.param.numel() / pp.copies
        grads = [rl_grads[h][i] for h in range(2)] + [mtp_grads[h][k][i] for k in range(K) for h in range(2)]
        if all(g is None for g in grads) and not pp.grad_reductions:
            grads = None
        else:
            grads = _reduced_gradients(pp, grads)
            rl = (grads[0], grads[1])
            mtp = [(grads[2 + 2 * k], grads[3 + 2 * k]) for k in range(K)]
            local[row, :n_raw] += _dots(rl, mtp).to(device) / pp.copies
        shard = preconditioner[i] if preconditioner is not None else None
        if shard is None:
            continue
        if shard.stop > pp.param.numel():
            raise ValueError(
                f"a preconditioner shard ends at {shard.stop}, past the parameter's {pp.param.numel()}"
            )
        local[row, -1] += (shard.stop - shard.start) / shard.copies
        if grads is None:
            continue
        cut = slice(shard.start, shard.stop)
        rl = tuple(g.reshape(-1)[cut] for g in (grads[0], grads[1]))
        mtp = [(grads[2 + 2 * k].reshape(-1)[cut], grads[3 + 2 * k].reshape(-1)[cut]) for k in range(K)]
        weight = shard.inverse.reshape(-1)
        local[row, n_raw : 2 * n_raw] += _dots(rl, mtp, weight).to(device) / shard.copies
    if stats_group is not None and _group_size(stats_group) > 1:
        local = all_reduce_sum_(local.to(collective_device(stats_group)), stats_group)
    values = local.cpu().tolist()
    for row in values:
        if not all(math.isfinite(x) for x in row):
            raise ValueError(
                "a gradient or the preconditioner has NaN/Inf entries: the exact statistics are undefined "
                "for this update"
            )
    (main_same, main_cross), (mtp_same, mtp_cross) = (_combine(r[:n_raw], K, shares) for r in values)
    has_mtp = values[1][-3] > 0
    for main, mtp in ((main_same, mtp_same), (main_cross, mtp_cross)):
        main.mtp_c, main.mtp_v2 = (mtp.c, mtp.v2) if has_mtp else ([], [])
        main.mtp_rl_norm2 = mtp.rl_norm2
    out = ExactStatistics(main_same, main_cross, precond_note=precond_note)
    covered = [r[-1] for r in values]
    if preconditioner is not None or any(covered):
        elements = [r[-2] for r in values]
        if any(abs(c - e) > 1e-6 * max(1.0, e) for c, e in zip(covered, elements, strict=True)):
            raise ValueError(
                f"the optimizer state given covers {sum(covered):.0f} of {sum(elements):.0f} parameter elements "
                "over all ranks: every rank must pass its own shards (or all pass preconditioner=None)"
            )
        (p_same, p_cross), _ = (_combine(r[n_raw : 2 * n_raw], K, shares) for r in values)
        out.same_sample_precond, out.cross_fit_precond = p_same, p_cross
        out.precond_note = "Adam's second moment"
    return out


def exact_cross_fitted_statistics(
    rl_losses: Sequence[torch.Tensor],
    mtp_losses: Sequence[Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor | ProbeParameter],
    *,
    shares: tuple[float, float] = (0.5, 0.5),
    preconditioner=None,
    precond_note: str = "no preconditioner was given",
    group=None,
    stats_group=None,
) -> ExactStatistics:
    """:func:`cross_fitted_statistics` from backward passes of each half's losses (the graph stays alive).

    ``rl_losses = (L_RL^A, L_RL^B)``, ``mtp_losses = ([L_MTP,k^A]_k, [L_MTP,k^B]_k)``: each half's part
    of the minibatch loss (its tokens over the minibatch's denominators). ``preconditioner`` is a
    sequence aligned with ``params`` or a callable taking the probe parameters that returns one.
    Costs 2(1 + K) backward passes.
    """
    probe = [pp for pp in as_probe_parameters(params, group=group) if pp.param.requires_grad]
    if not probe:
        raise ValueError("no parameter in the chosen set requires grad")
    tensors = [pp.param for pp in probe]

    def grads(loss: torch.Tensor) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True))

    rl = [grads(loss) for loss in rl_losses]
    mtp = [[grads(loss) for loss in half] for half in mtp_losses]
    if callable(preconditioner):
        preconditioner = preconditioner(probe)
    elif preconditioner is not None:
        keep = [i for i, pp in enumerate(as_probe_parameters(params, group=group)) if pp.param.requires_grad]
        preconditioner = [preconditioner[i] for i in keep]
    return cross_fitted_statistics(
        rl, mtp, probe, shares=shares, preconditioner=preconditioner, precond_note=precond_note,
        stats_group=stats_group,
    )  # fmt: skip
