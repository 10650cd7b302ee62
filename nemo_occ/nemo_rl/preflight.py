"""``nemo-occ train --check``: everything a launch would reject or silently ignore, found without a GPU.

A launch (``nemo_occ.nemo_rl.run_grpo``) loads the recipe with NeMo-RL's inheritance rules, applies the
command-line overrides with NeMo-RL's Hydra parser, checks the result (:func:`check_recipe`) and hands it
to ``MasterConfig``, which accepts unknown keys and ignores them. :func:`preflight` does the same steps
(the same override parser: :mod:`nemo_occ.nemo_rl.overrides`) and adds what the launch does not do:
every key NeMo-RL's config types do not declare (:mod:`nemo_occ.nemo_rl.config_schema`).

The report names the NeMo-RL tree it checked against (version and commit). Keys NeMo-RL declares only
after a release (:data:`nemo_occ.nemo_rl.compat.RECIPE_KEYS_AFTER_RELEASE`) are checked per version:
where that tree does not declare one, it is left out as the launch leaves it out, with a note saying
what the run does instead.

Where no NeMo-RL source tree is found (``$NEMO_RL_ROOT``, or the checkout of an importable ``nemo_rl``),
the recipe's ``nemo_rl:`` parents and the key check are skipped and the report says so; ``--strict``
then fails, since it cannot do what it promises.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from nemo_occ.core.config import CONFIG_KEY, NemoOCCConfig
from nemo_occ.nemo_rl.compat import describe_nemo_rl_tree, drop_newer_keys
from nemo_occ.nemo_rl.config_schema import UnknownKey, declares, load_nemo_rl_schema, unknown_keys
from nemo_occ.nemo_rl.recipes import (
    Recipe,
    check_recipe,
    find_nemo_rl_root,
    load_recipe,
    parallel_layout,
)

__all__ = ["Preflight", "preflight", "nemo_rl_unknown_keys", "print_report"]


@dataclass
class Preflight:
    """The checked recipe and what could not be verified or is not known to NeMo-RL."""

    recipe: Recipe
    occ: NemoOCCConfig
    nemo_rl_root: Path | None
    unknown: list[UnknownKey] = field(default_factory=list)
    keys_checked: bool = False
    newer_keys: list[str] = field(default_factory=list)  # notes: keys this NeMo-RL does not declare yet


def nemo_rl_unknown_keys(config: dict, root: Path | None) -> list[UnknownKey] | None:
    """Keys of ``config`` NeMo-RL's ``MasterConfig`` types do not know; None without a NeMo-RL tree."""
    schema = load_nemo_rl_schema(root) if root is not None else None
    if schema is None:
        return None
    # our block: NemoOCCConfig checks it strictly, NeMo-RL never reads it
    return unknown_keys(config, schema.master, ignore={CONFIG_KEY}, read_keys=schema.read_keys)


def preflight(config_path: str | Path, overrides: Sequence[str] = ()) -> Preflight:
    """Load ``config_path`` with ``overrides`` as a launch does and check it; raises ``RecipeError``."""
    root = find_nemo_rl_root()
    recipe = load_recipe(config_path, overrides, nemo_rl_root=root or False)
    occ = check_recipe(recipe)
    schema = load_nemo_rl_schema(root) if root is not None and not recipe.skipped_parents else None
    newer: list[str] = []
    if schema is not None:
        # as the launch does: keys this tree's NeMo-RL does not declare yet (a release before the change
        # that added them) are taken out, with a note; checked per version, not reported as unknown
        newer = drop_newer_keys(recipe.config, lambda dotted: declares(schema.master, dotted))
    unknown = nemo_rl_unknown_keys(recipe.config, root) if schema is not None else None
    return Preflight(recipe, occ, root, unknown or [], keys_checked=unknown is not None, newer_keys=newer)


def print_report(
    result: Preflight, out: TextIO | None = None, err: TextIO | None = None, *, refused: bool = False
) -> None:
    """What ``--check`` prints: OK line, our block, the GPU layout; warnings and unchecked parts on stderr.

    ``refused``: the caller fails the check (``--strict`` on an unchecked or unknown key), so the first
    line says the recipe was checked, not that it is OK.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    lay = parallel_layout(result.recipe.config)
    print(f"recipe {'checked, refused under --strict' if refused else 'OK'}: {result.recipe.path}", file=out)
    print(f"  nemo_occ: {result.occ.model_dump()}", file=out)
    print(
        f"  GPUs {lay.world} = DP {lay.dp} x TP {lay.tp} x PP {lay.pp} x CP {lay.cp}; EP {lay.ep}, ETP {lay.etp}",
        file=out,
    )
    if result.keys_checked:
        print(f"  checked against {describe_nemo_rl_tree(result.nemo_rl_root)}", file=out)
    else:
        print("  not checked against any NeMo-RL (see the note)", file=out)
    for key in result.unknown:
        print(f"warning: NeMo-RL's config types do not know {key}: NeMo-RL would ignore it", file=err)
    for note in result.newer_keys:
        print(f"note: {note}", file=err)
    for note in result.recipe.notes:
        print(f"note: {note}", file=err)
    if result.recipe.skipped_parents:
        print(
            "note: not checked (no NeMo-RL source tree; set NEMO_RL_ROOT to a NeMo-RL checkout): "
            f"{', '.join(result.recipe.skipped_parents)} and NeMo-RL's key names",
            file=err,
        )
    elif not result.keys_checked:
        print("note: NeMo-RL's key names not checked (no MasterConfig in the NeMo-RL tree)", file=err)
