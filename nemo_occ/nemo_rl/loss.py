"""NeMo-RL loss function: NeMo-RL's clipped policy loss on the main head + the regime's MTP term.

    L = L_NeMo-RL(main head)  +  Σ_k λ_k · L_MTP,k                      (MTP term: nemo_occ.core.objective)

The main head's term is NeMo-RL's own ``ClippedPGLossFn`` (so DAPO, GSPO, dual clip, KL and
importance-sampling settings keep their exact NeMo-RL meaning); the MTP term clips and aggregates like
it (:func:`nemo_occ.nemo_rl.loss_config.policy_loss_config`) and uses the same global denominators, so
both terms sum over micro-batches and data-parallel ranks to full-batch means.

Protocol (``nemo_rl.algorithms.loss.interfaces.LossFunction``): ``loss_type`` and ``input_type`` are the
main loss's (TOKEN_LEVEL unless ``token_level_loss: false``; LOGPROB), ``__call__(next_token_logprobs,
data, global_valid_seqs, global_valid_toks)`` returns ``(loss, metrics)`` with every summable metric
pre-divided by a global denominator, and ``metric_normalizations`` names that denominator per metric
(the reduction rule of :func:`nemo_occ.core.metrics.metric_rule`, shared with the worker and the lab).
Other attributes NeMo-RL reads off the loss (``reference_policy_kl_penalty``, ``force_on_policy_ratio``,
``use_fused_linear_logprobs``, ...) are the main loss's.

Where the MTP log-probs come from: the worker extension (``nemo_occ.nemo_rl.worker``) computes them
during the model's forward and puts them in the micro-batch ``data`` (keys, layout, writer and reader:
:mod:`nemo_occ.nemo_rl.mtp_batch`), [B, S-1] and aligned like ``next_token_logprobs`` (index j scores
token j+1), with the per-token validity and argmax-correctness next to them. This object is pickled
to the Ray workers once per ``train()`` call; the calibrator state must outlive that, so the worker binds its persistent
:class:`MTPObjective` with :meth:`OCCLossFn.bind_objective` (unpickled copies start unbound).

Draft acceptance (``mtp/accuracy_d``): the share of tokens with an MTP target (and in the loss mask)
where depth d's arg-max is the sampled token, Megatron's ``mtp_{d}_acceptance_rate`` / 100. Its
denominator is not a global count NeMo-RL hands the loss, so the loss only counts hits and tokens
(:func:`nemo_occ.core.metrics.acceptance_counts`, :meth:`OCCLossFn.pop_acceptance_counts`); the worker
sums them over the step and the data-parallel ranks and reports the ratio
(:func:`nemo_occ.core.metrics.step_metrics`); Megatron's own metric is gone, as its MTP loss is skipped.

Letters: B sequences of the micro-batch, S tokens per sequence, K MTP depths.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from nemo_occ.core.config import NemoOCCConfig, PolicyLossConfig
from nemo_occ.core.diagnostics import StreamingHalves
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.metrics import acceptance_counts, loss_metric_names, metric_rule
from nemo_occ.core.objective import MTPObjective
from nemo_occ.nemo_rl.compat import clipped_pg_loss, metric_normalizer
from nemo_occ.nemo_rl.fused_mtp import MTP_CARRIER_KEY
from nemo_occ.nemo_rl.loss_config import check_loss_settings
from nemo_occ.nemo_rl.mtp_batch import read_mtp_inputs, read_mtp_old_logprobs

__all__ = ["OCCLossFn", "build_loss_fn"]


class OCCLossFn:
    """NeMo-RL ``LossFunction``: ``main_loss`` (a ``ClippedPGLossFn``) plus the regime's MTP term."""

    def __init__(self, main_loss: Any, nemo_occ_cfg: NemoOCCConfig, policy_cfg: PolicyLossConfig):
        self.main_loss = main_loss
        self.nemo_occ_cfg = nemo_occ_cfg
        self.policy_cfg = policy_cfg
        self.loss_type = main_loss.loss_type
        self.input_type = main_loss.input_type
        self._objective: MTPObjective | None = None
        self._acceptance: torch.Tensor | None = None  # [K, 2] float64: (arg-max hits, MTP-valid tokens)
        self._probe: int | None = None
        self._probe_half: int | None = None  # 0 = A, 1 = B: the probe pass's half of the sequences
        self._halves = StreamingHalves()
        self.metric_normalizations = dict(getattr(main_loss, "metric_normalizations", {}) or {})
        self.metric_normalizations.update(self._our_normalizations())

    # -- NeMo-RL reads attributes of ClippedPGLossFn off the loss object: answer with the main loss's.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("main_loss", "_objective", "_probe", "_probe_half", "_halves"):
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
    def bind_objective(self, objective: MTPObjective) -> None:
        """Use ``objective`` (and its calibrator state) for the MTP term from now on."""
        if objective.cfg != self.nemo_occ_cfg:
            raise ValueError(
                "the bound MTPObjective was built from a different nemo_occ config than this loss"
            )
        self._objective = objective

    @property
    def objective(self) -> MTPObjective:
        """The bound objective; a loss that was never bound (e.g. in a test) builds its own from its config."""
        if self._objective is None:
            self._objective = MTPObjective(self.nemo_occ_cfg, self.policy_cfg)
        return self._objective

    @contextlib.contextmanager
    def probing(self, component: int, half: int | None = None) -> Iterator[None]:
        """For one exact-probe pass: the loss is only component 0, the main RL loss, or component k, depth
        k's unscaled MTP loss; no calibrator statistics are taken (``nemo_occ.core.diagnostics``). With
        ``half`` (0 = A, 1 = B) only that half's sequences count (the others' ``sample_mask`` is 0; the
        denominators stay the batch's): sequences are split as they stream by, balanced by the loss's
        denominator (:class:`nemo_occ.core.diagnostics.StreamingHalves`), the same way in every pass
        over the same micro-batches; :meth:`probe_load` is each half's part of it on this rank."""
        if not 0 <= component <= self.nemo_occ_cfg.num_depths:
            raise ValueError(
                f"probe component must be 0 (RL) or an MTP depth 1..{self.nemo_occ_cfg.num_depths}"
            )
        if half not in (None, 0, 1):
            raise ValueError(f"probe half must be 0 (A), 1 (B) or None, got {half!r}")
        self._probe, self._probe_half = component, half
        self._halves.reset()
        try:
            yield
        finally:
            self._probe = self._probe_half = None

    def probe_load(self) -> list[float]:
        """[A, B]: each half's part of the loss's denominator on this rank, in the last probe pass."""
        return list(self._halves.load)

    def _half_of(self, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """``data`` with ``sample_mask`` zero outside this probe pass's half."""
        sample_mask = data["sample_mask"]
        valid = data["token_mask"][:, 1:] * sample_mask.unsqueeze(-1)  # [B, S-1]
        seq_level = self.policy_cfg.aggregation == "seq_mean_token_mean"
        weights = (valid.sum(1) > 0).double() if seq_level else valid.sum(1).double()
        in_a = self._halves.assign(weights)
        keep = in_a if self._probe_half == 0 else ~in_a
        half = copy.copy(data)
        half["sample_mask"] = sample_mask * keep.to(sample_mask.dtype)
        return half

    def _our_normalizations(self) -> dict[str, Any]:
        """The denominator of each MTP metric this loss reports, by the one rule of
        :func:`nemo_occ.core.metrics.metric_rule`, as NeMo-RL's ``MetricNormalizer``."""
        # NeMo-RL's enum where it has one (#2683), else one with the same values: NeMo-RL v0.7.0 reads no
        # table (its synchronous trainer passes the global denominators and sums the metrics), so there
        # the table documents the denominators and changes nothing (nemo_occ.nemo_rl.compat).
        MetricNormalizer = metric_normalizer()
        per_seq = self.nemo_occ_cfg.regime_spec.uses_policy_loss and (
            self.policy_cfg.aggregation == "seq_mean_token_mean"
        )
        return {
            name: MetricNormalizer(metric_rule(name, loss_per_sequence=per_seq).denominator.value)
            for name in loss_metric_names(self.nemo_occ_cfg.num_depths)
        }

    # -- LossFunction protocol ---------------------------------------------------------------------
    def __call__(
        self,
        next_token_logprobs: torch.Tensor,  # [B, S-1]
        data: Mapping[str, Any],
        global_valid_seqs: torch.Tensor,
        global_valid_toks: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self._probe_half is not None:
            data = self._half_of(data)
        loss, metrics = self.main_loss(
            next_token_logprobs=next_token_logprobs,
            data=data,
            global_valid_seqs=global_valid_seqs,
            global_valid_toks=global_valid_toks,
            **kwargs,
        )
        if not self.nemo_occ_cfg.regime_spec.has_mtp_term or self._probe == 0:
            return loss, metrics

        lp = next_token_logprobs  # [B, S-1]
        width = lp.shape[1]
        mask = (data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)).bool()  # [B, S-1]
        if getattr(self.main_loss, "force_on_policy_ratio", False):
            old = lp.detach()
        else:
            old = data["prev_logprobs"][:, 1:]
        advantages = data["advantages"][:, 1:]
        K = self.nemo_occ_cfg.num_depths
        mtp_lps, mtp_masks, correct = read_mtp_inputs(data, K, width, lp.device)
        mtp_olds = read_mtp_old_logprobs(data, K, width, required=self.nemo_occ_cfg.old_logprobs == "mtp")
        inputs = TokenInputs(
            main_logprobs=lp, old_logprobs=old, advantages=advantages, mask=mask, mtp_logprobs=mtp_lps,
            mtp_masks=mtp_masks, mtp_old_logprobs=mtp_olds, global_valid_tokens=global_valid_toks,
            global_valid_seqs=global_valid_seqs,
        )  # fmt: skip
        if self._probe is not None:  # depth k's unscaled loss alone: no statistics, no λ
            return self.objective.unscaled_losses(inputs)[self._probe - 1], {}

        with (
            torch.no_grad()
        ):  # before the objective records anything: a bad input raises with state unchanged
            depth_masks = [mask & valid_d for valid_d in mtp_masks]  # K x [B, S-1]: loss tokens with a target
            hits = acceptance_counts(correct, depth_masks) if all(c is not None for c in correct) else None
            valid = hits[:, 1] if hits is not None else torch.stack([m.sum() for m in depth_masks])  # [K]
        mtp_loss, mtp_metrics = self.objective(inputs)
        # NeMo-RL's metrics are floats: one device-to-host copy for all of ours (each .item() stalls the stream)
        keys = list(mtp_metrics)
        device = valid.device
        host = torch.cat(
            [torch.as_tensor(mtp_metrics[k], device=device).detach().double().reshape(1) for k in keys]
            + [valid.double(), torch.as_tensor(global_valid_toks).to(device).double().reshape(1)]
        ).tolist()
        metrics = dict(metrics)
        metrics.update(zip(keys, host[: len(keys)], strict=True))
        n_tok = host[-1] if host[-1] > 0 else 1.0
        for d, tokens in enumerate(host[len(keys) : -1], start=1):
            metrics[f"mtp/valid_fraction_{d}"] = float(tokens) / n_tok
        if hits is not None:
            self._acceptance = hits if self._acceptance is None else self._acceptance + hits
        # fused path (nemo_occ.nemo_rl.fused_mtp): the MTP log-probs are detached, a scalar 0 carries the gradient
        carrier = data.get(MTP_CARRIER_KEY) if hasattr(data, "get") else None
        return loss + mtp_loss + (carrier if carrier is not None else 0.0), metrics

    def pop_acceptance_counts(self) -> torch.Tensor | None:
        """[K, 2] float64 (arg-max hits, MTP-valid loss tokens) per depth since the last pop; None if none."""
        counts, self._acceptance = self._acceptance, None
        return counts


def build_loss_fn(
    loss_cfg: Mapping | Any,
    nemo_occ_cfg: NemoOCCConfig,
    *,
    use_fused_linear_logprobs: bool = False,
) -> OCCLossFn:
    """NeMo-RL's ``ClippedPGLossFn(loss_cfg)`` wrapped with the MTP term of ``nemo_occ_cfg`` (needs NeMo-RL)."""
    from nemo_rl.algorithms.loss import ClippedPGLossConfig

    policy_cfg = check_loss_settings(loss_cfg, nemo_occ_cfg)
    if isinstance(loss_cfg, Mapping):
        loss_cfg = ClippedPGLossConfig(**loss_cfg)
    # seam: the use_fused_linear_logprobs keyword came with NeMo-RL #2833, after v0.7.0
    main = clipped_pg_loss(loss_cfg, use_fused_linear_logprobs=use_fused_linear_logprobs)
    return OCCLossFn(main, nemo_occ_cfg, policy_cfg)
