"""Capture each MTP depth's hidden states during a GPTModel's normal forward; turn them into log-probs.

    with MTPCapture(model, detach_trunk=False) as cap:
        logits = model(input_ids, position_ids, attention_mask, packed_seq_params=psp)  # anyone's call
        mtp = cap.logprobs(input_ids, packed_seq_params=psp)   # ModelLogProbs: mtp_logprobs K x [B, S-1]

What the context changes in the forward, all undone on exit (hooks removed, attributes restored):

* A forward hook on ``model.mtp`` (the ``MultiTokenPredictionBlock``) keeps the K depth chunks of
  its output ``cat([h_main, h_1, ..., h_K], dim=0)`` and hands only ``h_main`` on, and the
  GPTModel object sees a config copy with ``mtp_num_layers=None``. Megatron's built-in MTP loss is
  therefore never computed: no MTP logits, no ``MTPLossAutoScaler`` gradient, and no crash on
  ``labels=None`` (megatron-core 0.16.x), on every core, because both the inline 0.16 loss and the
  newer ``process_mtp_loss`` sit behind ``if self.config.mtp_num_layers`` in ``_postprocess``.
  The main head's logits / loss come out exactly as without MTP.
* ``detach_trunk=True`` (the ``detach`` regime) cuts every path from the MTP log-probs into
  the trunk: the MTP block's input (the trunk's hidden states) is detached, the shared embedding's
  output inside the MTP layers is detached, and the log-probs use the output weight detached. Only
  ``mtp.*`` parameters receive gradient from the MTP term. The cut is at the block's input, not the
  first depth's, because newer cores' ``mtp_hsm`` (hidden-state mixing, training only) also feeds the
  block input into depths >= 2; the main head still reads the un-detached hidden states. Megatron
  >= 0.19's ``mtp_detach_heads`` does the same three cuts; it is not needed here, and it must be off
  for the joint regimes (checked).

Packed rows (THD) whose documents sit in padded slots with ``cu_seqlens_q`` (real lengths) different
from ``cu_seqlens_q_padded`` are refused: megatron's MTP layer rolls its input ids inside the
documents of ``cu_seqlens_q`` taken as row positions (``roll_tensor`` / ``_roll_tensor_packed_seq`` in
``transformer/multi_token_prediction.py``, 0.16 and 0.20), so every document after the first would be
rolled at the wrong place. Passing the padded boundaries as ``cu_seqlens_q`` too (NeMo-RL's layout for
GPT models) is exact for every real token: the roll then stays inside each slot, and a real token sees
padding only after itself.

Pipeline parallelism: MTP lives on the last stage. On a stage without an MTP block the context
installs nothing and ``active`` is False.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from nemo_occ.megatron.chunked_logprobs import (
    DEFAULT_CHUNK_SIZE,
    discard_deferred_errors,
    raise_deferred_errors,
)
from nemo_occ.megatron.head_logprobs import FusedMTPTerm, ModelLogProbs, logprobs_from_hidden
from nemo_occ.megatron.model_access import swapped_config, unwrap_gpt_model


def refuse_padded_slots(packed_seq_params) -> None:
    """Raise when packed documents sit in padded slots given by real-length ``cu_seqlens_q`` (module doc)."""
    if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", "thd") != "thd":
        return
    real, padded = packed_seq_params.cu_seqlens_q, getattr(packed_seq_params, "cu_seqlens_q_padded", None)
    if padded is None or padded is real:
        return
    if real.shape != padded.shape or not torch.equal(real.to(padded.device, padded.dtype), padded):
        raise ValueError(
            "packed_seq_params has cu_seqlens_q != cu_seqlens_q_padded (documents in padded slots): "
            "megatron's MTP layers roll their inputs at the cu_seqlens_q row positions, which is wrong for "
            "every document after the first. Set cu_seqlens_q = cu_seqlens_q_padded (and cu_seqlens_kv = "
            "cu_seqlens_kv_padded), as NeMo-RL does, and mask the padding in the loss"
        )


class _DetachedOutput:
    """Calls the wrapped module and detaches its output; attribute reads go to the module."""

    def __init__(self, module: torch.nn.Module):
        self._module = module

    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs).detach()

    def __getattr__(self, name: str):
        return getattr(self._module, name)


@dataclasses.dataclass
class CapturedMTP:
    """The hidden states one forward produced: main head [s, b, H] and K depths [s, b, H]."""

    gpt: torch.nn.Module
    main_hidden: torch.Tensor
    mtp_hidden: list[torch.Tensor]
    detach_trunk: bool

    def logprobs(
        self,
        input_ids: torch.Tensor,
        *,
        packed_seq_params=None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        return_top1: bool = False,
        fused: FusedMTPTerm | None = None,
    ) -> ModelLogProbs:
        """The MTP depths' aligned log-probs (``main_*`` None); ``input_ids`` exactly as passed to the model.

        ``fused``: take the MTP loss term's gradient in the chunk loops (``ModelLogProbs.mtp_carrier``).
        """
        return logprobs_from_hidden(
            self.gpt,
            input_ids,
            main_hidden=None,
            mtp_hidden=self.mtp_hidden,
            packed_seq_params=packed_seq_params,
            detach_trunk=self.detach_trunk,
            chunk_size=chunk_size,
            return_top1=return_top1,
            fused=fused,
        )


class MTPCapture(contextlib.AbstractContextManager):
    """Context manager that captures MTP hidden states from ``model(...)`` calls (see module doc).

    Each forward replaces the previous capture: call ``take()`` / ``logprobs()`` after every
    ``model(...)`` call (NeMo-RL and megatron's schedules run the loss right after the forward).
    """

    def __init__(self, model: torch.nn.Module, *, detach_trunk: bool):
        if not isinstance(detach_trunk, bool):
            raise TypeError("detach_trunk must be a bool (True for the detach regime)")
        self.gpt = unwrap_gpt_model(model)
        self.detach_trunk = detach_trunk
        self.active = bool(getattr(self.gpt, "mtp_process", False))
        if self.active and not self.gpt.post_process:
            raise ValueError(
                "this pipeline stage has MTP layers but no output layer; keep MTP on the last stage "
                "(the default pipeline layout)"
            )
        if self.active and getattr(self.gpt.config, "mtp_detach_heads", False) and not detach_trunk:
            raise ValueError(
                "megatron's mtp_detach_heads=True blocks the MTP gradient into the trunk that a joint "
                "regime needs; set mtp_detach_heads: false (nemo-occ detaches itself for 'detach')"
            )
        self.num_depths = int(self.gpt.config.mtp_num_layers or 0) if self.active else 0
        self._handles: list = []
        self._stack: contextlib.ExitStack | None = None
        self._block_input: torch.Tensor | None = None
        self._captured: CapturedMTP | None = None

    # -- hooks -----------------------------------------------------------------------------------
    def _block_pre_hook(self, module, args, kwargs):
        refuse_padded_slots(kwargs.get("packed_seq_params"))
        self._block_input = None
        if self.detach_trunk:
            if kwargs.get("embedding") is not None:
                kwargs["embedding"] = _DetachedOutput(kwargs["embedding"])
            # Every MTP depth reads the trunk only through the block input (the first depth directly,
            # later ones under mtp_hsm); the main head gets the original back in _block_hook.
            self._block_input = kwargs["hidden_states"]
            hidden = self._block_input.detach()
            if torch.is_grad_enabled():
                # Megatron's viewless-tensor / checkpoint helpers expect an input that requires grad.
                hidden.requires_grad_(True)
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _block_hook(self, module, args, kwargs, output):
        # [h_main, h_1, ..., h_K] along the sequence; h_main is the block input (all MTP on this stage).
        chunks = torch.chunk(output, 1 + self.num_depths, dim=0)
        main = chunks[0] if self._block_input is None else self._block_input
        self._block_input = None
        self._captured = CapturedMTP(
            gpt=self.gpt, main_hidden=main, mtp_hidden=list(chunks[1:]), detach_trunk=self.detach_trunk
        )
        return main

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> MTPCapture:
        if not self.active:
            return self
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(swapped_config(self.gpt, mtp_num_layers=None))
        block = self.gpt.mtp
        self._handles.append(block.register_forward_pre_hook(self._block_pre_hook, with_kwargs=True))
        self._handles.append(block.register_forward_hook(self._block_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._block_input = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        # The log-prob kernels' checks were recorded on the device during the block (no host sync per
        # micro-batch): raised here, once, unless the block is failing anyway.
        if exc[0] is None:
            raise_deferred_errors()
        else:
            discard_deferred_errors()
        return None

    # -- results -------------------------------------------------------------------------------
    def take(self) -> CapturedMTP:
        """The hidden states of the last forward (and forget them)."""
        if not self.active:
            raise ValueError("this pipeline stage holds no MTP block (MTP lives on the last stage)")
        if self._captured is None:
            raise ValueError("no MTP hidden states captured: call model(...) inside the `with` block first")
        captured, self._captured = self._captured, None
        return captured

    def logprobs(
        self,
        input_ids: torch.Tensor,
        *,
        packed_seq_params=None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        return_top1: bool = False,
        fused: FusedMTPTerm | None = None,
    ) -> ModelLogProbs:
        """``take().logprobs(...)``: aligned MTP log-probs of the last forward."""
        return self.take().logprobs(
            input_ids,
            packed_seq_params=packed_seq_params,
            chunk_size=chunk_size,
            return_top1=return_top1,
            fused=fused,
        )
