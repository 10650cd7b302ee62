"""The GRPO entry point against NeMo-RL's own driver code, up to where the first GPU worker would start.

Runs where NeMo-RL's ``grpo`` module imports (its container, or a checkout on ``PYTHONPATH`` with its
light driver-side dependencies on Python >= 3.12; see docs/nemo_rl.md "What ran where"); skipped
otherwise. NeMo-RL's real ``MasterConfig`` validates every recipe; then ``run_grpo.main`` runs for every
recipe through NeMo-RL's real worker registry, ``configure_generation_config`` and ``grpo.setup``
(logger, checkpointer, data loaders, its own ``ClippedPGLossFn`` and config checks) until ``setup``
builds the Ray cluster. Stand-ins replace only what needs a Ray cluster, GPUs or the network: ``init_ray``,
the tokenizer download, the dataset download + Ray environments, the per-node venv build, and the cluster.
"""

from __future__ import annotations

import functools
import types
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.nemo_rl
grpo = pytest.importorskip(
    "nemo_rl.algorithms.grpo",
    reason="needs NeMo-RL's driver-side code (its container, or a checkout on PYTHONPATH, Python >= 3.12)",
)

from nemo_occ.core.config import load_config  # noqa: E402
from nemo_occ.nemo_rl import run_grpo  # noqa: E402
from nemo_occ.nemo_rl.recipes import find_nemo_rl_root, load_recipe  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
# The Ray actor class NeMo-RL starts for the policy (defined in nemo_occ/nemo_rl/megatron_worker.py).
WORKER_FQN = "nemo_occ.nemo_rl.megatron_worker.OCCMegatronPolicyWorker"
DEFAULT_FQN = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"


@pytest.fixture(autouse=True)
def _nemo_rl_tree():
    if find_nemo_rl_root() is None:
        pytest.skip("no NeMo-RL source tree for the recipes' nemo_rl: parents (set NEMO_RL_ROOT)")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_as_nemo_rls_master_config(path: Path):
    config = run_grpo.load_and_check(str(path), [])
    master = grpo.MasterConfig(**config)
    assert master.policy["megatron_cfg"]["mtp_num_layers"] == 1
    assert master.policy["nemo_occ"]["regime"] == path.stem.split("-")[1]
    assert master.loss_fn.ratio_clip_max == config["loss_fn"]["ratio_clip_max"]


def test_master_config_rejects_what_nemo_rl_rejects():
    """Not vacuous: the same call refuses a recipe whose GRPO block has the wrong type."""
    config = run_grpo.load_and_check(str(RECIPES[0]), ["grpo.num_prompts_per_step=many"])
    with pytest.raises(Exception, match="num_prompts_per_step"):
        grpo.MasterConfig(**config)


class _ReachedCluster(Exception):
    """Raised by the stand-in cluster: ``grpo.setup`` got as far as allocating GPUs."""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_launch_reaches_the_ray_cluster_with_our_worker_and_loss(path: Path, tmp_path, monkeypatch):
    import nemo_rl.algorithms.utils
    import nemo_rl.data.utils
    import nemo_rl.distributed.virtual_cluster
    import nemo_rl.utils.venvs
    from nemo_rl.distributed import ray_actor_environment_registry as registry
    from nemo_rl.models.policy.lm_policy import Policy

    from nemo_occ.nemo_rl.policy import OCCPolicy

    calls: dict = {}
    monkeypatch.setattr(nemo_rl.distributed.virtual_cluster, "init_ray", lambda: calls.setdefault("ray", 1))
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
    monkeypatch.setattr(nemo_rl.algorithms.utils, "get_tokenizer", lambda cfg: tokenizer)

    def fake_data(tok, data_cfg, env_cfg):
        calls["data"] = (data_cfg["train"]["dataset_name"], sorted(env_cfg))
        return [{"idx": 0}], [{"idx": 0}], {}, {}

    monkeypatch.setattr(nemo_rl.data.utils, "setup_response_data", fake_data)

    def fake_venv(py_executable, venv_name):
        calls["venv"] = (py_executable, venv_name)
        return "/venvs/" + venv_name + "/bin/python"

    monkeypatch.setattr(nemo_rl.utils.venvs, "create_local_venv_on_each_node", fake_venv)
    # Leave NeMo-RL's registry as it was after the test, whatever register_worker wrote.
    monkeypatch.setitem(registry.ACTOR_ENVIRONMENT_REGISTRY, WORKER_FQN, "<unset>")
    real_setup = grpo.setup

    @functools.wraps(real_setup)  # keeps the real signature, which the start-up check reads
    def recording_setup(master, tok, dataset, val_dataset, *args, **kwargs):
        calls["setup"] = (master, tok, kwargs)
        return real_setup(master, tok, dataset, val_dataset, *args, **kwargs)

    monkeypatch.setattr(grpo, "setup", recording_setup)

    def cluster(**kwargs):
        raise _ReachedCluster(kwargs)

    monkeypatch.setattr(grpo, "RayVirtualCluster", cluster)

    argv = [
        "--config",
        str(path),
        f"logger.log_dir={tmp_path / 'logs'}",
        f"checkpointing.checkpoint_dir={tmp_path / 'checkpoints'}",
    ]
    # The warnings the recipe's own nemo_occ block earns (a setting without effect), once validated.
    with warnings.catch_warnings(record=True) as own:
        warnings.simplefilter("always")
        load_config(load_recipe(path, nemo_rl_root=find_nemo_rl_root()).config["nemo_occ"], key=None)
    with warnings.catch_warnings(record=True) as launch, pytest.raises(_ReachedCluster) as reached:
        warnings.simplefilter("always")
        run_grpo.main(argv)
    ours = {str(w.message) for w in launch if str(w.message).startswith("nemo_occ.")}
    assert ours <= {str(w.message) for w in own}, "warned about settings the recipe does not make"

    master, tok, kwargs = calls["setup"]
    assert calls["ray"] == 1 and tok is tokenizer
    assert calls["data"][0] == master.data["train"]["dataset_name"]
    factory = kwargs["policy_factory"]
    assert isinstance(factory, functools.partial) and factory.func is OCCPolicy
    assert issubclass(OCCPolicy, Policy)  # NeMo-RL's Policy, carrying the MTP heads' old log-probs
    assert factory.keywords == {"worker_extension_cls_fqn": WORKER_FQN}
    # NeMo-RL's own lookup when it starts the worker: our FQN runs in its Megatron worker's interpreter.
    default_executable = registry.ACTOR_ENVIRONMENT_REGISTRY[DEFAULT_FQN]
    if default_executable.startswith("uv"):  # the container: the venv built for NeMo-RL's own worker
        assert calls["venv"] == (default_executable, DEFAULT_FQN)
        expected = f"/venvs/{DEFAULT_FQN}/bin/python"
    else:
        expected = default_executable
    assert registry.get_actor_python_env(WORKER_FQN) == expected
    # The worker gets the recipe's nemo_occ block; generation was configured from the tokenizer.
    assert master.policy["nemo_occ"]["regime"] == path.stem.split("-")[1]
    assert master.policy["generation"]["_pad_token_id"] == 0
    assert (
        reached.value.args[0]["bundle_ct_per_node_list"]
        == [master.cluster["gpus_per_node"]] * (master.cluster["num_nodes"])
    )
