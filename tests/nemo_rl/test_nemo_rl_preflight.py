"""`nemo-occ train --check` sees what a launch sees: Hydra overrides, YAML errors, the whole config, and
keys NeMo-RL's config types do not know (read from its source with ast).

The override tests run hydra-core's parser (nemo-occ's fallback) and, where NeMo-RL imports, compare it
with NeMo-RL's own ``parse_hydra_overrides``. The key check runs on a small stand-in NeMo-RL tree that
exercises each typing rule, on the real tree where one is found (``NEMO_RL_ROOT``), and, where NeMo-RL
imports (Python >= 3.12), against the declarations read by ``typing``/pydantic at run time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from nemo_occ.cli import main
from nemo_occ.nemo_rl.compat import drop_newer_keys
from nemo_occ.nemo_rl.config_schema import declares, load_nemo_rl_schema, unknown_keys
from nemo_occ.nemo_rl.preflight import preflight
from nemo_occ.nemo_rl.recipes import RecipeError, find_nemo_rl_root, load_recipe

ROOT = Path(__file__).resolve().parents[2]
MIMO = "recipes/dapo-occ-mimo-7b-rl-4n8g-h100-tp2.yaml"
GLM = "recipes/dapo-occ-glm4.5-air-8n8g-h100-tp4pp2ep8-fp8.yaml"

pytest.importorskip("hydra", reason="needs hydra-core (a nemo-occ dependency)")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# -- overrides: Hydra's grammar, as the launch applies it --------------------------------------------
@pytest.fixture
def small(tmp_path):
    return _write(tmp_path / "r.yaml", "a: {b: 1, c: [1, 2]}\nd: x\n")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["a.b=3"], {"a": {"b": 3, "c": [1, 2]}, "d": "x"}),
        (["+a.e=null"], {"a": {"b": 1, "c": [1, 2], "e": None}, "d": "x"}),
        (["++a.b=4", "++f.g=[3,4]"], {"a": {"b": 4, "c": [1, 2]}, "d": "x", "f": {"g": [3, 4]}}),
        (["~a.c", "d='y z'"], {"a": {"b": 1}, "d": "y z"}),
    ],
)
def test_overrides_follow_hydra_semantics(small, overrides, expected):
    assert load_recipe(small, overrides, nemo_rl_root=False).config == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("a.x=1", "override 'a.x=1': Could not override 'a.x'"),  # a key=v typo is an error at launch
        ("+a.b=2", "An item is already at 'a.b'"),
        ("a.b", "has no '=': write a.b=<value> to set it"),
        ("--chek", "unknown option '--chek'"),
        ("a.b=[1,", "override 'a.b=[1,'"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(small, override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(small, ["d=kept", override], nemo_rl_root=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_failing_override_leaves_the_loaded_config_alone(small):
    from omegaconf import OmegaConf

    from nemo_occ.nemo_rl.overrides import OverrideError, apply_overrides

    cfg = OmegaConf.create({"a": {"b": 1}})
    with pytest.raises(OverrideError):
        apply_overrides(cfg, ["a.b=2", "a.nope=3"])
    assert OmegaConf.to_container(cfg) == {"a": {"b": 1}}


def test_without_nemo_rl_base_a_new_plain_key_is_added_and_noted(tmp_path):
    child = _write(tmp_path / "c.yaml", "defaults: nemo_rl:examples/configs/grpo_math_1B.yaml\na: 1\n")
    recipe = load_recipe(child, ["grpo.seed=3"], nemo_rl_root=False)
    assert recipe.config == {"a": 1, "grpo": {"seed": 3}}
    assert recipe.notes and "grpo.seed=3" in recipe.notes[0]


@pytest.mark.nemo_rl
def test_our_fallback_parser_matches_nemo_rls(small):
    config_mod = pytest.importorskip("nemo_rl.utils.config", reason="needs NeMo-RL importable")
    from hydra._internal.config_loader_impl import ConfigLoaderImpl  # noqa: F401  (fallback present)
    from omegaconf import OmegaConf

    overrides = ["a.b=3", "+a.e=null", "++f.g=[3,4]", "~a.c", "d='y z'", "++a.h=${a.b}"]
    theirs = OmegaConf.to_container(config_mod.parse_hydra_overrides(OmegaConf.load(small), overrides))
    ours = load_recipe(small, overrides, nemo_rl_root=False, resolve=False).config
    assert ours == theirs


# -- YAML errors and --print-config ------------------------------------------------------------------
def test_yaml_syntax_error_names_file_and_line_without_traceback(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "defaults: x.yaml\npolicy:\n  model_name: a\n   oops: [1\n")
    with pytest.raises(RecipeError, match=rf"^{tmp_path}/bad.yaml:4:\d+: YAML syntax error"):
        load_recipe(bad, nemo_rl_root=False)
    result = subprocess.run(
        [sys.executable, "-m", "nemo_occ.cli", "train", "--config", str(bad), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and f"{bad}:4:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_print_config_prints_the_whole_resolved_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", MIMO, "--check", "--print-config", "grpo.max_num_steps=7"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[: out.index("recipe OK")])
    root = find_nemo_rl_root()
    expected = load_recipe(ROOT / MIMO, ["grpo.max_num_steps=7"], nemo_rl_root=root or False).config
    schema = load_nemo_rl_schema(root) if root is not None else None
    if schema is not None:  # what the launch hands NeMo-RL: without the keys this NeMo-RL lacks
        drop_newer_keys(expected, lambda dotted: declares(schema.master, dotted))
    assert printed == expected
    assert printed["grpo"]["max_num_steps"] == 7 and {"policy", "cluster", "nemo_occ", "loss_fn"} <= set(
        printed
    )


# -- keys NeMo-RL's types do not know: the rules, on a stand-in tree -----------------------------------
@pytest.fixture
def fake_tree(tmp_path):
    """A tiny ``nemo_rl`` package with one instance of each typing construct NeMo-RL's configs use."""
    tree = tmp_path / "fake-nemo-rl"
    _write(tree / "nemo_rl" / "__init__.py", "")
    _write(
        tree / "nemo_rl" / "models" / "generation.py",
        """\
        from typing import Any, NotRequired, TypedDict

        class GenerationConfig(TypedDict):
            backend: str
            max_new_tokens: NotRequired[int]

        class VllmSpecificArgs(TypedDict):
            tensor_parallel_size: int

        class VllmConfig(GenerationConfig):
            vllm_cfg: VllmSpecificArgs
            vllm_kwargs: NotRequired[dict[str, Any]]

        def read(cfg):
            return cfg["vllm_cfg"].get("enable_prefix_caching")
        """,
    )
    _write(
        tree / "nemo_rl" / "algorithms" / "grpo.py",
        """\
        from typing import Literal, Optional, TypedDict, Union
        from pydantic import BaseModel, Field
        from ..models.generation import GenerationConfig

        class On(TypedDict):
            enabled: Literal[True]
            size: int

        class Off(TypedDict):
            enabled: Literal[False]

        class Sched(TypedDict):
            name: str

        class PolicyConfig(TypedDict):
            generation: "GenerationConfig"
            feature: On | Off
            scheduler: Optional[list[Sched]]
            per_task: dict[str, Sched]

        class GRPOConfig(BaseModel, extra="allow"):
            max_num_steps: int
            seed_value: int = Field(default=0, alias="seed")

        class MasterConfig(BaseModel, extra="allow"):
            policy: PolicyConfig
            grpo: GRPOConfig
            env: dict
        """,
    )
    return tree


def test_the_key_walk_follows_each_typing_rule(fake_tree):
    schema = load_nemo_rl_schema(fake_tree)
    config = {
        "grpo": {"max_num_steps": 1, "seed": 2, "max_num_step": 3},  # alias ok; typo reported
        "env": {"anything": {"goes": 1}},  # bare dict: open
        "policy": {
            "generation": {  # declared GenerationConfig; VllmConfig's keys come from the subclass
                "backend": "vllm",
                "vllm_cfg": {
                    "tensor_parallel_size": 1,
                    "tensor_paralel_size": 2,
                    "enable_prefix_caching": False,
                },
                "vllm_kwargs": {"free": 1},
                "temprature": 1.0,
            },
            "feature": {"enabled": True, "size": 2, "sise": 3},  # union of On | Off
            "scheduler": [{"name": "a"}, {"nme": "b"}],  # list items checked
            "per_task": {"math": {"name": "x", "extra": 1}},  # dict[str, X] values checked
        },
        "nemo_occ": {"regime": "occ"},
    }
    found = unknown_keys(config, schema.master, ignore={"nemo_occ"}, read_keys=schema.read_keys)
    assert [u.path for u in found] == [
        "grpo.max_num_step",
        "policy.generation.vllm_cfg.tensor_paralel_size",
        "policy.generation.temprature",
        "policy.feature.sise",
        "policy.scheduler[1].nme",
        "policy.per_task.math.extra",
    ]
    assert found[0].suggestions[0] == "grpo.max_num_steps"
    assert "did you mean policy.generation.vllm_cfg.tensor_parallel_size" in str(found[1])


def test_check_warns_about_a_typo_in_a_recipe_file_and_strict_fails(fake_tree, tmp_path, monkeypatch, capsys):
    _write(fake_tree / "examples" / "configs" / "grpo_math_1B.yaml", "grpo:\n  max_num_steps: 1\n")
    recipe = _write(
        tmp_path / "typo.yaml",
        f"""\
        defaults: {ROOT / MIMO}
        grpo:
          max_num_step: 3
        """,
    )
    monkeypatch.setenv("NEMO_RL_ROOT", str(fake_tree))
    assert main(["train", "--config", str(recipe), "--check"]) == 0
    assert "do not know grpo.max_num_step (did you mean grpo.max_num_steps" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "--check", "--strict"]) == 2
    assert "key(s) NeMo-RL does not know" in capsys.readouterr().err


def _add_grpo_field(tree: Path, line: str) -> None:
    grpo = tree / "nemo_rl" / "algorithms" / "grpo.py"
    grpo.write_text(
        grpo.read_text().replace("    max_num_steps: int\n", f"    max_num_steps: int\n    {line}\n", 1)
    )


def test_a_key_this_nemo_rl_declares_only_later_is_left_out_with_a_note(
    fake_tree, tmp_path, monkeypatch, capsys
):
    """grpo.val_num_generations_per_prompt came after v0.7.0 (NeMo-RL #3401): checked per version."""
    _write(fake_tree / "examples" / "configs" / "grpo_math_1B.yaml", "grpo:\n  max_num_steps: 1\n")
    _write(
        fake_tree / "nemo_rl" / "package_info.py",
        'MAJOR = 0\nMINOR = 7\nPATCH = 0\nPRE_RELEASE = ""\n',
    )
    recipe = _write(tmp_path / "child.yaml", f"defaults: {ROOT / MIMO}\n")
    monkeypatch.setenv("NEMO_RL_ROOT", str(fake_tree))
    # (the stand-in tree declares few keys: the recipe's others are reported unknown, so no --strict)
    assert main(["train", "--config", str(recipe), "--check"]) == 0
    out, err = capsys.readouterr()
    assert f"checked against NeMo-RL 0.7.0 at {fake_tree}" in out
    assert "note: grpo.val_num_generations_per_prompt=32 left out" in err and "#3401" in err
    assert "avg@1" in err and "do not know grpo.val_num_generations_per_prompt" not in err
    assert "val_num_generations_per_prompt" not in preflight(recipe).recipe.config["grpo"]

    _add_grpo_field(fake_tree, "val_num_generations_per_prompt: int = 1")  # a NeMo-RL that has #3401
    assert main(["train", "--config", str(recipe), "--check"]) == 0
    err = capsys.readouterr().err
    assert "left out" not in err and "do not know grpo.val_num_generations_per_prompt" not in err
    assert preflight(recipe).recipe.config["grpo"]["val_num_generations_per_prompt"] == 32


def test_strict_fails_when_it_cannot_check_nemo_rls_keys(monkeypatch, capsys):
    """Without a NeMo-RL tree, --strict cannot do what it promises: one line saying what to set."""
    import nemo_occ.nemo_rl.preflight as preflight_module

    monkeypatch.delenv("NEMO_RL_ROOT", raising=False)
    monkeypatch.setattr(preflight_module, "find_nemo_rl_root", lambda: None)
    monkeypatch.chdir(ROOT)
    smoke = "recipes/grpo-occ-mimo-7b-rl-1n8g-h100-tp2-smoke.yaml"
    assert main(["train", "--config", smoke, "--check", "--strict", "grpo.max_num_step=1"]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "set NEMO_RL_ROOT" in errors[0]
    assert "not checked against any NeMo-RL" in out
    assert "recipe OK" not in out  # strict never says OK about what it did not check
    assert main(["train", "--config", smoke, "--check"]) == 0  # without --strict: a report with a note
    out, err = capsys.readouterr()
    assert "note: not checked (no NeMo-RL source tree" in err and out.startswith("recipe OK: ")


# -- the real NeMo-RL tree -------------------------------------------------------------------------------
def _real_schema():
    root = find_nemo_rl_root()
    if root is None:
        pytest.skip("no NeMo-RL source tree (set NEMO_RL_ROOT or run in the NeMo-RL container)")
    schema = load_nemo_rl_schema(root)
    assert schema is not None, f"{root} has no nemo_rl/algorithms/grpo.py::MasterConfig"
    return root, schema


@pytest.mark.nemo_rl
@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_uses_only_keys_nemo_rl_knows(path, monkeypatch):
    """Per version: a key this NeMo-RL declares stays and must be known; one it declares only later
    (compat.RECIPE_KEYS_AFTER_RELEASE) is left out with a note, as the launch leaves it out."""
    root, schema = _real_schema()
    monkeypatch.setenv("NEMO_RL_ROOT", str(root))
    result = preflight(path)
    assert result.keys_checked and result.unknown == []
    config = load_recipe(path, nemo_rl_root=root).config
    val_key = "grpo.val_num_generations_per_prompt"
    if declares(schema.master, val_key):  # NeMo-RL main (#3401)
        assert result.newer_keys == [] and "val_num_generations_per_prompt" in result.recipe.config["grpo"]
    else:  # v0.7.0
        value = config["grpo"]["val_num_generations_per_prompt"]
        assert [n.split(" left out")[0] for n in result.newer_keys] == [f"{val_key}={value}"]
        assert "val_num_generations_per_prompt" not in result.recipe.config["grpo"]


@pytest.mark.nemo_rl
@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("++grpo.max_num_step=3", "grpo.max_num_steps"),
        (
            "++policy.generation.vllm_cfg.tensor_paralel_size=2",
            "policy.generation.vllm_cfg.tensor_parallel_size",
        ),
        ("++policy.megatron_cfg.optimizer.weight_decai=0.0", "policy.megatron_cfg.optimizer.weight_decay"),
        ("++loss_fn.ratio_clip_maxx=0.3", "loss_fn.ratio_clip_max"),
        ("++cluster.num_node=2", "cluster.num_nodes"),
    ],
)
def test_a_typo_anywhere_in_a_real_recipe_is_reported(override, suggestion):
    root, schema = _real_schema()
    config = load_recipe(ROOT / GLM, [override], nemo_rl_root=root).config
    # as preflight does: keys this NeMo-RL declares only after a release (v0.7.0) are checked per version
    drop_newer_keys(config, lambda dotted: declares(schema.master, dotted))
    found = unknown_keys(config, schema.master, ignore={"nemo_occ"}, read_keys=schema.read_keys)
    assert [u.path for u in found] == [override[2:].split("=")[0]]
    assert suggestion in found[0].suggestions


def _declared(tp, seen: set) -> dict | None:
    """Field name -> type of a TypedDict / pydantic model, read at run time (the oracle); None otherwise."""
    if isinstance(tp, type) and typing.is_typeddict(tp):
        return typing.get_type_hints(tp)
    fields = getattr(tp, "model_fields", None) if isinstance(tp, type) else None
    if isinstance(fields, dict):
        return {(f.alias or name): f.annotation for name, f in fields.items()}
    return None


def _alternatives(tp) -> list:
    """The classes a declared type can hold a mapping of, looking through unions, lists and dicts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [a for arg in typing.get_args(tp) for a in _alternatives(arg)]
    if origin in (list, tuple, set, dict):
        args = typing.get_args(tp)
        return _alternatives(args[-1]) if args else []
    if origin is not None and typing.get_args(tp):  # NotRequired[...], Annotated[...], Literal stays out
        if origin in (typing.Literal,):
            return []
        return _alternatives(typing.get_args(tp)[0])
    return [tp] if _declared(tp, set()) is not None else []


@pytest.mark.nemo_rl
def test_the_ast_reading_knows_every_key_the_imported_types_declare():
    """Oracle: walk MasterConfig as Python sees it; every declared key must be known to the ast schema."""
    if sys.version_info < (3, 12):
        pytest.skip("NeMo-RL's MasterConfig can only be built on Python >= 3.12")
    grpo = pytest.importorskip("nemo_rl.algorithms.grpo", reason="needs NeMo-RL importable")
    _, schema = _real_schema()
    checked = 0
    stack = [(grpo.MasterConfig, schema.master, "")]
    seen = set()
    while stack:
        tp, ast_schema, path = stack.pop()
        if (tp, path.count(".")) in seen or path.count(".") > 6:
            continue
        seen.add((tp, path.count(".")))
        for name, sub in _declared(tp, seen).items():
            if ast_schema.open:
                continue
            fields = ast_schema.fields or {}
            assert name in fields or ast_schema.values is not None, f"{path}{name}: declared, unknown to ast"
            checked += 1
            sub_schema = fields.get(name) or ast_schema.values
            for alt in _alternatives(sub):
                nested = sub_schema.items if sub_schema.items is not None else sub_schema
                nested = nested.values if nested.values is not None and nested.fields is None else nested
                stack.append((alt, nested, f"{path}{name}."))
    assert checked > 300, checked
