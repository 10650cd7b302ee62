"""Benchmark: MTP log-probs at the physical limit vs full logits, forward + backward, CPU or one CUDA GPU.

Every variant computes the token log-probs of ``hidden @ weight.T`` and the gradients of hidden and of
the weight for a given upstream gradient dL/dlog p, the weight's accumulated into an existing
``main_grad`` buffer (Megatron DDP's, allocated before the measurement, like the model's weights):

* ``log_softmax``: full [T, V] logits, ``log_softmax`` + gather + autograd;
* ``megatron``: full [T, V] logits -> Megatron's own ``tensor_parallel.vocab_parallel_cross_entropy``
  (works in place on the fp32 logits; TP group of one). In both, the logits come from Megatron's
  ``linear_with_grad_accumulation_and_async_allreduce`` with ``gradient_accumulation_fusion``: its
  backward adds the weight gradient into ``main_grad`` through ``fused_weight_gradient_mlp_cuda`` (on
  the CPU a stand-in with the kernel's signature and effect, ``main_grad += grad^T @ input`` in fp32);
* ``chunked``: ``token_logprobs``, one [C, V] logits chunk at a time, recomputed in backward (4 GEMMs);
* ``fused``: ``fused_token_loss``, dL/dlog p known in forward, the gradient taken chunk by chunk there
  (3 GEMMs); backward only scales.

GEMMs: the matmul FLOPs of one step (``torch.utils.flop_counter``) divided by 2·T·V·H, counted on a small
shape: 3 is the limit (logits, input gradient, weight gradient).

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

On CUDA (``--device cuda``) memory is the caching allocator's own count, in the one bench process:
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the bytes allocated before
the step (tensors, not the allocator's reserved-but-free blocks).

Time: one long-lived process, one warm-up per variant, then ``--repeats`` rounds in which the variants
run back to back in alternating order (so background noise is shared); medians of wall time and of
process CPU time (user + sys of all threads) are reported. On a shared machine CPU time is the steadier
of the two: it does not count the time other processes held the cores. On CUDA each step is bracketed by
``torch.cuda.synchronize()`` and the ratios are of wall time (host CPU time says nothing about the GPU).

Run:  python bench/bench_chunked_logprobs.py --threads 1                (defaults: T=4096, H=512, V=32768)
      python bench/bench_chunked_logprobs.py --threads 1 --hidden 1024 --vocab 9472 --chunk-sizes 64 128 256 512
          (GLM-4.5-Air's ratio at TP4: V/TP = 151552/4 = 37888 = 9.25 H, H = 4096; the bound on what any
          chunk size can reach there is worked out in docs/benchmarks.md)
      python bench/bench_chunked_logprobs.py --device cuda --tokens 8192 --hidden 1024 --vocab 65536  (bf16)
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
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nemo_occ.megatron.chunked_logprobs import fused_token_loss, token_logprobs  # noqa: E402

DEFAULT_CHUNK = inspect.signature(token_logprobs).parameters["chunk_size"].default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}  # what a GPU trains in; the CPU's fast path


def naive_logprobs(hidden, weight, targets):
    """Full [T, V] logits; nothing keeps them alive but autograd (the naive path's best case)."""
    return F.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def make_inputs(tokens, hidden_size, vocab, dtype, seed=0, device="cpu"):
    """Filled in place on ``device``: no temporary copies."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.empty(tokens, hidden_size, dtype=dtype, device=device).normal_(generator=gen)  # [T, H]
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device=device).normal_(generator=gen)  # [V, H]
    weight.div_(hidden_size**0.5)
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=device)  # [T]
    grad_out = torch.randn(tokens, generator=gen, device=device)  # [T]
    return hidden, weight, targets, grad_out


class _CPUWgradKernel:
    """CPU stand-in for ``fused_weight_gradient_mlp_cuda``: the same call, main_grad += grad^T @ input (fp32)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.reshape(-1, grad_output.shape[-1]).t().float(),
                         total_input.reshape(-1, total_input.shape[-1]).float())  # fmt: skip


def megatron_logits(hidden, weight):
    """[T, V] fp32 logits from Megatron's output-layer matmul with fused weight-gradient accumulation."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is None or not hidden.is_cuda:
        layers.fused_weight_gradient_mlp_cuda = _CPUWgradKernel()
    logits = layers.linear_with_grad_accumulation_and_async_allreduce(
        hidden,
        weight,
        None,
        gradient_accumulation_fusion=True,
        allreduce_dgrad=False,
        sequence_parallel=False,
    )
    return logits.float()


def megatron_logprobs(hidden, weight, targets):
    """Full [T, V] fp32 logits -> -vocab_parallel_cross_entropy (megatron-core, TP group of one)."""
    from megatron.core import tensor_parallel

    logits = megatron_logits(hidden, weight).unsqueeze(1)  # [T, 1, V]: megatron's [s, b, V/tp]
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets.unsqueeze(1)).squeeze(1)


def init_single_rank_megatron(device: str = "cpu") -> None:
    """World of one (gloo; nccl for CUDA tensors) + megatron's parallel state: vocab_parallel_cross_entropy
    all-reduces over TP."""
    from nemo_occ.lab.parallel import init_model_parallel

    init_model_parallel(tensor_parallel=1, backend="nccl" if device == "cuda" else "gloo")


def weight_with_main_grad(weight):
    """The weight as Megatron DDP leaves it: a leaf with an fp32 ``main_grad`` buffer (earlier micro-batches)."""
    w = weight.detach().requires_grad_(True)
    w.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    w.grad_added_to_main_grad = False
    return w


def step(variant, chunk_size, hidden, weight, targets, grad_out):
    """Forward + backward; returns the input gradient so its memory counts for every variant."""
    h = hidden.detach().requires_grad_(True)
    if variant == "fused":
        _, _, carrier = fused_token_loss(
            h, weight, targets, lambda rows, lp: grad_out[rows], chunk_size=chunk_size
        )
        carrier.backward()
    else:
        if variant == "log_softmax":
            lp = F.log_softmax(megatron_logits(h, weight), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        elif variant == "megatron":
            lp = megatron_logprobs(h, weight, targets)
        else:
            lp = token_logprobs(h, weight, targets, chunk_size=chunk_size)
        (lp * grad_out).sum().backward()
    weight.grad = None  # the dummy DDP's hook would drop
    return h.grad


class _MatmulFlops(TorchDispatchMode):
    """2·m·n·k of every matrix product (mm, addmm and its in-place form, bmm), as the ops see them."""

    OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.OPS:
            a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))


def count_gemms(args, variant, chunk_size) -> float:
    """Matmul FLOPs of one step / (2 T V H), on a small shape (T=256, V=1024, H=64)."""
    t, v, h = 256, 1024, 64
    hidden, weight, targets, grad_out = make_inputs(t, h, v, DTYPES[args.dtype], seed=2, device=args.device)
    weight = weight_with_main_grad(weight)
    with _MatmulFlops() as counter:
        step(variant, min(chunk_size, 64) if chunk_size else 0, hidden, weight, targets, grad_out)
    return counter.flops / (2 * t * v * h)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def make_small_twin(inputs):
    """A few tokens against the real weight: builds what is made once per weight shape (the dummy gradient)."""
    hidden, weight, targets, grad_out = inputs
    return hidden[:8], weight, targets[:8], grad_out[:8]


def measure_memory_child(args) -> None:
    """Runs in a fresh process; prints one JSON line with the peak extra bytes."""
    dtype = DTYPES[args.dtype]
    if args.variant == "megatron":
        init_single_rank_megatron()
    small = list(make_inputs(8, args.hidden, 64, dtype))
    small[1] = weight_with_main_grad(small[1])
    step(args.variant, args.chunk_size, *small)  # warm up kernels/workspaces on a tiny shape
    inputs = list(make_inputs(args.tokens, args.hidden, args.vocab, dtype))
    inputs[1] = weight_with_main_grad(inputs[1])
    step(args.variant, args.chunk_size, *make_small_twin(inputs))  # the dummy gradient, once per shape
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    grads = step(args.variant, args.chunk_size, *inputs)
    after = _status_bytes("VmHWM")
    del grads
    print(json.dumps({"peak_extra_bytes": after - before}))


def measure_memory_cuda(args, variant, chunk_size) -> int:
    """Peak bytes the CUDA caching allocator handed out during one step, beyond what was allocated before."""
    dtype = DTYPES[args.dtype]
    small = list(make_inputs(8, args.hidden, 64, dtype, device="cuda"))
    small[1] = weight_with_main_grad(small[1])
    step(variant, chunk_size, *small)  # warm-up (cuBLAS)
    inputs = list(make_inputs(args.tokens, args.hidden, args.vocab, dtype, device="cuda"))
    inputs[1] = weight_with_main_grad(inputs[1])
    step(variant, chunk_size, *make_small_twin(inputs))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step(variant, chunk_size, *inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del grads, inputs
    return peak


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
    hidden, weight, targets, _ = make_inputs(
        64, args.hidden, 1024, DTYPES[args.dtype], seed=1, device=args.device
    )
    reference = naive_logprobs(hidden, weight, targets)
    tolerance = {}
    if args.device == "cuda" and hidden.dtype != torch.float32:
        # cuBLAS may round a chunk's low-precision logits differently from the full matmul's (another
        # kernel per shape), so every variant is held to the fp32 truth of the same inputs instead: each
        # logit is off by <= eps/2 |z|, so log p = z_y - logsumexp(z) by <= eps max|z| (4x margin).
        reference = naive_logprobs(hidden.float(), weight.float(), targets)
        bound = 4 * torch.finfo(hidden.dtype).eps * (hidden.float() @ weight.float().t()).abs().max().item()
        tolerance = dict(rtol=0.0, atol=bound)
    for variant, chunk_size in variants:
        w = weight_with_main_grad(weight)
        if variant == "log_softmax":
            if not tolerance:
                continue
            got = naive_logprobs(hidden, weight, targets)
        elif variant == "megatron":
            got = megatron_logprobs(hidden, w, targets)
        elif variant == "fused":
            got, _, _ = fused_token_loss(
                hidden, weight, targets, lambda rows, lp: torch.zeros_like(lp), chunk_size=chunk_size
            )
        else:
            got = token_logprobs(hidden, weight, targets, chunk_size=chunk_size)
        torch.testing.assert_close(got, reference, **tolerance, msg=lambda m, v=variant: f"{v}: {m}")


def measure_time(args, variants) -> dict[tuple[str, int], tuple[float, float]]:
    """Median (wall seconds, CPU seconds) of one forward + backward per variant."""
    inputs = list(make_inputs(args.tokens, args.hidden, args.vocab, DTYPES[args.dtype], device=args.device))
    inputs[1] = weight_with_main_grad(inputs[1])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    wall: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    cpu: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for v in variants:
        step(*v, *inputs)  # warm-up
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            step(*v, *inputs)
            sync()
            wall[v].append(time.perf_counter() - start)
            cpu[v].append(time.process_time() - start_cpu)
    return {v: (statistics.median(wall[v]), statistics.median(cpu[v])) for v in variants}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per call")
    p.add_argument("--hidden", type=int, default=512, help="H, hidden size")
    p.add_argument("--vocab", type=int, default=32768, help="V, vocabulary size (one rank)")
    p.add_argument(
        "--device", choices=sorted(DEFAULT_DTYPE), default="cpu", help="where to run (default cpu)"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda"
    )
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
    if args.dtype is None:
        args.dtype = DEFAULT_DTYPE[args.device]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; run on a GPU machine or use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args._child_memory:
        measure_memory_child(args)
        return 0

    variants = [("log_softmax", 0), ("megatron", 0)]
    variants += [("chunked", c) for c in args.chunk_sizes] + [("fused", c) for c in args.chunk_sizes]
    mib = 2**20
    floor = args.tokens * args.hidden * torch.finfo(DTYPES[args.dtype]).bits // 8
    cuda = args.device == "cuda"
    where = f" device={torch.cuda.get_device_name()}" if cuda else ""
    print(
        f"T={args.tokens} H={args.hidden} V={args.vocab} (V/H={args.vocab / args.hidden:.2f}) dtype={args.dtype} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} repeats={args.repeats}{where}"
    )
    print(
        f"[T, V] fp32 logits alone: {args.tokens * args.vocab * 4 / mib:.0f} MiB; "
        f"input gradient (floor): {floor / mib:.0f} MiB; weight gradient: into the existing main_grad"
    )
    if cuda:
        init_single_rank_megatron("cuda")
        memory = {v: measure_memory_cuda(args, *v) for v in variants}
    else:
        memory = {v: measure_memory(args, *v) for v in variants}
        init_single_rank_megatron()
    gemms = {v: count_gemms(args, *v) for v in variants}
    check_same_logprobs(args, variants)
    seconds = measure_time(args, variants)
    naive, megatron = ("log_softmax", 0), ("megatron", 0)
    clock = 0 if cuda else 1  # ratios of wall time on CUDA, of process CPU time on the CPU
    label = "wall" if cuda else "cpu"
    print(
        f"{'variant':<16}{'GEMMs':>6}{'peak extra MiB':>15}{'wall s':>9}{'cpu s':>9}"
        f"{'mem lsm/x':>11}{'mem mcore/x':>13}{label + ' x/lsm':>11}{label + ' x/mcore':>13}"
    )
    for v in variants:
        name = v[0] if v[0] in ("log_softmax", "megatron") else f"{v[0]} C={v[1]}"
        (w, c), t = seconds[v], seconds[v][clock]
        t0, t1 = seconds[naive][clock], seconds[megatron][clock]
        digits = 4 if cuda else 2  # a GPU step takes milliseconds
        print(
            f"{name:<16}{gemms[v]:>6.2f}{memory[v] / mib:>15.1f}{w:>9.{digits}f}{c:>9.{digits}f}"
            f"{memory[naive] / memory[v]:>11.2f}{memory[megatron] / memory[v]:>13.2f}"
            f"{t / t0:>11.2f}{t / t1:>13.2f}"
        )
    return 0


if __name__ == "__main__":
    from nemo_occ.lab.cpu_compat import cpu_compat

    # Megatron's output-layer backward allocates its dummy gradient on torch.cuda.current_device()
    with cpu_compat():  # no patch where CUDA is available
        raise SystemExit(main())
