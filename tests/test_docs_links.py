"""README.md and docs/: every relative link and anchor resolves, every repository path and ``nemo_occ.*``
name they cite exists, and the README's two CPU commands are the ones CI runs.

Anchors follow GitHub's heading slugs: lower case, punctuation other than ``-`` and ``_`` dropped, each
space a ``-``, and ``-1``, ``-2``, ... appended to repeats. Fenced code blocks hold no links or headings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest

from nemo_occ.core.config import NemoOCCConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# a path under one of the repository's top-level folders, as docs name files in backticks
MODULE_NAME = re.compile(r"`(nemo_occ(?:\.\w+)+)`")  # a module or a name in one, as docs cite code
REPO_PATH = re.compile(r"`((?:\.ci|bench|docs|nemo_occ|recipes|scripts|slurm|tests)/[\w./-]+)`")


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (their lines become empty, so line numbers stay)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in _prose(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            if n:
                seen[f"{slug}-{n}"] = 1
    return set(seen)


def links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            broken.append(
                f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} missing"
            )
        elif anchor and (dest.suffix != ".md" or unquote(anchor) not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def missing_paths(page: Path) -> list[str]:
    missing = []
    for path in REPO_PATH.findall(page.read_text()):
        if re.search(r"[*{}<>]", path):  # a pattern (`test_megatron_*.py`, `{occ,detach}`): not one file
            continue
        if not (ROOT / path.rstrip("/")).exists():
            missing.append(path)
    return missing


def _defines(module: Path, name: str) -> bool:
    source = module.read_text()
    return bool(
        re.search(rf"^\s*(?:def|class)\s+{name}\b|^{name}\s*[:=]|^\s*(?:from\s+\S+\s+)?import\b.*\b{name}\b",
                  source, flags=re.M)
    )  # fmt: skip


def missing_modules(page: Path) -> list[str]:
    """Dotted names ``nemo_occ.a.b[.Name[.attr]]`` whose module is not in the package or lacks ``Name``.

    ``nemo_occ.<field>`` is a recipe key (the ``nemo_occ:`` block), checked against the config's fields."""
    missing = []
    for dotted in MODULE_NAME.findall(page.read_text()):
        parts = dotted.split(".")
        if parts[1] in NemoOCCConfig.model_fields and not (ROOT / "nemo_occ" / parts[1]).exists():
            continue
        for cut in range(len(parts), 0, -1):
            base = ROOT.joinpath(*parts[:cut])
            module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if module.exists():
                break
        rest = parts[cut:]
        if not module.exists() or len(rest) > 2 or (rest and not _defines(module, rest[0])):
            missing.append(dotted)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: {broken_links(page)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page: Path):
    assert not missing_paths(page), f"{page.relative_to(ROOT)} names files not in the repository"
    assert not missing_modules(page), f"{page.relative_to(ROOT)} names code not in the package"


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in links(page):
            path = target.partition("#")[0]
            if path.endswith(".md") and "://" not in path:
                todo.append((page.parent / unquote(path)).resolve())
    assert not set(PAGES) - reached, sorted(str(p.relative_to(ROOT)) for p in set(PAGES) - reached)


def _ci_commands() -> list[str]:
    """The shell lines of .ci/run (comments and shell setup dropped)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.startswith(("#", "set ", "cd "))]


def _readme_commands() -> list[str]:
    """The indented command lines of the README's first section after the title's (the CPU commands)."""
    text = (ROOT / "README.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    return [ln[4:] for ln in sections[1].splitlines() if ln.startswith("    ") and ln.strip()]


def test_the_readme_test_command_is_what_ci_runs_verbatim():
    readme = _readme_commands()
    assert len(readme) == 2, readme  # the demo command, then the test command
    assert _ci_commands()[0] == readme[1]


def test_the_readme_demo_command_installs_like_the_test_command_and_runs_the_console_script():
    demo, test = _readme_commands()
    words, test_words = shlex.split(demo), shlex.split(test)
    scripts = (ROOT / "pyproject.toml").read_text().partition("[project.scripts]")[2].partition("\n[")[0]
    # same venv and pinned torch as CI, with the lab extra (which the dev extra includes), then the installed
    # console script
    assert words[: words.index("-e")] == test_words[: test_words.index("-e")]
    assert words[words.index("-e") + 1] == ".[lab]" and test_words[test_words.index("-e") + 1] == ".[dev]"
    extras = (ROOT / "pyproject.toml").read_text().partition("[project.optional-dependencies]")[2]
    dev = re.search(r"^dev = \[\s*\"nemo-occ\[([\w,]+)\]\"", extras, flags=re.M)
    assert dev and "lab" in dev.group(1).split(","), "the dev extra must pull the lab extra"
    assert words[-2:] == [".venv/bin/nemo-occ", "demo"]
    assert re.search(r"^nemo-occ = \"nemo_occ\.cli:main\"$", scripts, flags=re.M)


CODE_DIRS = ("nemo_occ", "tests", "bench", "scripts", "slurm", "recipes", ".ci")
DOCS_CITATION = re.compile(r"(NeMo-RL's\s+)?(?<![\w/])(docs/[\w./-]*\w)")


def test_code_recipes_and_scripts_cite_only_docs_in_the_repository():
    """A ``docs/...`` path in code, tests, recipes or scripts names a page of this repository (an upstream
    one is introduced as ``NeMo-RL's docs/...``), and no file cites the reference notes kept outside it."""
    outside = "REFERENCE" + ".md"  # split so that this file does not cite it either
    wrong = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or path.suffix in {".pyc", ".png", ".pt"}:
                continue
            text = path.read_text(errors="replace")
            rel = path.relative_to(ROOT)
            wrong += [f"{rel}: {outside}"] * (outside in text)
            for upstream, cited in DOCS_CITATION.findall(text):
                if not upstream and not (ROOT / cited.rstrip(".")).exists():
                    wrong.append(f"{rel}: {cited}")
    assert not wrong, wrong
