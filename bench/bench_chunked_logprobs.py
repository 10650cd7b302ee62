"""Benchmark: chunked token log-probs vs full logits, forward + backward, on the CPU.

Compares ``nemo_occ.megatron.chunked_logprobs.token_logprobs`` (one [C, V] logits chunk at a time,
recomputed in backward) with two full-logits baselines, all computing log-probs and the gradients of
hidden and weight for a random upstream gradient:

* ``naive``: ``log_softmax(hidden @ weight.T).gather(targets)`` + autograd;
* ``megatron``: Megatron's own ``tensor_parallel.vocab_parallel_cross_entropy`` on the fp32 logits (what
  its output layer feeds; it works in place on the logits, so it keeps fewer [T, V] copies than
  ``log_softmax``), with a TP group of one (gloo, one process). The fused variant
  (``fusions.fused_cross_entropy``) is the same arithmetic JIT-compiled for CUDA and is not run here.

Memory, measured honestly for CPU torch: each (variant, chunk size) runs in a FRESH subprocess that
builds the inputs and runs the variant once on a tiny shape (so one-time library workspaces are paid
before the measurement), resets the kernel's resident-set high-water mark to the current RSS (``echo 5
> /proc/self/clear_refs``, so nothing allocated while building the inputs can hide the peak), runs
forward + backward once at the real shape and reads the high-water mark (``VmHWM`` in
/proc/self/status). "Peak extra" = VmHWM - RSS before the step: every byte the operation had resident
at its worst moment, including its outputs (the gradients of hidden and weight, ``(T + V) * H`` values,
printed as the floor no method can go below). tracemalloc does not see torch's CPU allocations and
``torch.profiler`` memory events need post-processing to give a peak, so the kernel's own accounting is
used. glibc serves large blocks with mmap and unmaps them on free, so the high-water mark is the real
peak and not an allocator artefact.

Time: one long-lived process, one warm-up per variant, then ``--repeats`` rounds in which the variants
run back to back in alternating order (so background noise is shared); medians of wall time and of
process CPU time (user + sys of all threads) are reported. On a shared machine CPU time is the steadier
of the two: it does not count the time other processes held the cores.

Run:  /work/venv/bin/python bench/bench_chunked_logprobs.py            (defaults: T=4096, H=512, V=32768)
      /work/venv/bin/python bench/bench_chunked_logprobs.py --chunk-sizes 256 512 1024 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nemo_occ.megatron.chunked_logprobs import token_logprobs  # noqa: E402

DEFAULT_CHUNK = inspect.signature(token_logprobs).parameters["chunk_size"].default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def naive_logprobs(hidden, weight, targets):
    """Full [T, V] logits; nothing keeps them alive but autograd (the naive path's best case)."""
    return F.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def make_inputs(tokens, hidden_size, vocab, dtype, seed=0):
    """Filled in place: no temporary copies."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.empty(tokens, hidden_size, dtype=dtype).normal_(generator=gen)  # [T, H]
    weight = torch.empty(vocab, hidden_size, dtype=dtype).normal_(generator=gen)  # [V, H]
    weight.div_(hidden_size**0.5)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)  # [T]
    grad_out = torch.randn(tokens, generator=gen)  # [T]
    return hidden, weight, targets, grad_out


def megatron_logprobs(hidden, weight, targets):
    """Full [T, V] fp32 logits -> -vocab_parallel_cross_entropy (megatron-core, TP group of one)."""
    from megatron.core import tensor_parallel

    logits = (hidden @ weight.t()).float().unsqueeze(1)  # [T, 1, V]: megatron's [s, b, V/tp]
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets.unsqueeze(1)).squeeze(1)


def init_single_rank_megatron() -> None:
    """gloo world of one + megatron's parallel state: vocab_parallel_cross_entropy all-reduces over TP."""
    from nemo_occ.megatron.parallel import init_model_parallel

    init_model_parallel(tensor_parallel=1)


def step(variant, chunk_size, hidden, weight, targets, grad_out):
    """Forward + backward; returns the gradients so their memory counts for every variant."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    if variant == "naive":
        lp = naive_logprobs(h, w, targets)
    elif variant == "megatron":
        lp = megatron_logprobs(h, w, targets)
    else:
        lp = token_logprobs(h, w, targets, chunk_size=chunk_size)
    (lp * grad_out).sum().backward()
    return h.grad, w.grad


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def measure_memory_child(args) -> None:
    """Runs in a fresh process; prints one JSON line with the peak extra bytes."""
    dtype = DTYPES[args.dtype]
    if args.variant == "megatron":
        init_single_rank_megatron()
    small = make_inputs(8, args.hidden, 64, dtype)
    step(args.variant, args.chunk_size, *small)  # warm up kernels/workspaces on a tiny shape
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, dtype)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    grads = step(args.variant, args.chunk_size, *inputs)
    after = _status_bytes("VmHWM")
    del grads
    print(json.dumps({"peak_extra_bytes": after - before}))


def measure_memory(args, variant, chunk_size) -> int:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child-memory",
        "--variant",
        variant,
        "--chunk-size",
        str(chunk_size),
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(args.vocab),
        "--dtype",
        args.dtype,
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def check_same_logprobs(args, variants) -> None:
    """Every variant computes the same log-probs (small shape): the table compares like with like."""
    hidden, weight, targets, _ = make_inputs(64, args.hidden, 1024, DTYPES[args.dtype], seed=1)
    reference = naive_logprobs(hidden, weight, targets)
    for variant, chunk_size in variants:
        if variant == "naive":
            continue
        if variant == "megatron":
            got = megatron_logprobs(hidden, weight, targets)
        else:
            got = token_logprobs(hidden, weight, targets, chunk_size=chunk_size)
        torch.testing.assert_close(got, reference, msg=lambda m, v=variant: f"{v}: {m}")


def measure_time(args, variants) -> dict[tuple[str, int], tuple[float, float]]:
    """Median (wall seconds, CPU seconds) of one forward + backward per variant."""
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, DTYPES[args.dtype])
    wall: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    cpu: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for v in variants:
        step(*v, *inputs)  # warm-up
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            step(*v, *inputs)
            wall[v].append(time.perf_counter() - start)
            cpu[v].append(time.process_time() - start_cpu)
    return {v: (statistics.median(wall[v]), statistics.median(cpu[v])) for v in variants}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per call")
    p.add_argument("--hidden", type=int, default=512, help="H, hidden size")
    p.add_argument("--vocab", type=int, default=32768, help="V, vocabulary size (one rank)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=[DEFAULT_CHUNK],
        help=f"chunk sizes of the chunked variant (default: token_logprobs' default, {DEFAULT_CHUNK})",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). Use 1 on a shared machine: with more threads than "
        "free cores every small parallel op waits for a descheduled thread, which punishes the chunked "
        "variant's many smaller ops and measures the scheduler, not the method.",
    )
    p.add_argument("--_child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # no TE / APEX here
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args._child_memory:
        measure_memory_child(args)
        return 0

    variants = [("naive", 0), ("megatron", 0)] + [("chunked", c) for c in args.chunk_sizes]
    mib = 2**20
    floor = (args.tokens + args.vocab) * args.hidden * torch.finfo(DTYPES[args.dtype]).bits // 8
    print(
        f"T={args.tokens} H={args.hidden} V={args.vocab} dtype={args.dtype} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(
        f"[T, V] fp32 logits alone: {args.tokens * args.vocab * 4 / mib:.0f} MiB; "
        f"gradient outputs (floor): {floor / mib:.0f} MiB"
    )
    memory = {v: measure_memory(args, *v) for v in variants}
    init_single_rank_megatron()
    check_same_logprobs(args, variants)
    seconds = measure_time(args, variants)
    naive, megatron = ("naive", 0), ("megatron", 0)
    print(
        f"{'variant':<16}{'peak extra MiB':>15}{'wall s':>9}{'cpu s':>9}"
        f"{'mem naive/x':>13}{'mem mcore/x':>13}{'cpu x/naive':>13}{'cpu x/mcore':>13}"
    )
    for v in variants:
        name = v[0] if v[0] != "chunked" else f"chunked C={v[1]}"
        (w, c), c0, c1 = seconds[v], seconds[naive][1], seconds[megatron][1]
        print(
            f"{name:<16}{memory[v] / mib:>15.1f}{w:>9.2f}{c:>9.2f}"
            f"{memory[naive] / memory[v]:>13.2f}{memory[megatron] / memory[v]:>13.2f}"
            f"{c / c0:>13.2f}{c / c1:>13.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
