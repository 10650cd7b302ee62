"""The worker extension's exact probes (item 4 of ``nemo_occ.nemo_rl.worker``, ``nemo_occ.fidelity.every``):
the probed update's micro-batches run 2(1 + K) extra times, one loss component of one half of the sequences
each, with gradients kept on this rank, and the same-sample, cross-fitted and Adam-preconditioned c and v²
are read off them (``nemo_occ.core.diagnostics.cross_fitted_statistics``).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from nemo_occ.core.diagnostics import cross_fitted_statistics
from nemo_occ.nemo_rl import megatron_policy_worker_patches as patches

__all__ = ["ProbeMixin"]


class ProbeMixin:
    """Runs the probed update's extra forward-backward passes and keeps their exact statistics."""

    def patched_forward_backward(self, wrapper: Any):
        """Make NeMo-RL's ``train`` call ``wrapper(original, **kwargs)`` for ``megatron_forward_backward``."""
        return patches.forward_backward(wrapper)

    @contextlib.contextmanager
    def gradient_probe_pass(self) -> Iterator[None]:
        """One extra forward-backward whose gradient only accumulates on this rank, then is read and dropped.

        Megatron's DDP would reduce (or reduce-scatter, with the distributed optimizer) the gradient at the
        last micro-batch, and ``finalize_model_grads`` would also update MoE expert biases: NeMo-RL's split
        step API (``begin_train_step``) nulls the same three hooks and runs under ``model.no_sync()``. The
        MoE auxiliary loss is scaled to 0 (it belongs to neither c nor v²), and the model's buffers (MoE
        token counts) are restored, so the probe leaves no trace in the update that follows.
        """
        model_config = getattr(self.model, "config", None)
        hooks = ("grad_sync_func", "no_sync_func", "finalize_model_grads_func", "moe_grad_scale_func")
        saved = (
            {name: getattr(model_config, name, None) for name in hooks} if model_config is not None else {}
        )
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        if model_config is not None:
            model_config.grad_sync_func = None
            model_config.no_sync_func = contextlib.nullcontext
            model_config.finalize_model_grads_func = None
            model_config.moe_grad_scale_func = lambda: 0.0
        no_sync = getattr(self.model, "no_sync", None)
        try:
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                yield
        finally:
            for name, value in saved.items():
                setattr(model_config, name, value)
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name])

    def _probe_gradients(self, params: list[Any]) -> list[torch.Tensor | None]:
        """This rank's accumulated gradients (megatron's ``main_grad``, else ``.grad``), copied, then zeroed."""
        out = []
        for pp in params:
            g = getattr(pp.param, "main_grad", None)
            g = pp.param.grad if g is None else g
            out.append(None if g is None else g.detach().clone())
        if hasattr(self.model, "zero_grad_buffer"):
            self.model.zero_grad_buffer()
        else:
            self.model.zero_grad(set_to_none=True)
        return out

    def _probing_forward_backward(self, loss_fn: Any, probe_index: int):
        """``megatron_forward_backward`` that probes the ``probe_index``-th training call first."""
        from nemo_occ.megatron.probe_layout import (
            adam_preconditioner,
            probe_parameters,
            probe_statistics_group,
        )

        calls = itertools.count()

        def forward_backward(original: Any, **kwargs: Any):
            if kwargs.get("forward_only") or next(calls) != probe_index:
                return original(**kwargs)
            microbatches = list(kwargs.pop("data_iterator"))  # replayed by every pass
            params = probe_parameters(self.model, gradients="local")
            grads: list[list[list[torch.Tensor | None]]] = [[], []]  # [half][component][parameter]
            for half in (0, 1):
                for component in range(self.nemo_occ_cfg.num_depths + 1):
                    with loss_fn.probing(component, half=half), self.gradient_probe_pass():
                        original(data_iterator=iter(microbatches), **kwargs)
                    grads[half].append(self._probe_gradients(params))
            scale = (
                float(self.optimizer.get_loss_scale()) if hasattr(self.optimizer, "get_loss_scale") else 1.0
            )
            if scale != 1.0:  # fp16 loss scaling: report the gradients' statistics, not the scaled ones
                for g in itertools.chain.from_iterable(itertools.chain.from_iterable(grads)):
                    if g is not None:
                        g.div_(scale)
            try:
                shares = self.probe_shares(loss_fn)
            except ValueError as err:  # the same on every rank (the counts are all-reduced): no probe
                warnings.warn(f"probe skipped: {err}", stacklevel=2)
                return original(data_iterator=iter(microbatches), **kwargs)
            shards, note = adam_preconditioner(self.optimizer, params)
            self._occ_exact = cross_fitted_statistics(
                [h[0] for h in grads], [h[1:] for h in grads], params, shares=shares,
                preconditioner=shards, precond_note=note, stats_group=probe_statistics_group(),
            )  # fmt: skip
            return original(data_iterator=iter(microbatches), **kwargs)

        return forward_backward

    def probe_shares(self, loss_fn: Any) -> tuple[float, float]:
        """Each half's share of the probed update's loss denominator, the same on every rank.

        Only the stage holding the loss counts; its ranks of one data-parallel replica (TP, CP) count
        alike, so summing over the world scales both halves equally and the ratio is the batch's.
        """
        load = torch.tensor(
            loss_fn.probe_load() if self.holds_output_layer() else [0.0, 0.0], dtype=torch.float64
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from nemo_occ.core.distributed import all_reduce_sum_, collective_device
            from nemo_occ.megatron.probe_layout import probe_statistics_group

            group = probe_statistics_group()
            load = all_reduce_sum_(load.to(collective_device(group)), group).cpu()
        total = float(load.sum())
        if not total > 0 or float(load.min()) <= 0:
            raise ValueError(
                f"the probed update's halves hold {load.tolist()} of its loss denominator: cross-fitting needs "
                "at least two sequences with loss tokens"
            )
        return float(load[0]) / total, float(load[1]) / total
