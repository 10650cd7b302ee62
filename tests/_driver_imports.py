"""Run nemo-occ's NeMo-RL driver side in an interpreter that refuses every heavy import; print a JSON report.

    python -m tests._driver_imports stand-in|real <recipe>     (from the repository root)

Run by ``tests/nemo_rl/test_nemo_rl_driver.py`` in a fresh process. A meta-path finder refuses (and records) every
import of megatron (and so Megatron-Bridge), Transformer Engine and NeMo-RL's policy-worker modules: the
packages NeMo-RL's driver venv does not have. A refused import that some code swallows is still recorded.

Then it does what the driver does: ``nemo-occ train --check``, import the entry point, register the
worker with NeMo-RL's actor registry, build the loss and pickle it (Ray sends it to the workers).
``stand-in``: ``nemo_rl`` is the test's stand-in package (only the registry module); ``real``: NeMo-RL's
own code, whose ``grpo``, policy and generation modules ``run_grpo.train`` imports are imported too.
"""

from __future__ import annotations

import importlib.abc
import io
import json
import pickle
import sys

HEAVY = ("megatron", "transformer_engine", "nemo_rl.models.policy.workers")
refused: list[str] = []


def _is_heavy(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in HEAVY)


class _RefuseHeavy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _is_heavy(name):
            refused.append(name)
            raise ImportError(f"{name} is not installed in NeMo-RL's driver venv (refused by the test)")
        return None


class _RecordingUnpickler(pickle.Unpickler):
    """Unpickles like ``pickle.loads`` and records the module of every class it looks up."""

    modules: set[str] = set()

    def find_class(self, module, name):
        self.modules.add(module)
        return super().find_class(module, name)


def main(mode: str, recipe: str) -> dict:
    sys.meta_path.insert(0, _RefuseHeavy())

    from nemo_occ.cli import main as cli_main

    check_rc = cli_main(["train", "--config", recipe, "--check"])

    from nemo_occ.core.config import ConfigError, NemoOCCConfig
    from nemo_occ.nemo_rl import run_grpo
    from nemo_occ.nemo_rl.loss import OCCLossFn, build_loss_fn
    from nemo_occ.nemo_rl.loss_config import policy_loss_config

    fqn = run_grpo.register_worker()
    from nemo_rl.distributed.ray_actor_environment_registry import ACTOR_ENVIRONMENT_REGISTRY

    default_fqn = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"
    occ = NemoOCCConfig(regime="occ")
    dapo = {"ratio_clip_min": 0.2, "ratio_clip_max": 0.28, "reference_policy_kl_penalty": 0.0}
    if mode == "real":
        loss = build_loss_fn(dapo, occ)
        try:  # every import of the training path runs before the (invalid) nemo_occ block is read
            run_grpo.train({"policy": {"nemo_occ": {"regime": "not-a-regime"}}}, recipe)
            train_imports = "train() did not reject the invalid block"
        except ConfigError:
            train_imports = "ok"
    else:
        from types import SimpleNamespace

        loss = OCCLossFn(
            SimpleNamespace(loss_type="token", input_type="logprob"), occ, policy_loss_config(dapo)
        )
        train_imports = "not run"
    blob = pickle.dumps(loss)
    unpickler = _RecordingUnpickler(io.BytesIO(blob))
    copy = unpickler.load()
    return {
        "check_rc": check_rc,
        "fqn": fqn,
        "executable": ACTOR_ENVIRONMENT_REGISTRY.get(fqn),
        "default_executable": ACTOR_ENVIRONMENT_REGISTRY.get(default_fqn),
        "pickled_modules": sorted(unpickler.modules),
        "unpickled_regime": copy.nemo_occ_cfg.regime,
        "train_imports": train_imports,
        "refused": refused,
        "heavy_loaded": sorted(m for m in sys.modules if _is_heavy(m)),
    }


if __name__ == "__main__":
    report = main(sys.argv[1], sys.argv[2])
    print("REPORT " + json.dumps(report))
