"""What the regime and probe benches share: the model-shape and device flags, the model, the synthetic
batch, the interleaved timing rounds and the header line.

Both time one optimizer update of a megatron-core GPT with MTP layers (CPU through
``nemo_occ.lab.cpu_compat``, which each bench enters at its entry point, or CUDA), built the same
way so their figures are comparable.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nemo_occ.core.inputs import TokenInputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}  # what a GPU trains in; the CPU's fast path


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The flags of the benchmarked model, the timing rounds and the device."""
    ap.add_argument("--tokens", type=int, default=256, help="sequence length S")
    ap.add_argument("--batch", type=int, default=16, help="sequences per update B")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument(
        "--device", choices=sorted(DEFAULT_DTYPE), default="cpu", help="where to run (default cpu)"
    )
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda"
    )


def prepare(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.dtype, Callable[[], None]]:
    """Check the device, set threads and quiet megatron's warnings; return the dtype and a sync function."""
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device; run on a GPU machine or use --device cpu")
    dtype = DTYPES[args.dtype or DEFAULT_DTYPE[args.device]]
    # CUDA runs asynchronously: a timed update ends only when the device has finished it.
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    return dtype, sync


def build_model(args: argparse.Namespace, dtype: torch.dtype, mtp_num_layers: int) -> torch.nn.Module:
    """A tiny GPT with ``mtp_num_layers`` MTP layers, seed 0, in ``dtype`` on ``args.device``."""
    from nemo_occ.lab.parallel import init_model_parallel
    from nemo_occ.lab.tiny_gpt import TinyGPTConfig, build_tiny_gpt

    init_model_parallel(tensor_parallel=1, backend="nccl" if args.device == "cuda" else "gloo")
    torch.manual_seed(0)
    cfg = TinyGPTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        max_sequence_length=args.tokens,
        mtp_num_layers=mtp_num_layers,
    )
    # Built on the CPU in fp32 (megatron's CPU initialisation), then moved: parameters in ``dtype`` as a
    # bf16 GPU run keeps them (no fp32 master copy: the optimizer is plain SGD on the parameters).
    # config.bf16 makes megatron's attention take its softmax in fp32, as in a bf16 training run.
    bf16 = {"bf16": True} if dtype == torch.bfloat16 else {}
    return build_tiny_gpt(cfg, transformer_fields=bf16).to(device=args.device, dtype=dtype)


@dataclass(frozen=True)
class SyntheticBatch:
    """One update's data: random token ids, old main-head log-probs a little off the model's own (so that
    δ_RL != 0), one advantage per sequence, every token valid."""

    ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    old_logprobs: torch.Tensor  # [B, S-1]
    advantages: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, S-1], bool
    global_valid_tokens: torch.Tensor
    global_valid_seqs: torch.Tensor

    @property
    def counts(self) -> dict:
        """The normalisers the losses take as keyword arguments."""
        return dict(global_valid_tokens=self.global_valid_tokens, global_valid_seqs=self.global_valid_seqs)


def synthetic_batch(model: torch.nn.Module, args: argparse.Namespace) -> SyntheticBatch:
    """The batch both benches time on (generator seed 1), on ``args.device``."""
    from nemo_occ.core import valid_counts
    from nemo_occ.megatron import forward_with_mtp_logprobs

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g).to(args.device)
    pos = torch.arange(args.tokens, device=args.device)[None].expand(args.batch, -1)
    with torch.no_grad():
        old = forward_with_mtp_logprobs(model, ids, pos, detach_trunk=True)
    noise = 0.05 * torch.randn(old.main_logprobs.shape, generator=g).to(args.device)
    old_main = old.main_logprobs + noise
    adv = torch.randn(args.batch, generator=g).to(args.device)
    mask = torch.ones_like(old_main, dtype=torch.bool)
    n_tok, n_seq = valid_counts(mask)
    return SyntheticBatch(ids, pos, old_main, adv, mask, n_tok, n_seq)


def main_head_loss(cur, b: SyntheticBatch, policy_cfg) -> torch.Tensor:
    """The main head's clipped policy loss on ``b`` from a forward's log-probs ``cur``."""
    from nemo_occ.core import clipped_policy_loss

    loss, _ = clipped_policy_loss(
        cur.main_logprobs, b.old_logprobs, b.advantages, b.mask, policy_cfg, **b.counts
    )
    return loss


def update_losses(cur, b: SyntheticBatch, policy_cfg, objective) -> tuple[torch.Tensor, torch.Tensor]:
    """The main head's clipped policy loss and ``objective``'s MTP loss (regime-scaled, with its statistics)
    on ``b``: what one training update backpropagates, summed."""
    mtp_loss, _ = objective(TokenInputs(main_logprobs=cur.main_logprobs, old_logprobs=b.old_logprobs, advantages=b.advantages,
                                        mask=b.mask, mtp_logprobs=cur.mtp_logprobs, mtp_masks=cur.mtp_masks, **b.counts))  # fmt: skip
    return main_head_loss(cur, b, policy_cfg), mtp_loss


def fused_mtp_term(b: SyntheticBatch, policy_cfg, objective):
    """The MTP term's per-token gradient for the fused log-prob path (``head_logprobs.FusedMTPTerm``).

    What ``nemo_occ.nemo_rl.fused_mtp.fused_mtp_term`` builds from a NeMo-RL micro-batch, here from ``b``:
    each depth's token weights (the regime's loss, its aggregation, λ_k of this update, the global counts)
    and dL/d log p from ``token_loss_grad`` with the main head's old log-probs and the advantages.
    """
    from nemo_occ.core.losses import token_loss_grad, token_loss_weights
    from nemo_occ.megatron.head_logprobs import FusedMTPTerm

    loss = objective.regime.objective
    coefs = objective.coefficients()
    advantages = b.advantages[:, None].expand_as(b.old_logprobs)  # [B, S-1]

    def prepare(depth: int, valid: torch.Tensor):
        weights = token_loss_weights(
            loss, b.mask & valid, policy_cfg.aggregation, coefs[depth - 1], **b.counts
        )  # [B, S-1]
        return lambda rows, j, lp: token_loss_grad(
            loss, lp, b.old_logprobs[rows, j], advantages[rows, j], weights[rows, j], policy_cfg
        )

    return FusedMTPTerm(prepare=prepare)


def unscaled_mtp_losses(cur, b: SyntheticBatch, objective) -> list[torch.Tensor]:
    """Each depth's MTP loss before the regime's coefficient (the exact probes' g_MTP)."""
    return objective.unscaled_losses(TokenInputs(mtp_logprobs=cur.mtp_logprobs, old_logprobs=b.old_logprobs,
                                                 advantages=b.advantages, mask=b.mask, mtp_masks=cur.mtp_masks, **b.counts))  # fmt: skip


def state_snapshot(model: torch.nn.Module) -> dict:
    """A copy of the model's state, loaded back before every timed update so that each starts alike."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}


def interleaved_rounds(update: Callable[[Any], object], variants: Sequence, rounds: int) -> dict[Any, list]:
    """One warm-up update per variant, then ``rounds`` rounds that run every variant once in a rotating
    order, so that machine noise hits the variants alike; returns each variant's ``update`` results."""
    variants = tuple(variants)
    for v in variants:
        update(v)
    results: dict[object, list] = {v: [] for v in variants}
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            results[v].append(update(v))
    return results


def header(args: argparse.Namespace, dtype: torch.dtype, mtp_num_layers: int) -> str:
    """The line that says what was measured where."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return (
        f"B={args.batch} S={args.tokens} H={args.hidden} layers={args.layers} V={args.vocab} "
        f"MTP={mtp_num_layers} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"rounds={args.rounds} dtype={dtype} device={device}"
    )
