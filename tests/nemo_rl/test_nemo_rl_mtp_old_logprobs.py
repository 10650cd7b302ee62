"""``old_logprobs: mtp`` on the NeMo-RL path, worker side: the MTP heads' old log-probs come out of the same
forward as ``prev_logprobs`` (a real megatron-core GPT with an MTP layer, under a stand-in for NeMo-RL's
``get_logprobs`` loop whose post-processor has NeMo-RL's signature), in ``prev_logprobs``' layout, and the
loss uses them as the MTP heads' ratio denominator. The names and signatures the worker swaps are checked
against NeMo-RL's source when it is available (``NEMO_RL_ROOT`` or an importable checkout).

Letters: B sequences, S tokens.
"""

from __future__ import annotations

import ast
import contextlib
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.core.config import NemoOCCConfig  # noqa: E402
from nemo_occ.megatron.model_access import mtp_disabled  # noqa: E402
from nemo_occ.nemo_rl.loss import OCCLossFn  # noqa: E402
from nemo_occ.nemo_rl.loss_config import policy_loss_config  # noqa: E402
from nemo_occ.nemo_rl.mtp_batch import mtp_logprobs_key, mtp_old_logprobs_key, mtp_valid_key  # noqa: E402
from nemo_occ.nemo_rl.worker import OCCWorkerExtension  # noqa: E402

V, B, S = 32, 4, 10


class LogprobsPostProcessor:
    """Stand-in for NeMo-RL's (same ``__call__`` signature): main log-probs in ``prev_logprobs``' layout."""

    def __init__(self, cfg, sampling_params=None, use_fused_linear_logprobs=False):
        self.cfg = cfg

    def __call__(self, data_dict, input_ids, cu_seqlens_padded):
        def processor(output_tensor):
            lp = torch.log_softmax(output_tensor.float(), dim=-1)[:, :-1]  # [B, S-1, V]
            lp = lp.gather(-1, data_dict["input_ids"][:, 1:, None]).squeeze(-1)
            return torch.tensor(0.0), {"logprobs": torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)}

        return processor


class MegatronStandIn:
    """NeMo-RL's ``get_logprobs`` reduced to its loop: micro-batches, forward, post-processor, pad and stack."""

    def __init__(self, config, tokenizer=None, weights_path=None, optimizer_path=None, **kwargs):
        from nemo_occ.lab.tiny_gpt import build_tiny_gpt

        self.cfg = config
        torch.manual_seed(0)
        self.model = build_tiny_gpt(vocab_size=V, num_layers=2, mtp_num_layers=1, max_sequence_length=S)

    def get_logprobs(self, *, data, micro_batch_size=None, require_router_replay=True):
        mbs = micro_batch_size or 2
        post = sys.modules[__name__].LogprobsPostProcessor(cfg=self.cfg)  # looked up per call, as NeMo-RL's
        out = []
        with torch.no_grad():
            for start in range(0, data["input_ids"].shape[0], mbs):
                mb = {k: v[start : start + mbs] for k, v in data.items()}
                ids = mb["input_ids"]
                fn = post(data_dict=mb, input_ids=ids, cu_seqlens_padded=None)
                # NeMo-RL's core (0.20) runs an MTP model without labels and the main logits do not depend on
                # the MTP block; 0.16.1 needs labels for it, so outside a capture the stand-in skips the block
                skip = (
                    mtp_disabled(self.model) if self.model.config.mtp_num_layers else contextlib.nullcontext()
                )
                with skip:
                    logits = self.model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
                out.append(fn(logits)[1]["logprobs"])
        return {"logprobs": torch.cat(out)}

    def get_reference_policy_logprobs(self, *, data, micro_batch_size=None):
        return {
            "reference_logprobs": self.get_logprobs(data=data, micro_batch_size=micro_batch_size)["logprobs"]
        }


class Worker(OCCWorkerExtension, MegatronStandIn):
    def holds_output_layer(self):
        return True

    def broadcast_tensors_from_last_stage(self, tensors):
        return tensors

    @contextlib.contextmanager
    def patched_logprobs_post_processor(self, capture, inputs, sink):
        from nemo_occ.nemo_rl.megatron_policy_worker_patches import mtp_logprobs_post_processor_class

        module = sys.modules[__name__]
        original = module.LogprobsPostProcessor
        module.LogprobsPostProcessor = mtp_logprobs_post_processor_class(original, capture, inputs, sink)
        try:
            yield
        finally:
            module.LogprobsPostProcessor = original


@pytest.fixture(autouse=True)
def _megatron_cpu():
    from nemo_occ.lab import cpu_compat
    from nemo_occ.lab.parallel import model_parallel

    with cpu_compat.cpu_compat(), model_parallel(tensor_parallel=1):
        yield


def _config(**block):
    return {
        "model_name": "tiny",
        "megatron_cfg": {"mtp_num_layers": 1},
        "nemo_occ": {"regime": "policy", **block},
    }


def _batch():
    g = torch.Generator().manual_seed(9)
    return {"input_ids": torch.randint(0, V, (B, S), generator=g)}


def test_old_mtp_logprobs_come_from_the_prev_logprobs_forward_in_its_layout():
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    worker = Worker(_config(old_logprobs="mtp"))
    data = _batch()
    out = worker.get_logprobs(data=data)
    key = mtp_old_logprobs_key(1)
    assert out[key].shape == (B, S) and out["logprobs"].shape == (B, S)
    with torch.no_grad():
        ref = forward_with_mtp_logprobs(
            worker.model, data["input_ids"], torch.arange(S).expand(B, S), detach_trunk=False
        )
    valid = ref.mtp_masks[0]  # [B, S-1]: depth 1 has no target at the first aligned position
    torch.testing.assert_close(out[key][:, 1:][valid], ref.mtp_logprobs[0][valid])
    assert bool((out[key][:, 0] == 0).all()) and bool((out[key][:, 1:][~valid] == 0).all())
    torch.testing.assert_close(out["logprobs"][:, 1:], ref.main_logprobs)  # the main log-probs are untouched
    # not captured when nothing reads them, nor for the reference policy
    assert key not in Worker(_config()).get_logprobs(data=data)
    assert set(worker.get_reference_policy_logprobs(data=data)) == {"reference_logprobs"}
    assert key in Worker(_config(fidelity={"every": 5})).get_logprobs(data=data)  # the head-gap metrics


def test_the_loss_takes_the_mtp_heads_own_old_logprobs():
    """At θ = θ_old the MTP ratio against the head's own old log-prob is 1 for every token: the MTP term
    is -coef · Σ A / n, unclipped. Against the main head's old log-prob it is not."""
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    worker = Worker(_config(old_logprobs="mtp"))
    data = _batch()
    old = worker.get_logprobs(data=data)
    with torch.no_grad():
        cur = forward_with_mtp_logprobs(
            worker.model, data["input_ids"], torch.arange(S).expand(B, S), detach_trunk=False
        )
    adv = torch.randn(B, generator=torch.Generator().manual_seed(2))
    mb = {
        "input_ids": data["input_ids"],
        "token_mask": torch.ones(B, S),
        "sample_mask": torch.ones(B),
        "prev_logprobs": old["logprobs"],
        "advantages": adv[:, None].expand(B, S),
        mtp_old_logprobs_key(1): old[mtp_old_logprobs_key(1)],
        mtp_logprobs_key(1): cur.mtp_logprobs[0],
        mtp_valid_key(1): cur.mtp_masks[0],
    }

    class Zero:
        loss_type, input_type, force_on_policy_ratio = "token_level", "logprob", False

        def __call__(self, next_token_logprobs, data, global_valid_seqs, global_valid_toks):
            return next_token_logprobs.sum() * 0, {}

    n = float(B * (S - 1))
    for reading, exact_ratio in (("mtp", True), ("main", False)):
        loss_fn = OCCLossFn(
            Zero(), NemoOCCConfig(regime="policy", old_logprobs=reading), policy_loss_config({})
        )
        loss, metrics = loss_fn(cur.main_logprobs, mb, torch.tensor(float(B)), torch.tensor(n))
        valid = cur.mtp_masks[0]
        expected = -0.1 * float((adv[:, None].expand(B, S - 1) * valid).sum()) / n
        assert (float(loss) == pytest.approx(expected, rel=1e-5)) == exact_ratio, reading
        assert (metrics["mtp/clip_fraction_1"] == 0.0) or not exact_ratio
    missing = {k: v for k, v in mb.items() if k != mtp_old_logprobs_key(1)}
    loss_fn = OCCLossFn(Zero(), NemoOCCConfig(regime="policy", old_logprobs="mtp"), policy_loss_config({}))
    with pytest.raises(ValueError, match="nemo_occ_mtp_old_logprobs_1"):
        loss_fn(cur.main_logprobs, missing, torch.tensor(float(B)), torch.tensor(n))


# -- what the worker swaps, against NeMo-RL's source --------------------------------------------------


def _nemo_rl_source(relative: str) -> ast.Module:
    import os
    from pathlib import Path

    from nemo_occ.nemo_rl.recipes import find_nemo_rl_root

    root = os.environ.get("NEMO_RL_ROOT") or find_nemo_rl_root()
    path = Path(root or "") / relative
    if not root or not path.is_file():
        pytest.skip("needs NeMo-RL's source (set NEMO_RL_ROOT to a checkout)")
    return ast.parse(path.read_text())


def _function(tree: ast.AST, cls: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not found in NeMo-RL's source")


def test_the_names_the_worker_swaps_match_nemo_rls_source():
    worker = _nemo_rl_source("nemo_rl/models/policy/workers/megatron_policy_worker.py")
    train = _nemo_rl_source("nemo_rl/models/megatron/train.py")
    imported = {
        a.asname or a.name for n in ast.walk(worker) if isinstance(n, ast.ImportFrom) for a in n.names
    }
    assert {"LogprobsPostProcessor", "LossPostProcessor", "megatron_forward_backward"} <= imported
    call = _function(train, "LogprobsPostProcessor", "__call__")
    assert [a.arg for a in call.args.args] == ["self", "data_dict", "input_ids", "cu_seqlens_padded"]
    get_logprobs = _function(worker, "MegatronPolicyWorkerImpl", "get_logprobs")
    assert {"data", "micro_batch_size"} <= {a.arg for a in get_logprobs.args.kwonlyargs}
    calls = [
        n
        for n in ast.walk(_function(worker, "MegatronPolicyWorkerImpl", "train"))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "megatron_forward_backward"
    ]
    # the probes' wrapper takes keywords only, and replays data_iterator
    assert calls and all(not c.args and "data_iterator" in {k.arg for k in c.keywords} for c in calls)
    assert [
        c
        for c in ast.walk(get_logprobs)
        if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "LogprobsPostProcessor"
    ]
