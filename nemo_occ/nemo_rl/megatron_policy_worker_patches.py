"""The patches nemo-occ applies to NeMo-RL's Megatron policy worker, each for the duration of one call.

NeMo-RL's ``MegatronPolicyWorkerImpl`` offers no hook where nemo-occ needs one, so the worker extension
(``nemo_occ.nemo_rl.worker``) rebinds a few names while one ``train`` or ``get_logprobs`` call runs and
restores them when it returns or raises. Each context manager below says which upstream behaviour it
relies on; ``tests/nemo_rl/test_nemo_rl_against_nemo_rl.py`` and the upstream check run them against the real
worker. Nothing is patched at import time, and nothing outside this module patches NeMo-RL.

1. :func:`loss_post_processor`: ``train`` looks up the name ``LossPostProcessor`` in its worker module's
   globals (imported there from ``nemo_rl.models.megatron.train``) and calls it once per global batch with
   keyword arguments (``loss_fn``, ``cfg``, ...); it calls the instance once per micro-batch with
   ``data_dict``, ``packed_seq_params``, ``global_valid_seqs``, ``global_valid_toks`` and gets back the
   function Megatron's schedule applies to the model's output. Rebinding that global to a subclass makes
   ``train`` build ours, which attaches the MTP log-probs to ``data_dict`` before the loss runs.
2. :func:`logprobs_post_processor`: the same for ``get_logprobs``, which builds ``LogprobsPostProcessor``
   from the module's globals with keyword arguments (``cfg``, ...) and calls it per micro-batch with
   ``data_dict``, ``input_ids``, ``cu_seqlens_padded``.
3. :func:`forward_backward`: ``train`` runs each global batch through the module global
   ``megatron_forward_backward``, called with keyword arguments only.
4. :func:`after_each_optimizer_step`: ``train`` closes each global batch with ``self.optimizer.step()``
   (not in eval mode), looked up on the optimizer instance, and unpacks its result as
   ``(update_successful, grad_norm, num_zeros_in_grad)``; replacing the instance's ``step`` makes that
   call ours, returning the result unchanged.

Only the Ray worker runs these (they import NeMo-RL's Megatron worker module when entered).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from nemo_occ.nemo_rl.mtp_batch import attach_mtp_to_batch, old_logprobs_rows

__all__ = [
    "loss_post_processor",
    "logprobs_post_processor",
    "forward_backward",
    "after_each_optimizer_step",
    "mtp_loss_post_processor_class",
    "mtp_logprobs_post_processor_class",
]


def _worker_module():
    from nemo_rl.models.policy.workers import megatron_policy_worker

    return megatron_policy_worker


@contextlib.contextmanager
def _rebound(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def loss_post_processor(capture: Any, inputs: Any) -> Iterator[None]:
    """``train`` builds :func:`mtp_loss_post_processor_class` of NeMo-RL's ``LossPostProcessor`` (item 1)."""
    module = _worker_module()
    with _rebound(
        module, "LossPostProcessor", mtp_loss_post_processor_class(module.LossPostProcessor, capture, inputs)
    ):
        yield


@contextlib.contextmanager
def logprobs_post_processor(capture: Any, inputs: Any, sink: list) -> Iterator[None]:
    """``get_logprobs`` builds :func:`mtp_logprobs_post_processor_class`, which fills ``sink`` (item 2)."""
    module = _worker_module()
    cls = mtp_logprobs_post_processor_class(module.LogprobsPostProcessor, capture, inputs, sink)
    with _rebound(module, "LogprobsPostProcessor", cls):
        yield


@contextlib.contextmanager
def forward_backward(wrapper: Callable[..., Any]) -> Iterator[None]:
    """``train`` calls ``wrapper(original, **kwargs)`` for ``megatron_forward_backward(**kwargs)`` (item 3)."""
    module = _worker_module()
    original = module.megatron_forward_backward
    with _rebound(module, "megatron_forward_backward", lambda **kwargs: wrapper(original, **kwargs)):
        yield


@contextlib.contextmanager
def after_each_optimizer_step(optimizer: Any, callback: Callable[[Any], None]) -> Iterator[None]:
    """Every ``optimizer.step()`` then calls ``callback(result)`` and returns its result (item 4)."""
    step = optimizer.step

    def step_then_callback(*args: Any, **kwargs: Any):
        result = step(*args, **kwargs)
        callback(result)
        return result

    with _rebound(optimizer, "step", step_then_callback):
        yield


def mtp_logprobs_post_processor_class(base: type, capture: Any, inputs: Any, sink: list) -> type:
    """A subclass of NeMo-RL's ``LogprobsPostProcessor`` that also keeps each depth's old log-probs.

    Per micro-batch it appends to ``sink`` the depths' rows in ``prev_logprobs``' layout
    (:func:`nemo_occ.nemo_rl.mtp_batch.old_logprobs_rows`).
    """

    class MTPLogprobsPostProcessor(base):
        def __call__(self, data_dict, input_ids, cu_seqlens_padded):
            main = super().__call__(
                data_dict=data_dict, input_ids=input_ids, cu_seqlens_padded=cu_seqlens_padded
            )
            from nemo_occ.megatron.chunked_logprobs import DEFAULT_CHUNK_SIZE

            chunk = self.cfg.get("logprob_chunk_size") or DEFAULT_CHUNK_SIZE

            def with_mtp(output_tensor):
                # Runs right after this micro-batch's forward, on the stage holding the MTP layers.
                mtp = capture.take().logprobs(
                    inputs.input_ids, packed_seq_params=inputs.packed_seq_params, chunk_size=chunk
                )
                sink.append(old_logprobs_rows(data_dict["input_ids"], mtp, inputs.packed_seq_params))
                return main(output_tensor)

            return with_mtp

    return MTPLogprobsPostProcessor


def mtp_loss_post_processor_class(base: type, capture: Any, inputs: Any) -> type:
    """A subclass of NeMo-RL's ``LossPostProcessor`` that attaches the MTP log-probs before the loss."""

    class MTPLossPostProcessor(base):
        def __call__(self, data_dict, packed_seq_params=None, global_valid_seqs=None, global_valid_toks=None):
            compute_loss = super().__call__(
                data_dict=data_dict,
                packed_seq_params=packed_seq_params,
                global_valid_seqs=global_valid_seqs,
                global_valid_toks=global_valid_toks,
            )
            from nemo_occ.megatron.chunked_logprobs import DEFAULT_CHUNK_SIZE

            chunk = self.cfg.get("logprob_chunk_size") or DEFAULT_CHUNK_SIZE

            def with_mtp(output_tensor, *args, **kwargs):
                # Runs right after this micro-batch's forward, on the stage holding the MTP layers.
                from nemo_occ.nemo_rl.fused_mtp import MTP_CARRIER_KEY, fused_mtp_term

                captured = capture.take()
                fused = fused_mtp_term(
                    self.loss_fn, data_dict, global_valid_seqs, global_valid_toks,
                    fp16=bool(getattr(captured.gpt.config, "fp16", False)), packed=packed_seq_params is not None,
                    cp_size=int(getattr(captured.gpt.config, "context_parallel_size", 1) or 1),
                )  # fmt: skip
                mtp = captured.logprobs(
                    inputs.input_ids, packed_seq_params=packed_seq_params, chunk_size=chunk, return_top1=True,
                    fused=fused,
                )  # fmt: skip
                attach_mtp_to_batch(data_dict, mtp, packed_seq_params)
                if mtp.mtp_carrier is not None:
                    data_dict[MTP_CARRIER_KEY] = mtp.mtp_carrier
                return compute_loss(output_tensor, *args, **kwargs)

            return with_mtp

    return MTPLossPostProcessor
