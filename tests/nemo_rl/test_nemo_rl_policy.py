"""``old_logprobs: mtp`` on the NeMo-RL path, driver side: the MTP heads' old log-probs returned by the workers'
``get_logprobs`` travel through NeMo-RL's own ``Policy.get_logprobs`` (DP sharding with dynamic batching,
``BatchedDataDict.from_batches``, the reorder) and ``Policy.train`` (``shard_by_batch_size``) to the
workers' training batches, row for row with ``prev_logprobs``; only the worker group is a stand-in (it
needs Ray and GPUs). Runs where NeMo-RL's driver side imports (its container, or a checkout on
PYTHONPATH with NeMo-RL's driver dependencies).

Letters: B sequences, S tokens.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.nemo_rl
pytest.importorskip("nemo_rl.models.policy.lm_policy", reason="needs NeMo-RL's driver side (nemo_rl)")

import numpy as np  # noqa: E402
from nemo_rl.distributed.batched_data_dict import BatchedDataDict  # noqa: E402
from nemo_rl.distributed.named_sharding import NamedSharding  # noqa: E402

from nemo_occ.nemo_rl.mtp_batch import mtp_old_logprobs_key  # noqa: E402
from nemo_occ.nemo_rl.policy import OCCPolicy  # noqa: E402

B, S, DP = 8, 12, 2
KEY = mtp_old_logprobs_key(1)


def _main(ids):  # what a worker "computes": a function of the row's tokens, so any row mix-up shows
    return -ids.float() / 100


def _mtp(ids):
    return -ids.float() / 50 - 1


class WorkerGroup:
    """Stand-in for NeMo-RL's RayWorkerGroup: runs each DP shard's call at once, in order."""

    def __init__(self):
        self.train_shards = []

    def run_all_workers_sharded_data(self, method, *, data, **kwargs):
        if method == "get_logprobs":
            out = []
            for shard in data:
                ids = shard["input_ids"]
                out.append(BatchedDataDict({"logprobs": _main(ids), KEY: _mtp(ids)}))
            return out
        assert method == "train"
        self.train_shards = list(data)
        return [
            {"global_loss": torch.tensor(0.0), "grad_norm": torch.tensor(0.0), "all_mb_metrics": {}}
            for _ in data
        ]

    def get_all_worker_results(self, futures):
        return futures

    def shutdown(self, cleanup_method=None):
        return True


def _policy():
    policy = object.__new__(OCCPolicy)  # Policy.__init__ starts Ray workers; set what its methods read
    policy.cfg = {
        "train_global_batch_size": B,
        "train_micro_batch_size": 2,
        "dynamic_batching": {"enabled": True, "logprob_mb_tokens": 24, "train_mb_tokens": 24},
        "sequence_packing": {"enabled": False},
    }
    policy.sharding_annotations = NamedSharding(  # as Policy.__init__ builds it, here PP = CP = TP = 1
        layout=np.arange(DP).reshape(1, DP, 1, 1),
        names=["pipeline_parallel", "data_parallel", "context_parallel", "tensor_parallel"],
    )
    policy.use_dynamic_batches, policy.use_sequence_packing = True, False
    policy.dynamic_batching_args = {
        "input_key": "input_ids",
        "input_lengths_key": "input_lengths",
        "sequence_length_round": 4,
        "max_tokens_per_microbatch": 0,
    }
    policy.debug_payload_metrics = False
    policy.flops_tracker = None
    policy.worker_group = WorkerGroup()
    return policy


def _rollouts():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 3, 7, 9, 4, 12, 6, 10])  # ragged: dynamic batching sorts by length
    ids = torch.randint(1, 90, (B, S), generator=g) * (torch.arange(S)[None] < lengths[:, None])
    return BatchedDataDict({"input_ids": ids, "input_lengths": lengths})


def test_mtp_old_logprobs_reach_the_training_shards_row_for_row():
    policy, train_data = _policy(), _rollouts()
    logprob_data = BatchedDataDict(
        {"input_ids": train_data["input_ids"], "input_lengths": train_data["input_lengths"]}
    )
    out = policy.get_logprobs(logprob_data)  # NeMo-RL's: shard, workers, from_batches, reorder
    torch.testing.assert_close(out["logprobs"], _main(train_data["input_ids"]))
    train_data["prev_logprobs"] = out["logprobs"]  # all that grpo_train keeps
    policy.train(train_data, loss_fn=None)
    shards = policy.worker_group.train_shards
    assert len(shards) == DP and sum(s["input_ids"].shape[0] for s in shards) == B
    for shard in shards:
        ids = shard["input_ids"]
        torch.testing.assert_close(shard["prev_logprobs"], _main(ids)[:, : shard["prev_logprobs"].shape[1]])
        torch.testing.assert_close(shard[KEY], _mtp(ids)[:, : shard[KEY].shape[1]])
    assert KEY not in train_data  # the caller's batch is left as it was
    policy.train(train_data, loss_fn=None)  # the next train call has nothing to add
    assert all(KEY not in s for s in policy.worker_group.train_shards)


def test_a_different_batch_is_refused():
    policy, train_data = _policy(), _rollouts()
    policy.get_logprobs(
        BatchedDataDict({"input_ids": train_data["input_ids"], "input_lengths": train_data["input_lengths"]})
    )
    other = BatchedDataDict({k: v.flip(0) for k, v in train_data.items()})
    with pytest.raises(ValueError, match="not the one whose old log-probs"):
        policy.train(other, loss_fn=None)
