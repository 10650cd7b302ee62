"""The demo's policy: a small megatron-core GPT with MTP layers, driven through the production path.

Training log-probs come from ``nemo_occ.megatron.mtp_logprobs.forward_with_mtp_logprobs`` — the
same capture, chunked vocab-parallel log-probs, alignment and detach that the NeMo-RL worker uses —
never from a separate toy implementation. Sampling uses the main head only
(``forward_main_logits``, MTP block skipped).

Generation recomputes the whole (short) sequence for each new token instead of keeping a KV cache:
responses are ``digits + 2`` tokens long, so the cache would save little, and a batched full
forward per token keeps the loop to ``response_len`` tensor calls for the whole batch (a design
choice, not measured against a cached loop).

Letters: N sequences, P prompt length, L sequence length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_occ.lab.demo.config import DemoConfig
from nemo_occ.lab.demo.task import VOCAB_SIZE, AdditionTask

__all__ = ["DemoPolicy"]


@dataclass
class DemoPolicy:
    model: torch.nn.Module
    position_ids: torch.Tensor  # [1, L]

    @classmethod
    def build(cls, cfg: DemoConfig, task: AdditionTask) -> DemoPolicy:
        """Needs megatron-core set up for one CPU process (``run_demo`` enters it once for the whole run)."""
        from nemo_occ.lab.tiny_gpt import build_tiny_gpt

        torch.manual_seed(cfg.seed)
        model = build_tiny_gpt(cfg.model.tiny_gpt(vocab_size=VOCAB_SIZE, max_sequence_length=task.seq_len))
        return cls(model=model, position_ids=torch.arange(task.seq_len)[None])

    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.position_ids[:, : tokens.shape[1]].expand(tokens.shape[0], -1)

    @torch.no_grad()
    def generate(
        self, prompts: torch.Tensor, new_tokens: int, temperature: float, generator: torch.Generator
    ) -> torch.Tensor:
        """[N, P + new_tokens]: prompts followed by tokens sampled from the main head."""
        from nemo_occ.megatron.mtp_logprobs import forward_main_logits

        self.model.eval()
        seqs = prompts
        for _ in range(new_tokens):
            logits = forward_main_logits(self.model, seqs, self._positions(seqs))[:, -1].float()  # [N, V]
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # [N, 1]
            seqs = torch.cat([seqs, nxt], dim=1)
        self.model.train()
        return seqs

    def logprobs(self, seqs: torch.Tensor, *, detach_trunk: bool, return_top1: bool = False):
        """Main and aligned MTP log-probs [N, L-1] of ``seqs`` (see ``forward_with_mtp_logprobs``)."""
        from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

        return forward_with_mtp_logprobs(
            self.model, seqs, self._positions(seqs), detach_trunk=detach_trunk, return_top1=return_top1
        )
