"""The worker's exact probes (``nemo_occ.fidelity.every``) on a real megatron-core GPT with an MTP layer,
over a stand-in for NeMo-RL's Megatron worker whose ``train`` calls a module-level
``megatron_forward_backward`` per optimizer update, as NeMo-RL's does.

Checked: the probed update's same-sample and cross-fitted c, v² equal a brute-force computation on that
update's micro-batches (one ``.backward()`` per loss and half, dotted in Python; the halves are the
rows the streaming split gives: equal rows alternate A, B); the probe leaves no trace in training (the gradient at
every optimizer step and the OCC metrics equal those of a run without probes); the probed update is the
step's second; ``every: 2`` probes every second RL step; the probe history survives a checkpoint.

Letters: B sequences, S tokens.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core")

from nemo_occ.core.config import NemoOCCConfig  # noqa: E402
from nemo_occ.core.losses import clipped_policy_loss  # noqa: E402
from nemo_occ.nemo_rl.loss import OCCLossFn  # noqa: E402
from nemo_occ.nemo_rl.loss_config import policy_loss_config  # noqa: E402
from nemo_occ.nemo_rl.mtp_batch import mtp_logprobs_key, mtp_valid_key  # noqa: E402
from nemo_occ.nemo_rl.worker import STATE_FILE, OCCWorkerExtension  # noqa: E402
from tests._worker_stand_ins import without_capture  # noqa: E402

V, B, S = 32, 2, 10


class MainNLL:
    """Stand-in for NeMo-RL's main loss: token-mean negative log-likelihood over the global batch."""

    loss_type = "token_level"
    input_type = "logprob"
    force_on_policy_ratio = False

    def __call__(self, next_token_logprobs, data, global_valid_seqs, global_valid_toks):
        mask = data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)
        loss = -(next_token_logprobs * mask).sum() / global_valid_toks
        return loss, {"loss": loss.item()}


def megatron_forward_backward(*, model, data_iterator, post_processing_fn, forward_only, global_valid_toks):
    """Stand-in for NeMo-RL's: forward every micro-batch, the loss with the MTP log-probs in its data, backward."""
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    for mb in data_iterator:
        ids = mb["input_ids"]
        out = forward_with_mtp_logprobs(model, ids, torch.arange(S).expand_as(ids), detach_trunk=False)
        data = {**mb, mtp_logprobs_key(1): out.mtp_logprobs[0], mtp_valid_key(1): out.mtp_masks[0]}
        loss, _ = post_processing_fn(out.main_logprobs, data, torch.tensor(float(B)), global_valid_toks)
        if not forward_only:
            loss.backward()


class RecordingOptimizer:
    def __init__(self, model):
        self.model, self.grads = model, []
        self.skip: set[int] = set()  # calls (0-based) that report a skipped update, as Megatron's step() does

    def step(self):  # the weights stay put, so every update sees the same model
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        return (False, None, None) if len(self.grads) - 1 in self.skip else (True, 0.0, 0)


class MegatronStandIn:
    """NeMo-RL's worker reduced to its ``train`` loop: per update, zero grads, forward-backward, step."""

    def __init__(self, config, tokenizer=None, weights_path=None, optimizer_path=None, **kwargs):
        from nemo_occ.lab.tiny_gpt import build_tiny_gpt

        self.cfg = config
        torch.manual_seed(0)
        self.model = build_tiny_gpt(vocab_size=V, num_layers=2, mtp_num_layers=1, max_sequence_length=S)
        self.optimizer = RecordingOptimizer(self.model)

    def train(self, data, loss_fn, eval_mode=False, gbs=None, mbs=None):
        for update in data:
            self.model.zero_grad(set_to_none=True)
            n_tok = sum(float((mb["token_mask"][:, 1:] * mb["sample_mask"][:, None]).sum()) for mb in update)
            sys.modules[__name__].megatron_forward_backward(  # looked up per call, as NeMo-RL's name is
                model=self.model,
                data_iterator=iter(update),
                post_processing_fn=loss_fn,
                forward_only=eval_mode,
                global_valid_toks=torch.tensor(n_tok),
            )
            if not eval_mode:
                self.optimizer.step()
        return {}

    def save_checkpoint(self, weights_path, optimizer_path=None, **kwargs):
        pass


class Worker(OCCWorkerExtension, MegatronStandIn):
    def occ_reduction_group(self):
        return None

    def is_state_writer(self):
        return True

    def broadcast_from_last_stage(self, metrics):
        return metrics

    def holds_output_layer(self):
        return True

    def updates_in_step(self, data, gbs):
        return len(data)

    def update_applied(self, step_result):
        return bool(step_result[0])

    @contextlib.contextmanager
    def patched_loss_post_processor(self, capture, inputs):
        yield  # the stand-in's forward-backward puts the MTP log-probs into the data itself

    @contextlib.contextmanager
    def patched_forward_backward(self, wrapper):
        module = sys.modules[__name__]
        original = module.megatron_forward_backward
        module.megatron_forward_backward = lambda **kwargs: wrapper(original, **kwargs)
        try:
            yield
        finally:
            module.megatron_forward_backward = original


@pytest.fixture(autouse=True)
def _megatron_cpu(monkeypatch):
    from nemo_occ.lab import cpu_compat
    from nemo_occ.lab.parallel import model_parallel

    without_capture(monkeypatch)
    with cpu_compat.cpu_compat(), model_parallel(tensor_parallel=1):
        yield


def _microbatch(seed):
    """Old log-probs near the model's own (every worker builds the same weights), so ratios stay unclipped."""
    from nemo_occ.lab.tiny_gpt import build_tiny_gpt
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    torch.manual_seed(0)
    model = build_tiny_gpt(vocab_size=V, num_layers=2, mtp_num_layers=1, max_sequence_length=S)
    with torch.no_grad():
        now = forward_with_mtp_logprobs(model, ids, torch.arange(S).expand_as(ids), detach_trunk=False)
    old = now.main_logprobs + 0.1 * torch.randn(B, S - 1, generator=g)
    mask = torch.ones(B, S)
    mask[:, :3] = 0  # the prompt
    return {
        "input_ids": ids,
        "token_mask": mask,
        "sample_mask": torch.ones(B),
        "prev_logprobs": torch.cat([torch.zeros(B, 1), old], dim=1),  # NeMo-RL's [B, S], position 0 is 0
        "advantages": torch.randn(B, 1, generator=g).expand(B, S).contiguous(),
    }


def _config(every):
    block = {"regime": "occ", "fidelity": {"every": every}} if every else {"regime": "occ"}
    return {"model_name": "tiny", "megatron_cfg": {"mtp_num_layers": 1}, "nemo_occ": block}


def _loss(every):
    cfg = _config(every)["nemo_occ"]
    return OCCLossFn(MainNLL(), NemoOCCConfig(**cfg), policy_loss_config({"ratio_clip_max": 0.28}))


def _brute_force(model, update, policy_cfg, rows=None):
    """c, v² over the main model and v² over mtp.* of ``update``'s summed losses (of ``rows`` of every
    micro-batch, over the whole update's token count), by .backward() per loss; and the gradients."""
    from nemo_occ.megatron.mtp_logprobs import forward_with_mtp_logprobs

    n_tok = sum(float(mb["token_mask"][:, 1:].sum()) for mb in update)
    rl = mtp = 0.0
    for mb in update:
        ids = mb["input_ids"]
        out = forward_with_mtp_logprobs(model, ids, torch.arange(S).expand_as(ids), detach_trunk=False)
        mask = mb["token_mask"][:, 1:].bool()
        if rows is not None:
            mask = mask & rows[:, None]
        old, adv = mb["prev_logprobs"][:, 1:], mb["advantages"][:, 1:]
        rl = rl - (out.main_logprobs * mask).sum() / n_tok
        mtp = mtp + clipped_policy_loss(
            out.mtp_logprobs[0], old, adv, mask & out.mtp_masks[0], policy_cfg,
            global_valid_tokens=n_tok, global_valid_seqs=float(B),
        )[0]  # fmt: skip
    grads = []
    for loss in (rl, mtp):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None})

    def dot(a, b, mtp_part):
        return sum(float((a[n] * b[n]).sum()) for n in a if n in b and n.startswith("mtp.") == mtp_part)

    return (
        dot(grads[0], grads[1], False),
        dot(grads[1], grads[1], False),
        dot(grads[1], grads[1], True),
        grads,
    )


def _dot(a, b, mtp_part=False):
    return sum(float((a[n] * b[n]).sum()) for n in a if n in b and n.startswith("mtp.") == mtp_part)


def test_probe_equals_brute_force_and_leaves_no_trace_in_training():
    step = [[_microbatch(0), _microbatch(1)], [_microbatch(2), _microbatch(3)]]
    plain, probed = Worker(_config(0)), Worker(_config(1))
    plain_metrics = plain.train(step, _loss(0))["mtp_metrics"]
    probed_metrics = probed.train(step, _loss(1))["mtp_metrics"]
    # training is untouched: the gradient at every optimizer step and the OCC metrics are the same
    assert len(probed.optimizer.grads) == 2
    for a, b in zip(plain.optimizer.grads, probed.optimizer.grads, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    for key, value in plain_metrics.items():
        assert probed_metrics[key] == value, key
    # the probed update is the step's second, and its statistics are exact
    c, v2, mtp_v2, _ = _brute_force(probed.model, step[1], _loss(1).policy_cfg)
    c_first, _, _, _ = _brute_force(probed.model, step[0], _loss(1).policy_cfg)
    assert abs(c) > 1e-6 and not c == pytest.approx(c_first)
    assert probed_metrics["fidelity/c_same_sample_1"] == pytest.approx(c, rel=1e-5)
    assert probed_metrics["fidelity/v2_same_sample_1"] == pytest.approx(v2, rel=1e-5)
    assert probed_metrics["fidelity/mtp_params_v2_same_sample_1"] == pytest.approx(mtp_v2, rel=1e-5)
    # cross-fitted: every micro-batch's rows alternate A, B (equal token counts), each half half the tokens
    (rl_a, mtp_a), (rl_b, mtp_b) = (
        _brute_force(probed.model, step[1], _loss(1).policy_cfg, torch.tensor(r))[3] for r in ([1, 0], [0, 1])
    )
    c_x = 4 * (_dot(rl_a, mtp_b) + _dot(rl_b, mtp_a)) / 2  # ĝ^h = g^h / ½
    assert abs(c_x - c) > 1e-3 * abs(c)  # a different number from the same-sample one
    assert probed_metrics["fidelity/c_cross_fit_1"] == pytest.approx(c_x, rel=1e-5)
    assert probed_metrics["fidelity/v2_cross_fit_1"] == pytest.approx(4 * _dot(mtp_a, mtp_b), rel=1e-5)
    assert probed_metrics["fidelity/rl_norm2_cross_fit"] == pytest.approx(4 * _dot(rl_a, rl_b), rel=1e-5)
    # the stand-in's optimizer keeps no Adam state: no preconditioned metric, and it says so
    assert probed_metrics["fidelity/precond_available"] == 0.0
    assert probed_metrics["fidelity/probes"] == 1.0
    assert not any(k.startswith("fidelity/") for k in plain_metrics)


def test_every_second_step_and_the_history_survives_a_checkpoint(tmp_path):
    worker = Worker(_config(2))
    steps = [[[_microbatch(4 * s + i)] for i in range(2)] for s in range(3)]
    seen = [
        any(k.startswith("fidelity/") for k in worker.train(step, _loss(2))["mtp_metrics"]) for step in steps
    ]
    assert seen == [False, True, False] and worker.occ_rl_steps == 3
    assert worker.train(steps[0], _loss(2), eval_mode=True) is not None and worker.occ_rl_steps == 3
    weights = tmp_path / "step_3" / "policy" / "weights"
    worker.save_checkpoint(str(weights))
    assert (weights.parent / STATE_FILE).is_file()
    resumed = Worker(_config(2), None, weights_path=str(weights))
    assert resumed.occ_rl_steps == 3 and resumed.occ_probes.records == worker.occ_probes.records
    metrics = resumed.train(steps[1], _loss(2))["mtp_metrics"]  # RL step 4: probed, the second probe
    assert metrics["fidelity/probes"] == 2.0


class AdamStateOptimizer(RecordingOptimizer):
    """The recording optimizer (the weights stay put) holding a torch Adam's state one step old: what the
    probe reads Adam's second moment from (``param_groups``, ``state``)."""

    def __init__(self, model):
        super().__init__(model)
        adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(9)
        for p in model.parameters():
            p.grad = 0.1 * torch.randn(p.shape, generator=g) + 0.05
        adam.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
                p.grad = None
        self.param_groups, self.state = adam.param_groups, adam.state
        self.inverse = {
            n: 1.0 / ((adam.state[p]["exp_avg_sq"].double() / (1 - 0.99)).sqrt() + 1e-6)
            for n, p in model.named_parameters()
        }


def test_preconditioned_statistics_read_the_optimizers_adam_state():
    step = [[_microbatch(0), _microbatch(1)], [_microbatch(2), _microbatch(3)]]
    worker = Worker(_config(1))
    worker.optimizer = AdamStateOptimizer(worker.model)
    metrics = worker.train(step, _loss(1))["mtp_metrics"]
    assert metrics["fidelity/precond_available"] == 1.0
    (rl_a, mtp_a), (rl_b, mtp_b) = (
        _brute_force(worker.model, step[1], _loss(1).policy_cfg, torch.tensor(r))[3] for r in ([1, 0], [0, 1])
    )
    w = worker.optimizer.inverse

    def dot(a, b):
        return sum(float((a[n] * b[n] * w[n]).sum()) for n in a if n in b and not n.startswith("mtp."))

    c_x = 4 * (dot(rl_a, mtp_b) + dot(rl_b, mtp_a)) / 2
    assert metrics["fidelity/c_cross_fit_precond_1"] == pytest.approx(c_x, rel=1e-5)
    assert metrics["fidelity/v2_cross_fit_precond_1"] == pytest.approx(4 * dot(mtp_a, mtp_b), rel=1e-5)
    assert not metrics["fidelity/c_cross_fit_precond_1"] == pytest.approx(metrics["fidelity/c_cross_fit_1"])


def test_estimator_probed_takes_lambda_from_the_cross_fitted_probe():
    cfg = _config(1)
    cfg["nemo_occ"]["occ"] = {"estimator": "probed", "lambda_plus": 0.5}
    worker = Worker(cfg)
    loss = OCCLossFn(
        MainNLL(), NemoOCCConfig(**cfg["nemo_occ"]), policy_loss_config({"ratio_clip_max": 0.28})
    )
    metrics = worker.train([[_microbatch(0), _microbatch(1)], [_microbatch(2), _microbatch(3)]], loss)[
        "mtp_metrics"
    ]
    c_x, v2_x = metrics["fidelity/c_cross_fit_1"], metrics["fidelity/v2_cross_fit_1"]
    assert v2_x > 0 and worker.occ_objective.calibrator.lambdas == [0.5 * c_x / (v2_x + 1e-8)]
    assert metrics["occ/lambda_applied_1"] == 0.0  # both updates used the initial λ: the probe sets the next


def test_a_skipped_probed_update_records_no_probe():
    """Megatron did not apply the probed update (inf/NaN gradients): there is nothing to pair with proxies."""
    worker = Worker(_config(1))
    worker.optimizer.skip = {1}  # the probed update is the step's second
    metrics = worker.train([[_microbatch(0)], [_microbatch(1)]], _loss(1))["mtp_metrics"]
    assert worker.occ_probes.records == [] and not any(k.startswith("fidelity/") for k in metrics)
    assert metrics["occ/skipped"] == 0.5
