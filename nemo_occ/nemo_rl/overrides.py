"""Command-line overrides of a recipe, parsed exactly as NeMo-RL's entry point parses them.

NeMo-RL's ``examples/run_grpo.py`` passes every argument it does not know to
``nemo_rl.utils.config.parse_hydra_overrides``: the config is put in struct mode and Hydra's own
override grammar is applied, so

* ``key=value``   sets a key that exists (a key that does not exist is an error),
* ``+key=value``  adds a key that does not exist (an existing one is an error),
* ``++key=value`` sets or adds,
* ``~key``        deletes a key (``~key=value`` only if it holds that value),

and values follow Hydra's grammar (``null``, ``[1,2]``, quoted strings, ``${...}``). :func:`apply_overrides`
calls that function when NeMo-RL is importable, else hydra-core's ``OverridesParser`` and config loader
the same way (the calls NeMo-RL makes; hydra-core is a dependency of nemo-occ). Overrides are applied one
at a time, in order, which is what Hydra does with the whole list, so an error names the override that
caused it. A bare ``key`` without ``=`` is rejected up front: Hydra would too, with a grammar message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["OverrideError", "apply_overrides", "check_override_syntax", "hydra_override_applier"]


class OverrideError(ValueError):
    """An override the user has to fix; the message is one line and names the override."""


def check_override_syntax(override: str) -> None:
    """Reject what Hydra's grammar cannot mean as an override, with a message that says what to write."""
    if override.startswith("-"):
        raise OverrideError(
            f"unknown option {override!r}: overrides are key=value (see `nemo-occ train --help`)"
        )
    if "=" not in override and not override.startswith("~"):
        raise OverrideError(
            f"override {override!r} has no '=': write {override}=<value> to set it, "
            f"++{override}=<value> to add it, or ~{override} to delete it"
        )


def hydra_override_applier() -> Callable[[Any, list[str]], Any]:
    """``apply(cfg, overrides) -> cfg``: NeMo-RL's ``parse_hydra_overrides``, else hydra-core's parser.

    Both run Hydra's ``OverridesParser`` and ``ConfigLoaderImpl._apply_overrides_to_config`` on the config
    in struct mode; the fallback is for machines without NeMo-RL (a login node, CI).
    """
    try:
        from nemo_rl.utils.config import parse_hydra_overrides

        return parse_hydra_overrides
    except ImportError:
        pass
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError as err:
        raise OverrideError(
            f"applying overrides needs hydra-core (a dependency of nemo-occ; {err}): pip install hydra-core"
        ) from None
    from omegaconf import OmegaConf

    def apply(cfg, overrides: list[str]):
        OmegaConf.set_struct(cfg, True)
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        ConfigLoaderImpl._apply_overrides_to_config(overrides=parsed, cfg=cfg)
        return cfg

    return apply


def _one_line(err: BaseException) -> str:
    text = str(err)
    if text.startswith("Failed to parse Hydra overrides: "):  # NeMo-RL's wrapper around Hydra's message
        text = text[len("Failed to parse Hydra overrides: ") :]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "hydra.cc/docs" not in line]
    return " ".join(lines) or type(err).__name__


def apply_overrides(
    cfg, overrides: Sequence[str], *, lenient_new_keys: bool = False
) -> tuple[Any, list[str]]:
    """Apply ``overrides`` to the OmegaConf ``cfg`` in order; return ``(cfg, notes)``.

    ``lenient_new_keys=True`` is for a recipe whose NeMo-RL base could not be loaded: a ``key=value``
    whose key is missing may exist in that base, so it is added (as ``++key=value``) and reported in
    ``notes`` instead of failing. Raises :class:`OverrideError` with one line naming the bad override.
    """
    import copy

    apply = hydra_override_applier()
    cfg = copy.deepcopy(cfg)  # Hydra edits in place; a failing override must leave the caller's config intact
    notes: list[str] = []
    for override in overrides:
        check_override_syntax(override)
        try:
            cfg = apply(cfg, [override])
        except Exception as err:  # Hydra and NeMo-RL raise several types; all are the user's override
            plain = not override.startswith(("+", "~"))
            if lenient_new_keys and plain and "Could not override" in str(err):
                cfg = apply(cfg, ["++" + override])
                notes.append(
                    f"{override}: key not in the recipe's own files; not checked against NeMo-RL's base config"
                )
                continue
            raise OverrideError(f"override {override!r}: {_one_line(err)}") from None
    return cfg, notes
