"""The NeMo-RL versions nemo-occ runs on, and the seams where they differ.

Supported: NeMo-RL **v0.7.0** (the release most users start from, with megatron-core 0.19) up to
**main 7ea279ab** (megatron-core 0.20), both run by ``scripts/upstream_check.sh``.

Every seam is decided by what the installed NeMo-RL offers (a keyword in a signature, a name in a
module, a field in a config type), never by its version string alone: main at 7ea279ab still calls
itself 0.6.0, older than the release's 0.7.0, because NeMo-RL bumps the version on its release branch.
The version string only rules out what is certainly too old (below 0.6).

Seams, each bridging one upstream change made after v0.7.0:

* :func:`clipped_pg_loss`: ``ClippedPGLossFn(cfg, use_fused_linear_logprobs=...)`` (NeMo-RL #2833,
  chunked linear fusion); v0.7.0 takes ``cfg`` only and has no fused path.
* :func:`shutdown_environments`: ``nemo_rl.algorithms.grpo.shutdown_environments`` (#3391); v0.7.0's
  entry script leaves the environment actors to Ray's shutdown at exit, and so does nemo-occ there.
* :func:`checkpointer_context`: ``CheckpointManager`` as a context manager that flushes background
  checkpoint writes (#2828); v0.7.0 writes checkpoints synchronously and has nothing to flush.
* :func:`metric_normalizer`: ``nemo_rl.algorithms.loss.interfaces.MetricNormalizer`` (#2683, the
  split-API trainer, which runs micro-batches with placeholder denominators and rescales each metric by
  the denominator the loss names). v0.7.0 has only the synchronous trainer, which hands the loss the
  global denominators and sums the per-micro-batch metrics; no code of it reads the table, so the same
  table built with an enum of the same values is correct there and never consulted.
* :data:`RECIPE_KEYS_AFTER_RELEASE`: recipe keys NeMo-RL's config types declare only after v0.7.0
  (``grpo.val_num_generations_per_prompt``, #3401). Where the installed NeMo-RL does not declare one, the
  key is taken out of the config before NeMo-RL sees it and the check says what the run does instead.

What nemo-occ cannot run without (:func:`require_supported_nemo_rl`, before Ray starts):
``grpo.setup(policy_factory=...)`` and ``configure_generation_config(trains_mtp=...)``, both in v0.7.0
and missing from v0.6.0.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SUPPORTED",
    "UNTESTED_ENV",
    "NewerKey",
    "RECIPE_KEYS_AFTER_RELEASE",
    "UnsupportedNemoRL",
    "checkpointer_context",
    "clipped_pg_loss",
    "describe_nemo_rl_tree",
    "drop_newer_keys",
    "installed_declares",
    "metric_normalizer",
    "require_supported_nemo_rl",
    "shutdown_environments",
]

SUPPORTED = "NeMo-RL v0.7.0 up to main 7ea279ab"
# Set to 1 to start on a NeMo-RL whose version string is newer than the tested range (the seams are
# still checked).
UNTESTED_ENV = "NEMO_OCC_UNTESTED_NEMO_RL"


class UnsupportedNemoRL(RuntimeError):
    """The installed NeMo-RL is outside the supported range or lacks what nemo-occ needs; one line."""


# ---------------------------------------------------------------------------------------------
# Loss seams
# ---------------------------------------------------------------------------------------------
class _ReleaseMetricNormalizer(enum.Enum):
    """NeMo-RL's ``MetricNormalizer`` (#2683), same members and values, for NeMo-RL without it."""

    TOKENS = "tokens"  # divided by global_valid_toks
    SEQUENCES = "sequences"  # divided by global_valid_seqs
    NONE = "none"  # not normalized


def metric_normalizer() -> type[enum.Enum]:
    """NeMo-RL's ``MetricNormalizer`` where it exists (#2683), else an enum with the same values."""
    try:  # seam: NeMo-RL #2683 (split-API train step) added the enum after v0.7.0
        from nemo_rl.algorithms.loss.interfaces import MetricNormalizer as upstream
    except ImportError:
        return _ReleaseMetricNormalizer
    return upstream


def clipped_pg_loss(cfg: Any, *, use_fused_linear_logprobs: bool = False) -> Any:
    """NeMo-RL's ``ClippedPGLossFn`` for ``cfg``, with the fused-log-probs flag where NeMo-RL has it."""
    from nemo_rl.algorithms.loss import ClippedPGLossFn

    # seam: NeMo-RL #2833 (chunked linear fusion) added the keyword after v0.7.0
    if "use_fused_linear_logprobs" in inspect.signature(ClippedPGLossFn).parameters:
        return ClippedPGLossFn(cfg, use_fused_linear_logprobs=use_fused_linear_logprobs)
    if use_fused_linear_logprobs:
        raise UnsupportedNemoRL(
            "policy.megatron_cfg.use_fused_linear_logprobs needs NeMo-RL main after v0.7.0 (#2833); "
            "this NeMo-RL's ClippedPGLossFn has no fused path: set it to false"
        )
    return ClippedPGLossFn(cfg)


# ---------------------------------------------------------------------------------------------
# Entry-script seams
# ---------------------------------------------------------------------------------------------
def shutdown_environments(task_to_env: Any, val_task_to_env: Any) -> bool:
    """Shut the environment actors down as NeMo-RL's entry script does; False where it does not."""
    grpo = importlib.import_module("nemo_rl.algorithms.grpo")
    # seam: NeMo-RL #3391 added grpo.shutdown_environments after v0.7.0; v0.7.0's examples/run_grpo.py
    # shuts nothing down and leaves the actors to Ray's shutdown when the driver exits.
    shutdown = getattr(grpo, "shutdown_environments", None)
    if shutdown is None:
        return False
    shutdown(task_to_env, val_task_to_env)
    return True


def checkpointer_context(checkpointer: Any) -> contextlib.AbstractContextManager:
    """``checkpointer`` itself where it is a context manager (flushes pending writes on exit), else a no-op."""
    # seam: NeMo-RL #2828 (async checkpointing) made CheckpointManager a context manager after v0.7.0;
    # v0.7.0 finishes every checkpoint before save returns, so there is nothing to flush.
    if hasattr(type(checkpointer), "__enter__") and hasattr(type(checkpointer), "__exit__"):
        return checkpointer
    return contextlib.nullcontext(checkpointer)


# ---------------------------------------------------------------------------------------------
# Recipe keys NeMo-RL declares only after the release
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewerKey:
    """A recipe key NeMo-RL's config types declare only after v0.7.0, and what a run does without it."""

    path: str  # dotted, e.g. grpo.val_num_generations_per_prompt
    change: str  # the upstream change that added it
    without: str  # what NeMo-RL without it does instead
    release_value: Any  # the value that means the same as leaving the key out

    def note(self, value: Any) -> str:
        """The line the recipe check prints when this key, set to ``value``, is taken out of the config."""
        same = value == self.release_value
        return (
            f"{self.path}={value} left out: this NeMo-RL does not declare it (added by {self.change}); "
            + ("the same as its default" if same else f"the run {self.without}")
        )


RECIPE_KEYS_AFTER_RELEASE: tuple[NewerKey, ...] = (
    NewerKey(
        "grpo.val_num_generations_per_prompt",
        "NeMo-RL #3401, after v0.7.0",
        "validates one sample per prompt (val:accuracy is avg@1, not avg@k)",
        1,
    ),
)


def _pop(config: dict, dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, Mapping) else None
    if not isinstance(node, dict) or leaf not in node:
        return False, None
    return True, node.pop(leaf)


def drop_newer_keys(config: dict, declares) -> list[str]:
    """Take out of ``config`` each key of :data:`RECIPE_KEYS_AFTER_RELEASE` that ``declares(path)`` denies.

    ``declares``: dotted path -> whether the installed NeMo-RL's config types name it (the source tree's
    schema for ``--check``, the imported types at launch). Returns one note per key taken out.
    """
    notes = []
    for key in RECIPE_KEYS_AFTER_RELEASE:
        if declares(key.path):
            continue
        found, value = _pop(config, key.path)
        if found:
            notes.append(key.note(value))
    return notes


def installed_declares(dotted: str) -> bool:
    """Whether the imported NeMo-RL's ``MasterConfig`` types declare ``dotted`` (``grpo.<key>`` only).

    True where NeMo-RL's ``grpo`` module does not import: nothing can be launched there, and the key is
    left for the launch's own import to fail on."""
    block, _, key = dotted.partition(".")
    if block != "grpo" or "." in key:
        raise ValueError(f"installed_declares reads grpo.<key> only, not {dotted}")
    try:
        from nemo_rl.algorithms.grpo import GRPOConfig
    except ImportError:
        return True

    fields = getattr(GRPOConfig, "model_fields", None)  # a pydantic model on main
    if fields is not None:
        names = set(fields) | {f.alias for f in fields.values() if getattr(f, "alias", None)}
    else:  # a TypedDict on v0.7.0
        names = set(getattr(GRPOConfig, "__required_keys__", ())) | set(
            getattr(GRPOConfig, "__optional_keys__", ())
        )
    return key in names


# ---------------------------------------------------------------------------------------------
# Which NeMo-RL
# ---------------------------------------------------------------------------------------------
def _version_of_tree(root: Path) -> str | None:
    try:
        text = (root / "nemo_rl" / "package_info.py").read_text(encoding="utf-8")
    except OSError:
        return None
    parts = {
        name: m.group(1)
        for name in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE")
        if (m := re.search(rf"^{name}\s*=\s*['\"]?([^'\"\n]*)['\"]?\s*$", text, re.M))
    }
    if not {"MAJOR", "MINOR", "PATCH"} <= parts.keys():
        return None
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts.get('PRE_RELEASE', '')}"


def _commit_of_tree(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=8", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def describe_nemo_rl_tree(root: Path) -> str:
    """``NeMo-RL 0.7.0 (commit 81aa43dd) at /path``: what ``--check`` checked against."""
    version = _version_of_tree(root) or "of unknown version"
    commit = _commit_of_tree(root)
    return f"NeMo-RL {version}" + (f" (commit {commit})" if commit else "") + f" at {root}"


def _parse_version(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def require_supported_nemo_rl() -> str:
    """Raise :class:`UnsupportedNemoRL` (one line naming the version needed) unless the installed NeMo-RL
    is in the supported range and has every seam nemo-occ needs; return its version. Imports NeMo-RL's
    driver side (no Ray, no GPU)."""
    try:
        import nemo_rl
    except ImportError as err:
        raise UnsupportedNemoRL(f"nemo-occ needs {SUPPORTED}: NeMo-RL is not importable ({err})") from None
    version = str(getattr(nemo_rl, "__version__", "unknown"))
    parsed = _parse_version(version)
    if parsed is not None and parsed < (0, 6):
        raise UnsupportedNemoRL(f"nemo-occ needs {SUPPORTED}; this NeMo-RL is {version}")
    if parsed is not None and parsed > (0, 7) and os.environ.get(UNTESTED_ENV) != "1":
        raise UnsupportedNemoRL(
            f"nemo-occ is tested with {SUPPORTED}; this NeMo-RL is {version} "
            f"(set {UNTESTED_ENV}=1 to try it anyway)"
        )
    grpo = importlib.import_module("nemo_rl.algorithms.grpo")
    generation = importlib.import_module("nemo_rl.models.generation")
    registry = importlib.import_module("nemo_rl.distributed.ray_actor_environment_registry")
    needs = (
        (
            "grpo.setup(policy_factory=...)",
            lambda: "policy_factory" in inspect.signature(grpo.setup).parameters,
        ),
        (
            "configure_generation_config(trains_mtp=...)",
            lambda: "trains_mtp" in inspect.signature(generation.configure_generation_config).parameters,
        ),
        ("grpo.grpo_train", lambda: hasattr(grpo, "grpo_train")),
        (
            "ray_actor_environment_registry.ACTOR_ENVIRONMENT_REGISTRY",
            lambda: hasattr(registry, "ACTOR_ENVIRONMENT_REGISTRY") and hasattr(registry, "MCORE_EXECUTABLE"),
        ),
    )
    for what, present in needs:
        if not present():
            raise UnsupportedNemoRL(f"nemo-occ needs {SUPPORTED}: this NeMo-RL ({version}) lacks {what}")
    return version
