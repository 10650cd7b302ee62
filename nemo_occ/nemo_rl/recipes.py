"""Loading and checking nemo-occ recipes: NeMo-RL GRPO configs with a ``nemo_occ:`` block.

A recipe is a NeMo-RL master config (``grpo``, ``loss_fn``, ``policy``, ``data``, ``env``, ``logger``,
``cluster``, ``checkpointing``) plus our strict ``nemo_occ:`` block (:class:`NemoOCCConfig`).

Inheritance (``defaults:``) is resolved the way NeMo-RL's ``nemo_rl.utils.config.load_config`` does it:
a string or a list of parent files, relative to the including file's directory (absolute paths as
given), parents merged in order, the child last, and a mapping marked ``_override_: true`` replacing
the inherited one instead of merging into it. One addition: a parent written ``nemo_rl:<path>``
(e.g. ``nemo_rl:examples/configs/grpo_math_1B.yaml``) is resolved against the NeMo-RL source tree
(``$NEMO_RL_ROOT``, else the checkout that holds the importable ``nemo_rl`` package; in the NeMo-RL
container that is ``/opt/nemo-rl``), because our recipes live outside NeMo-RL's ``examples/`` folder.
Without a NeMo-RL tree (CI) such parents can be skipped and are reported, so everything a recipe sets
itself is still checked.

:func:`check_recipe` is what the entry point runs before Ray starts: the ``nemo_occ`` block strictly,
the NeMo-RL part structurally (blocks present, Megatron enabled, MTP layers kept, loss settings our MTP
term can follow), and the parallel layout (sizes divide the GPU count and, given model facts, the
model's heads, layers and experts). Every problem is reported at once, each saying what to set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_occ.core.config import ConfigError, NemoOCCConfig, load_config

__all__ = [
    "NEMO_RL_PREFIX",
    "NEMO_RL_BLOCKS",
    "ModelFacts",
    "Recipe",
    "RecipeError",
    "check_recipe",
    "find_nemo_rl_root",
    "load_recipe",
    "load_recipe_tree",
    "parallel_layout",
]

NEMO_RL_PREFIX = "nemo_rl:"
# Top-level blocks of NeMo-RL's GRPO MasterConfig a recipe must end up with.
NEMO_RL_BLOCKS = ("grpo", "loss_fn", "policy", "data", "env", "logger", "cluster", "checkpointing")


class RecipeError(ConfigError):
    """A recipe the user has to fix; the message lists every problem and what to set."""


# ---------------------------------------------------------------------------------------------
# Loading (NeMo-RL's inheritance rules)
# ---------------------------------------------------------------------------------------------
def find_nemo_rl_root() -> Path | None:
    """The NeMo-RL source tree: ``$NEMO_RL_ROOT``, else the checkout holding the ``nemo_rl`` package."""
    env = os.environ.get("NEMO_RL_ROOT")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("nemo_rl")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))).parent
    return root if (root / "examples" / "configs").is_dir() else None


@dataclass
class Recipe:
    """A resolved recipe: the merged mapping, the parents that could not be read, and override notes."""

    path: Path
    config: dict[str, Any]
    skipped_parents: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # overrides that could not be fully checked


def _merge(base, child):
    """NeMo-RL's ``merge_with_override``: OmegaConf merge, honouring ``_override_: true``."""
    from omegaconf import DictConfig, OmegaConf

    for key in list(child.keys()):
        if OmegaConf.is_missing(child, key):
            continue
        value = child[key]
        if isinstance(value, DictConfig) and value.get("_override_", False):
            value.pop("_override_")
            if key in base:
                base.pop(key)
    return OmegaConf.merge(base, child)


def _load_yaml(path: Path):
    """``OmegaConf.load`` with a YAML syntax error turned into one line: ``file:line:column: problem``."""
    import yaml
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise RecipeError(
            f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")
        ) from None


def _load_tree(path: Path, nemo_rl_root: Path | None, skipped: list[str], chain: tuple[Path, ...]):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    path = path.resolve()
    if path in chain:
        raise RecipeError(f"recipe inheritance cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    cfg = _load_yaml(path)
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level")
    if "defaults" not in cfg:
        return cfg
    parents = cfg.pop("defaults")
    if isinstance(parents, str):
        parents = [parents]
    elif isinstance(parents, ListConfig):
        parents = [str(p) for p in parents]
    else:
        raise RecipeError(f"{path}: 'defaults' must be a file name or a list of file names")
    base = OmegaConf.create({})
    for parent in parents:
        if parent.startswith(NEMO_RL_PREFIX):
            if nemo_rl_root is None:
                skipped.append(parent)
                continue
            parent_path = nemo_rl_root / parent[len(NEMO_RL_PREFIX) :]
        else:
            parent_path = Path(parent) if parent.startswith("/") else path.parent / parent
        base = _merge(base, _load_tree(parent_path, nemo_rl_root, skipped, (*chain, path)))
    return _merge(base, cfg)


def load_recipe_tree(path: str | Path, nemo_rl_root: str | Path | None = None):
    """The merged OmegaConf ``DictConfig`` of ``path`` (unresolved), for NeMo-RL's override parser.

    ``nemo_rl_root=None`` looks the NeMo-RL tree up and raises if a ``nemo_rl:`` parent cannot be found.
    """
    root = Path(nemo_rl_root) if nemo_rl_root else find_nemo_rl_root()
    skipped: list[str] = []
    cfg = _load_tree(Path(path), root, skipped, ())
    if skipped:
        raise RecipeError(
            f"{path} inherits {skipped[0]!r} from NeMo-RL, but no NeMo-RL source tree was found: "
            "run inside the NeMo-RL container or set NEMO_RL_ROOT to a NeMo-RL checkout"
        )
    return cfg


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    nemo_rl_root: str | Path | None | bool = True,
    resolve: bool = True,
) -> Recipe:
    """Load ``path`` with its ``defaults`` chain and NeMo-RL overrides; see the module docstring.

    ``nemo_rl_root=True`` looks the NeMo-RL tree up (:func:`find_nemo_rl_root`) and raises if a recipe
    needs it and there is none; ``None`` or ``False`` skips ``nemo_rl:`` parents (they are listed in
    ``Recipe.skipped_parents``); a path uses that tree. Overrides are parsed as a launch parses them
    (:func:`nemo_occ.nemo_rl.overrides.apply_overrides`: ``key=v``, ``+key=v``, ``++key=v``, ``~key``).
    With skipped parents a ``key=v`` whose key the recipe's own files lack is added and noted in
    ``Recipe.notes`` (it may exist in NeMo-RL's base, which was not loaded).
    """
    from omegaconf import OmegaConf

    from nemo_occ.nemo_rl.overrides import OverrideError, apply_overrides

    if nemo_rl_root is True:
        root = find_nemo_rl_root()
        must_resolve = True
    else:
        root = Path(nemo_rl_root) if nemo_rl_root else None
        must_resolve = False
    skipped: list[str] = []
    cfg = _load_tree(Path(path), root, skipped, ())
    if skipped and must_resolve:
        raise RecipeError(
            f"{path} inherits {skipped[0]!r} from NeMo-RL, but no NeMo-RL source tree was found: "
            "run inside the NeMo-RL container or set NEMO_RL_ROOT to a NeMo-RL checkout"
        )
    _register_nemo_rl_resolvers()
    notes: list[str] = []
    if overrides:
        try:
            cfg, notes = apply_overrides(cfg, overrides, lenient_new_keys=bool(skipped))
        except OverrideError as err:
            raise RecipeError(str(err)) from None
    data = OmegaConf.to_container(cfg, resolve=resolve and not skipped)
    return Recipe(path=Path(path), config=data, skipped_parents=skipped, notes=notes)


def _register_nemo_rl_resolvers() -> None:
    """The resolvers NeMo-RL's ``register_omegaconf_resolvers`` adds before loading configs (same lambdas)."""
    import warnings

    from omegaconf import OmegaConf

    # register_new_resolver is what NeMo-RL uses (nested ${...} arguments); omegaconf 2.4 deprecates the
    # name, while 2.3's register_resolver is the legacy kind that rejects ${...} arguments.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if not OmegaConf.has_resolver("mul"):
            OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
        if not OmegaConf.has_resolver("add"):
            OmegaConf.register_new_resolver("add", lambda a, b: a + b)
        if not OmegaConf.has_resolver("div"):
            OmegaConf.register_new_resolver("div", lambda a, b: a / b)
        if not OmegaConf.has_resolver("max"):
            OmegaConf.register_new_resolver("max", lambda a, b: max(a, b))


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """Architecture numbers a parallel layout must divide (from the model's HF config)."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    num_experts: int | None = None
    mtp_layers: int = 0


def _get(cfg: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _int(value: Any, default: int = 1) -> int:
    if value is None:
        return default
    if isinstance(value, str):  # an unresolved ${...} left by a skipped NeMo-RL parent
        return default
    return int(value)


@dataclass(frozen=True)
class ParallelLayout:
    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int

    @property
    def dp(self) -> int:
        """Data-parallel size: world / (TP · PP · CP)."""
        return self.world // (self.tp * self.pp * self.cp)


def parallel_layout(cfg: Mapping) -> ParallelLayout:
    """The recipe's GPU count and Megatron parallel sizes (``policy.megatron_cfg``), as integers."""
    mc = _get(cfg, "policy.megatron_cfg", {}) or {}
    return ParallelLayout(
        world=_int(_get(cfg, "cluster.num_nodes")) * _int(_get(cfg, "cluster.gpus_per_node")),
        tp=_int(mc.get("tensor_model_parallel_size")),
        pp=_int(mc.get("pipeline_model_parallel_size")),
        cp=_int(mc.get("context_parallel_size")),
        ep=_int(mc.get("expert_model_parallel_size")),
        etp=_int(mc.get("expert_tensor_parallel_size")),
    )


def _check_layout(cfg: Mapping, facts: ModelFacts | None, problems: list[str]) -> None:
    # long on purpose: one check per parallel-layout rule, each appending its own message
    lay = parallel_layout(cfg)
    mc = _get(cfg, "policy.megatron_cfg", {}) or {}
    model_parallel = lay.tp * lay.pp * lay.cp
    if lay.world % model_parallel:
        problems.append(
            f"cluster has {lay.world} GPUs, not divisible by TP*PP*CP = {lay.tp}*{lay.pp}*{lay.cp}: "
            "change cluster.num_nodes / gpus_per_node or the megatron_cfg parallel sizes"
        )
        return
    per_stage = lay.world // lay.pp
    if per_stage % (lay.ep * lay.etp):
        problems.append(
            f"expert_model_parallel_size*expert_tensor_parallel_size = {lay.ep}*{lay.etp} must divide the "
            f"{per_stage} GPUs of one pipeline stage"
        )
    gbs = _get(cfg, "policy.train_global_batch_size")
    if isinstance(gbs, int) and gbs % lay.dp:
        problems.append(
            f"policy.train_global_batch_size={gbs} is not divisible by the data-parallel size {lay.dp}"
        )
    gen_tp = _get(cfg, "policy.generation.vllm_cfg.tensor_parallel_size")
    if isinstance(gen_tp, int) and lay.world % gen_tp:
        problems.append(
            f"policy.generation.vllm_cfg.tensor_parallel_size={gen_tp} must divide the {lay.world} GPUs"
        )
    if mc.get("sequence_parallel") is False and lay.tp > 1 and facts is not None and facts.num_experts:
        problems.append("MoE with tensor parallelism needs policy.megatron_cfg.sequence_parallel: true")
    if facts is None:
        return
    if facts.num_attention_heads % lay.tp:
        problems.append(
            f"tensor_model_parallel_size={lay.tp} must divide the {facts.num_attention_heads} attention heads"
        )
    if facts.num_query_groups % lay.tp:
        problems.append(
            f"tensor_model_parallel_size={lay.tp} must divide the {facts.num_query_groups} KV heads"
        )
    first = mc.get("num_layers_in_first_pipeline_stage")
    last = mc.get("num_layers_in_last_pipeline_stage")
    if first is None and last is None:
        if facts.num_layers % lay.pp:
            problems.append(
                f"pipeline_model_parallel_size={lay.pp} does not divide the {facts.num_layers} layers: set "
                "num_layers_in_first/last_pipeline_stage or change the pipeline size"
            )
    else:
        inner = lay.pp - (first is not None) - (last is not None)
        rest = facts.num_layers - _int(first, 0) - _int(last, 0)
        if rest < 0 or (inner > 0 and rest % inner) or (inner == 0 and rest != 0):
            problems.append(
                f"num_layers_in_first/last_pipeline_stage ({first}/{last}) leave {rest} of {facts.num_layers} "
                f"layers for {inner} inner stage(s): they must split evenly"
            )
    if facts.num_experts:
        if facts.num_experts % lay.ep:
            problems.append(
                f"expert_model_parallel_size={lay.ep} must divide the {facts.num_experts} experts"
            )
    elif lay.ep > 1:
        problems.append("expert_model_parallel_size > 1 on a dense model: set it to 1")


def _check_mtp(cfg: Mapping, occ: NemoOCCConfig, facts: ModelFacts | None, problems: list[str]) -> None:
    # long on purpose: one check per MTP setting of the recipe, each appending its own message
    temperature = _get(cfg, "policy.generation.temperature", 1.0)
    if occ.regime_spec.uses_policy_loss and temperature is not None and float(temperature) != 1.0:
        # NeMo-RL divides the main logits by the sampling temperature before its log-probs; the MTP
        # log-probs are not scaled, so the MTP ratio would compare unscaled with scaled log-probs.
        problems.append(
            f"regime '{occ.regime}' needs policy.generation.temperature: 1.0 (got {temperature}): "
            "nemo-occ's MTP log-probs are not temperature-scaled"
        )
    top_k = _get(cfg, "policy.generation.top_k")
    top_p = _get(cfg, "policy.generation.top_p", 1.0)
    filtering = (isinstance(top_k, int) and top_k > 0) or (isinstance(top_p, (int, float)) and top_p != 1.0)
    if occ.regime_spec.uses_policy_loss and filtering:
        # NeMo-RL's training log-probs (the old ones too) are top-k/top-p filtered and renormalised like
        # the sampler; the MTP log-probs are not, so the MTP ratio would mix the two distributions.
        problems.append(
            f"regime '{occ.regime}' needs policy.generation.top_k: null and top_p: 1.0 (got {top_k}, {top_p}): "
            "NeMo-RL filters the main head's training log-probs like the sampler, nemo-occ's MTP log-probs "
            "are not filtered"
        )
    mc = _get(cfg, "policy.megatron_cfg", {}) or {}
    if occ.regime_spec.has_mtp_term and mc.get("use_fused_linear_logprobs"):
        # NeMo-RL's fused forward returns the main log-probs straight from the decoder's hidden states and
        # never runs GPTModel._postprocess, where the MTP block runs: nothing would be captured.
        problems.append(
            "policy.megatron_cfg.use_fused_linear_logprobs: true skips the model's MTP block (NeMo-RL's fused "
            f"forward stops after the decoder), which regime '{occ.regime}' trains: set it to false"
        )
    mtp = mc.get("mtp_num_layers")
    spec = _get(cfg, "policy.generation.vllm_kwargs.speculative_config")
    drafting = isinstance(spec, Mapping) and _int(spec.get("num_speculative_tokens"), 0) > 0
    needs_mtp = occ.regime_spec.has_mtp_term or drafting
    if needs_mtp and not isinstance(mtp, int):
        problems.append(
            "policy.megatron_cfg.mtp_num_layers is not set: set it to the model's number of MTP layers "
            "(1 for GLM-4.5-Air and MiMo-7B); never rely on NeMo-RL's inherited default of 0"
        )
    elif needs_mtp and mtp < occ.num_depths:
        why = (
            f"regime '{occ.regime}' trains {occ.num_depths} MTP depth(s)"
            if occ.regime_spec.has_mtp_term
            else "MTP drafting"
        )
        problems.append(
            f"{why} but policy.megatron_cfg.mtp_num_layers={mtp}: set mtp_num_layers: {occ.num_depths} "
            "(NeMo-RL's grpo_math_1B.yaml sets 0, which removes the MTP layer)"
        )
    if facts is not None and needs_mtp and facts.mtp_layers < occ.num_depths:
        problems.append(
            f"the model has {facts.mtp_layers} MTP layer(s) but nemo_occ.num_depths={occ.num_depths}: "
            "use regime none, or a model with MTP layers"
        )
    if isinstance(mtp, int) and mtp > 0 and occ.regime_spec.has_mtp_term:
        scale = mc.get("mtp_loss_scaling_factor")
        if scale not in (0, 0.0):
            problems.append(
                f"policy.megatron_cfg.mtp_loss_scaling_factor={scale}: set it to 0.0; nemo-occ trains the MTP "
                "layer with its own term and Megatron's built-in MTP cross-entropy would be added on top"
            )
        if mc.get("mtp_detach_heads"):
            problems.append(
                "policy.megatron_cfg.mtp_detach_heads: true conflicts with nemo-occ's regimes: set it to false "
                "and choose nemo_occ.regime: detach to keep MTP gradients out of the trunk"
            )
    vllm_kwargs = _get(cfg, "policy.generation.vllm_kwargs", {}) or {}
    if isinstance(vllm_kwargs, Mapping) and "enable_prefix_caching" in vllm_kwargs:
        problems.append(
            "policy.generation.vllm_kwargs.enable_prefix_caching: NeMo-RL already passes enable_prefix_caching "
            "to vllm.LLM from vllm_cfg (vLLM init fails with a duplicate keyword): move it to "
            "policy.generation.vllm_cfg.enable_prefix_caching"
        )
    if drafting:
        if str(spec.get("method")) not in ("mtp", "deepseek_mtp"):
            problems.append(
                f"speculative_config.method={spec.get('method')!r}: nemo-occ drafts with the co-trained MTP layer, "
                "use method: mtp"
            )
        if _get(cfg, "policy.generation.vllm_cfg.enable_prefix_caching") is not False:
            problems.append(
                "MTP speculative decoding: set policy.generation.vllm_cfg.enable_prefix_caching: false "
                "(vLLM returned wrong log-probs with MTP drafting plus prefix caching)"
            )


def _check_updates_per_step(cfg: Mapping, occ: NemoOCCConfig, problems: list[str]) -> None:
    """OCC needs at least two optimizer updates per RL step: the first runs at θ = θ_old, where δ_RL = 0."""
    if not occ.regime_spec.calibrated or occ.occ.allow_one_update_per_step:
        return
    prompts = _get(cfg, "grpo.num_prompts_per_step")
    samples_per_prompt = _get(cfg, "grpo.num_generations_per_prompt")
    gbs = _get(cfg, "policy.train_global_batch_size")
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (prompts, samples_per_prompt, gbs)
    ):
        return  # unresolved (a skipped NeMo-RL parent) or refused elsewhere
    samples = prompts * samples_per_prompt
    if gbs >= samples:
        problems.append(
            f"regime '{occ.regime}' with one optimizer update per RL step: policy.train_global_batch_size={gbs} "
            f">= grpo.num_prompts_per_step x num_generations_per_prompt = {prompts} x {samples_per_prompt} = "
            f"{samples}; that update runs at θ = θ_old (δ_RL = 0), so OCC never gets statistics and λ never "
            f"moves: make train_global_batch_size at most {samples // 2} (the paper: {samples // 4}, 4 updates), "
            "or set nemo_occ.occ.allow_one_update_per_step: true to run with λ fixed at occ.initial_lambda"
        )


def _check_fp8(cfg: Mapping, problems: list[str]) -> None:
    """Blockwise FP8 needs the two settings every NeMo-RL blockwise-FP8 Megatron recipe carries.

    NeMo-RL's ``grpo_math_*_megatron_fp8.yaml`` and its FP8 ``recipes/llm/*`` set
    ``megatron_cfg.env_vars.NVTE_FP8_BLOCK_SCALING_FP32_SCALES: "1"`` (FP32 block scales in Transformer
    Engine) and ``megatron_cfg.optimizer.use_precision_aware_optimizer: false``, while its
    ``grpo_math_1B.yaml`` base sets the optimizer flag to true. A missing ``fp8_recipe`` is that base's
    default, blockwise.
    """
    fp8 = _get(cfg, "policy.megatron_cfg.fp8_cfg")
    if not isinstance(fp8, Mapping) or fp8.get("enabled") is not True:
        return
    if fp8.get("fp8_recipe", "blockwise") != "blockwise":
        return
    scales = _get(cfg, "policy.megatron_cfg.env_vars.NVTE_FP8_BLOCK_SCALING_FP32_SCALES")
    if scales != "1":
        problems.append(
            'blockwise FP8: set policy.megatron_cfg.env_vars.NVTE_FP8_BLOCK_SCALING_FP32_SCALES: "1" (a quoted '
            f"string; got {scales!r}), as every NeMo-RL blockwise-FP8 Megatron recipe does"
        )
    if _get(cfg, "policy.megatron_cfg.optimizer.use_precision_aware_optimizer") is not False:
        problems.append(
            "blockwise FP8: set policy.megatron_cfg.optimizer.use_precision_aware_optimizer: false "
            "(NeMo-RL's grpo_math_1B.yaml sets true; its blockwise-FP8 Megatron recipes all turn it off)"
        )


def check_recipe(recipe: Recipe | Mapping, facts: ModelFacts | None = None) -> NemoOCCConfig:
    """Validate a resolved recipe; return its :class:`NemoOCCConfig` or raise :class:`RecipeError`."""
    from nemo_occ.nemo_rl.loss_config import check_loss_settings

    cfg = recipe.config if isinstance(recipe, Recipe) else recipe
    skipped = recipe.skipped_parents if isinstance(recipe, Recipe) else []
    problems: list[str] = []
    try:
        occ = load_config(dict(cfg))
    except ConfigError as err:
        raise RecipeError(str(err)) from None
    if not skipped:
        for block in NEMO_RL_BLOCKS:
            if not isinstance(cfg.get(block), Mapping):
                problems.append(
                    f"missing NeMo-RL block '{block}:' (inherit NeMo-RL's grpo_math_1B.yaml via defaults)"
                )
    if _get(cfg, "policy.megatron_cfg.enabled") is not True:
        problems.append("nemo-occ needs the Megatron backend: set policy.megatron_cfg.enabled: true")
    if _get(cfg, "policy.dtensor_cfg.enabled") is True:
        problems.append("set policy.dtensor_cfg.enabled: false (nemo-occ runs on the Megatron backend)")
    for key in ("cluster.num_nodes", "cluster.gpus_per_node"):
        if not isinstance(_get(cfg, key), int):
            problems.append(
                f"set {key} explicitly (an integer); the Slurm scripts check it against the allocation"
            )
    # run_grpo drives NeMo-RL's synchronous grpo_train only (the worker wraps its train(), not the
    # split-API train_microbatch that async GRPO and the TransferQueue trainer use).
    if _get(cfg, "grpo.async_grpo.enabled") is True:
        problems.append("nemo-occ runs the synchronous GRPO trainer only: set grpo.async_grpo.enabled: false")
    if _get(cfg, "data_plane.enabled") is True:
        problems.append(
            "nemo-occ runs NeMo-RL's legacy synchronous trainer only: set data_plane.enabled: false "
            "(the TransferQueue trainer is not supported)"
        )
    _check_mtp(cfg, occ, facts, problems)
    _check_updates_per_step(cfg, occ, problems)
    _check_fp8(cfg, problems)
    try:
        check_loss_settings(cfg.get("loss_fn") or {}, occ)
    except ConfigError as err:
        problems.append(str(err))
    _check_layout(cfg, facts, problems)
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))
    return occ


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m nemo_occ.nemo_rl.recipes nodes <recipe> [override ...]``: print ``<num_nodes> <gpus_per_node>``.

    ``slurm/submit.sh`` compares it with the node count it is asked for before calling sbatch.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m nemo_occ.nemo_rl.recipes")
    parser.add_argument("what", choices=["nodes"])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides, nemo_rl_root=find_nemo_rl_root() or False).config
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_int(_get(cfg, "cluster.num_nodes"), 0), _int(_get(cfg, "cluster.gpus_per_node"), 0))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
