"""The lab: the CPU demo, the study, their figures, and the small megatron-core GPT they run on with the
CPU shims it needs (``tiny_gpt``, ``cpu_compat``, ``parallel``). Installed with the ``[lab]`` extra;
nothing in the library imports from here.
"""

from __future__ import annotations

import importlib.util

# what the [lab] extra installs beyond the library: import name -> distribution name
_LAB_PACKAGES = {
    "megatron.core": "megatron-core",
    "matplotlib": "matplotlib",
    "scipy": "scipy",
    "tensorboard": "tensorboard",
    "tqdm": "tqdm",
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return False


def missing_lab_packages() -> list[str]:
    """The distributions of the ``[lab]`` extra that are not importable here, in a fixed order."""
    return [dist for name, dist in _LAB_PACKAGES.items() if not _importable(name)]


def require_lab(command: str) -> None:
    """Exit with one line naming the extra to install when ``command`` (a lab command) lacks its packages."""
    missing = missing_lab_packages()
    if missing:
        raise SystemExit(
            f'nemo-occ {command} needs the lab extra: pip install -e ".[lab]" (missing: {", ".join(missing)})'
        )
