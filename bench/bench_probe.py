"""Cost of an exact-statistics probe: a probed optimizer update against an unprobed one, in one run.

Every variant runs the production path on identical data: ``forward_with_mtp_logprobs`` on a
megatron-core GPT with MTP layers (CPU, through ``nemo_occ.lab.cpu_compat``), the main head's
clipped loss, ``MTPObjective`` (regime occ), one backward and an optimizer step. A probed update also
computes c and v² over ``probe_parameters(model)``, in one of two ways:

- ``retain`` (the demo): ``exact_gradient_statistics`` reuses the training forward (``retain_graph``)
  and adds 1 + K backward passes (two for one MTP layer) and the per-parameter dot products;
- ``rerun`` (the NeMo-RL worker, whose pipeline schedule cannot back-propagate a retained graph twice):
  1 + K extra forward-backward passes, one per loss component, gradients read off the parameters.

The variants alternate round by round so machine noise hits them alike; the report gives the median
time per update, the probed/unprobed ratio r, and the amortised ratio when one update in every N
steps of M updates is probed (``nemo_occ.fidelity.every: N``): 1 + (r - 1) / (N·M), for the given M
and for the worst case M = 1. Updates only: a real RL step also spends time on the rollout, which the
probe does not touch, so the step-level ratio is lower still.
With ``--device cuda`` (bf16 parameters by default, ``--dtype float32`` for fp32) every update is
bracketed by ``torch.cuda.synchronize()``.

    python bench/bench_probe.py [--tokens 256] [--batch 16] [--hidden 256] [--layers 4] [--vocab 8192]
                                [--depths 1] [--rounds 7] [--every 10] [--updates-per-step 4] [--threads 0]
                                [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _setup import (  # bench/ is on sys.path when run
    add_model_args,
    build_model,
    header,
    interleaved_rounds,
    main_head_loss,
    prepare,
    state_snapshot,
    synthetic_batch,
    unscaled_mtp_losses,
    update_losses,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--depths", type=int, default=1, help="MTP layers K")
    ap.add_argument("--every", type=int, default=10, help="N of nemo_occ.fidelity.every")
    ap.add_argument("--updates-per-step", type=int, default=4, help="M: optimizer updates per RL step")
    args = ap.parse_args()
    dtype, sync = prepare(ap, args)

    from nemo_occ.core import MTPObjective, NemoOCCConfig, PolicyLossConfig
    from nemo_occ.core.diagnostics import exact_gradient_statistics, gradient_statistics
    from nemo_occ.megatron import forward_with_mtp_logprobs
    from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group

    model = build_model(args, dtype, mtp_num_layers=args.depths)
    init_state = state_snapshot(model)
    b = synthetic_batch(model, args)
    policy_cfg = PolicyLossConfig()
    nemo_occ_cfg = NemoOCCConfig(regime="occ", num_depths=args.depths)

    def rerun_probe() -> None:
        params = probe_parameters(model)
        objective = MTPObjective(nemo_occ_cfg, policy_cfg)
        grads = []
        for component in range(1 + args.depths):
            model.zero_grad(set_to_none=True)
            cur = forward_with_mtp_logprobs(model, b.ids, b.position_ids, detach_trunk=False)
            # the probe's own losses: no statistics, no λ (as the NeMo-RL probe)
            ([main_head_loss(cur, b, policy_cfg)] + unscaled_mtp_losses(cur, b, objective))[
                component
            ].backward()
            grads.append([None if pp.param.grad is None else pp.param.grad.clone() for pp in params])
        model.zero_grad(set_to_none=True)
        gradient_statistics(grads[0], grads[1:], params, stats_group=probe_statistics_group())

    def update(probed: str | None) -> float:
        model.load_state_dict(init_state)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        objective = MTPObjective(nemo_occ_cfg, policy_cfg)
        sync()
        t0 = time.perf_counter()
        cur = forward_with_mtp_logprobs(model, b.ids, b.position_ids, detach_trunk=False)
        main_loss, mtp_loss = update_losses(cur, b, policy_cfg, objective)
        if probed == "retain":
            exact_gradient_statistics(main_loss, unscaled_mtp_losses(cur, b, objective), probe_parameters(model),
                                      stats_group=probe_statistics_group())  # fmt: skip
        elif probed == "rerun":
            rerun_probe()
        opt.zero_grad(set_to_none=True)
        (main_loss + mtp_loss).backward()
        opt.step()
        objective.close_update()
        sync()
        return time.perf_counter() - t0

    times = interleaved_rounds(update, (None, "retain", "rerun"), args.rounds)
    plain = statistics.median(times[None])
    n, m = args.every, args.updates_per_step
    print(header(args, dtype, args.depths))
    print(f"{'update':<16} {'median s':>9} {'ratio r':>8} {f'amortised N={n} M={m}':>20} {f'N={n} M=1':>10}")
    print(f"{'unprobed':<16} {plain:>9.4f} {1.0:>8.3f}")
    for v, extra in (("retain", "backward"), ("rerun", "forward-backward")):
        med = statistics.median(times[v])
        ratio = med / plain
        print(
            f"{'probed, ' + v:<16} {med:>9.4f} {ratio:>8.3f} {1 + (ratio - 1) / (n * m):>20.3f} "
            f"{1 + (ratio - 1) / n:>10.3f}   ({1 + args.depths} extra {extra} passes)"
        )


if __name__ == "__main__":
    from nemo_occ.lab.cpu_compat import cpu_compat

    with cpu_compat():  # changes nothing where CUDA is available
        main()
