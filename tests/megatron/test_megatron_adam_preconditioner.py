"""Adam's preconditioner read from megatron's optimizers (``nemo_occ.megatron.probe_layout.adam_preconditioner``).

- megatron-core's real ``FP32Optimizer`` (built on a CPU by sending its one CUDA tensor, the loss scale, to
  the CPU) wraps a torch Adam: its shards equal ``nemo_occ.core.preconditioner.adam_preconditioner`` of the
  wrapped Adam, parameter by parameter.
- The ``DistributedOptimizer`` cannot be built without CUDA tensors, so a stand-in with the attributes the
  reader uses (checked to exist on the real class) holds the state of two data-parallel ranks' element
  ranges, as megatron's does: the two ranks' shards tile every parameter once, hold the values of the full
  state at their ranges, and count 1/(copies / 2).
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.core.diagnostics import ProbeParameter  # noqa: E402
from nemo_occ.core.preconditioner import NO_STATE_YET  # noqa: E402
from nemo_occ.core.preconditioner import adam_preconditioner as torch_adam_preconditioner  # noqa: E402
from nemo_occ.megatron.probe_layout import adam_preconditioner  # noqa: E402


@contextlib.contextmanager
def _cuda_tensors_on_cpu():
    real = torch.tensor

    def tensor(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return real(*args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = real


def _stepped_adam(params, steps=2):
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-5)
    for s in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.1 * (i + 1)) + 0.01 * s * torch.arange(p.numel()).reshape(p.shape)
        opt.step()
    return opt


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]


def test_fp32_optimizer_reads_the_wrapped_adams_state():
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    params = _params()
    inner = torch.optim.Adam(params, lr=1e-2)
    with _cuda_tensors_on_cpu():
        opt = FP32Optimizer(inner, OptimizerConfig(optimizer="adam", lr=1e-2), lambda o: None)
    probe = [ProbeParameter(p, copies=2) for p in params]
    assert adam_preconditioner(opt, probe) == (None, NO_STATE_YET)
    inner.load_state_dict(_stepped_adam(params).state_dict())  # the wrapped Adam takes a stepped state
    shards, note = adam_preconditioner(opt, probe)
    expected, _ = torch_adam_preconditioner(inner, probe)
    assert note == "Adam's second moment"
    for got, want in zip(shards, expected, strict=True):
        assert (got.start, got.stop, got.copies) == (want.start, want.stop, want.copies) == (0, want.stop, 2)
        torch.testing.assert_close(got.inverse, want.inverse, rtol=0, atol=0)


class _DistributedStandIn:
    """Rank ``rank`` of 2 of megatron's DistributedOptimizer, fp32 parameters, one parameter group."""

    def __init__(self, params, full_state_opt, rank):
        from megatron.core.optimizer.distrib_optimizer import Range

        self.model_float16_groups, self.shard_fp32_from_float16_groups = [[]], [[]]
        self.model_fp32_groups, self.shard_fp32_groups = [list(params)], [[]]
        self._ranges = {}
        shards = []
        for p in params:
            n = p.numel()
            start, end = rank * n // 2, (rank + 1) * n // 2
            self._ranges[p] = {"param": Range(start, end)}
            shard = torch.nn.Parameter(p.detach().reshape(-1)[start:end].clone())
            self.shard_fp32_groups[0].append(shard)
            shards.append(shard)
        self.optimizer = torch.optim.Adam(shards, lr=1e-2, betas=(0.9, 0.95), eps=1e-5)
        full = full_state_opt.state_dict()["state"]
        for i, (p, shard) in enumerate(zip(params, shards, strict=True)):
            r = self._ranges[p]["param"]
            self.optimizer.state[shard] = {
                "step": full[i]["step"].clone(),
                "exp_avg": full[i]["exp_avg"].reshape(-1)[r.start : r.end].clone(),
                "exp_avg_sq": full[i]["exp_avg_sq"].reshape(-1)[r.start : r.end].clone(),
            }
        self.data_parallel_group = None  # the reader asks its size: see _size below

    def _get_model_param_range_map(self, param):
        return self._ranges[param]


def test_distributed_optimizer_shards_tile_each_parameter_once(monkeypatch):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for name in ("_get_model_param_range_map", "__init__"):
        assert hasattr(DistributedOptimizer, name)
    source = inspect.getsource(DistributedOptimizer)
    for attr in ("model_float16_groups", "model_fp32_groups", "shard_fp32_from_float16_groups",
                 "shard_fp32_groups", "data_parallel_group"):  # fmt: skip
        assert f"self.{attr} =" in source or f"self.{attr}," in source, attr
    params = _params()
    full = _stepped_adam(params)
    expected, _ = torch_adam_preconditioner(full, [ProbeParameter(p) for p in params])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    probe = [ProbeParameter(p, copies=4) for p in params]  # DP = 2 times TP = 2 (replicated over TP)
    per_rank = [adam_preconditioner(_DistributedStandIn(params, full, r), probe)[0] for r in (0, 1)]
    for i, want in enumerate(expected):
        a, b = per_rank[0][i], per_rank[1][i]
        assert (a.start, a.stop, b.start, b.stop) == (0, want.stop // 2, want.stop // 2, want.stop)
        assert a.copies == b.copies == 2  # each range: held by its TP replicas only
        torch.testing.assert_close(torch.cat([a.inverse, b.inverse]), want.inverse, rtol=1e-6, atol=0)
