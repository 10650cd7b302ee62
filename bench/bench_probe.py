"""Cost of an exact-statistics probe: a probed optimizer update against an unprobed one, in one run.

Every variant runs the production path on identical data: ``forward_with_mtp_logprobs`` on a
megatron-core GPT with MTP layers (CPU, through ``nemo_occ.lab.cpu_compat``), the main head's
clipped loss, ``MTPObjective`` (regime occ), one backward and an Adam step (from a state one step
old, so that the probe reads a second moment). A probed update also computes the same-sample,
cross-fitted and Adam-preconditioned c and v² over ``probe_parameters(model)``
(``nemo_occ.core.diagnostics.cross_fitted_statistics``; halves by sequence), in one of two ways:

- ``retain`` (the demo): ``exact_cross_fitted_statistics`` reuses the training forward
  (``retain_graph``) and adds 2(1 + K) backward passes (four for one MTP layer), one per loss
  component and half, and the per-parameter dot products;
- ``rerun`` (the NeMo-RL worker, whose pipeline schedule cannot back-propagate a retained graph twice):
  2(1 + K) extra forward-backward passes, gradients read off the parameters.

``occ.estimator: probed`` costs what the probe costs (setting λ from its statistics is a division per
depth), so the amortised ratio is also that estimator's cost against an unprobed ``signed`` run.

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
import copy
import dataclasses
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
    from nemo_occ.core.diagnostics import cross_fitted_statistics, exact_cross_fitted_statistics, half_masks
    from nemo_occ.core.preconditioner import adam_preconditioner
    from nemo_occ.megatron import forward_with_mtp_logprobs
    from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group

    model = build_model(args, dtype, mtp_num_layers=args.depths)
    b = synthetic_batch(model, args)
    policy_cfg = PolicyLossConfig()
    nemo_occ_cfg = NemoOCCConfig(regime="occ", num_depths=args.depths)
    mask_a, mask_b, shares = half_masks(b.mask)
    halves = [dataclasses.replace(b, mask=m) for m in (mask_a, mask_b)]  # the batch's denominators

    def losses(cur, half, objective) -> list[torch.Tensor]:
        return [main_head_loss(cur, half, policy_cfg)] + unscaled_mtp_losses(cur, half, objective)

    # an Adam state one step old: every timed update starts from it, and the probe reads its second moment
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    cur = forward_with_mtp_logprobs(model, b.ids, b.position_ids, detach_trunk=False)
    sum(update_losses(cur, b, policy_cfg, MTPObjective(nemo_occ_cfg, policy_cfg))).backward()
    opt.step()
    init_state, opt_state = state_snapshot(model), copy.deepcopy(opt.state_dict())

    def rerun_probe(opt) -> None:
        params = probe_parameters(model)
        objective = MTPObjective(nemo_occ_cfg, policy_cfg)
        grads: list[list] = [[], []]
        for h, half in enumerate(halves):
            for component in range(1 + args.depths):
                model.zero_grad(set_to_none=True)
                cur = forward_with_mtp_logprobs(model, b.ids, b.position_ids, detach_trunk=False)
                losses(cur, half, objective)[component].backward()  # no statistics, no λ (as NeMo-RL's)
                grads[h].append([None if pp.param.grad is None else pp.param.grad.clone() for pp in params])
        model.zero_grad(set_to_none=True)
        shards, note = adam_preconditioner(opt, params)
        cross_fitted_statistics([g[0] for g in grads], [g[1:] for g in grads], params, shares=shares,
                                preconditioner=shards, precond_note=note, stats_group=probe_statistics_group())  # fmt: skip

    def update(probed: str | None) -> float:
        model.load_state_dict(init_state)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        opt.load_state_dict(opt_state)
        objective = MTPObjective(nemo_occ_cfg, policy_cfg)
        sync()
        t0 = time.perf_counter()
        cur = forward_with_mtp_logprobs(model, b.ids, b.position_ids, detach_trunk=False)
        main_loss, mtp_loss = update_losses(cur, b, policy_cfg, objective)
        if probed == "retain":
            params = probe_parameters(model)
            shards, note = adam_preconditioner(opt, params)
            per_half = [losses(cur, half, objective) for half in halves]
            exact_cross_fitted_statistics([h[0] for h in per_half], [h[1:] for h in per_half], params,
                                          shares=shares, preconditioner=shards, precond_note=note,
                                          stats_group=probe_statistics_group())  # fmt: skip
        elif probed == "rerun":
            rerun_probe(opt)
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
            f"{1 + (ratio - 1) / n:>10.3f}   ({2 * (1 + args.depths)} extra {extra} passes)"
        )


if __name__ == "__main__":
    from nemo_occ.lab.cpu_compat import cpu_compat

    with cpu_compat():  # changes nothing where CUDA is available
        main()
