"""The launch path of ``nemo_occ.nemo_rl.run_grpo``: what ``load_and_check`` hands NeMo-RL and the workers.

``load_and_check`` moves the recipe's ``nemo_occ`` block into ``policy.nemo_occ``; ``train()`` and every
Megatron worker rebuild the :class:`NemoOCCConfig` from it. Runs without NeMo-RL: its one driver-side
call here (``register_omegaconf_resolvers``) is replaced by a stand-in, and the recipe is made
self-contained (no ``nemo_rl:`` parent) so no NeMo-RL tree is needed.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest
import yaml

from nemo_occ.core.config import load_config
from nemo_occ.nemo_rl.recipes import NEMO_RL_BLOCKS, check_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
OCC_RECIPE = ROOT / "recipes" / "dapo-occ-mimo-7b-rl-4n8g-h100-tp2.yaml"


@pytest.fixture
def self_contained_recipe(tmp_path, monkeypatch) -> Path:
    """The OCC recipe without its NeMo-RL parent, written as one file; NeMo-RL's resolvers stood in for."""
    config = load_recipe(OCC_RECIPE, nemo_rl_root=False).config
    config["policy"].pop("make_sequence_length_divisible_by")  # interpolates keys of the skipped parent
    for block in NEMO_RL_BLOCKS:
        config.setdefault(block, {})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    stand_in = types.ModuleType("nemo_rl.utils.config")
    stand_in.register_omegaconf_resolvers = lambda: None
    for name in ("nemo_rl", "nemo_rl.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "nemo_rl.utils.config", stand_in)
    monkeypatch.setenv("NEMO_RL_ROOT", str(tmp_path))  # no NeMo-RL tree here: the key check is skipped
    return path


def test_the_block_handed_to_the_workers_rebuilds_the_recipes_config_without_warnings(
    self_contained_recipe,
):
    """An OCC recipe that never sets ``coef`` must not warn "coef has no effect" in train() and every rank."""
    from nemo_occ.nemo_rl.run_grpo import load_and_check

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe itself is clean: nothing may warn on the way
        expected = check_recipe(load_recipe(self_contained_recipe, nemo_rl_root=False))
        config = load_and_check(str(self_contained_recipe), [])
        rebuilt = load_config(dict(config["policy"]["nemo_occ"]), key=None)  # train() and each worker
    assert "nemo_occ" not in config
    assert rebuilt == expected
    assert rebuilt.regime == "occ" and rebuilt.occ.lambda_plus == 1.0  # the recipe's values, not defaults


def test_a_coef_the_user_set_under_occ_still_warns(self_contained_recipe):
    from nemo_occ.nemo_rl.run_grpo import load_and_check

    with pytest.warns(UserWarning, match="coef has no effect"):
        load_and_check(str(self_contained_recipe), ["++nemo_occ.coef=0.3"])


@pytest.mark.nemo_rl
def test_train_calls_nemo_rl_with_its_real_signatures(tmp_path, monkeypatch):
    """``run_grpo.train`` up to where Ray would start workers, against NeMo-RL's own function signatures.

    Every NeMo-RL call ``train`` makes is replaced by a recorder that binds the arguments to the real
    function's signature (so a renamed or missing parameter fails) and returns a stand-in; ``setup``'s
    stand-in has as many entries as its real return annotation. Registration and ``MasterConfig`` are real.
    """
    import functools
    import inspect
    import typing

    grpo = pytest.importorskip(
        "nemo_rl.algorithms.grpo", reason="needs NeMo-RL's driver side (Python >= 3.12)"
    )
    import nemo_rl.algorithms.utils as algorithm_utils
    import nemo_rl.data.utils as data_utils
    import nemo_rl.distributed.virtual_cluster as virtual_cluster
    import nemo_rl.models.generation as generation
    from nemo_rl.algorithms.loss import ClippedPGLossFn
    from nemo_rl.distributed.ray_actor_environment_registry import ACTOR_ENVIRONMENT_REGISTRY
    from nemo_rl.models.policy.lm_policy import Policy

    from nemo_occ.nemo_rl import run_grpo
    from nemo_occ.nemo_rl.loss import OCCLossFn
    from nemo_occ.nemo_rl.policy import OCCPolicy
    from nemo_occ.nemo_rl.worker import WORKER_FQN

    default_fqn = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"
    monkeypatch.setitem(ACTOR_ENVIRONMENT_REGISTRY, default_fqn, sys.executable)  # no `uv` venv build
    monkeypatch.setitem(ACTOR_ENVIRONMENT_REGISTRY, WORKER_FQN, "restored by monkeypatch")

    calls: dict[str, inspect.BoundArguments] = {}
    setup_size = len(typing.get_args(typing.get_type_hints(grpo.setup)["return"]))

    from nemo_rl.utils.checkpoint import CheckpointManager

    class Checkpointer:
        """A stand-in CheckpointManager: a context manager only where NeMo-RL's is one."""

    if hasattr(CheckpointManager, "__enter__"):  # NeMo-RL #2828, after v0.7.0: the launch must flush it

        def _enter(self):
            calls["checkpointer.enter"] = None
            return self

        Checkpointer.__enter__ = _enter
        Checkpointer.__exit__ = lambda self, *exc: False
    has_shutdown = hasattr(grpo, "shutdown_environments")  # NeMo-RL #3391, after v0.7.0

    class Generation:
        def shutdown(self):
            calls["generation.shutdown"] = None

    def setup_result(bound):
        out = [object() for _ in range(setup_size)]
        # positions as NeMo-RL's examples/run_grpo.py unpacks them
        out[1], out[6], out[8], out[10] = (
            Generation(),
            ClippedPGLossFn(bound.arguments["master_config"].loss_fn),
            Checkpointer(),
            bound.arguments["master_config"],
        )
        calls["setup_result"] = out
        return out

    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
    results = {
        "init_ray": None,
        "get_tokenizer": tokenizer,
        "configure_generation_config": lambda b: b.arguments["config"],
        "setup_response_data": ({"math": "data"}, None, {"math": "env"}, {"math": "env"}),
        "setup": setup_result,
        "grpo_train": None,
        **({"shutdown_environments": None} if has_shutdown else {}),
    }
    modules = {
        "init_ray": virtual_cluster,
        "get_tokenizer": algorithm_utils,
        "configure_generation_config": generation,
        "setup_response_data": data_utils,
        "setup": grpo,
        "grpo_train": grpo,
        **({"shutdown_environments": grpo} if has_shutdown else {}),
    }
    for name, module in modules.items():
        signature = inspect.signature(getattr(module, name))

        def recorder(*args, _name=name, _signature=signature, **kwargs):
            bound = _signature.bind(*args, **kwargs)
            calls[_name] = bound
            result = results[_name]
            return result(bound) if callable(result) else result

        monkeypatch.setattr(module, name, recorder)

    config = run_grpo.load_and_check(str(OCC_RECIPE), [f"logger.log_dir={tmp_path}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert run_grpo.train(config, str(OCC_RECIPE)) == 0

    assert ACTOR_ENVIRONMENT_REGISTRY[WORKER_FQN] == sys.executable  # the Megatron worker's interpreter
    generation_kwargs = calls["configure_generation_config"].arguments
    assert generation_kwargs["trains_mtp"] is True and generation_kwargs["has_refit_draft_weights"] is False
    factory = calls["setup"].arguments["policy_factory"]
    assert isinstance(factory, functools.partial) and factory.func is OCCPolicy
    assert issubclass(OCCPolicy, Policy)  # NeMo-RL's Policy, carrying the MTP heads' old log-probs
    inspect.signature(Policy).bind_partial(**factory.keywords)  # a keyword Policy really takes
    assert factory.keywords == {"worker_extension_cls_fqn": WORKER_FQN}
    trained = calls["grpo_train"].arguments
    out = calls["setup_result"]
    names = ("policy", "policy_generation", "wrapped_dataloader", "val_dataloader", "logger", "checkpointer")
    for name, index in zip((*names, "grpo_save_state"), (0, 1, 4, 5, 7, 8, 9), strict=True):
        assert trained[name] is out[index], name
    assert trained["master_config"] is out[10]
    assert isinstance(trained["loss_fn"], OCCLossFn) and trained["loss_fn"].nemo_occ_cfg.regime == "occ"
    assert trained["task_to_env"] == {"math": "env"}
    assert ("shutdown_environments" in calls) == has_shutdown and "generation.shutdown" in calls
    assert ("checkpointer.enter" in calls) == hasattr(CheckpointManager, "__enter__")
