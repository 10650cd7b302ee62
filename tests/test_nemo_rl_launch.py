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

ROOT = Path(__file__).resolve().parents[1]
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
