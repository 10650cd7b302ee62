"""The worker extension's logic on CPU, over a stand-in for NeMo-RL's Megatron worker (same method names):
one OCC update per optimizer step with the lagged λ, eval mode leaves λ alone, calibrator state through a
checkpoint, the setup check for missing MTP layers, and unpacking packed MTP rows.

Letters: B sequences, S tokens, T packed tokens.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import pytest
import torch

from nemo_occ.core.config import NemoOCCConfig
from nemo_occ.nemo_rl.loss import OCCLossFn
from nemo_occ.nemo_rl.loss_config import policy_loss_config
from nemo_occ.nemo_rl.mtp_batch import mtp_correct_key, mtp_logprobs_key, unpack_rows
from nemo_occ.nemo_rl.worker import STATE_FILE, OCCWorkerExtension
from tests._worker_stand_ins import NoCapture, without_capture


class MainNLL:
    loss_type = "token_level"
    input_type = "logprob"
    force_on_policy_ratio = False

    def __call__(self, next_token_logprobs, data, global_valid_seqs, global_valid_toks):
        mask = data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)
        loss = -(next_token_logprobs * mask).sum() / global_valid_toks
        return loss, {"loss": loss.item()}


def _microbatch(seed):
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 8
    data = {
        "token_mask": torch.ones(B, S),
        "sample_mask": torch.ones(B),
        "prev_logprobs": -torch.rand(B, S, generator=g),
        "advantages": torch.randn(B, S, generator=g),
    }
    main = data["prev_logprobs"][:, 1:] + 0.1 * torch.randn(B, S - 1, generator=g)
    data[mtp_logprobs_key(1)] = data["prev_logprobs"][:, 1:] + 0.2 * torch.randn(B, S - 1, generator=g)
    data[mtp_correct_key(1)] = torch.rand(B, S - 1, generator=g) > 0.4
    return main, data


class FakeOptimizer:
    """Megatron's ``step()`` contract: (update_successful, grad_norm, num_zeros_in_grad); the calls listed
    in ``skip`` (0-based) report a skipped update as Megatron does on inf/NaN gradients."""

    def __init__(self):
        self.steps = 0
        self.skip: set[int] = set()

    def step(self):
        self.steps += 1
        if self.steps - 1 in self.skip:
            return False, None, None
        return True, 0.0, 0


class FakeMegatronWorker:
    """Stand-in for MegatronPolicyWorkerImpl: per global batch, the micro-batch losses, then one step."""

    def __init__(self, config, tokenizer=None, weights_path=None, optimizer_path=None, **kwargs):
        self.cfg = config
        self.model = torch.nn.Linear(1, 1)
        self.optimizer = FakeOptimizer()
        self.saved = []

    def train(self, data, loss_fn, eval_mode=False, gbs=None, mbs=None):
        for global_batch in data:
            n_tok = sum(float(mb["token_mask"][:, 1:].sum()) for _, mb in global_batch)
            for main, mb in global_batch:
                loss_fn(main, mb, torch.tensor(4.0), torch.tensor(n_tok))
            if not eval_mode:
                self.optimizer.step()
        return {"all_mb_metrics": {}}

    def save_checkpoint(self, weights_path, optimizer_path=None, **kwargs):
        self.saved.append(weights_path)


class Worker(OCCWorkerExtension, FakeMegatronWorker):
    def occ_reduction_group(self):
        return None

    def is_state_writer(self):
        return True

    def broadcast_from_last_stage(self, metrics):
        return metrics

    def update_applied(self, step_result):
        return bool(step_result[0])  # one process: nothing to AND over a model-parallel group

    @contextlib.contextmanager
    def patched_loss_post_processor(self, capture, inputs):
        yield  # the stand-in puts the MTP log-probs into the data itself


@pytest.fixture(autouse=True)
def _no_megatron(monkeypatch):
    without_capture(monkeypatch)


def _config(regime="occ", **policy):
    return {
        "model_name": "tiny",
        "megatron_cfg": {"mtp_num_layers": 1},
        "nemo_occ": {"regime": regime},
        **policy,
    }


def _loss(regime="occ"):
    return OCCLossFn(MainNLL(), NemoOCCConfig(regime=regime), policy_loss_config({"ratio_clip_max": 0.28}))


def _lambda_by_loops(global_batch):
    """λ+ Σ δ_RL δ_MTP / (Σ δ_MTP² + ε) over the valid positions j >= 1, explicit loops."""
    c = v2 = 0.0
    for main, mb in global_batch:
        old = mb["prev_logprobs"][:, 1:]
        mtp = mb[mtp_logprobs_key(1)]
        for b in range(main.shape[0]):
            for j in range(1, main.shape[1]):
                d_rl = float(main[b, j] - old[b, j])
                d_mtp = float(mtp[b, j] - old[b, j])
                c += d_rl * d_mtp
                v2 += d_mtp * d_mtp
    return c / (v2 + 1e-8)


def test_one_calibrator_update_per_optimizer_step_with_lagged_lambda():
    worker = Worker(_config())
    update_1 = [_microbatch(0), _microbatch(1)]
    update_2 = [_microbatch(2)]
    metrics = worker.train([update_1, update_2], _loss())
    assert worker.optimizer.steps == 2 and worker.occ_objective.calibrator.num_updates == 2
    lam_1, lam_2 = _lambda_by_loops(update_1), _lambda_by_loops(update_2)
    assert not math.isclose(lam_1, lam_2)
    # the step's first update ran at θ = θ_old: reported, but it does not set λ; the second one does
    assert worker.occ_objective.coefficients()[0] == pytest.approx(lam_2)  # for the next update
    occ = metrics["mtp_metrics"]
    # λ after the step's last update, which the next step starts with (not a mean over the updates)
    assert occ["occ/lambda_1"] == pytest.approx(lam_2)
    assert occ["occ/lambda_applied_1"] == pytest.approx(0.0)  # both updates ran with the initial λ
    assert occ["occ/refreshed"] == pytest.approx(0.5)
    # the next RL step starts with the λ the previous step ended with, and its first update keeps it
    metrics = worker.train([[_microbatch(3)], [_microbatch(4)]], _loss())
    occ = metrics["mtp_metrics"]
    lam_4 = _lambda_by_loops([_microbatch(4)])
    assert occ["occ/lambda_applied_1"] == pytest.approx(lam_2)  # both updates used the carried λ
    assert worker.occ_objective.coefficients()[0] == pytest.approx(lam_4)


def test_a_skipped_update_keeps_lambda_and_its_statistics_set_nothing():
    worker = Worker(_config())
    worker.optimizer.skip = {2}  # the third update: Megatron found inf/NaN gradients and did not apply it
    updates = [[_microbatch(10 + u)] for u in range(4)]
    occ = worker.train(updates, _loss())["mtp_metrics"]
    lam = [_lambda_by_loops(u) for u in updates]
    # update 1 (θ_old) keeps λ = 0, update 2 sets λ(2), update 3 is skipped and keeps it, update 4 sets λ(4)
    assert worker.occ_objective.coefficients()[0] == pytest.approx(lam[3])
    assert occ["occ/lambda_1"] == pytest.approx(lam[3])  # λ after the step's last update
    assert occ["occ/lambda_applied_1"] == pytest.approx((0.0 + 0.0 + lam[1]) / 3)  # the applied updates'
    assert occ["occ/skipped"] == pytest.approx(1 / 4) and occ["occ/refreshed"] == pytest.approx(2 / 4)
    assert worker.occ_objective.calibrator.num_updates == 3


def test_updates_count_as_made_at_theta_old_until_one_is_applied():
    worker = Worker(_config())
    worker.optimizer.skip = {0}  # θ does not move, so the second update also runs at θ_old: δ_RL = 0
    updates = [[_microbatch(20 + u)] for u in range(3)]
    occ = worker.train(updates, _loss())["mtp_metrics"]
    assert occ["occ/refreshed"] == pytest.approx(1 / 3)  # only the third update refreshes
    assert occ["occ/lambda_applied_1"] == pytest.approx(0.0)  # the third still ran with the initial λ
    assert worker.occ_objective.coefficients()[0] == pytest.approx(_lambda_by_loops(updates[2]))


def test_mtp_accuracy_is_hits_over_mtp_valid_tokens_of_the_whole_step():
    """Megatron's mtp_{d}_acceptance_rate / 100, which skipping its MTP loss would otherwise drop."""
    worker = Worker(_config(regime="ce"))
    step = [[_microbatch(0), _microbatch(1)], [_microbatch(2)]]
    metrics = worker.train(step, _loss(regime="ce"))
    hits = tokens = 0
    for update in step:
        for _, mb in update:
            for b in range(mb["token_mask"].shape[0]):
                for j in range(1, mb["token_mask"].shape[1] - 1):  # j = 0 has no depth-1 target
                    tokens += 1
                    hits += bool(mb[mtp_correct_key(1)][b, j])
    assert metrics["mtp_metrics"]["accuracy_1"] == pytest.approx(hits / tokens)


def test_eval_mode_keeps_lambda_and_statistics():
    worker = Worker(_config())
    worker.train([[_microbatch(0)]], _loss())
    before = worker.occ_objective.calibrator.state_dict()
    worker.train([[_microbatch(5)]], _loss(), eval_mode=True)
    after = worker.occ_objective.calibrator.state_dict()
    assert after["lambdas"] == before["lambdas"] and torch.equal(after["stats"], before["stats"])
    assert after["num_updates"] == before["num_updates"]


def test_worker_refuses_nemo_rls_plain_loss():
    with pytest.raises(TypeError, match="OCCLossFn"):
        Worker(_config()).train([[_microbatch(0)]], MainNLL())


def _worker_state(worker):
    state = worker.occ_objective.state_dict()["calibrator"]
    return state["lambdas"], state["stats"].tolist(), state["num_updates"], worker.occ_objective.policy_cfg


def test_a_loss_of_another_config_is_refused_and_changes_nothing():
    worker = Worker(_config())
    worker.train([[_microbatch(0)], [_microbatch(1)]], _loss())
    before = _worker_state(worker)
    other = OCCLossFn(
        MainNLL(),
        NemoOCCConfig(regime="occ", occ={"lambda_plus": 0.5}),
        policy_loss_config({"ratio_clip_max": 0.5}),
    )
    with pytest.raises(ValueError, match="different nemo_occ config"):
        worker.train([[_microbatch(2)], [_microbatch(3)]], other)
    assert _worker_state(worker) == before and worker.occ_rl_steps == 1 and worker.optimizer.steps == 2


def test_a_train_that_raises_mid_update_leaves_no_statistics_behind():
    worker, fresh = Worker(_config()), Worker(_config())
    for w in (worker, fresh):
        w.train([[_microbatch(0)], [_microbatch(1)]], _loss())
    before = _worker_state(worker)
    broken = dict(_microbatch(3)[1])
    del broken[
        "advantages"
    ]  # the second micro-batch's loss raises after the first one's statistics were taken
    with pytest.raises(KeyError):
        worker.train([[_microbatch(2), (_microbatch(3)[0], broken)]], _loss())
    assert _worker_state(worker) == before and worker.occ_rl_steps == 1
    step = [
        [_microbatch(4)],
        [_microbatch(5)],
    ]  # and the next step is the one a worker without the error makes
    assert worker.train(step, _loss())["mtp_metrics"] == fresh.train(step, _loss())["mtp_metrics"]


def test_calibrator_state_survives_checkpoint_and_resume(tmp_path):
    worker = Worker(_config())
    worker.train([[_microbatch(0)], [_microbatch(1)]], _loss())
    weights = tmp_path / "step_10" / "policy" / "weights"
    worker.save_checkpoint(str(weights))
    assert (weights.parent / STATE_FILE).is_file()
    assert not [p for p in weights.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    resumed = Worker(_config(), None, weights_path=str(weights))
    assert resumed.occ_objective.coefficients() == worker.occ_objective.coefficients()
    assert resumed.occ_objective.calibrator.num_updates == 2


def test_which_lambda_each_update_uses_is_what_the_docs_say():
    """Measured on the worker (the caller that decides refresh): the first two updates of a run use
    initial_lambda, the first two of every later step the previous step's last λ, update u >= 2 update
    u-1's. nemo_occ/core/calibration.py, core/config.py and docs/nemo_rl.md state exactly this."""
    cfg = _config()
    cfg["nemo_occ"]["occ"] = {"initial_lambda": 0.37}
    worker = Worker(cfg)
    used = []
    close = worker.occ_objective.close_update

    def recording(*args, **kwargs):
        update = close(*args, **kwargs)
        used.append((update.depths[0].lambda_applied, update.depths[0].lambda_next))
        return update

    worker.occ_objective.close_update = recording
    loss = OCCLossFn(
        MainNLL(), NemoOCCConfig(**cfg["nemo_occ"]), policy_loss_config({"ratio_clip_max": 0.28})
    )
    worker.train([[_microbatch(0)], [_microbatch(1)], [_microbatch(2)]], loss)
    worker.train([[_microbatch(3)], [_microbatch(4)], [_microbatch(5)]], loss)
    applied = [a for a, _ in used]
    after = [n for _, n in used]
    assert applied[0] == applied[1] == 0.37  # the first two updates of the run
    assert after[1] != 0.37 and applied[2] == after[1]  # update 2 uses update 1's λ
    assert applied[3] == applied[4] == after[2]  # step 2's first two: step 1's last λ
    assert applied[5] == after[4]
    calibration = Path(__file__).resolve().parents[2] / "nemo_occ" / "core" / "calibration.py"
    assert "update u ≥ 2 uses the λ of update u−1" in " ".join(calibration.read_text().split())
    config = (Path(__file__).resolve().parents[2] / "nemo_occ" / "core" / "config.py").read_text()
    assert "the first two updates of a run" in config
    guide = (Path(__file__).resolve().parents[2] / "docs" / "nemo_rl.md").read_text()
    assert "`initial_lambda` (0) for the first two updates of a run" in " ".join(guide.split())


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``Path.touch(marker)``: what a planted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_state_file_is_refused_without_running_its_code(tmp_path):
    worker = Worker(_config())
    worker.train([[_microbatch(0)], [_microbatch(1)]], _loss())
    weights = tmp_path / "step_10" / "policy" / "weights"
    worker.save_checkpoint(str(weights))
    state_file = weights.parent / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "code-ran"
    state["objective"]["payload"] = _RunsCodeWhenUnpickled(marker)  # a checkpoint from someone else
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="holds objects other than numbers") as info:
        Worker(_config(), None, weights_path=str(weights))
    assert not marker.exists()
    assert "\n" not in str(info.value) and f"{state_file}" in str(info.value)


def test_resume_under_changed_settings_names_them(tmp_path):
    worker = Worker(_config())
    worker.train([[_microbatch(0)], [_microbatch(1)]], _loss())
    weights = tmp_path / "step_10" / "policy" / "weights"
    worker.save_checkpoint(str(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no warning
        Worker(_config(), None, weights_path=str(weights))
    cfg = _config()
    cfg["nemo_occ"] = {"regime": "occ", "occ": {"lambda_plus": 0.5}, "fidelity": {"every": 2}}
    with pytest.warns(UserWarning, match="changed nemo_occ settings") as record:
        resumed = Worker(cfg, None, weights_path=str(weights))
    (message,) = [str(w.message) for w in record if "changed" in str(w.message)]
    assert "fidelity.every: 0 -> 2; occ.lambda_plus: 1.0 -> 0.5)" in message
    assert f"move {weights.parent / STATE_FILE} away" in message
    assert resumed.occ_objective.coefficients() == worker.occ_objective.coefficients()  # still restored


def test_resume_without_state_warns(tmp_path):
    with pytest.warns(UserWarning, match="restarts"):
        Worker(_config(), None, weights_path=str(tmp_path / "policy" / "weights"))


def test_setup_fails_when_the_model_has_no_mtp_layer(monkeypatch):
    import nemo_occ.megatron.mtp_capture as capture_mod

    class NoMTP(NoCapture):
        def __init__(self, model, *, detach_trunk):
            self.active, self.num_depths = False, 0

    monkeypatch.setattr(capture_mod, "MTPCapture", NoMTP)
    monkeypatch.setattr(Worker, "holds_output_layer", lambda self: True)
    cfg = _config()
    cfg["megatron_cfg"]["mtp_num_layers"] = 0
    with pytest.raises(ValueError, match="mtp_num_layers: 1 explicitly"):
        Worker(cfg)
    Worker(_config(regime="none"))  # no MTP term: fine


def test_missing_nemo_occ_block_says_how_to_launch():
    with pytest.raises(ValueError, match="run_grpo"):
        Worker({"model_name": "tiny"})


def test_unpack_rows_matches_a_loop():
    # three documents of lengths 4, 2, 5 packed with padding to multiples of 4: starts 0, 4, 8
    cu = torch.tensor([0, 4, 6, 11])
    cu_pad = torch.tensor([0, 4, 8, 16])
    packed = torch.arange(15, dtype=torch.float32).reshape(1, 15).requires_grad_()  # [1, T-1]
    width = 6
    rows = unpack_rows(packed, cu, cu_pad, width, fill=-1.0)
    lengths = [4, 2, 5]
    starts = [0, 4, 8]
    for n in range(3):
        for j in range(width):
            expect = float(starts[n] + j) if j < lengths[n] - 1 else -1.0
            assert rows[n, j].item() == expect, (n, j)
    rows.sum().backward()
    assert packed.grad.sum().item() == sum(n - 1 for n in lengths)  # each kept position once


def test_update_applied_reads_the_step_result_as_nemo_rls_train_does():
    """The stand-ins above override ``update_applied``; its real body must do what NeMo-RL's ``train`` does
    with ``optimizer.step()``'s result: unpack (update_successful, grad_norm, num_zeros_in_grad) and AND the
    first over ``get_pg_collection(self.model).mp``, with the functions imported from the same modules."""
    import ast
    import inspect
    import os
    import textwrap
    from pathlib import Path

    from nemo_occ.nemo_rl.recipes import find_nemo_rl_root

    root = os.environ.get("NEMO_RL_ROOT") or find_nemo_rl_root()
    source = Path(root or "") / "nemo_rl/models/policy/workers/megatron_policy_worker.py"
    if not root or not source.is_file():
        pytest.skip("needs NeMo-RL's source (set NEMO_RL_ROOT to a checkout)")
    theirs = ast.parse(source.read_text())
    ours = ast.parse(textwrap.dedent(inspect.getsource(OCCWorkerExtension.update_applied)))
    wanted = {"get_pg_collection", "logical_and_across_model_parallel_group"}

    def imports(tree):
        return {
            a.name: n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
            if a.name in wanted
        }  # fmt: skip

    assert imports(ours) == imports(theirs) and set(imports(ours)) == wanted
    text = ast.unparse(theirs)
    assert "update_successful, grad_norm, num_zeros_in_grad = self.optimizer.step()" in text
    assert "logical_and_across_model_parallel_group(update_successful, mp_group=pg_collection.mp)" in text
    assert "pg_collection = get_pg_collection(self.model)" in text
    body = ast.unparse(ours)
    assert "bool(step_result[0])" in body
    assert (
        "logical_and_across_model_parallel_group(update_successful, mp_group=get_pg_collection(self.model).mp)"
        in body
    )
