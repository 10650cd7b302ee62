"""Capture each MTP depth's hidden states during a GPTModel's normal forward; turn them into log-probs.

    with MTPCapture(model, detach_trunk=False) as cap:
        logits = model(input_ids, position_ids, attention_mask, packed_seq_params=psp)  # anyone's call
        mtp = cap.logprobs(input_ids, packed_seq_params=psp)   # K x [B, S-1], aligned to main positions

What the context changes in the forward, all undone on exit (hooks removed, attributes restored):

* A forward hook on ``model.mtp`` (the ``MultiTokenPredictionBlock``) keeps the K depth chunks of
  its output ``cat([h_main, h_1, ..., h_K], dim=0)`` and hands only ``h_main`` on, and the
  GPTModel object sees a config copy with ``mtp_num_layers=None``. Megatron's built-in MTP loss is
  therefore never computed: no MTP logits, no ``MTPLossAutoScaler`` gradient, and no crash on
  ``labels=None`` (megatron-core 0.16.x), on every core, because both the inline 0.16 loss and the
  newer ``process_mtp_loss`` sit behind ``if self.config.mtp_num_layers`` in ``_postprocess``.
  The main head's logits / loss come out exactly as without MTP.
* ``detach_trunk=True`` (the ``detach`` regime) cuts every path from the MTP log-probs into
  the trunk: the hidden states entering the first MTP depth are detached (the chain between MTP
  depths keeps its gradient: those are MTP parameters), the shared embedding's output inside
  the MTP layers is detached, and the log-probs use the output weight detached. Only ``mtp.*``
  parameters receive gradient from the MTP term. Megatron >= 0.19's ``mtp_detach_heads`` does the
  same three cuts; it is not needed here, and it must be off for the joint regimes (checked).

Pipeline parallelism: MTP lives on the last stage. On a stage without an MTP block the context
installs nothing and ``active`` is False.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from nemo_occ.megatron.chunked_logprobs import DEFAULT_CHUNK_SIZE
from nemo_occ.megatron.head_logprobs import head_logprobs, sequence_layout
from nemo_occ.megatron.model_access import swapped_config, unwrap_gpt_model


@dataclasses.dataclass
class MTPHeadLogProbs:
    """Aligned per-depth MTP log-probs; index j of every depth scores tok[j+1] (like the main head)."""

    logprobs: list[torch.Tensor]  # K x [B, S-1] fp32 (0 where masked)
    masks: list[torch.Tensor]  # K x [B, S-1] bool: a valid MTP target exists at j
    top1: list[torch.Tensor] | None  # K x [B, S-1] bool: target is the head's arg-max (draft hit)


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
    ) -> MTPHeadLogProbs:
        """Per-depth aligned MTP log-probs; ``input_ids`` exactly as passed to the model."""
        layout = sequence_layout(self.gpt, input_ids, packed_seq_params)
        logprobs, masks, top1 = [], [], []
        for depth, hidden in enumerate(self.mtp_hidden, start=1):
            lp, valid, hit = head_logprobs(
                self.gpt,
                hidden,
                layout,
                depth,
                detach_weight=self.detach_trunk,
                chunk_size=chunk_size,
                return_top1=return_top1,
            )
            logprobs.append(lp)
            masks.append(valid)
            top1.append(hit)
        return MTPHeadLogProbs(logprobs=logprobs, masks=masks, top1=top1 if return_top1 else None)


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
        self._layer_calls = 0
        self._captured: CapturedMTP | None = None

    # -- hooks -----------------------------------------------------------------------------------
    def _block_pre_hook(self, module, args, kwargs):
        self._layer_calls = 0
        if self.detach_trunk and kwargs.get("embedding") is not None:
            kwargs["embedding"] = _DetachedOutput(kwargs["embedding"])
        return args, kwargs

    def _layer_pre_hook(self, module, args, kwargs):
        # Only the first depth reads the trunk; later depths read the previous MTP depth.
        if self.detach_trunk and self._layer_calls == 0:
            hidden = kwargs["hidden_states"].detach()
            if torch.is_grad_enabled():
                # Megatron's viewless-tensor / checkpoint helpers expect an input that requires grad.
                hidden.requires_grad_(True)
            kwargs["hidden_states"] = hidden
        self._layer_calls += 1
        return args, kwargs

    def _block_hook(self, module, args, kwargs, output):
        chunks = torch.chunk(output, 1 + self.num_depths, dim=0)
        self._captured = CapturedMTP(
            gpt=self.gpt, main_hidden=chunks[0], mtp_hidden=list(chunks[1:]), detach_trunk=self.detach_trunk
        )
        return chunks[0]

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> MTPCapture:
        if not self.active:
            return self
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(swapped_config(self.gpt, mtp_num_layers=None))
        block = self.gpt.mtp
        self._handles.append(block.register_forward_pre_hook(self._block_pre_hook, with_kwargs=True))
        self._handles.append(block.register_forward_hook(self._block_hook, with_kwargs=True))
        for layer in block.layers:
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._stack is not None:
            self._stack.close()
            self._stack = None
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
    ) -> MTPHeadLogProbs:
        """``take().logprobs(...)``: aligned MTP log-probs of the last forward."""
        return self.take().logprobs(
            input_ids, packed_seq_params=packed_seq_params, chunk_size=chunk_size, return_top1=return_top1
        )
