"""The package's layout promises: a plain install pulls only the core's packages, the library never imports
the lab, and no two modules import each other (directly or through others, at any depth of a function)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nemo_occ"


def _imports() -> dict[str, set[str]]:
    """module -> the nemo_occ modules it imports anywhere in its source (function-local imports included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_plain_install_pulls_no_lab_or_layer_packages():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M).group(1)
    names = {
        re.match(r"[A-Za-z0-9_.-]+", d.strip().strip('",')).group(0).lower()
        for d in deps.split("\n")
        if '"' in d
    }
    assert names == {"torch", "numpy", "pydantic", "pyyaml"}


def test_the_library_never_imports_the_lab():
    graph = _imports()
    offenders = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if not m.startswith("nemo_occ.lab")
        for t in ts
        if t.startswith("nemo_occ.lab")
    )
    # the CLI registers the lab's commands by name (importlib), without importing them
    assert offenders == []


def test_no_import_circles():
    graph = _imports()
    seen, on_path, cycles = set(), [], []

    def visit(module):
        on_path.append(module)
        for target in sorted(graph[module]):
            if target in on_path:
                cycles.append(on_path[on_path.index(target) :] + [target])
            elif target not in seen:
                visit(target)
        on_path.pop()
        seen.add(module)

    for module in sorted(graph):
        if module not in seen:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("command", ["demo", "study"])
def test_a_lab_command_without_the_extra_names_it_in_one_line(monkeypatch, capsys, command):
    import nemo_occ.lab as lab
    from nemo_occ.cli import main

    monkeypatch.setattr(lab, "_importable", lambda name: name not in ("matplotlib", "tensorboard"))
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--quick"])
    message = str(exit_info.value)
    assert message == (
        f'nemo-occ {command} needs the lab extra: pip install -e ".[lab]" (missing: matplotlib, tensorboard)'
    )
