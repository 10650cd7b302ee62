"""The demo's verifiable-reward task: multi-digit addition with a rule-based verifier.

A problem is ``a + b`` with zero-padded ``D``-digit operands; the answer is the ``D+1``-digit sum
written least-significant digit first (the order a left-to-right model can compute carries in),
followed by EOS. Reward 1 when the generated answer matches exactly, else 0 — the verifiable reward
of RLVR, like ``math-verify`` on DAPO-Math.

Token layout of one sequence (length L = 2D + 3 + D + 2)::

    BOS a_{D-1} .. a_0 + b_{D-1} .. b_0 =  | r_0 r_1 .. r_D EOS
    <--------------- prompt ------------->   <-- response -->

Letters: N problems, L sequence length, P prompt length, R response length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AdditionTask", "VOCAB_SIZE"]

PLUS, EQUALS, BOS, EOS, PAD = 10, 11, 12, 13, 14
VOCAB_SIZE = 16  # 15 symbols, padded to a multiple of common TP sizes
_SYMBOLS = {PLUS: "+", EQUALS: "=", BOS: "", EOS: "", PAD: "_"}


@dataclass(frozen=True)
class AdditionTask:
    digits: int = 3

    @property
    def prompt_len(self) -> int:
        """Tokens of a prompt: two ``digits``-digit operands, '+', '=' and the start token."""
        return 2 * self.digits + 3

    @property
    def response_len(self) -> int:
        """Tokens of a response: the sum's digits and the end token."""
        return self.digits + 2

    @property
    def seq_len(self) -> int:
        """Tokens of a whole sequence: prompt and response."""
        return self.prompt_len + self.response_len

    # -- data ----------------------------------------------------------------------------------------
    def sample_operands(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[N, 2] operands drawn uniformly, excluding the held-out set's residue class (see eval_operands)."""
        hi = 10**self.digits
        ops = torch.randint(0, hi, (n, 2), generator=generator)
        # keep training and evaluation disjoint: held-out problems have (a + 7b) % 13 == 0
        held = self._is_heldout(ops)
        while bool(held.any()):
            ops[held, 1] = (ops[held, 1] + 1) % hi
            held = self._is_heldout(ops)
        return ops

    def eval_operands(self, n: int, seed: int) -> torch.Tensor:
        """[N, 2] fixed held-out problems (disjoint from every training draw)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        hi = 10**self.digits
        out = []
        while sum(len(o) for o in out) < n:
            ops = torch.randint(0, hi, (4 * n, 2), generator=g)
            out.append(ops[self._is_heldout(ops)])
        return torch.cat(out)[:n]

    @staticmethod
    def _is_heldout(ops: torch.Tensor) -> torch.Tensor:
        return (ops[:, 0] + 7 * ops[:, 1]) % 13 == 0

    def _digits(self, x: torch.Tensor, n: int, lsb_first: bool) -> torch.Tensor:
        powers = 10 ** torch.arange(n)  # [n] least significant first
        d = (x[:, None] // powers) % 10  # [N, n]
        return d if lsb_first else d.flip(-1)

    def prompts(self, ops: torch.Tensor) -> torch.Tensor:
        """[N, P] prompt tokens."""
        n = ops.shape[0]
        col = lambda v: torch.full((n, 1), v, dtype=torch.long)  # noqa: E731
        return torch.cat(
            [
                col(BOS),
                self._digits(ops[:, 0], self.digits, False),
                col(PLUS),
                self._digits(ops[:, 1], self.digits, False),
                col(EQUALS),
            ],
            dim=1,
        )

    def answers(self, ops: torch.Tensor) -> torch.Tensor:
        """[N, R] reference responses (sum digits LSB first, then EOS)."""
        s = ops[:, 0] + ops[:, 1]
        return torch.cat([self._digits(s, self.digits + 1, True), torch.full((len(s), 1), EOS)], dim=1)

    def sequences(self, ops: torch.Tensor) -> torch.Tensor:
        """[N, L] full reference sequences (for the supervised warm start)."""
        return torch.cat([self.prompts(ops), self.answers(ops)], dim=1)

    def response_mask(self, n: int) -> torch.Tensor:
        """[N, L-1] bool: next-token index j (which scores tok[j+1]) is trained on iff tok[j+1] is
        a response token, i.e. j + 1 >= P."""
        mask = torch.zeros(n, self.seq_len - 1, dtype=torch.bool)
        mask[:, self.prompt_len - 1 :] = True
        return mask

    # -- verifier ------------------------------------------------------------------------------------
    def rewards(self, ops: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """[N] 1.0 where the response is exactly the sum's digits then EOS, else 0.0."""
        return (responses == self.answers(ops)).all(dim=1).float()

    def render(self, tokens: torch.Tensor) -> str:
        """``tokens`` as text, for logs and reports."""
        return "".join(_SYMBOLS.get(int(t), str(int(t))) for t in tokens)
