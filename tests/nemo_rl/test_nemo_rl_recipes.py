"""Every recipe under recipes/: our block strictly, NeMo-RL's part structurally, the parallel layout
against the model's architecture, the paper's hyperparameters, and the file name / header contract.

NeMo-RL's own base config (``defaults: nemo_rl:...``) is resolved when a NeMo-RL tree is available
(``NEMO_RL_ROOT`` or an importable ``nemo_rl``); without it those parents are skipped and only what our
recipes set is checked (the full resolution runs in the ``nemo_rl``-marked test).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from nemo_occ.nemo_rl.recipes import (
    ModelFacts,
    RecipeError,
    check_recipe,
    find_nemo_rl_root,
    load_recipe,
    parallel_layout,
)

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(p for p in RECIPES_DIR.glob("*.yaml"))
PAPER_RUNS = [p for p in RECIPES if not p.stem.endswith("-smoke")]
SMOKE_RUNS = [p for p in RECIPES if p.stem.endswith("-smoke")]

# Architecture facts from the models' config.json on the Hugging Face Hub.
MODEL_FACTS = {
    "zai-org/GLM-4.5-Air": ModelFacts(
        num_layers=46, num_attention_heads=96, num_query_groups=8, num_experts=128, mtp_layers=1
    ),
    "XiaomiMiMo/MiMo-7B-RL": ModelFacts(
        num_layers=36, num_attention_heads=32, num_query_groups=8, mtp_layers=1
    ),
    # Public model cards: 47 layers with MLA (20 heads, no KV grouping), 64 routed experts, MTP at layer 47.
    "zai-org/GLM-4.7-Flash": ModelFacts(
        num_layers=47, num_attention_heads=20, num_query_groups=20, num_experts=64, mtp_layers=1
    ),
}

NAME = re.compile(
    r"^(?P<algo>dapo|gspo|grpo)-(?P<regime>occ|detach|ce|policy)-(?P<model>glm4\.5-air|glm4\.7-flash|mimo-7b-rl)-"
    r"(?P<nodes>\d+)n(?P<gpus>\d+)g-(?P<gpu>h100|h20)-(?P<par>[a-z0-9]+?)(?P<fp8>-fp8)?(?P<smoke>-smoke)?$"
)


def _load(path: Path, **kw):
    return load_recipe(path, nemo_rl_root=False, **kw)


def test_there_are_recipes_for_both_models_and_all_regimes():
    names = {p.stem for p in RECIPES}
    for algo, model in (("dapo", "glm4.5-air"), ("dapo", "mimo-7b-rl"), ("gspo", "mimo-7b-rl")):
        for regime in ("occ", "detach", "ce", "policy"):
            assert any(n.startswith(f"{algo}-{regime}-{model}-") for n in names), (algo, regime, model)
    assert any("glm4.5-air" in n and "-h20-" in n for n in names)
    assert any("glm4.5-air" in n and "-h100-" in n for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid_for_its_model(path: Path):
    recipe = _load(path)
    cfg = recipe.config
    facts = MODEL_FACTS[cfg["policy"]["model_name"]]
    occ = check_recipe(recipe, facts)
    assert cfg["policy"]["megatron_cfg"]["mtp_num_layers"] == occ.num_depths == facts.mtp_layers
    lay = parallel_layout(cfg)
    # Independent arithmetic on the raw numbers, not through check_recipe.
    assert lay.world == cfg["cluster"]["num_nodes"] * cfg["cluster"]["gpus_per_node"]
    assert lay.world % (lay.tp * lay.pp * lay.cp) == 0
    assert (lay.world // lay.pp) % (lay.ep * lay.etp) == 0
    assert facts.num_attention_heads % lay.tp == 0 and facts.num_query_groups % lay.tp == 0
    assert facts.num_layers % lay.pp == 0
    if facts.num_experts:
        assert facts.num_experts % lay.ep == 0
        assert lay.tp == 1 or cfg["policy"]["megatron_cfg"]["sequence_parallel"] is True  # MoE + TP needs SP
    assert cfg["policy"]["train_global_batch_size"] % lay.dp == 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_file_name_states_the_topology(path: Path):
    m = NAME.match(path.stem)
    assert m, f"{path.name}: expected <algo>-<regime>-<model>-<N>n<G>g-<gpu>-<parallel>[-fp8].yaml"
    cfg = _load(path).config
    mc = cfg["policy"]["megatron_cfg"]
    assert cfg["cluster"]["num_nodes"] == int(m["nodes"]) and cfg["cluster"]["gpus_per_node"] == int(
        m["gpus"]
    )
    sizes = dict(re.findall(r"(tp|pp|cp|ep)(\d+)", m["par"]))
    keys = {
        "tp": "tensor_model_parallel_size",
        "pp": "pipeline_model_parallel_size",
        "cp": "context_parallel_size",
        "ep": "expert_model_parallel_size",
    }
    for short, key in keys.items():
        assert int(mc.get(key) or 1) == int(sizes.get(short, 1)), (path.name, key)
    assert bool((mc.get("fp8_cfg") or {}).get("enabled")) == bool(m["fp8"])
    if m["fp8"]:
        assert mc["fp8_cfg"]["fp8_recipe"] == "blockwise"
    assert cfg["nemo_occ"]["regime"] == m["regime"]
    gspo = cfg["loss_fn"].get("sequence_level_importance_ratios", False)
    assert gspo == (m["algo"] == "gspo")
    if m["algo"] == "dapo":
        assert cfg["loss_fn"]["ratio_clip_max"] == 0.28 and cfg["grpo"]["use_dynamic_sampling"] is True
    elif m["algo"] == "gspo":
        assert cfg["loss_fn"]["token_level_loss"] is False
    else:  # plain GRPO: symmetric clip, no dynamic sampling
        assert cfg["loss_fn"]["ratio_clip_min"] == cfg["loss_fn"]["ratio_clip_max"]
        assert not cfg["grpo"].get("use_dynamic_sampling", False)


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _header_launch(path: Path) -> tuple[int, list[str]]:
    """The node count and overrides of the header's ``slurm/submit.sh <recipe> <nodes> [override ...] --``."""
    m = re.search(
        rf"slurm/submit\.sh recipes/{re.escape(path.name)} (\d+)((?: [^-\s]\S*)*) --", _header(path)
    )
    assert m, f"{path.name}: the header gives no `slurm/submit.sh recipes/{path.name} <nodes> ... --` command"
    return int(m[1]), m[2].split()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_header_gives_the_launch_command(path: Path):
    assert f"python -m nemo_occ.nemo_rl.run_grpo --config recipes/{path.name}" in _header(path)
    nodes, overrides = _header_launch(path)
    assert _load(path, overrides=overrides).config["cluster"]["num_nodes"] == nodes


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_passes_check_with_its_own_overrides(path: Path, capsys, monkeypatch):
    """`nemo-occ train --check --strict` with the header's overrides, as slurm/submit.sh runs it.

    Without a NeMo-RL tree --strict cannot check NeMo-RL's key names and fails (tests/test_preflight.py),
    so there the check runs without it."""
    from nemo_occ.cli import main
    from nemo_occ.nemo_rl.recipes import find_nemo_rl_root

    monkeypatch.chdir(RECIPES_DIR.parent)
    _, overrides = _header_launch(path)
    strict = ["--strict"] if find_nemo_rl_root() is not None else []
    assert main(["train", "--config", f"recipes/{path.name}", "--check", *strict, *overrides]) == 0
    assert "recipe OK" in capsys.readouterr().out


@pytest.mark.parametrize("path", PAPER_RUNS, ids=lambda p: p.stem)
def test_paper_hyperparameters(path: Path):
    cfg = _load(path).config
    assert cfg["grpo"]["max_num_steps"] == 200
    assert cfg["grpo"]["num_prompts_per_step"] == 128 and cfg["grpo"]["num_generations_per_prompt"] == 16
    assert cfg["policy"]["megatron_cfg"]["optimizer"]["lr"] == pytest.approx(1e-6)
    assert cfg["policy"]["generation"]["temperature"] == 1.0
    assert cfg["data"]["train"]["dataset_name"] == "DAPOMath17K"
    assert cfg["grpo"]["val_num_generations_per_prompt"] == 32
    assert cfg["nemo_occ"]["occ"]["lambda_plus"] == 1.0
    if cfg["nemo_occ"]["regime"] in ("detach", "ce", "policy"):
        assert cfg["nemo_occ"]["coef"] == 0.1
    spec = cfg["policy"]["generation"]["vllm_kwargs"]["speculative_config"]
    assert spec["method"] == "mtp" and spec["num_speculative_tokens"] >= 1


@pytest.mark.parametrize("path", SMOKE_RUNS, ids=lambda p: p.stem)
def test_smoke_runs_are_short_one_node_occ_runs_that_refresh_lambda(path: Path):
    cfg = _load(path).config
    assert cfg["cluster"]["num_nodes"] == 1 and cfg["nemo_occ"]["regime"] == "occ"
    assert cfg["grpo"]["max_num_steps"] <= 20
    assert cfg["policy"]["generation"]["max_new_tokens"] <= 2048
    samples = cfg["grpo"]["num_prompts_per_step"] * cfg["grpo"]["num_generations_per_prompt"]
    assert samples // cfg["policy"]["train_global_batch_size"] >= 2  # OCC refreshes lambda from update 2 on
    assert cfg["policy"]["max_total_sequence_length"] >= (
        cfg["data"]["max_input_seq_length"] + cfg["policy"]["generation"]["max_new_tokens"]
    )


def test_there_is_a_one_node_smoke_run_per_model_family():
    families = {_load(p).config["policy"]["model_name"].split("/")[0] for p in SMOKE_RUNS}
    assert families == {"XiaomiMiMo", "zai-org"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_colocated_vllm_pins_its_kv_cache(path: Path):
    """NeMo-RL's colocated vLLM 0.25 recipes pin kv_cache_memory_bytes under vllm_kwargs (wake-up OOM)."""
    kwargs = _load(path).config["policy"]["generation"]["vllm_kwargs"]
    assert isinstance(kwargs.get("kv_cache_memory_bytes"), int) and kwargs["kv_cache_memory_bytes"] >= 2**30


# -- the checker catches what it claims to catch ---------------------------------------------------
GLM = "recipes/dapo-occ-glm4.5-air-8n8g-h100-tp4pp2ep8-fp8.yaml"
MIMO = "recipes/dapo-occ-mimo-7b-rl-4n8g-h100-tp2.yaml"


def _check(path, *overrides, facts=True):
    recipe = _load(RECIPES_DIR.parent / path, overrides=list(overrides))
    return check_recipe(recipe, MODEL_FACTS[recipe.config["policy"]["model_name"]] if facts else None)


@pytest.mark.parametrize(
    "override, match",
    [
        ("policy.megatron_cfg.mtp_num_layers=0", "mtp_num_layers: 1"),
        ("policy.megatron_cfg.mtp_loss_scaling_factor=0.1", "mtp_loss_scaling_factor"),
        ("policy.megatron_cfg.mtp_detach_heads=true", "mtp_detach_heads"),
        ("policy.megatron_cfg.tensor_model_parallel_size=16", "KV heads"),
        ("policy.megatron_cfg.pipeline_model_parallel_size=4", "does not divide the 46 layers"),
        ("policy.megatron_cfg.expert_model_parallel_size=3", "experts"),
        ("policy.megatron_cfg.context_parallel_size=3", "not divisible by TP\\*PP\\*CP"),
        ("policy.generation.vllm_cfg.enable_prefix_caching=true", "prefix_caching"),
        (
            "policy.generation.vllm_kwargs.enable_prefix_caching=false",
            "move it to policy.generation.vllm_cfg",
        ),
        ("loss_fn.token_level_loss=true", "token_level_loss: false"),
        ("policy.megatron_cfg.enabled=false", "megatron_cfg.enabled: true"),
        ("policy.generation.temperature=0.7", "temperature: 1.0"),
        ("policy.generation.top_p=0.7", "top_p: 1.0"),
        ("policy.generation.top_k=20", "top_k: null"),
        ("policy.megatron_cfg.use_fused_linear_logprobs=true", "use_fused_linear_logprobs: true skips"),
        ("grpo.async_grpo.enabled=true", "async_grpo.enabled: false"),
        ("++data_plane.enabled=true", "data_plane.enabled: false"),
        ("~policy.megatron_cfg.env_vars", "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"),
        ("policy.megatron_cfg.env_vars.NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1", "a quoted string"),
        (
            "policy.megatron_cfg.optimizer.use_precision_aware_optimizer=true",
            "use_precision_aware_optimizer: false",
        ),
        (
            "~policy.megatron_cfg.optimizer.use_precision_aware_optimizer",
            "use_precision_aware_optimizer: false",
        ),
    ],
)
def test_checker_rejects_with_a_message_saying_what_to_set(override, match):
    path = "recipes/gspo-occ-mimo-7b-rl-4n8g-h100-tp2.yaml" if "token_level" in override else GLM
    with pytest.raises(RecipeError, match=match):
        _check(path, override)


def test_occ_with_one_update_per_step_is_refused_naming_the_sizes_to_change():
    """One optimizer update per RL step runs at θ = θ_old (δ_RL = 0): OCC would never move λ."""
    samples = 128 * 16  # the paper runs' prompts x samples per step
    with pytest.raises(RecipeError) as err:
        _check(MIMO, f"policy.train_global_batch_size={samples}")
    message = str(err.value)
    assert f"policy.train_global_batch_size={samples} >= grpo.num_prompts_per_step" in message
    assert f"128 x 16 = {samples}" in message and f"at most {samples // 2}" in message
    assert "nemo_occ.occ.allow_one_update_per_step: true" in message
    # the explicit key accepts it; a regime with a fixed coefficient never needed the check
    _check(MIMO, f"policy.train_global_batch_size={samples}", "++nemo_occ.occ.allow_one_update_per_step=true")
    _check("recipes/dapo-policy-mimo-7b-rl-4n8g-h100-tp2.yaml", f"policy.train_global_batch_size={samples}")
    # two updates per step are enough for OCC's second update to see δ_RL != 0
    _check(MIMO, f"policy.train_global_batch_size={samples // 2}")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_make_several_updates_per_step(path: Path):
    cfg = _load(path).config
    samples = cfg["grpo"]["num_prompts_per_step"] * cfg["grpo"]["num_generations_per_prompt"]
    assert samples // cfg["policy"]["train_global_batch_size"] >= 2
    assert not cfg["nemo_occ"].get("occ", {}).get("allow_one_update_per_step", False)


def test_blockwise_fp8_by_default_recipe_needs_the_upstream_settings_too():
    """fp8_recipe left out is NeMo-RL's base default (blockwise); other recipes need neither setting."""
    with pytest.raises(RecipeError, match="NVTE_FP8_BLOCK_SCALING_FP32_SCALES"):
        _check(GLM, "~policy.megatron_cfg.fp8_cfg.fp8_recipe", "~policy.megatron_cfg.env_vars")
    _check(
        GLM,
        "policy.megatron_cfg.fp8_cfg.fp8_recipe=tensorwise",
        "~policy.megatron_cfg.env_vars",
        "policy.megatron_cfg.optimizer.use_precision_aware_optimizer=true",
    )


def test_a_model_without_mtp_layers_is_rejected_for_joint_regimes():
    recipe = _load(RECIPES_DIR.parent / MIMO)
    no_mtp = ModelFacts(num_layers=36, num_attention_heads=32, num_query_groups=8, mtp_layers=0)
    with pytest.raises(RecipeError, match="regime none"):
        check_recipe(recipe, no_mtp)


def test_regime_none_without_drafting_needs_no_mtp_layer():
    _check(
        MIMO,
        "nemo_occ.regime=none",
        "policy.megatron_cfg.mtp_num_layers=0",
        "policy.generation.vllm_kwargs.speculative_config.num_speculative_tokens=0",
    )


def test_old_logprobs_mtp_and_probes_are_accepted_on_nemo_rl():
    """The MTP heads' own old log-probs travel with prev_logprobs (nemo_occ.nemo_rl.policy), so both readings
    of δ_MTP are available on NeMo-RL; the probes are one key."""
    occ = _check(GLM, "nemo_occ.old_logprobs=mtp", "nemo_occ.fidelity.every=10")
    assert occ.old_logprobs == "mtp" and occ.fidelity.every == 10


def test_unknown_key_in_our_block_is_rejected():
    with pytest.raises(RecipeError, match="lambda_pluss"):
        _check(GLM, "nemo_occ.occ.lambda_pluss=2.0")


# -- inheritance follows NeMo-RL's rules ------------------------------------------------------------
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_later_parents_win_child_last_and_override_marker(tmp_path):
    _write(tmp_path, "a.yaml", "x: 1\nblock: {p: 1, q: 1}\n")
    _write(tmp_path, "b.yaml", "x: 2\nblock: {q: 2}\n")
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "sub/c.yaml", "defaults: ../a.yaml\ny: 3\n")  # a parent's parent, relative to it
    child = _write(
        tmp_path,
        "child.yaml",
        """\
        defaults:
          - sub/c.yaml
          - b.yaml
        y: 4
        block:
          _override_: true
          r: 5
        """,
    )
    cfg = load_recipe(child, nemo_rl_root=False).config
    assert cfg == {"x": 2, "y": 4, "block": {"r": 5}}


def test_nemo_rl_parents_are_skipped_and_reported_without_a_tree(tmp_path, monkeypatch):
    from nemo_occ.nemo_rl import recipes

    child = _write(tmp_path, "c.yaml", "defaults: nemo_rl:examples/configs/grpo_math_1B.yaml\nz: 1\n")
    recipe = load_recipe(child, nemo_rl_root=False)
    assert recipe.skipped_parents == ["nemo_rl:examples/configs/grpo_math_1B.yaml"] and recipe.config == {
        "z": 1
    }
    monkeypatch.setattr(recipes, "find_nemo_rl_root", lambda: None)
    with pytest.raises(RecipeError, match="NEMO_RL_ROOT"):
        load_recipe(child, nemo_rl_root=True)
    with pytest.raises(RecipeError, match="NEMO_RL_ROOT"):
        recipes.load_recipe_tree(child)
    with pytest.raises(RecipeError, match="not found"):  # a tree without that file
        load_recipe(child, nemo_rl_root=tmp_path)


def test_inheritance_cycle_is_reported(tmp_path):
    _write(tmp_path, "a.yaml", "defaults: b.yaml\n")
    _write(tmp_path, "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml", nemo_rl_root=False)


# -- against NeMo-RL's real base config and loader -----------------------------------------------------
@pytest.mark.nemo_rl
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_against_nemo_rl_base(path: Path):
    root = find_nemo_rl_root()
    if root is None:
        pytest.skip("no NeMo-RL source tree (set NEMO_RL_ROOT or run in the NeMo-RL container)")
    recipe = load_recipe(path, nemo_rl_root=root)
    assert not recipe.skipped_parents
    cfg = recipe.config
    check_recipe(recipe, MODEL_FACTS[cfg["policy"]["model_name"]])
    # The inherited default (0) is overridden, and NeMo-RL's keys we did not set are present.
    assert cfg["policy"]["megatron_cfg"]["mtp_num_layers"] == 1
    assert "moe_router_dtype" in cfg["policy"]["megatron_cfg"] and "vllm_cfg" in cfg["policy"]["generation"]
    assert isinstance(cfg["policy"]["make_sequence_length_divisible_by"], int)


@pytest.mark.nemo_rl
def test_our_loader_matches_nemo_rls_loader(tmp_path):
    config_mod = pytest.importorskip("nemo_rl.utils.config", reason="needs NeMo-RL importable")
    from omegaconf import OmegaConf

    _write(tmp_path, "a.yaml", "x: 1\nblock: {p: 1, q: 1}\nlst: [1, 2]\n")
    _write(tmp_path, "b.yaml", "defaults: a.yaml\nx: 2\nblock: {q: 2}\n")
    child = _write(tmp_path, "c.yaml", "defaults: [b.yaml]\nlst: [3]\nblock:\n  _override_: true\n  r: 5\n")
    theirs = OmegaConf.to_container(config_mod.load_config(child))
    ours = load_recipe(child, nemo_rl_root=False).config
    assert ours == theirs


def test_sampler_filtering_is_refused_only_where_the_mtp_ratio_uses_the_main_log_probs():
    """ce/detach score MTP log-probs against sampled tokens only; NeMo-RL's filtered log-probs do not enter."""
    for regime in ("ce", "detach"):
        _check(MIMO, f"nemo_occ.regime={regime}", "policy.generation.top_p=0.7", "policy.generation.top_k=20")
    with pytest.raises(RecipeError, match="use_fused_linear_logprobs"):
        _check(MIMO, "nemo_occ.regime=detach", "policy.megatron_cfg.use_fused_linear_logprobs=true")
