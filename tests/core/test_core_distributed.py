"""Multi-process invariance on gloo: 2 and 4 ranks, each holding a shard of the batch, give the λ
(``update(group)``), the summed gradient and the exact gradient statistics of the single-process
full batch.

One spawn of 4 processes (starting a process costs a torch import, the bulk of the run time): the
4-rank checks use the default group (``group=None``); the 2-rank checks run at the same time in
two explicit process groups {0, 1} and {2, 3}, each sharding the whole batch over its two ranks,
which also checks that the ``group`` argument is honoured rather than the default group.

Letters: B sequences, S token positions.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_occ.core.config import NemoOCCConfig, OCCConfig, PolicyLossConfig
from nemo_occ.core.diagnostics import exact_gradient_statistics
from nemo_occ.core.distributed import all_reduce_sum_
from nemo_occ.core.inputs import TokenInputs
from nemo_occ.core.losses import clipped_policy_loss, valid_counts
from nemo_occ.core.objective import MTPObjective
from tests._refs import TinyMTPModel, close_metrics, count_valid, loop_lambda

POLICIES = {
    "token_mean": PolicyLossConfig(aggregation="token_mean"),
    "gspo": PolicyLossConfig(aggregation="seq_mean_token_mean", importance_ratio="sequence"),
}
OBJ_CFG = NemoOCCConfig(regime="occ", occ=OCCConfig(initial_lambda=0.6, lambda_plus=0.8))
# uneven shards of the 8 sequences, per group size
SHARDS = {2: [(0, 3), (3, 8)], 4: [(0, 1), (1, 3), (3, 6), (6, 8)]}
WORLD = 4


def _data():
    gen = torch.Generator().manual_seed(70)
    ids = torch.randint(0, 13, (8, 7), generator=gen)  # [B, S]
    model = TinyMTPModel(V=13, H=6, K=1, seed=70)
    with torch.no_grad():
        main, _, _ = model(ids)
    old = main + 0.4 * torch.randn(main.shape, generator=gen, dtype=main.dtype)  # [B, S-1]
    adv = torch.randn(8, generator=gen, dtype=torch.float64)
    lengths = torch.randint(2, 7, (8,), generator=gen)
    mask = torch.arange(6)[None, :] < lengths[:, None]  # [B, S-1]
    return ids, old, adv, mask


def _step(ids, old, adv, mask, policy_cfg, group=None):
    """One update on (a shard of) the batch: main + MTP loss backward, λ from ``close_update``, and
    exact statistics over all parameters. Returns (flat gradient of this shard, [λ, ĉ, v̂², n] after
    ``close_update``, exact c, v², ||g_RL||²)."""
    model = TinyMTPModel(V=13, H=6, K=1, seed=70)
    params = list(model.parameters())
    obj = MTPObjective(OBJ_CFG, policy_cfg)
    n_tok, n_seq = valid_counts(mask)
    counts = all_reduce_sum_(torch.stack([n_tok, n_seq]), group)  # global denominators
    kw = dict(global_valid_tokens=counts[0], global_valid_seqs=counts[1])
    main, mtp, mtp_masks = model(ids)
    main_loss, _ = clipped_policy_loss(main, old, adv, mask, policy_cfg, **kw)
    mtp_term, _ = obj(
        TokenInputs(
            main_logprobs=main,
            old_logprobs=old,
            advantages=adv,
            mask=mask,
            mtp_logprobs=mtp,
            mtp_masks=mtp_masks,
            **kw,
        )
    )
    unscaled, _ = obj.regime.depth_loss(mtp[0], old, adv, mask & mtp_masks[0], policy_cfg, **kw)
    exact = exact_gradient_statistics(main_loss, [unscaled], params, group=group)
    (main_loss + mtp_term).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    occ = close_metrics(obj, group)
    # ĉ, v̂² and the token count as well as λ: λ is a ratio and would not see a uniformly wrong sum
    proxies = [occ[f"occ/{k}_1"] for k in ("lambda", "c_hat", "v2_hat", "valid_tokens")]
    return grad, proxies, exact.c[0], exact.v2[0], exact.rl_norm2


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        ids, old, adv, mask = _data()
        results = {}
        for size, group in ((4, dist.group.WORLD), (2, pairs[rank // 2])):
            lo, hi = SHARDS[size][rank % size]
            for name, cfg in POLICIES.items():
                grad, proxies, c, v2, rl2 = _step(ids[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi], cfg, group)
                dist.all_reduce(grad, group=group)  # the data-parallel gradient sum
                results[(size, name)] = dict(grad=grad, proxies=proxies, c=c, v2=v2, rl2=rl2)
        try:  # several processes and no group: the caller must say which ranks share the batch
            all_reduce_sum_(torch.ones(1))
            results["no_group_error"] = None
        except ValueError as err:
            results["no_group_error"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_ranks_holding_shards_equal_the_full_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in ranks:
        assert res["no_group_error"] and "data-parallel" in res["no_group_error"]
    ids, old, adv, mask = _data()
    for name, cfg in POLICIES.items():
        grad, proxies, c, v2, rl2 = _step(ids, old, adv, mask, cfg)  # single process, full batch
        lam = proxies[0]
        # brute-force λ over the full batch
        model = TinyMTPModel(V=13, H=6, K=1, seed=70)
        with torch.no_grad():
            main, mtp, mtp_masks = model(ids)
        ref_lam = loop_lambda(main, old, mtp[0], mask & mtp_masks[0], lambda_plus=0.8)
        torch.testing.assert_close(
            torch.tensor(lam, dtype=torch.float64), torch.tensor(ref_lam, dtype=torch.float64)
        )
        assert abs(ref_lam) > 1e-3
        for size in (2, 4):
            for r, res in enumerate(ranks):
                got = res[(size, name)]
                where = f"{size} ranks, rank {r}, {name}"
                torch.testing.assert_close(got["grad"], grad, msg=lambda m, w=where: f"{w}: {m}")
                for key, want in (("proxies", proxies), ("c", c), ("v2", v2), ("rl2", rl2)):
                    torch.testing.assert_close(
                        torch.tensor(got[key], dtype=torch.float64),
                        torch.tensor(want, dtype=torch.float64),
                        msg=lambda m, w=where, k=key: f"{w}, {k}: {m}",
                    )


def test_group_without_initialised_distributed_raises():
    assert not dist.is_initialized()
    t = torch.ones(2)
    assert all_reduce_sum_(t) is t  # single process: a no-op
    with pytest.raises(ValueError, match="not initialised"):
        all_reduce_sum_(t, group=object())


def test_full_batch_counts_are_the_loop_counts():
    """The worker's global denominators come from valid_counts; the shards cover the batch."""
    _, _, _, mask = _data()
    for shards in SHARDS.values():
        assert [i for lo, hi in shards for i in range(lo, hi)] == list(range(8))
        tot = torch.zeros(2)
        for lo, hi in shards:
            tot += torch.stack(valid_counts(mask[lo:hi]))
        assert tuple(int(x) for x in tot) == count_valid(mask)
