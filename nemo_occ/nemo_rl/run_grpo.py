"""GRPO/DAPO/GSPO on NeMo-RL with nemo-occ's MTP training: NeMo-RL's GRPO entry script, two swaps.

    python -m nemo_occ.nemo_rl.run_grpo --config recipes/<recipe>.yaml [key=value ...]
    nemo-occ train --config recipes/<recipe>.yaml [key=value ...]

The steps are those of NeMo-RL's ``examples/run_grpo.py`` (load config + Hydra overrides ->
``MasterConfig`` -> ``init_ray`` -> tokenizer and generation config -> data -> ``grpo.setup`` ->
``grpo_train``), with:

1. the policy built as :class:`nemo_occ.nemo_rl.policy.OCCPolicy` (NeMo-RL's ``Policy``, which also carries
   the MTP heads' old log-probs from ``get_logprobs`` into ``train``) with ``worker_extension_cls_fqn`` =
   nemo-occ's Megatron worker (registered in NeMo-RL's actor environment registry to the interpreter of
   NeMo-RL's own Megatron worker, so no new worker virtualenv is built), which receives the recipe's
   ``nemo_occ`` block in its policy config;
2. ``grpo.setup``'s ``ClippedPGLossFn`` replaced by :class:`nemo_occ.nemo_rl.loss.OCCLossFn` built from
   the same ``loss_fn`` block.

Before Ray starts, the installed NeMo-RL is checked (:func:`nemo_occ.nemo_rl.compat.require_supported_nemo_rl`:
v0.7.0 up to main, with every seam nemo-occ needs) and the recipe is checked
(:func:`nemo_occ.nemo_rl.recipes.check_recipe`), so a wrong NeMo-RL, a wrong parallel layout or a missing
``mtp_num_layers`` fails in seconds, not after model loading. Where NeMo-RL v0.7.0 and main differ, the
calls go through :mod:`nemo_occ.nemo_rl.compat`. Simplified:
only the synchronous trainer (NeMo-RL's ``grpo_train``) is supported; async GRPO and the TransferQueue
data plane are rejected.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from nemo_occ.nemo_rl.compat import (
    UnsupportedNemoRL,
    checkpointer_context,
    require_supported_nemo_rl,
    shutdown_environments,
)
from nemo_occ.nemo_rl.recipes import RecipeError, check_recipe, load_recipe_tree

__all__ = ["main", "parse_args", "register_worker"]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(the entry script's options, the Hydra-style ``key=value`` overrides that follow them)."""
    parser = argparse.ArgumentParser(
        prog="python -m nemo_occ.nemo_rl.run_grpo",
        description="Run NeMo-RL GRPO with nemo-occ's MTP training (OCC).",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="load and check the recipe (with overrides), print the result and exit; needs no GPU or Ray",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="with --check: also print the whole resolved config"
    )
    parser.add_argument(
        "--strict", action="store_true", help="with --check: fail on keys NeMo-RL's config types do not know"
    )
    return parser.parse_known_args(argv)


def load_and_check(config_path: str, overrides: Sequence[str]) -> dict:
    """Recipe + NeMo-RL Hydra overrides -> resolved dict, checked; the nemo_occ block moved into policy."""
    from omegaconf import OmegaConf

    from nemo_occ.core.config import CONFIG_KEY
    from nemo_occ.nemo_rl.compat import drop_newer_keys, installed_declares
    from nemo_occ.nemo_rl.loss_config import policy_loss_config
    from nemo_occ.nemo_rl.overrides import OverrideError, apply_overrides
    from nemo_occ.nemo_rl.preflight import nemo_rl_unknown_keys
    from nemo_occ.nemo_rl.recipes import find_nemo_rl_root

    try:
        from nemo_rl.utils.config import register_omegaconf_resolvers
    except ImportError as err:
        raise SystemExit(
            f"NeMo-RL is not importable ({err}); run inside the NeMo-RL container (see docs/nemo_rl.md)"
        ) from None
    register_omegaconf_resolvers()
    cfg = load_recipe_tree(config_path)
    try:  # NeMo-RL's parse_hydra_overrides, one override at a time so an error names it
        cfg, _ = apply_overrides(cfg, overrides)
    except OverrideError as err:
        raise RecipeError(str(err)) from None
    config = OmegaConf.to_container(cfg, resolve=True)
    occ = check_recipe(config)
    # seam: keys the installed NeMo-RL's config types do not declare yet (grpo.val_num_generations_per_prompt
    # came with NeMo-RL #3401, after v0.7.0) are taken out, and the run says what it does instead
    for note in drop_newer_keys(config, installed_declares):
        print(f"note: {note}", file=sys.stderr)
    for key in nemo_rl_unknown_keys(config, find_nemo_rl_root()) or []:
        print(f"warning: NeMo-RL's config types do not know {key}: NeMo-RL will ignore it", file=sys.stderr)
    config.pop(CONFIG_KEY)
    # Only what the recipe set: train() and every worker rebuild the config from this block, and a full
    # dump would make defaults look user-set (e.g. "coef has no effect" on every rank of an OCC run).
    config["policy"][CONFIG_KEY] = occ.model_dump(exclude_unset=True)
    policy_loss_config(config["loss_fn"])  # raises early on a GSPO/token-level mismatch
    return config


def register_worker() -> str:
    """Register our worker FQN with the interpreter of NeMo-RL's own Megatron worker; return the FQN.

    NeMo-RL names worker virtualenvs after the actor class; mapping a new FQN to the ``uv run`` Megatron
    executable would build a fresh venv. Mapping it to the existing venv's python reuses the container's.
    ``nemo_occ`` must be importable there (``PYTHONPATH``, which NeMo-RL forwards to its workers).
    Runs on the driver: reads the FQN as a string and imports nothing of the worker (no megatron there).
    """
    from nemo_rl.distributed.ray_actor_environment_registry import (
        ACTOR_ENVIRONMENT_REGISTRY,
        MCORE_EXECUTABLE,
    )

    from nemo_occ.nemo_rl.worker import WORKER_FQN

    default_fqn = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"
    executable = ACTOR_ENVIRONMENT_REGISTRY.get(default_fqn, MCORE_EXECUTABLE)
    if executable.startswith("uv"):
        from nemo_rl.utils.venvs import create_local_venv_on_each_node

        executable = create_local_venv_on_each_node(py_executable=executable, venv_name=default_fqn)
    ACTOR_ENVIRONMENT_REGISTRY[WORKER_FQN] = executable
    return WORKER_FQN


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: check the recipe (``--check``) or train with it; the exit code."""
    args, overrides = parse_args(argv)
    try:
        if args.check:
            return check_only(args.config, overrides, print_config=args.print_config, strict=args.strict)
        # before Ray starts: a NeMo-RL outside the supported range, or without a seam nemo-occ needs,
        # stops here with the version it needs (nemo_occ.nemo_rl.compat)
        require_supported_nemo_rl()
        config = load_and_check(args.config, overrides)
    except (RecipeError, UnsupportedNemoRL) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return train(config, args.config)


def check_only(
    config_path: str, overrides: Sequence[str], *, print_config: bool = False, strict: bool = False
) -> int:
    """``--check``: what a launch would see (:mod:`nemo_occ.nemo_rl.preflight`), without NeMo-RL or a GPU.

    ``print_config`` prints the whole resolved config as YAML; ``strict`` turns keys NeMo-RL's types do
    not know, and a check that could not read NeMo-RL's types at all, into an error (exit 2), which is how
    ``slurm/submit.sh`` checks before asking for GPUs.
    """
    from omegaconf import OmegaConf

    from nemo_occ.nemo_rl.preflight import preflight, print_report

    result = preflight(config_path, overrides)
    if print_config:
        print(OmegaConf.to_yaml(OmegaConf.create(result.recipe.config)), end="")
    print_report(result, refused=strict and (not result.keys_checked or bool(result.unknown)))
    if strict and not result.keys_checked:
        where = (
            "without a NeMo-RL source tree"
            if result.nemo_rl_root is None or result.recipe.skipped_parents
            else f"in {result.nemo_rl_root} (no nemo_rl/algorithms/grpo.py with a MasterConfig)"
        )
        print(
            f"error: --strict cannot check NeMo-RL's key names {where}: set NEMO_RL_ROOT to a NeMo-RL "
            "checkout at the container's commit",
            file=sys.stderr,
        )
        return 2
    if strict and result.unknown:
        print(
            f"error: {len(result.unknown)} key(s) NeMo-RL does not know (see the warnings): fix the spelling, "
            "or drop --strict if NeMo-RL reads them without declaring them",
            file=sys.stderr,
        )
        return 2
    return 0


def train(config: dict, config_path: str) -> int:  # pragma: no cover - needs GPUs, Ray and NeMo-RL
    """NeMo-RL's GRPO set-up and ``grpo_train`` on ``config``, with nemo-occ's policy worker and loss."""
    # long on purpose: NeMo-RL's own entry script's steps in its order (Ray, tokenizer, data, setup,
    # grpo_train), so it can be read against upstream
    from nemo_rl.algorithms.grpo import MasterConfig, grpo_train, setup
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.data.utils import setup_response_data
    from nemo_rl.distributed.virtual_cluster import init_ray
    from nemo_rl.models.generation import configure_generation_config
    from nemo_rl.utils.logger import get_next_experiment_dir

    from nemo_occ.core.config import CONFIG_KEY, load_config
    from nemo_occ.nemo_rl.loss import build_loss_fn
    from nemo_occ.nemo_rl.policy import OCCPolicy

    occ = load_config(config["policy"][CONFIG_KEY], key=None)
    master = MasterConfig(**config)
    # read from the plain config: NeMo-RL main's GRPOConfig is a pydantic model, v0.7.0's a TypedDict
    if ((config["grpo"].get("async_grpo") or {}).get("enabled", False)) or (
        (config.get("data_plane") or {}).get("enabled", False)
    ):
        raise SystemExit(
            "nemo-occ supports the synchronous GRPO trainer only: set grpo.async_grpo.enabled: false"
        )
    print(f"Loaded recipe {config_path}; nemo_occ: {occ.model_dump()}")
    master.logger["log_dir"] = get_next_experiment_dir(master.logger["log_dir"])

    init_ray()
    worker_fqn = register_worker()

    tokenizer = get_tokenizer(master.policy["tokenizer"])
    megatron_cfg = master.policy.get("megatron_cfg") or {}
    master.policy["generation"] = configure_generation_config(
        master.policy["generation"],
        tokenizer,
        has_refit_draft_weights=bool(master.policy["draft"]["enabled"]),
        trains_mtp=bool(megatron_cfg.get("mtp_num_layers")),
    )
    dataset, val_dataset, task_to_env, val_task_to_env = setup_response_data(
        tokenizer, master.data, master.env
    )
    (
        policy,
        policy_generation,
        _nemo_gym,
        _cluster,
        dataloader,
        val_dataloader,
        loss_fn,
        logger,
        checkpointer,
        grpo_state,
        master_config,
        _teachers,
        _aliases,
    ) = setup(
        master,
        tokenizer,
        dataset,
        val_dataset,
        policy_factory=functools.partial(OCCPolicy, worker_extension_cls_fqn=worker_fqn),
    )
    loss_fn = build_loss_fn(
        master_config.loss_fn,
        occ,
        use_fused_linear_logprobs=getattr(loss_fn, "use_fused_linear_logprobs", False),
    )
    try:
        with checkpointer_context(checkpointer):  # seam: a context manager since NeMo-RL #2828
            grpo_train(
                policy,
                policy_generation,
                dataloader,
                val_dataloader,
                tokenizer,
                loss_fn,
                task_to_env,
                val_task_to_env,
                logger,
                checkpointer,
                grpo_state,
                master_config,
            )
    finally:
        shutdown_environments(task_to_env, val_task_to_env)  # seam: NeMo-RL #3391; a no-op on v0.7.0
        try:
            policy_generation.shutdown()
        except Exception as error:  # mirror NeMo-RL: shutdown errors must not mask training errors
            print(f"Error shutting down generation: {error}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
