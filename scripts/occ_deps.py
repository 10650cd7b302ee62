"""Print nemo-occ's third-party requirements for a scratch environment, one per line.

    python3 scripts/occ_deps.py pyproject.toml

The core's dependencies and those of every layer's extra (megatron, nemo_rl, export, lab), less torch and
megatron-core (an upstream check brings each its own way) and less the extras' references to nemo-occ
itself. The check scripts (upstream_check.sh, bridge_check.sh) install these into the venvs they build.
"""

import re
import sys

import tomllib

EXTRAS = ("megatron", "nemo_rl", "export", "lab")
SKIP = ("torch", "megatron-core", "nemo-occ")


def requirements(pyproject: str) -> list[str]:
    """The core's and the layer extras' requirements, each once, in pyproject order, less SKIP."""
    project = tomllib.load(open(pyproject, "rb"))["project"]
    extras = project.get("optional-dependencies", {})
    found = list(project["dependencies"]) + [d for name in EXTRAS for d in extras.get(name, [])]
    keep = [d for d in found if re.split(r"[<>=!~ \[;]", d)[0] not in SKIP]
    return list(dict.fromkeys(keep))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
