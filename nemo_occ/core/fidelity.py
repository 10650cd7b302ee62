"""Can the OCC proxies be trusted on this run? Metrics that answer it from the exact probes.

OCC sets λ_k = λ+ · ĉ_k / (v̂²_k + ε) from log-prob proxies of c_k = <g_RL, g_MTP,k> and
v²_k = ||g_MTP,k||² (Eq. 11-13 of the OCC paper, whose Fig. 8 claims that they track each other).
Every ``fidelity.every`` RL steps one optimizer update is probed (``nemo_occ.core.diagnostics``), and
:class:`ProbeHistory` keeps, per probe and depth, the update's per-token proxies ĉ/n and v̂²/n next
to the exact c and v² (over the main model's parameters). Per-token proxies are the ones compared:
the exact statistics are gradients of token-mean losses, while the summed proxies also grow with the
update's token count, which DAPO's dynamic sampling varies. Reported:

- at each probe: both proxies (summed and per token), c, v², ||g_RL||², v² over ``mtp.*``, and
  ``update_share_k`` = |λ_k|·||g_MTP,k|| / ||g_RL||: how far the MTP term can move the main model's
  update relative to the RL gradient (0 means λ does not matter, ≳ 1 that it dominates);
- over the probes so far: Spearman ρ with its 95% interval for (ĉ, c) and (v̂², v²)
  (:func:`spearman_interval`), and sign agreement against its base rate (:func:`sign_agreement`) for
  the values of (ĉ, c) — λ takes ĉ's sign — and for the probe-to-probe changes of (v̂², v²),
  whose values are never negative;
- ``trusted_k``, the verdict, by this rule: **1 when, over at least ``min_probes`` probes, the 95%
  intervals of ρ(ĉ, c) and of ρ(v̂², v²) both lie above 0 and ĉ's sign agrees with c's more often than
  the base rate; 0 otherwise**, including too few probes to tell. It asks only that the proxies rank
  the updates like the exact statistics do and that ĉ's sign means something: λ's scale is absorbed
  by λ+ anyway, so proportionality is not required.

:class:`HeadGap` measures a separate question, every update: with ``old_logprobs: main`` (the
reference code's reading) δ_MTP = log π_θ(MTP) − log π_old(main) contains the static gap between the
MTP head's and the main head's log-probs of the same token. It reports v̂² under both readings of
δ_MTP (against the main head's old log-prob and against the MTP head's own) and the share of the
first that the static gap alone accounts for, Σ (log π_old(MTP) − log π_old(main))² / v̂²(main).

Letters: B sequences, S token positions, K MTP depths.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from nemo_occ.core.diagnostics import GradientStatistics
from nemo_occ.core.distributed import all_reduce_sum_, collective_device
from nemo_occ.core.losses import check_logprob_inputs
from nemo_occ.core.metrics import UpdateStatistics

__all__ = ["HeadGap", "ProbeHistory", "probed_update", "sign_agreement", "spearman_interval"]

_Z95 = 1.959963984540054  # two-sided 95% normal quantile


def probed_update(num_updates: int) -> int:
    """Which optimizer update of a probed RL step is probed: the second, or the only one.

    The step's first update runs at θ = θ_old, where δ_RL ≡ 0 and so ĉ = 0 whatever c is: probing it
    would pair every exact c with a zero proxy.
    """
    if num_updates < 1:
        raise ValueError(f"a step has at least one update, got {num_updates}")
    return min(1, num_updates - 1)


def spearman_interval(
    x: Sequence[float], y: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """(ρ, low, high): Spearman's ρ (``scipy.stats.spearmanr``) with a Fisher-z interval.

    z = atanh(ρ) is taken as normal with standard error sqrt((1 + ρ²/2) / (n − 3)), the variance that
    Bonett & Wright (2000, Psychometrika 65:23) give for Spearman's ρ; the interval is
    tanh(z ± q·se), q the two-sided normal quantile of ``confidence``. None when n < 4 or either
    series is constant (ρ is then undefined).
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 4 or np.ptp(np.asarray(x, dtype=float)) == 0 or np.ptp(np.asarray(y, dtype=float)) == 0:
        return None
    from scipy.stats import norm, spearmanr

    rho = float(spearmanr(x, y).statistic)
    if not math.isfinite(rho):
        return None
    q = _Z95 if confidence == 0.95 else float(norm.ppf(0.5 + confidence / 2))
    se = math.sqrt((1.0 + rho * rho / 2.0) / (n - 3))
    z = math.atanh(max(-1.0 + 1e-15, min(1.0 - 1e-15, rho)))  # ρ = ±1 gives an interval of width ~0
    return rho, math.tanh(z - q * se), math.tanh(z + q * se)


def sign_agreement(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """(agreement, base rate): the share of pairs with sign(x) = sign(y), and the share that
    independent series with the same sign frequencies would give, Σ_s P(sign x = s)·P(sign y = s).
    None for empty series."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if not len(x):
        return None
    sx, sy = np.sign(np.asarray(x, dtype=float)), np.sign(np.asarray(y, dtype=float))
    agreement = float(np.mean(sx == sy))
    base = float(sum(np.mean(sx == s) * np.mean(sy == s) for s in (-1.0, 0.0, 1.0)))
    return agreement, base


class ProbeHistory:
    """The probes so far and the trust metrics over them (module docstring); checkpointed with the run.

    ``record`` adds one probe (call it after the probed update's ``close_update``, with that update's
    proxies, the λ it applied and its exact statistics) and returns the probe's metrics together with
    the running ones. The history is identical on every rank when the inputs are (they are reduced).
    """

    def __init__(self, num_depths: int, min_probes: int = 5):
        if num_depths < 1:
            raise ValueError(f"num_depths must be >= 1, got {num_depths}")
        if min_probes < 4:
            raise ValueError(f"min_probes must be >= 4 (a Spearman interval needs n >= 4), got {min_probes}")
        self.num_depths = num_depths
        self.min_probes = min_probes
        # per probe: per depth [ĉ/n, v̂²/n, c, v²]
        self.records: list[list[list[float]]] = []

    def record(
        self,
        *,
        c_hat: Sequence[float],
        v2_hat: Sequence[float],
        tokens: Sequence[float],
        lambdas: Sequence[float],
        exact: GradientStatistics,
        prefix: str = "fidelity",
    ) -> dict[str, float]:
        """Add one probe; returns ``{prefix}/...`` metrics of this probe and of all probes so far.

        ``c_hat``, ``v2_hat``: the update's summed proxies per depth; ``tokens``: its valid tokens per
        depth; ``lambdas``: the λ it applied. A probe whose update had a depth without valid tokens is
        not recorded (warning): its per-token proxies do not exist.
        """
        K = self.num_depths
        for name, seq in (("c_hat", c_hat), ("v2_hat", v2_hat), ("tokens", tokens), ("lambdas", lambdas)):
            if len(seq) != K:
                raise ValueError(f"{name} has {len(seq)} entries but there are {K} MTP depth(s)")
            if not all(math.isfinite(float(v)) for v in seq):
                raise ValueError(f"{name} has a NaN/Inf entry: {list(seq)}")
        if len(exact.c) != K:
            raise ValueError(f"the exact statistics have {len(exact.c)} depth(s) but there are {K}")
        if any(float(n) <= 0 for n in tokens):
            warnings.warn(
                "a probed update had an MTP depth without valid tokens: probe not recorded", stacklevel=2
            )
            return {}
        row = [[float(c_hat[k]) / float(tokens[k]), float(v2_hat[k]) / float(tokens[k]), exact.c[k], exact.v2[k]]
               for k in range(K)]  # fmt: skip
        self.records.append(row)
        out: dict[str, float] = {f"{prefix}/rl_norm2": exact.rl_norm2}
        for k in range(K):
            d = k + 1
            out[f"{prefix}/c_hat_{d}"] = float(c_hat[k])
            out[f"{prefix}/v2_hat_{d}"] = float(v2_hat[k])
            out[f"{prefix}/c_hat_per_token_{d}"] = row[k][0]
            out[f"{prefix}/v2_hat_per_token_{d}"] = row[k][1]
            out[f"{prefix}/c_{d}"] = exact.c[k]
            out[f"{prefix}/v2_{d}"] = exact.v2[k]
            if k < len(exact.mtp_v2):
                out[f"{prefix}/mtp_params_v2_{d}"] = exact.mtp_v2[k]
            if exact.rl_norm2 > 0:
                out[f"{prefix}/update_share_{d}"] = abs(float(lambdas[k])) * math.sqrt(
                    exact.v2[k] / exact.rl_norm2
                )
        out.update(self.metrics(prefix))
        return out

    def record_update(self, update: UpdateStatistics, exact: GradientStatistics) -> dict[str, float]:
        """:meth:`record` with the proxies of the probed update as ``MTPObjective.close_update`` returned them."""
        return self.record(
            c_hat=[s.c_hat for s in update.depths],
            v2_hat=[s.v2_hat for s in update.depths],
            tokens=[s.tokens for s in update.depths],
            lambdas=[s.lambda_applied for s in update.depths],
            exact=exact,
        )

    def metrics(self, prefix: str = "fidelity") -> dict[str, float]:
        """Running metrics over all probes so far; a statistic that is undefined yet is left out."""
        out: dict[str, float] = {f"{prefix}/probes": float(len(self.records))}
        for k in range(self.num_depths):
            d = k + 1
            c_hat, v2_hat, c, v2 = (np.array([r[k][i] for r in self.records]) for i in range(4))
            rho_c = spearman_interval(c_hat, c)
            rho_v = spearman_interval(v2_hat, v2)
            for name, rho in (("c", rho_c), ("v2", rho_v)):
                if rho is not None:
                    out[f"{prefix}/spearman_{name}_{d}"] = rho[0]
                    out[f"{prefix}/spearman_{name}_low_{d}"] = rho[1]
                    out[f"{prefix}/spearman_{name}_high_{d}"] = rho[2]
            signs_c = sign_agreement(c_hat, c)
            signs_v = sign_agreement(np.diff(v2_hat), np.diff(v2))
            for name, signs in (("c", signs_c), ("dv2", signs_v)):
                if signs is not None:
                    out[f"{prefix}/sign_agreement_{name}_{d}"] = signs[0]
                    out[f"{prefix}/sign_base_rate_{name}_{d}"] = signs[1]
            trusted = (
                len(self.records) >= self.min_probes
                and rho_c is not None
                and rho_v is not None
                and rho_c[1] > 0
                and rho_v[1] > 0
                and signs_c is not None
                and signs_c[0] > signs_c[1]
            )
            out[f"{prefix}/trusted_{d}"] = float(trusted)
        return out

    def state_dict(self) -> dict:
        """The probes recorded so far, as lists (for the OCC checkpoint; :meth:`load_state_dict` reads it)."""
        return {"num_depths": self.num_depths, "records": [[list(r) for r in rec] for rec in self.records]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; checked before anything is replaced."""
        if "records" not in state or "num_depths" not in state:
            raise ValueError("not a ProbeHistory state: it needs 'num_depths' and 'records'")
        if int(state["num_depths"]) != self.num_depths:
            raise ValueError(
                f"the checkpoint's probe history has {state['num_depths']} MTP depth(s) but this run has "
                f"{self.num_depths}; set nemo_occ.num_depths to match the checkpoint"
            )
        records = [[[float(v) for v in r] for r in rec] for rec in state["records"]]
        for rec in records:
            if len(rec) != self.num_depths or any(len(r) != 4 or not all(map(math.isfinite, r)) for r in rec):
                raise ValueError("the checkpoint's probe history is malformed (corrupt or from another run)")
        self.records = records


class HeadGap:
    """v̂² under both readings of δ_MTP and the static head gap's share (module docstring), per update.

    Per depth it sums, over valid tokens, [(lp − old_main)², (lp − old_mtp)², (old_mtp − old_main)², 1],
    lp the MTP head's current log-prob; :meth:`finish` reduces over the data-parallel group; the
    update's :class:`nemo_occ.core.metrics.DepthStatistics` carry the sums into the metrics.
    """

    def __init__(self, num_depths: int):
        self.num_depths = num_depths
        self._sums = torch.zeros(num_depths, 4, dtype=torch.float64)

    def statistics(
        self,
        mtp_logprobs: Sequence[torch.Tensor],  # K x [B, S]
        old_logprobs: torch.Tensor,  # [B, S] the main head's
        mtp_old_logprobs: Sequence[torch.Tensor],  # K x [B, S] each MTP head's own
        masks: Sequence[torch.Tensor],  # K x [B, S] valid for the depth
    ) -> torch.Tensor:
        """[K, 4] sums of one micro-batch (not accumulated; raises before any state moves)."""
        rows = []
        for lp, old_mtp, mask in zip(mtp_logprobs, mtp_old_logprobs, masks, strict=True):
            m = check_logprob_inputs(
                mask, ("mtp_logprobs", lp), ("old_logprobs", old_logprobs), ("mtp_old_logprobs", old_mtp)
            )
            with torch.no_grad():
                f64 = torch.float64
                cur, main, own = (t.detach().to(f64)[m] for t in (lp, old_logprobs, old_mtp))
                rows.append(
                    torch.stack(
                        [((cur - main) ** 2).sum(), ((cur - own) ** 2).sum(), ((own - main) ** 2).sum(),
                         torch.tensor(float(cur.numel()), dtype=f64, device=cur.device)]
                    ).cpu()
                )  # fmt: skip
        return torch.stack(rows)

    def add(self, stats: torch.Tensor) -> None:
        """Add one micro-batch's [K, 4] sums (:meth:`statistics`) to the open update's."""
        self._sums += stats

    def discard(self) -> None:
        """Drop the sums of an update that will not be finished (local; no collective)."""
        self._sums.zero_()

    def finish(self, group=None) -> list[tuple[float, float, float]]:
        """Reduce over ``group`` (a collective when distributed), reset, and return per depth the update's
        (v̂² vs the main head's old log-prob, v̂² vs the MTP head's own, static gap) sums."""
        sums = self._sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = all_reduce_sum_(sums.to(collective_device(group)), group).cpu()
        self._sums.zero_()
        return [(vs_main, vs_own, gap) for vs_main, vs_own, gap, _ in sums.tolist()]
