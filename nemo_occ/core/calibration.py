"""Optimal Coefficient Calibration (OCC): Eq. 12-13 of the OCC paper (arXiv 2605.28184).

For MTP depth k, over the valid tokens of one optimizer update (all its micro-batches, all
data-parallel ranks)::

    δ_RL      = log π_θ(main)  - log π_old(main)                          (per token)
    δ_MTP,k   = log π_θ(MTP k) - log π_old                                (π_old: see below)
    ĉ_k       = Σ δ_RL · δ_MTP,k          alignment proxy of c  = <g_RL, g_MTP>   (Eq. 12)
    v̂²_k      = Σ δ_MTP,k²                variance proxy of v² = ||g_MTP||²       (Eq. 12)
    λ_k       = λ+ · ĉ_k / (v̂²_k + ε)                                             (Eq. 13)

Estimators: ``signed`` (OCC-NoClip, the paper's default), ``clipped`` (OCC-Clip: max(0, ĉ)),
``reference`` (the public reference code: mean over tokens of δ_RL·δ_MTP / (δ_MTP² + ε); for parity),
``probed`` (beyond the paper; :meth:`OCCCalibrator.refresh_from_probe`): λ_k = λ+ · c_x,k / (v²_x,k + ε)
from the cross-fitted exact statistics of the probed update (``nemo_occ.core.diagnostics``, in
``fidelity.metric``), set once every ``fidelity.every`` RL steps and held between probes; the
proxies are still computed and reported, but never set λ. A probe whose v²_x ≤ 0 (the MTP gradient's
mean below its noise: c_x / v²_x means nothing) keeps the λ in effect, with a warning. λ+ and
``lambda_max`` mean what they mean for the proxies: a multiplier and a clamp on |λ|.
``π_old`` of δ_MTP is the main head's old log-prob or the MTP head's own (config ``old_logprobs``).

When λ is computed and which update uses it (timing ``lagged``, the default):
  1. every micro-batch forward of update u adds its statistics (:meth:`OCCCalibrator.statistics`,
     :meth:`OCCCalibrator.add_statistics`; no gradient);
  2. after the last backward of update u, :meth:`OCCCalibrator.close_update` all-reduces the sums over
     the given process group (the data-parallel group, over which the loss's token counts are summed)
     and sets λ from them;
  3. update u+1 (the next minibatch, or the first minibatch of the next RL step) uses that λ.
So λ is identical on every rank and independent of how the update was split into micro-batches.
A one-update lag is inherent: the statistics of update u exist only after its forward passes, and
its backward cannot wait for them without a second forward.

The first update of every RL step runs at θ = θ_old, where δ_RL ≡ 0 and so ĉ = 0: its statistics
carry no information, and letting them set λ would zero the coefficient of the step's second update.
The caller therefore closes that update with ``close_update(refresh=False)``: its statistics are
reported but λ is kept. So the first two updates of step t (u = 0 and 1) use the λ of the last update
of step t−1 (the first two updates of a run: ``initial_lambda``), and update u ≥ 2 uses the λ of update
u−1. (The reference code instead has λ ≈ 0 on each step's first minibatch.) With a single update per step λ would never be refreshed: callers warn.

An update the optimizer did not apply (Megatron's ``step()`` returns ``update_successful=False`` when
fp16/bf16 loss scaling found inf/NaN gradients, or the gradient norm exceeded
``grad_norm_skip_threshold``) is closed with ``close_update(skipped=True)``: θ did not move, so its
statistics are discarded (they may be inf/NaN themselves) and λ is kept; it is reported as ``skipped``.
The flag is summed over the group with the statistics, so one rank's skip is every rank's. Because θ
did not move, an RL step's updates count as made at θ = θ_old until one is applied (the caller keeps
``refresh=False`` until then).
Before any statistics exist λ = ``initial_lambda``. Timing ``microbatch`` (the reference code's
timing) lets each micro-batch use the λ of its own local statistics instead: see
:meth:`OCCCalibrator.local_lambdas`. It matches the reference code only while λ ≥ 0: the MTP term
here is λ·L(A) (Eq. 2), the reference code's L(λ·A), and for λ < 0 clipping acts on the other side
(``nemo_occ.core.objective``).

Eq. 10, Δ(λ) = η(1−Lη)·c·λ − (Lη²/2)·v²·λ², is reported per update for the λ that was applied, with
the unknown prefactors η(1−Lη) and Lη² set to 1 (Eq. 4's ½ kept): first-order term λ·ĉ, second-order
term ½·λ²·v̂². Under these prefactors λ = ĉ/v̂² (Eq. 13 with λ+ = 1) is the maximiser, with gain
ĉ²/(2v̂²) ≥ 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from nemo_occ.core.config import OCCConfig
from nemo_occ.core.distributed import all_reduce_sum_, collective_device
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.losses import check_logprob_inputs
from nemo_occ.core.metrics import DepthStatistics, UpdateStatistics

__all__ = ["OCCCalibrator", "proxy_statistics"]

# Columns of the per-depth statistics tensor [K, 4].
_C, _V2, _N, _RATIO = range(4)


def proxy_statistics(
    main_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mtp_logprobs: torch.Tensor,
    mtp_old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """[Σ δ_RL·δ_MTP, Σ δ_MTP², n_valid, Σ δ_RL·δ_MTP/(δ_MTP²+ε)] over the valid tokens, float64, no grad.

    All inputs are [B, S]; ``mask`` is the validity of this depth (main mask & MTP target mask).
    """
    m = check_logprob_inputs(
        mask,
        ("main_logprobs", main_logprobs),
        ("old_logprobs", old_logprobs),
        ("mtp_logprobs", mtp_logprobs),
        ("mtp_old_logprobs", mtp_old_logprobs),
    )
    with torch.no_grad():
        f64 = torch.float64
        d_rl = (main_logprobs.detach().to(f64) - old_logprobs.detach().to(f64))[m]
        d_mtp = (mtp_logprobs.detach().to(f64) - mtp_old_logprobs.detach().to(f64))[m]
        prod = d_rl * d_mtp
        sq = d_mtp * d_mtp
        return torch.stack(
            [
                prod.sum(),
                sq.sum(),
                torch.tensor(float(d_rl.numel()), dtype=f64, device=prod.device),
                (prod / (sq + eps)).sum(),
            ]
        )


class OCCCalibrator:
    """Per-depth OCC coefficient λ_k with its running statistics (see the module docstring).

    ``lambdas`` is the λ in effect; ``statistics`` computes one micro-batch's statistics and
    ``add_statistics`` adds them to the open update; ``close_update`` closes an optimizer update and sets
    the next λ; ``state_dict``/``load_state_dict`` carry λ across resumes.
    """

    def __init__(self, num_depths: int, cfg: OCCConfig | None = None):
        if num_depths < 1:
            raise ValueError(f"num_depths must be >= 1 (the model's MTP layers), got {num_depths}")
        self.cfg = cfg or OCCConfig()
        self.num_depths = num_depths
        self._lambdas = [float(self.cfg.initial_lambda)] * num_depths
        self._stats = torch.zeros(num_depths, 4, dtype=torch.float64)
        self._applied = torch.zeros(
            num_depths, 2, dtype=torch.float64
        )  # Σ λ applied, count (microbatch timing)
        self.num_updates = 0

    # -- the coefficient -------------------------------------------------------------------------
    @property
    def lambdas(self) -> list[float]:
        """λ_k currently in effect (index 0 is depth 1)."""
        return list(self._lambdas)

    def _finish(self, lam: float) -> float:
        """λ_max's clamp, and a refusal of an overflow (finite inputs: only an absurd λ+ overflows)."""
        if self.cfg.lambda_max is not None:
            lam = max(-self.cfg.lambda_max, min(self.cfg.lambda_max, lam))
        if not math.isfinite(lam):
            raise ValueError(
                f"λ overflowed to {lam} (lambda_plus={self.cfg.lambda_plus:g}); lower occ.lambda_plus "
                "or set occ.lambda_max"
            )
        return float(lam)

    def refresh_from_probe(self, c: Sequence[float], v2: Sequence[float]) -> list[float]:
        """``estimator: probed``: λ_k = λ+ · c_k / (v²_k + ε) from one probe's cross-fitted statistics,
        in effect from the next update until the next probe; returns the λ now in effect.

        A depth whose v²_k ≤ 0 keeps its λ (warning). Raises, changing nothing, on malformed input or
        when the estimator is not ``probed``. Every rank passes the same (all-reduced) statistics.
        """
        if self.cfg.estimator != "probed":
            raise ValueError(f"refresh_from_probe is for occ.estimator: probed, not {self.cfg.estimator!r}")
        K = self.num_depths
        if len(c) != K or len(v2) != K:
            raise ValueError(f"a probe gives c and v² per depth: {K} each, got {len(c)} and {len(v2)}")
        values = [float(x) for x in (*c, *v2)]
        if not all(math.isfinite(x) for x in values):
            raise ValueError(f"the probe's statistics have NaN/Inf entries: c={list(c)}, v2={list(v2)}")
        new = list(self._lambdas)
        for k in range(K):
            if v2[k] <= 0:
                warnings.warn(
                    f"the probe's cross-fitted v² of depth {k + 1} is {v2[k]:.3g} <= 0 (the MTP gradient's mean "
                    "is below its noise): λ is kept",
                    stacklevel=2,
                )
                continue
            new[k] = self._finish(self.cfg.lambda_plus * float(c[k]) / (float(v2[k]) + self.cfg.eps))
        self._lambdas = new
        return list(new)

    def lambda_from_statistics(self, stats: torch.Tensor) -> list[float]:
        """λ_k of Eq. 13 from a [K, 4] statistics tensor; 0 for a depth without valid tokens.

        Raises ValueError (and changes nothing) if ``stats`` is malformed or λ overflows.
        """
        out = []
        for c, v2, n, ratio_sum in self._checked(stats).tolist():
            if n <= 0:
                out.append(0.0)
                continue
            if self.cfg.estimator == "reference":
                lam = self.cfg.lambda_plus * ratio_sum / n
            else:  # probed: the proxies' signed λ, reported only (close_update never applies it)
                c_eff = max(0.0, c) if self.cfg.estimator == "clipped" else c
                lam = self.cfg.lambda_plus * c_eff / (v2 + self.cfg.eps)
            out.append(self._finish(lam))
        return out

    # -- statistics --------------------------------------------------------------------------------
    def statistics(self, inputs: TokenInputs) -> torch.Tensor:
        """[K, 4] statistics of one micro-batch (not accumulated): :func:`proxy_statistics` of each depth k over
        mask ∧ mtp_masks[k], with δ_MTP against ``mtp_old_logprobs[k]`` when given, else the main head's old."""
        if inputs.main_logprobs is None:
            raise ValueError("the calibrator's statistics need the main head's log-probs (main_logprobs)")
        if inputs.num_depths != self.num_depths:
            raise ValueError(
                f"got MTP log-probs for {inputs.num_depths} depth(s) but the calibrator has num_depths={self.num_depths}"
            )
        olds = inputs.mtp_old_logprobs or [inputs.old_logprobs] * self.num_depths
        rows = []
        for lp, old_k, mask_k in zip(inputs.mtp_logprobs, olds, inputs.depth_masks(), strict=True):
            rows.append(
                proxy_statistics(
                    inputs.main_logprobs, inputs.old_logprobs, lp, old_k, mask_k, self.cfg.eps
                ).cpu()
            )
        return torch.stack(rows)

    def add_statistics(self, stats: torch.Tensor) -> None:
        """Add precomputed [K, 4] statistics (e.g. gathered by a framework's own loop)."""
        self._stats += self._checked(stats)

    def _checked(self, stats: torch.Tensor) -> torch.Tensor:
        """``stats`` as a float64 CPU [K, 4] tensor after checking that it can be statistics."""
        if not isinstance(stats, torch.Tensor):
            raise TypeError(f"statistics must be a [{self.num_depths}, 4] tensor, got {type(stats).__name__}")
        if tuple(stats.shape) != (self.num_depths, 4):
            raise ValueError(f"statistics must be [{self.num_depths}, 4], got {tuple(stats.shape)}")
        s = stats.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(s).all()):
            raise ValueError("statistics have NaN/Inf entries; they would make every later λ NaN")
        if bool((s[:, _V2] < 0).any() or (s[:, _N] < 0).any()):
            raise ValueError("statistics have a negative v̂² or token count; columns are [ĉ, v̂², n, Σ ratio]")
        return s

    def local_lambdas(self, stats: torch.Tensor) -> list[float]:
        """λ of one micro-batch's own statistics (timing ``microbatch``); recorded for the metrics."""
        lams = self.lambda_from_statistics(stats)
        self._applied[:, 0] += torch.tensor(lams, dtype=torch.float64)
        self._applied[:, 1] += 1
        return lams

    # -- closing an update -------------------------------------------------------------------------
    def close_update(self, group=None, *, refresh: bool = True, skipped: bool = False) -> UpdateStatistics:
        """Close one optimizer update: reduce the sums over ``group``, set the next λ, return its statistics.

        ``refresh=False`` reports the statistics but keeps λ: use it for an update made at θ = θ_old
        (the first of each RL step), whose δ_RL is zero. ``lambda_next`` is the λ the next update will
        use, ``lambda_applied`` the λ this one used (under ``timing: microbatch`` the mean over its
        micro-batches). ``skipped=True``: the optimizer did not apply this update (module docstring). If
        any rank of ``group`` passes it, every rank discards the update's statistics (reported as 0),
        keeps λ and does not count the update in ``num_updates``.
        Every rank of ``group`` must call it (a collective when torch.distributed runs several
        processes): pass the group the loss's token counts are summed over, NeMo-RL's data-parallel group
        (``nemo_occ.nemo_rl.worker.OCCWorkerExtension.occ_reduction_group``).
        """
        flag = torch.tensor([[float(skipped), 0.0, 0.0, 0.0]], dtype=torch.float64)
        reduced = torch.cat([self._stats, flag])  # [K + 1, 4]: the skip flag travels with the sums
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            reduced = all_reduce_sum_(reduced.to(collective_device(group)), group=group).cpu()
        else:
            all_reduce_sum_(reduced, group=group)  # single process: validates ``group`` only
        stats, skipped = reduced[:-1], bool(reduced[-1, 0] > 0)
        if skipped:  # θ did not move: nothing of this update may set a λ
            self.discard_open_update()
            depths = tuple(DepthStatistics(0.0, 0.0, 0.0, lam, lam) for lam in self._lambdas)
            return UpdateStatistics(depths, refreshed=False, skipped=True)
        if self._applied[0, 1] > 0:  # microbatch timing: the mean λ the micro-batches used
            applied = (self._applied[:, 0] / self._applied[:, 1]).tolist()
        else:
            applied = list(self._lambdas)
        new = self.lambda_from_statistics(stats)
        if refresh and self.cfg.estimator != "probed":  # probed: only refresh_from_probe sets λ
            self._lambdas = new
        depths = tuple(
            DepthStatistics(c, v2, n, applied[k], self._lambdas[k])
            for k, (c, v2, n, _) in enumerate(stats.tolist())
        )
        self._stats.zero_()
        self._applied.zero_()
        self.num_updates += 1
        return UpdateStatistics(depths, refreshed=refresh, skipped=False)

    def discard_open_update(self) -> None:
        """Drop what was accumulated since the last :meth:`close_update` (local; no collective); λ stays."""
        self._stats.zero_()
        self._applied.zero_()

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """λ per depth, the open update's sums, the update count and the config: what a resume restores."""
        return {
            "num_depths": self.num_depths,
            "lambdas": list(self._lambdas),
            "stats": self._stats.clone(),
            "applied": self._applied.clone(),
            "num_updates": self.num_updates,
            "config": self.cfg.model_dump(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; everything is checked before anything is replaced."""
        missing = [k for k in ("num_depths", "lambdas", "stats", "num_updates") if k not in state]
        if missing:
            raise ValueError(f"not an OCCCalibrator state: missing {', '.join(missing)}")
        K = self.num_depths
        if int(state["num_depths"]) != K:
            raise ValueError(
                f"checkpoint calibrator has {state['num_depths']} MTP depth(s) but this run has {K}; "
                "set nemo_occ.num_depths to match the checkpoint"
            )
        lambdas = [float(x) for x in state["lambdas"]]
        num_updates = int(state["num_updates"])
        stats = torch.as_tensor(state["stats"]).to(torch.float64).clone()
        applied = torch.as_tensor(state.get("applied", torch.zeros(K, 2))).to(torch.float64).clone()
        for name, t, shape in (
            ("lambdas", torch.tensor(lambdas), (K,)),
            ("stats", stats, (K, 4)),
            ("applied", applied, (K, 2)),
        ):
            if tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"checkpoint calibrator '{name}' must be a finite {list(shape)} tensor, got shape "
                    f"{list(t.shape)}; the checkpoint is corrupt or from another run"
                )
        self._lambdas, self._stats, self._applied = lambdas, stats, applied
        self.num_updates = num_updates
