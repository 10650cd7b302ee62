"""Typed configuration: paper defaults, range checks, cross-field checks and YAML loading."""

from __future__ import annotations

import typing
import warnings

import pytest
from pydantic import ValidationError

from nemo_occ.core.config import (
    REGIMES,
    ConfigError,
    NemoOCCConfig,
    OCCConfig,
    PolicyLossConfig,
    load_config,
    parse_block,
)
from nemo_occ.core.regimes import get_regime


def test_defaults_are_the_papers():
    """The OCC paper's defaults (arXiv 2605.28184): λ+ = 1.0, ε = 1e-8, signed λ (OCC-NoClip), fixed λ = 0.1, DAPO clip 0.2/0.28."""
    occ = OCCConfig()
    assert (occ.lambda_plus, occ.eps, occ.estimator, occ.lambda_max) == (1.0, 1e-8, "signed", None)
    cfg = NemoOCCConfig()
    assert (cfg.regime, cfg.coef, cfg.num_depths) == ("occ", 0.1, 1)
    pol = PolicyLossConfig()
    assert (pol.ratio_clip_low, pol.ratio_clip_high, pol.ratio_clip_c) == (0.2, 0.28, None)


@pytest.mark.parametrize(
    "model, data, key",
    [
        (OCCConfig, {"lambda_plus": 0.0}, "lambda_plus"),
        (OCCConfig, {"lambda_plus": -1.0}, "lambda_plus"),
        (OCCConfig, {"eps": 0.0}, "eps"),
        (OCCConfig, {"eps": -1e-8}, "eps"),
        (OCCConfig, {"lambda_max": 0.0}, "lambda_max"),
        (OCCConfig, {"estimator": "abs"}, "estimator"),
        (OCCConfig, {"timing": "eager"}, "timing"),
        (PolicyLossConfig, {"ratio_clip_c": 1.0}, "ratio_clip_c"),
        (PolicyLossConfig, {"ratio_clip_c": 0.5}, "ratio_clip_c"),
        (PolicyLossConfig, {"ratio_clip_low": 1.0}, "ratio_clip_low"),
        (PolicyLossConfig, {"ratio_clip_low": -0.1}, "ratio_clip_low"),
        (PolicyLossConfig, {"ratio_clip_high": -0.1}, "ratio_clip_high"),
        (PolicyLossConfig, {"aggregation": "seq_mean_token_sum"}, "aggregation"),
        (NemoOCCConfig, {"regime": "occ2"}, "regime"),
        (NemoOCCConfig, {"num_depths": 0}, "num_depths"),
        (NemoOCCConfig, {"coef": -0.1}, "coef"),
        (NemoOCCConfig, {"old_logprobs": "draft"}, "old_logprobs"),
        (NemoOCCConfig, {"occ": {"eps": 0}}, "occ.eps"),
        (NemoOCCConfig, {"fidelity": {"every": -1}}, "fidelity.every"),
        (NemoOCCConfig, {"fidelity": {"window": 3}}, "fidelity.window"),
        (NemoOCCConfig, {"fidelity": {"min_windows": 1}}, "fidelity.min_windows"),
        (NemoOCCConfig, {"fidelity": {"metric": "adam"}}, "fidelity.metric"),
        (NemoOCCConfig, {"fidelity": {"evry": 10}}, "fidelity.evry"),
    ],
)
def test_out_of_range_values_raise_and_name_the_key(model, data, key):
    with pytest.raises(ValidationError):
        model(**data)
    with pytest.raises(ConfigError, match=rf"blk\.{key}:"):
        parse_block(model, data, "blk")


def test_boundary_values_are_accepted():
    OCCConfig(lambda_plus=1e-12, eps=1e-30, lambda_max=1e-6, initial_lambda=-1.0)
    PolicyLossConfig(ratio_clip_low=0.0, ratio_clip_high=0.0, ratio_clip_c=1.0001)


@pytest.mark.parametrize("model", [OCCConfig, PolicyLossConfig, NemoOCCConfig])
def test_unknown_keys_are_rejected(model):
    with pytest.raises(ValidationError):
        model(lamda_plus=1.0)
    with pytest.raises(ConfigError, match=r"nemo_occ\.lamda_plus: unknown key"):
        parse_block(model, {"lamda_plus": 1.0}, "nemo_occ")


def test_gspo_without_sequence_aggregation_names_the_key_to_set():
    with pytest.raises(ValidationError, match="set aggregation: seq_mean_token_mean"):
        PolicyLossConfig(importance_ratio="sequence")
    with pytest.raises(ConfigError, match="set aggregation: seq_mean_token_mean"):
        parse_block(PolicyLossConfig, {"importance_ratio": "sequence", "aggregation": "token_mean"}, "loss")
    PolicyLossConfig(importance_ratio="sequence", aggregation="seq_mean_token_mean")


def test_assignment_is_validated():
    cfg = OCCConfig()
    with pytest.raises(ValidationError):
        cfg.eps = -1.0


def test_load_config_from_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "policy:\n  lr: 1.0e-6\n"
        "nemo_occ:\n"
        "  regime: occ\n"
        "  num_depths: 2\n"
        "  occ: {lambda_plus: 0.5, eps: 1.0e-6, estimator: clipped, timing: microbatch, lambda_max: 4.0}\n"
    )
    cfg = load_config(path)
    assert cfg.regime == "occ" and cfg.num_depths == 2
    assert (cfg.occ.lambda_plus, cfg.occ.eps, cfg.occ.estimator, cfg.occ.timing, cfg.occ.lambda_max) == (
        0.5,
        1e-6,
        "clipped",
        "microbatch",
        4.0,
    )
    assert load_config(str(path)) == cfg
    assert load_config({"regime": "ce", "coef": 0.2}, key=None).coef == 0.2


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    no_block = tmp_path / "no_block.yaml"
    no_block.write_text("policy: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match="no 'nemo_occ:' block"):
        load_config(no_block)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nemo_occ:\n  occ: {lambda_plus: -1.0, epsilon: 1.0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "nemo_occ.occ.lambda_plus:" in msg and "nemo_occ.occ.epsilon: unknown key" in msg
    not_a_map = tmp_path / "list.yaml"
    not_a_map.write_text("nemo_occ: [1, 2]\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(not_a_map)
    empty = tmp_path / "empty.yaml"
    empty.write_text("nemo_occ:\n")
    assert load_config(empty) == NemoOCCConfig()


def test_derived_properties_follow_the_regime_table():
    names = ("none", "detach", "ce", "policy", "occ")
    trunk = {r: NemoOCCConfig(regime=r).regime_spec.trunk_gradient for r in names}
    assert trunk == {"none": False, "detach": False, "ce": True, "policy": True, "occ": True}
    assert [r for r in names if NemoOCCConfig(regime=r).regime_spec.uses_policy_loss] == ["policy", "occ"]
    assert not NemoOCCConfig(regime="none").regime_spec.has_mtp_term
    assert [r for r in names if NemoOCCConfig(regime=r).regime_spec.uses_coef] == ["detach", "ce", "policy"]


def test_the_config_accepts_exactly_the_regime_table_names():
    """One definition: the config's choices are the table's names (no Literal kept in sync by hand)."""
    assert REGIMES == ("none", "detach", "ce", "policy", "occ")
    for name in REGIMES:
        assert NemoOCCConfig(regime=name).regime_spec is get_regime(name)
    with pytest.raises(ValidationError):
        NemoOCCConfig(regime="occ2")


def test_fidelity_probes_are_off_by_default_and_one_key_turns_them_on():
    assert NemoOCCConfig().fidelity.every == 0
    cfg = load_config({"regime": "occ", "fidelity": {"every": 10}}, key=None)
    assert (cfg.fidelity.every, cfg.fidelity.window, cfg.fidelity.min_windows) == (10, 6, 3)
    assert cfg.fidelity.metric == "euclidean"


def test_fidelity_without_anything_to_compare_warns():
    with pytest.warns(UserWarning, match="no MTP loss"):
        NemoOCCConfig(regime="none", fidelity={"every": 5})
    with pytest.warns(UserWarning, match="monitor_proxies"):
        NemoOCCConfig(regime="policy", monitor_proxies=False, fidelity={"every": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NemoOCCConfig(regime="policy", fidelity={"every": 5})


def test_settings_without_effect_warn():
    with pytest.warns(UserWarning, match="lambda_plus"):
        NemoOCCConfig(regime="occ", coef=0.5)
    with pytest.warns(UserWarning, match="old_logprobs"):
        NemoOCCConfig(regime="ce", old_logprobs="mtp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NemoOCCConfig(regime="policy", coef=0.5)


def _float_fields():
    """(model, field) for every float field of the three blocks, found by annotation, not listed by hand."""
    out = []
    for model in (PolicyLossConfig, OCCConfig, NemoOCCConfig):
        for name, field in model.model_fields.items():
            if float in typing.get_args(field.annotation) or field.annotation is float:
                out.append((model, name))
    return out


def test_the_float_field_list_is_not_empty():
    names = {name for _, name in _float_fields()}
    assert {"lambda_plus", "eps", "lambda_max", "initial_lambda", "coef", "ratio_clip_c"} <= names


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), "inf", "nan"])
@pytest.mark.parametrize("model, key", _float_fields(), ids=lambda x: getattr(x, "__name__", x))
def test_non_finite_floats_are_rejected_and_name_the_key(model, key, bad):
    """inf/nan passed every range check they were not compared against (lambda_plus=inf gave λ = ±inf,
    initial_lambda=nan a NaN loss)."""
    with pytest.raises(ConfigError, match=rf"blk\.{key}: Input should be a finite number"):
        parse_block(model, {key: bad}, "blk")
    cfg = model()
    with pytest.raises(ValidationError, match="finite number"):
        setattr(cfg, key, bad)


def test_non_finite_yaml_values_are_rejected(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("nemo_occ:\n  regime: policy\n  coef: .inf\n  occ: {initial_lambda: .nan}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "nemo_occ.coef: Input should be a finite number" in str(err.value)
    assert "nemo_occ.occ.initial_lambda: Input should be a finite number" in str(err.value)
