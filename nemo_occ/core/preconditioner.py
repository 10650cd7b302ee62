"""Adam's diagonal preconditioner, read from the optimizer's state without changing it.

An Adam(W) update is Δθ = −η · m̂ / (√v̂ + ε), so the alignment that governs how the MTP term moves the
update is not <g_RL, g_MTP> but <g_RL, P g_MTP> with

    P = diag(1 / (√v̂ + ε)),   v̂ = v / (1 − β2^t)                  (Kingma & Ba, Algorithm 1)

v the optimizer's second-moment state (``exp_avg_sq``), t its step count. P is read at the probed
update, before that update's step: the metric the coming step will apply (up to the step's own
refresh of v, which changes it by the factor β2 and one squared gradient).

:func:`adam_preconditioner` reads a ``torch.optim.Adam``/``AdamW`` (the demo's, and the inner
optimizer megatron wraps). Megatron's mixed-precision and distributed optimizers keep the state on
fp32 copies of (shards of) the parameters: ``nemo_occ.megatron.probe_layout.adam_preconditioner``
maps those back. Before the optimizer's first step, or for an optimizer that keeps no second moment,
there is no P: the functions return None and a sentence saying so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nemo_occ.core.diagnostics import PreconditionerShard, ProbeParameter

__all__ = ["adam_inverse", "adam_preconditioner", "NO_STATE_YET"]

NO_STATE_YET = "before the optimizer's first step: Adam has no second moment yet"


def adam_inverse(exp_avg_sq: torch.Tensor, step: float, beta2: float, eps: float) -> torch.Tensor:
    """1 / (√(v / (1 − β2^t)) + ε), flattened, float32 or wider (a new tensor; the state is untouched)."""
    if step < 1:
        raise ValueError(f"a second moment exists from step 1 on, got step {step}")
    v = exp_avg_sq.detach().reshape(-1)
    v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v.clone()
    return 1.0 / ((v / (1.0 - beta2**step)).sqrt() + eps)


def _step(state: dict, group: dict) -> float | None:
    step = state.get("step", group.get("step"))  # torch keeps it per parameter, fused Adams per group
    return None if step is None else float(step)


def param_state_inverse(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None | str:
    """P of one parameter of a torch optimizer: the flattened inverse, None before its first step, or
    a sentence when the optimizer keeps no second moment."""
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        return f"a probed parameter is not in {type(optimizer).__name__}'s parameter groups"
    if "betas" not in group:
        return f"{type(optimizer).__name__} keeps no second moment (it is not Adam): no preconditioned metric"
    state = optimizer.state.get(param, {})
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    if key not in state:
        return None
    step = _step(state, group)
    if step is None or step < 1:
        return None
    # fused Adams (Apex, Transformer Engine) can switch the bias correction off per group
    beta2 = float(group["betas"][1]) if group.get("bias_correction", True) else 0.0
    return adam_inverse(state[key], step, beta2, float(group["eps"]))


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[ProbeParameter]
) -> tuple[list[PreconditionerShard] | None, str]:
    """(one whole-parameter shard per probe parameter, note), or (None, why there is none).

    For a ``torch.optim`` Adam(W) that holds every parameter's full state (a replicated optimizer):
    each shard counts 1/``copies`` like its parameter. A parameter the optimizer has not stepped yet
    (no state) makes the whole preconditioner absent: a partial metric would not be Adam's.
    """
    shards = []
    for pp in params:
        inverse = param_state_inverse(optimizer, pp.param)
        if isinstance(inverse, str):
            return None, inverse
        if inverse is None:
            return None, NO_STATE_YET
        shards.append(PreconditionerShard(0, pp.param.numel(), inverse, pp.copies))
    return shards, "Adam's second moment"
