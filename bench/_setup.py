"""What the regime and probe benches share: the model-shape and device flags, and the model itself.

Both time one optimizer update of a megatron-core GPT with MTP layers (CPU through
``nemo_occ.megatron.cpu_compat``, which each bench enters at its entry point, or CUDA), built the same
way so their figures are comparable.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch

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
    from nemo_occ.megatron.parallel import init_model_parallel
    from nemo_occ.megatron.tiny_gpt import TinyGPTConfig, build_tiny_gpt

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
