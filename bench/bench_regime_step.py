"""Cost of one optimizer update per MTP regime, measured side by side (the paper's Fig. 5 question).

Every variant runs the production path on identical data: ``forward_with_mtp_logprobs`` on a
megatron-core GPT with one MTP layer (CPU, through ``nemo_occ.lab.cpu_compat``), the main
head's clipped loss, ``MTPObjective`` for the regime, one backward, an optimizer step and
``close_update``. ``exact`` is the ``policy`` regime plus the exact gradient statistics
(``exact_gradient_statistics``: two extra backward passes), the full-model alternative to OCC's
log-prob proxies. A ``+fused`` variant is the same regime with the MTP heads' log-probs on the fused
path (``chunked_logprobs.fused_token_loss`` through ``head_logprobs.FusedMTPTerm``, as NeMo-RL's loss
post-processor builds it: the MTP term's gradient taken in forward, three GEMMs per chunk instead of
four); before timing, each is checked to leave the parameters where its unfused twin leaves them.

Variants are interleaved round by round (each round runs every variant once, in a rotating order) so
that machine noise hits them alike; the table reports the median wall time and process CPU time
(user + sys of all threads) per update and their ratios to ``detach`` and to ``policy`` (OCC's own
overhead is occ / policy: the proxy sums and the calibrator; the joint regimes' cost over detach is
occ / detach, and occ+fused / detach+fused on the fused path). The demo's per-step times also
depend on how many groups DAPO's dynamic sampling keeps, which differs between regimes; this
benchmark holds the data fixed. On a shared machine CPU time is the steadier of the two (it does not
count the time other processes held the cores; use ``--threads 1`` so that no thread waits for another).
With ``--device cuda`` (bf16 parameters by default, ``--dtype float32`` for fp32) every update is
bracketed by ``torch.cuda.synchronize()``; read the wall columns there (CPU time is the host's only).

How large the MTP part is decides the ratios: the header prints the trunk's, the MTP layer's and the
output heads' shares of the forward matmul FLOPs (2 per weight per token, plus 4 S H per attention layer).
With L layers the MTP layer alone is about 1 / (L + 1) of the transformer compute, as in the paper's
models (GLM-4.5-Air: 46 + 1); a small L or a vocabulary head that dominates a small hidden size
inflates every joint-regime ratio.

    python bench/bench_regime_step.py [--tokens 256] [--batch 16] [--hidden 256] [--layers 4]
                                      [--vocab 8192] [--rounds 7] [--threads 0] [--device cpu|cuda] [--dtype]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _setup import (  # bench/ is on sys.path when run
    add_model_args,
    build_model,
    fused_mtp_term,
    header,
    interleaved_rounds,
    prepare,
    state_snapshot,
    synthetic_batch,
    unscaled_mtp_losses,
    update_losses,
)

VARIANTS = ("none", "detach", "ce", "policy", "occ", "exact", "detach+fused", "policy+fused", "occ+fused")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    args = ap.parse_args()
    dtype, sync = prepare(ap, args)

    from nemo_occ.core import MTPObjective, NemoOCCConfig, PolicyLossConfig
    from nemo_occ.core.diagnostics import exact_gradient_statistics
    from nemo_occ.megatron import forward_with_mtp_logprobs

    model = build_model(args, dtype, mtp_num_layers=1)
    # Forward matmul FLOPs per token: 2 per matmul weight, 4 S H per attention layer (scores and values).
    attn = 4 * args.tokens * args.hidden
    weights = {
        part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(part) and p.dim() == 2)
        for part in ("decoder.", "mtp.")
    }
    flops = {
        "trunk": 2 * weights["decoder."] + args.layers * attn,
        "main head": 2 * args.vocab * args.hidden,
        "mtp layer": 2 * weights["mtp."] + attn,
        "mtp head": 2 * args.vocab * args.hidden,
    }
    init_state = state_snapshot(model)
    b = synthetic_batch(model, args)
    policy_cfg = PolicyLossConfig()

    def update(variant: str, grads: dict | None = None) -> tuple[float, float]:
        model.load_state_dict(init_state)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        regime, _, path = variant.partition("+")
        regime = "policy" if regime == "exact" else regime
        # λ = 1 from the start (the default 0 until statistics exist would leave occ's MTP term at 0)
        occ = {"initial_lambda": 1.0} if regime == "occ" else {}
        objective = MTPObjective(NemoOCCConfig(regime=regime, occ=occ), policy_cfg)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fused = fused_mtp_term(b, policy_cfg, objective) if path == "fused" else None
        cur = forward_with_mtp_logprobs(
            model, b.ids, b.position_ids, detach_trunk=not objective.regime.trunk_gradient, fused=fused
        )
        main_loss, mtp_loss = update_losses(cur, b, policy_cfg, objective)  # fused: mtp_loss has no graph
        if variant == "exact":
            exact_gradient_statistics(
                main_loss, unscaled_mtp_losses(cur, b, objective), list(model.parameters())
            )
        opt.zero_grad(set_to_none=True)
        (main_loss + mtp_loss + (cur.mtp_carrier if fused is not None else 0.0)).backward()
        if grads is not None:  # the check below, never in a timed update
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        objective.close_update()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    # The fused path must train what the unfused one trains: one update each, gradients compared.
    for regime in ("detach", "occ"):
        grads = {regime: {}, regime + "+fused": {}}
        for variant, into in grads.items():
            update(variant, into)
        ref, got = grads[regime], grads[regime + "+fused"]
        # per parameter, relative to its own largest gradient entry (a wrong MTP scale shows on mtp.*)
        worst = max(float((got[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in ref.items())
        if sorted(got) != sorted(ref) or worst > (1e-4 if dtype == torch.float32 else 5e-2):
            raise SystemExit(f"{regime}+fused gives other gradients than {regime} ({worst:.1e}, relative)")
        print(
            f"{regime}+fused vs {regime}: largest gradient difference {worst:.1e} (per parameter, relative)"
        )

    times = interleaved_rounds(update, VARIANTS, args.rounds)
    wall = {v: statistics.median(t[0] for t in ts) for v, ts in times.items()}
    cpu = {v: statistics.median(t[1] for t in ts) for v, ts in times.items()}
    print(header(args, dtype, 1))
    total = sum(flops.values())
    print("forward matmul FLOPs: " + ", ".join(f"{k} {v / total:.1%}" for k, v in flops.items()))
    print(f"{'':<8} {'median s/update':>17} {'x detach':>15} {'x policy':>15}")
    print(f"{'variant':<8} {'wall':>8} {'cpu':>8} {'wall':>7} {'cpu':>7} {'wall':>7} {'cpu':>7}")
    for v in VARIANTS:
        print(
            f"{v:<8} {wall[v]:>8.3f} {cpu[v]:>8.3f} {wall[v] / wall['detach']:>7.3f} {cpu[v] / cpu['detach']:>7.3f}"
            f" {wall[v] / wall['policy']:>7.3f} {cpu[v] / cpu['policy']:>7.3f}"
        )
    for path in ("", "+fused"):
        print(
            f"{'fused' if path else 'unfused'} MTP path, CPU time: occ / detach {cpu['occ' + path] / cpu['detach' + path]:.3f}, "
            f"policy / detach {cpu['policy' + path] / cpu['detach' + path]:.3f}, occ / policy "
            f"{cpu['occ' + path] / cpu['policy' + path]:.3f}"
        )
    print(
        "fused / unfused, CPU time: "
        + ", ".join(f"{r} {cpu[r + '+fused'] / cpu[r]:.3f}" for r in ("detach", "policy", "occ"))
    )


if __name__ == "__main__":
    from nemo_occ.lab.cpu_compat import cpu_compat

    with cpu_compat():  # changes nothing where CUDA is available
        main()
