"""Cost of an exact-statistics probe: a probed optimizer update against an unprobed one, in one run.

Both variants run the production path on identical data: ``forward_with_mtp_logprobs`` on a
megatron-core GPT with MTP layers (CPU, through ``nemo_occ.megatron.cpu_compat``), the main head's
clipped loss, ``MTPObjective`` (regime occ), one backward and an optimizer step. The probed update
also computes c and v² with ``exact_gradient_statistics`` over ``probe_parameters(model)``: it reuses
the training forward (``retain_graph``) and adds 1 + K backward passes (two for one MTP layer) and
the per-parameter dot products.

The variants alternate round by round so machine noise hits them alike; the report gives the median
time per update, the probed/unprobed ratio r, and the amortised ratio when one update in every N
steps of M updates is probed (``nemo_occ.fidelity.every: N``): 1 + (r - 1) / (N·M), for the given M
and for the worst case M = 1. Updates only: a real RL step also spends time on the rollout, which the
probe does not touch, so the step-level ratio is lower still.

    python bench/bench_probe.py [--tokens 256] [--batch 16] [--hidden 256] [--layers 4] [--vocab 8192]
                                [--depths 1] [--rounds 7] [--every 10] [--updates-per-step 4] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="sequence length S")
    ap.add_argument("--batch", type=int, default=16, help="sequences per update B")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--depths", type=int, default=1, help="MTP layers K")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--every", type=int, default=10, help="N of nemo_occ.fidelity.every")
    ap.add_argument("--updates-per-step", type=int, default=4, help="M: optimizer updates per RL step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from nemo_occ.core import MTPObjective, NemoOCCConfig, PolicyLossConfig, clipped_policy_loss, valid_counts
    from nemo_occ.core.diagnostics import exact_gradient_statistics
    from nemo_occ.megatron import cpu_compat, forward_with_mtp_logprobs
    from nemo_occ.megatron.parallel import init_model_parallel
    from nemo_occ.megatron.probe_layout import probe_parameters, probe_statistics_group
    from nemo_occ.megatron.tiny_gpt import TinyGPTConfig, build_tiny_gpt

    cpu_compat.enable()
    init_model_parallel(tensor_parallel=1)
    torch.manual_seed(0)
    cfg = TinyGPTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        max_sequence_length=args.tokens,
        mtp_num_layers=args.depths,
    )
    model = build_tiny_gpt(cfg)
    init_state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g)  # [B, S]
    pos = torch.arange(args.tokens)[None].expand(args.batch, -1)
    with torch.no_grad():
        old = forward_with_mtp_logprobs(model, ids, pos, detach_trunk=True)
    old_main = old.main_logprobs + 0.05 * torch.randn(old.main_logprobs.shape, generator=g)  # δ_RL != 0
    adv = torch.randn(args.batch, generator=g)
    mask = torch.ones_like(old_main, dtype=torch.bool)
    n_tok, n_seq = valid_counts(mask)
    policy_cfg = PolicyLossConfig()
    occ_cfg = NemoOCCConfig(regime="occ", num_depths=args.depths)

    def update(probed: bool) -> float:
        model.load_state_dict(init_state)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        objective = MTPObjective(occ_cfg, policy_cfg)
        t0 = time.perf_counter()
        cur = forward_with_mtp_logprobs(model, ids, pos, detach_trunk=False)
        kw = dict(global_valid_tokens=n_tok, global_valid_seqs=n_seq)
        main_loss, _ = clipped_policy_loss(cur.main_logprobs, old_main, adv, mask, policy_cfg, **kw)
        mtp_loss, _ = objective(main_logprobs=cur.main_logprobs, old_logprobs=old_main, advantages=adv, mask=mask,
                                mtp_logprobs=cur.mtp_logprobs, mtp_masks=cur.mtp_masks, **kw)  # fmt: skip
        if probed:
            unscaled = [
                objective.regime.depth_loss(lp, old_main, adv, mask & mk, policy_cfg, **kw)[0]
                for lp, mk in zip(cur.mtp_logprobs, cur.mtp_masks, strict=True)
            ]
            exact_gradient_statistics(
                main_loss, unscaled, probe_parameters(model), stats_group=probe_statistics_group()
            )
        opt.zero_grad(set_to_none=True)
        (main_loss + mtp_loss).backward()
        opt.step()
        objective.finish_update()
        return time.perf_counter() - t0

    update(False), update(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for probed in (r % 2 == 0, r % 2 == 1):
            times[probed].append(update(probed))
    plain, probed = statistics.median(times[False]), statistics.median(times[True])
    ratio = probed / plain
    n, m = args.every, args.updates_per_step
    print(
        f"B={args.batch} S={args.tokens} H={args.hidden} layers={args.layers} V={args.vocab} MTP={args.depths} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    print(f"unprobed update  {plain:.4f} s (median)")
    print(
        f"probed update    {probed:.4f} s (median)   ratio r = {ratio:.3f}  (extra backward passes: {1 + args.depths})"
    )
    print(f"amortised, one probed update every N={n} steps of M={m} updates: {1 + (ratio - 1) / (n * m):.3f}")
    print(f"amortised, worst case M=1 (one update per step):            {1 + (ratio - 1) / n:.3f}")


if __name__ == "__main__":
    main()
