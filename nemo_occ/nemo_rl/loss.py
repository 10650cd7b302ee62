"""NeMo-RL loss function: NeMo-RL's clipped policy loss on the main head + the regime's MTP term.

    L = L_NeMo-RL(main head)  +  Σ_k λ_k · L_MTP,k                      (MTP term: nemo_occ.core.objective)

The main head's term is NeMo-RL's own ``ClippedPGLossFn`` (so DAPO, GSPO, dual clip, KL and
importance-sampling settings keep their exact NeMo-RL meaning); the MTP term clips and aggregates like
it (:func:`nemo_occ.nemo_rl.loss_config.policy_loss_config`) and uses the same global denominators, so
both terms sum over micro-batches and data-parallel ranks to full-batch means.

Protocol (``nemo_rl.algorithms.loss.interfaces.LossFunction``): ``loss_type`` and ``input_type`` are the
main loss's (TOKEN_LEVEL unless ``token_level_loss: false``; LOGPROB), ``__call__(next_token_logprobs,
data, global_valid_seqs, global_valid_toks)`` returns ``(loss, metrics)`` with every summable metric
pre-divided by a global denominator, and ``metric_normalizations`` names that denominator per metric.
Other attributes NeMo-RL reads off the loss (``reference_policy_kl_penalty``, ``force_on_policy_ratio``,
``use_fused_linear_logprobs``, ...) are the main loss's.

Where the MTP log-probs come from: the worker extension (``nemo_occ.nemo_rl.worker``) computes them
during the model's forward and puts them in the micro-batch ``data`` under :func:`mtp_logprobs_key`,
[B, S-1] and aligned like ``next_token_logprobs`` (index j scores token j+1), with the per-token
validity and argmax-correctness next to them. This object is pickled to the Ray workers once per
``train()`` call; the calibrator state must outlive that, so the worker binds its persistent
:class:`MTPObjective` with :meth:`OCCLossFn.bind_objective` (unpickled copies start unbound).

Draft acceptance (``mtp/accuracy_d``): the share of tokens with an MTP target (and in the loss mask)
where depth d's arg-max is the sampled token, Megatron's ``mtp_{d}_acceptance_rate`` / 100. Its
denominator is not a global count NeMo-RL hands the loss, so the loss only counts hits and tokens
(:meth:`OCCLossFn.pop_acceptance_counts`); the worker sums them over the step and the data-parallel
ranks and reports the ratio (megatron's own metric is gone: its MTP loss is skipped).

Letters: B sequences of the micro-batch, S tokens per sequence, K MTP depths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from nemo_occ.core.config import NemoOCCConfig, PolicyLossConfig
from nemo_occ.core.objective import MTPObjective
from nemo_occ.nemo_rl.loss_config import check_loss_settings

__all__ = [
    "OCCLossFn",
    "build_loss_fn",
    "mtp_logprobs_key",
    "mtp_valid_key",
    "mtp_correct_key",
    "mtp_old_logprobs_key",
    "MTP_OLD_LOGPROBS_PREFIX",
]


def mtp_logprobs_key(depth: int) -> str:
    """Data key of depth ``depth``'s aligned MTP log-probs, [B, S-1] (1-based depth)."""
    return f"nemo_occ_mtp_logprobs_{depth}"


def mtp_valid_key(depth: int) -> str:
    """Data key of depth ``depth``'s validity, [B, S-1] bool (False where no MTP target exists)."""
    return f"nemo_occ_mtp_valid_{depth}"


def mtp_correct_key(depth: int) -> str:
    """Data key of whether depth ``depth``'s argmax equals the sampled token, [B, S-1] bool."""
    return f"nemo_occ_mtp_correct_{depth}"


MTP_OLD_LOGPROBS_PREFIX = "nemo_occ_mtp_old_logprobs_"


def mtp_old_logprobs_key(depth: int) -> str:
    """Data key of depth ``depth``'s old log-probs, [B, S] like NeMo-RL's ``prev_logprobs`` (position i
    holds the MTP head's log-prob of token i, aligned to the main head's; 0 where there is none)."""
    return f"{MTP_OLD_LOGPROBS_PREFIX}{depth}"


class OCCLossFn:
    """NeMo-RL ``LossFunction``: ``main_loss`` (a ``ClippedPGLossFn``) plus the regime's MTP term."""

    def __init__(self, main_loss: Any, occ_cfg: NemoOCCConfig, policy_cfg: PolicyLossConfig):
        self.main_loss = main_loss
        self.occ_cfg = occ_cfg
        self.policy_cfg = policy_cfg
        self.loss_type = main_loss.loss_type
        self.input_type = main_loss.input_type
        self._objective: MTPObjective | None = None
        self._acceptance: torch.Tensor | None = None  # [K, 2] float64: (arg-max hits, MTP-valid tokens)
        self._probe: int | None = None
        self.metric_normalizations = dict(getattr(main_loss, "metric_normalizations", {}) or {})
        self.metric_normalizations.update(self._our_normalizations())

    # -- NeMo-RL reads attributes of ClippedPGLossFn off the loss object: answer with the main loss's.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("main_loss", "_objective", "_probe"):
            raise AttributeError(name)
        return getattr(self.main_loss, name)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_objective"] = None  # the calibrator lives in the worker, not in each pickled copy
        state["_acceptance"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- the MTP objective -------------------------------------------------------------------------
    def make_objective(self) -> MTPObjective:
        return MTPObjective(self.occ_cfg, self.policy_cfg)

    def bind_objective(self, objective: MTPObjective) -> None:
        """Use ``objective`` (and its calibrator state) for the MTP term from now on."""
        if objective.cfg != self.occ_cfg:
            raise ValueError(
                "the bound MTPObjective was built from a different nemo_occ config than this loss"
            )
        self._objective = objective

    @property
    def objective(self) -> MTPObjective:
        if self._objective is None:
            self._objective = self.make_objective()
        return self._objective

    @contextlib.contextmanager
    def probing(self, component: int) -> Iterator[None]:
        """For one exact-probe pass: the loss is only component 0, the main RL loss, or component k, depth
        k's unscaled MTP loss; no calibrator statistics are taken (``nemo_occ.core.diagnostics``)."""
        if not 0 <= component <= self.occ_cfg.num_depths:
            raise ValueError(f"probe component must be 0 (RL) or an MTP depth 1..{self.occ_cfg.num_depths}")
        self._probe = component
        try:
            yield
        finally:
            self._probe = None

    def _our_normalizations(self) -> dict[str, Any]:
        try:
            from nemo_rl.algorithms.loss.interfaces import MetricNormalizer
        except ImportError:  # only NeMo-RL's split-API trainers read this table
            return {}
        seq_level = self.policy_cfg.aggregation == "seq_mean_token_mean"
        loss_norm = (
            MetricNormalizer.SEQUENCES
            if (self.occ_cfg.regime_spec.uses_policy_loss and seq_level)
            else MetricNormalizer.TOKENS
        )
        out = {"mtp/loss_scaled": loss_norm}
        for d in range(1, self.occ_cfg.num_depths + 1):
            out[f"mtp/loss_{d}"] = loss_norm
            out[f"mtp/clip_fraction_{d}"] = MetricNormalizer.TOKENS
            out[f"mtp/valid_fraction_{d}"] = MetricNormalizer.TOKENS
        return out

    # -- LossFunction protocol ---------------------------------------------------------------------
    def __call__(
        self,
        next_token_logprobs: torch.Tensor,  # [B, S-1]
        data: Mapping[str, Any],
        global_valid_seqs: torch.Tensor,
        global_valid_toks: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = self.main_loss(
            next_token_logprobs=next_token_logprobs,
            data=data,
            global_valid_seqs=global_valid_seqs,
            global_valid_toks=global_valid_toks,
            **kwargs,
        )
        if not self.occ_cfg.regime_spec.has_mtp_term or self._probe == 0:
            return loss, metrics

        lp = next_token_logprobs  # [B, S-1]
        width = lp.shape[1]
        mask = (data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)).bool()  # [B, S-1]
        if getattr(self.main_loss, "force_on_policy_ratio", False):
            old = lp.detach()
        else:
            old = data["prev_logprobs"][:, 1:]
        advantages = data["advantages"][:, 1:]
        mtp_lps, mtp_masks, correct = self._mtp_inputs(data, width, lp.device)
        mtp_olds = self._mtp_old_logprobs(data, width)
        if self._probe is not None:  # depth k's unscaled loss alone: no statistics, no λ
            return self.objective.depth_losses(
                mtp_logprobs=mtp_lps, old_logprobs=old, advantages=advantages, mask=mask, mtp_masks=mtp_masks,
                mtp_old_logprobs=mtp_olds, global_valid_tokens=global_valid_toks, global_valid_seqs=global_valid_seqs,
            )[self._probe - 1][0], {}  # fmt: skip

        mtp_loss, mtp_metrics = self.objective(
            main_logprobs=lp,
            old_logprobs=old,
            advantages=advantages,
            mask=mask,
            mtp_logprobs=mtp_lps,
            mtp_masks=mtp_masks,
            mtp_old_logprobs=mtp_olds,
            global_valid_tokens=global_valid_toks,
            global_valid_seqs=global_valid_seqs,
        )
        metrics = dict(metrics)
        for key, value in mtp_metrics.items():
            metrics[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
        n_tok = float(global_valid_toks) if float(global_valid_toks) > 0 else 1.0
        with torch.no_grad():
            for d, (valid_d, correct_d) in enumerate(zip(mtp_masks, correct, strict=True), start=1):
                m = mask & valid_d
                metrics[f"mtp/valid_fraction_{d}"] = float(m.sum()) / n_tok
                if correct_d is not None:
                    self._count_acceptance(d, (correct_d.bool() & m).sum(), m.sum())
        return loss + mtp_loss, metrics

    def _count_acceptance(self, depth: int, hits: torch.Tensor, tokens: torch.Tensor) -> None:
        if self._acceptance is None:
            self._acceptance = torch.zeros(
                self.occ_cfg.num_depths, 2, dtype=torch.float64, device=hits.device
            )
        self._acceptance[depth - 1, 0] += hits
        self._acceptance[depth - 1, 1] += tokens

    def pop_acceptance_counts(self) -> torch.Tensor | None:
        """[K, 2] float64 (arg-max hits, MTP-valid loss tokens) per depth since the last pop; None if none."""
        counts, self._acceptance = self._acceptance, None
        return counts

    def _mtp_old_logprobs(self, data: Mapping[str, Any], width: int) -> list[torch.Tensor] | None:
        """Per depth the MTP heads' own old log-probs [B, S-1], or None when the batch carries none."""
        keys = [mtp_old_logprobs_key(d) for d in range(1, self.occ_cfg.num_depths + 1)]
        if all(k in data for k in keys):
            return [data[k][:, 1 : 1 + width] for k in keys]
        if self.occ_cfg.old_logprobs == "mtp":
            missing = [k for k in keys if k not in data]
            raise ValueError(
                f"nemo_occ.old_logprobs is 'mtp' but the micro-batch has no {missing}: they are captured with "
                "prev_logprobs by nemo-occ's policy (nemo_occ.nemo_rl.policy); launch with "
                "`python -m nemo_occ.nemo_rl.run_grpo`"
            )
        return None

    def _mtp_inputs(self, data: Mapping[str, Any], width: int, device: torch.device):
        """Per depth: aligned log-probs [B, S-1], validity [B, S-1], argmax-correctness [B, S-1] or None."""
        lps, valids, correct = [], [], []
        positions = torch.arange(width, device=device)  # [S-1]
        for d in range(1, self.occ_cfg.num_depths + 1):
            key = mtp_logprobs_key(d)
            if key not in data:
                raise ValueError(
                    f"the micro-batch has no '{key}': the MTP log-probs are produced by nemo-occ's Megatron worker "
                    "extension; launch with `python -m nemo_occ.nemo_rl.run_grpo` (not NeMo-RL's examples/run_grpo.py)"
                )
            lps.append(data[key][:, :width])
            valid = data.get(mtp_valid_key(d))
            if valid is None:  # one sequence per row: the first d positions have no MTP target
                valid = (positions >= d).unsqueeze(0).expand(data[key].shape[0], width)
            valids.append(valid[:, :width].bool())
            hit = data.get(mtp_correct_key(d))
            correct.append(None if hit is None else hit[:, :width])
        return lps, valids, correct


def build_loss_fn(
    loss_cfg: Mapping | Any,
    occ_cfg: NemoOCCConfig,
    *,
    use_fused_linear_logprobs: bool = False,
) -> OCCLossFn:
    """NeMo-RL's ``ClippedPGLossFn(loss_cfg)`` wrapped with the MTP term of ``occ_cfg`` (needs NeMo-RL)."""
    from nemo_rl.algorithms.loss import ClippedPGLossConfig, ClippedPGLossFn

    policy_cfg = check_loss_settings(loss_cfg, occ_cfg)
    if isinstance(loss_cfg, Mapping):
        loss_cfg = ClippedPGLossConfig(**loss_cfg)
    main = ClippedPGLossFn(loss_cfg, use_fused_linear_logprobs=use_fused_linear_logprobs)
    return OCCLossFn(main, occ_cfg, policy_cfg)
