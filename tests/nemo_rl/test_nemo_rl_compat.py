"""The seams between NeMo-RL v0.7.0 and main (``nemo_occ.nemo_rl.compat``).

Each seam is tried twice against stand-in ``nemo_rl`` modules, once shaped like v0.7.0 and once like
main, so both branches run on any machine; the tests marked ``nemo_rl`` then check the detection on the
NeMo-RL that is installed (scripts/upstream_check.sh runs them against both).
"""

from __future__ import annotations

import sys
import types

import pytest

from nemo_occ.nemo_rl import compat
from nemo_occ.nemo_rl.compat import UnsupportedNemoRL


def _install(monkeypatch, name: str, **attrs) -> types.ModuleType:
    """Put a stand-in module (and its missing parent packages) into sys.modules for this test."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if not isinstance(sys.modules.get(parent), types.ModuleType) or not getattr(
            sys.modules[parent], "_stand_in", False
        ):
            package = types.ModuleType(parent)
            package.__path__ = []
            package._stand_in = True
            monkeypatch.setitem(sys.modules, parent, package)
    module = types.ModuleType(name)
    module._stand_in = True
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


class _ReleaseLoss:  # v0.7.0: ClippedPGLossFn(cfg)
    def __init__(self, cfg):
        self.cfg = cfg


class _MainLoss:  # main: ClippedPGLossFn(cfg, use_fused_linear_logprobs=False) (#2833)
    def __init__(self, cfg, use_fused_linear_logprobs: bool = False):
        self.cfg = cfg
        self.use_fused_linear_logprobs = use_fused_linear_logprobs


def test_the_fused_keyword_goes_only_to_a_nemo_rl_that_takes_it(monkeypatch):
    _install(monkeypatch, "nemo_rl.algorithms.loss", ClippedPGLossFn=_MainLoss)
    assert compat.clipped_pg_loss("cfg", use_fused_linear_logprobs=True).use_fused_linear_logprobs is True
    _install(monkeypatch, "nemo_rl.algorithms.loss", ClippedPGLossFn=_ReleaseLoss)
    assert compat.clipped_pg_loss("cfg").cfg == "cfg"  # no TypeError on v0.7.0
    with pytest.raises(UnsupportedNemoRL, match="use_fused_linear_logprobs needs NeMo-RL main after v0.7.0"):
        compat.clipped_pg_loss("cfg", use_fused_linear_logprobs=True)


def test_environments_are_shut_down_where_nemo_rl_has_the_call(monkeypatch):
    seen = []
    _install(monkeypatch, "nemo_rl.algorithms.grpo", shutdown_environments=lambda a, b: seen.append((a, b)))
    assert compat.shutdown_environments({"math": 1}, None) is True and seen == [({"math": 1}, None)]
    _install(monkeypatch, "nemo_rl.algorithms.grpo")  # v0.7.0: no shutdown_environments (#3391)
    assert compat.shutdown_environments({"math": 1}, None) is False


def test_the_checkpointer_is_entered_only_where_it_is_a_context_manager():
    class Flushing:  # main's CheckpointManager (#2828)
        def __init__(self):
            self.exited = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.exited = True
            return False

    flushing = Flushing()
    with compat.checkpointer_context(flushing) as entered:
        assert entered is flushing
    assert flushing.exited
    plain = object()  # v0.7.0's CheckpointManager
    with compat.checkpointer_context(plain) as entered:
        assert entered is plain


def test_metric_normalizer_is_nemo_rls_where_it_exists(monkeypatch):
    import enum

    class Upstream(enum.Enum):
        TOKENS = "tokens"
        SEQUENCES = "sequences"
        NONE = "none"

    _install(monkeypatch, "nemo_rl.algorithms.loss.interfaces", MetricNormalizer=Upstream)
    assert compat.metric_normalizer() is Upstream
    _install(monkeypatch, "nemo_rl.algorithms.loss.interfaces")  # v0.7.0: no MetricNormalizer (#2683)
    release = compat.metric_normalizer()
    assert {m.name: m.value for m in release} == {m.name: m.value for m in Upstream}


def test_a_newer_key_is_dropped_with_a_note_only_where_nemo_rl_lacks_it():
    config = {"grpo": {"val_num_generations_per_prompt": 32, "max_num_steps": 3}}
    assert compat.drop_newer_keys(config, lambda dotted: True) == []
    assert config["grpo"]["val_num_generations_per_prompt"] == 32
    (note,) = compat.drop_newer_keys(config, lambda dotted: False)
    assert config["grpo"] == {"max_num_steps": 3}
    assert note.startswith("grpo.val_num_generations_per_prompt=32 left out") and "#3401" in note
    assert "avg@1" in note
    (note,) = compat.drop_newer_keys({"grpo": {"val_num_generations_per_prompt": 1}}, lambda dotted: False)
    assert "the same as its default" in note
    assert compat.drop_newer_keys({"grpo": {}}, lambda dotted: False) == []


def _stand_in_nemo_rl(monkeypatch, version: str, *, policy_factory=True, trains_mtp=True):
    nemo_rl = _install(monkeypatch, "nemo_rl", __version__=version)
    nemo_rl.__path__ = []

    def setup(master_config, tokenizer, dataset, val_dataset, policy_factory=None): ...

    def setup_old(master_config, tokenizer, dataset, val_dataset): ...

    def configure(config, tokenizer, is_eval=False, has_refit_draft_weights=False, trains_mtp=False): ...

    def configure_old(config, tokenizer, is_eval=False, has_refit_draft_weights=False): ...

    _install(
        monkeypatch, "nemo_rl.algorithms.grpo", setup=setup if policy_factory else setup_old, grpo_train=None
    )
    _install(
        monkeypatch,
        "nemo_rl.models.generation",
        configure_generation_config=configure if trains_mtp else configure_old,
    )
    _install(
        monkeypatch,
        "nemo_rl.distributed.ray_actor_environment_registry",
        ACTOR_ENVIRONMENT_REGISTRY={},
        MCORE_EXECUTABLE="python",
    )
    monkeypatch.setitem(sys.modules, "nemo_rl", nemo_rl)


@pytest.mark.parametrize("version", ["0.7.0", "0.6.0+7ea279ab"])  # the release; main calls itself 0.6.0
def test_the_supported_range_starts(monkeypatch, version):
    monkeypatch.delenv(compat.UNTESTED_ENV, raising=False)
    _stand_in_nemo_rl(monkeypatch, version)
    assert compat.require_supported_nemo_rl() == version


@pytest.mark.parametrize(
    "version, kwargs, message",
    [
        ("0.5.0", {}, "needs NeMo-RL v0.7.0 up to main 7ea279ab; this NeMo-RL is 0.5.0"),
        ("0.6.0", {"policy_factory": False}, r"lacks grpo.setup\(policy_factory=...\)"),  # the 0.6.0 release
        ("0.6.0", {"trains_mtp": False}, r"lacks configure_generation_config\(trains_mtp=...\)"),
        ("0.8.0", {}, "tested with NeMo-RL v0.7.0 up to main 7ea279ab; this NeMo-RL is 0.8.0"),
    ],
)
def test_outside_the_range_it_stops_with_one_line_naming_the_version(monkeypatch, version, kwargs, message):
    monkeypatch.delenv(compat.UNTESTED_ENV, raising=False)
    _stand_in_nemo_rl(monkeypatch, version, **kwargs)
    with pytest.raises(UnsupportedNemoRL, match=message) as err:
        compat.require_supported_nemo_rl()
    assert "\n" not in str(err.value) and "v0.7.0" in str(err.value)


def test_a_newer_nemo_rl_may_be_tried_on_request_but_still_needs_the_seams(monkeypatch):
    monkeypatch.setenv(compat.UNTESTED_ENV, "1")
    _stand_in_nemo_rl(monkeypatch, "0.8.0")
    assert compat.require_supported_nemo_rl() == "0.8.0"
    _stand_in_nemo_rl(monkeypatch, "0.8.0", trains_mtp=False)
    with pytest.raises(UnsupportedNemoRL, match="trains_mtp"):
        compat.require_supported_nemo_rl()


def test_the_launch_stops_before_ray_on_an_unsupported_nemo_rl(monkeypatch, capsys, tmp_path):
    """run_grpo.main checks NeMo-RL before loading the recipe or starting anything."""
    from nemo_occ.nemo_rl import run_grpo

    monkeypatch.delenv(compat.UNTESTED_ENV, raising=False)
    _stand_in_nemo_rl(monkeypatch, "0.6.0", policy_factory=False)
    reached = []
    monkeypatch.setattr(run_grpo, "load_and_check", lambda *a: reached.append("load"))
    monkeypatch.setattr(run_grpo, "train", lambda *a: reached.append("train"))
    assert run_grpo.main(["--config", str(tmp_path / "any.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: nemo-occ needs NeMo-RL v0.7.0") and reached == []


def test_describe_names_version_and_commit(tmp_path):
    (tmp_path / "nemo_rl").mkdir()
    (tmp_path / "nemo_rl" / "package_info.py").write_text(
        'MAJOR = 0\nMINOR = 7\nPATCH = 0\nPRE_RELEASE = "rc1"\n'
    )
    assert compat.describe_nemo_rl_tree(tmp_path).startswith("NeMo-RL 0.7.0rc1")


# -- the installed NeMo-RL ----------------------------------------------------------------------------
@pytest.mark.nemo_rl
def test_the_installed_nemo_rl_is_supported_and_both_detections_agree():
    """The launch (imported types) and --check (source tree) decide a newer key the same way."""
    pytest.importorskip("nemo_rl.algorithms.grpo", reason="needs NeMo-RL's driver side (Python >= 3.12)")
    from nemo_occ.nemo_rl.config_schema import declares, load_nemo_rl_schema
    from nemo_occ.nemo_rl.recipes import find_nemo_rl_root

    compat.require_supported_nemo_rl()
    root = find_nemo_rl_root()
    if root is None:
        pytest.skip("no NeMo-RL source tree (set NEMO_RL_ROOT)")
    schema = load_nemo_rl_schema(root)
    for key in compat.RECIPE_KEYS_AFTER_RELEASE:
        assert compat.installed_declares(key.path) == declares(schema.master, key.path), key.path
    assert compat.installed_declares("grpo.max_num_steps") and not compat.installed_declares(
        "grpo.max_num_step"
    )
    assert compat.describe_nemo_rl_tree(root).startswith("NeMo-RL 0.")
