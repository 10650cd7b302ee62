"""Megatron-core model layer: MTP hidden-state capture, memory-bounded vocab-parallel log-probs and
detach (see docs/design.md). Needs megatron-core (the ``[megatron]`` extra; NeMo-RL's container has it).

Public entry points:

- ``MTPCapture``: capture each MTP depth's hidden states during anyone's ``model(...)`` call.
- ``forward_with_mtp_logprobs`` / ``forward_main_logits``: training forward (main + aligned MTP
  log-probs, no logits materialised) and the cheap sampling forward (MTP block skipped).
- ``ModelLogProbs``: what both ``MTPCapture.logprobs`` and ``forward_with_mtp_logprobs`` return.
- ``token_logprobs``: chunked, vocab-parallel log-probs of target tokens with recompute in backward.
"""

from nemo_occ.megatron.chunked_logprobs import token_logprobs
from nemo_occ.megatron.head_logprobs import ModelLogProbs
from nemo_occ.megatron.mtp_capture import MTPCapture
from nemo_occ.megatron.mtp_logprobs import forward_main_logits, forward_with_mtp_logprobs

__all__ = [
    "MTPCapture",
    "ModelLogProbs",
    "forward_main_logits",
    "forward_with_mtp_logprobs",
    "token_logprobs",
]
