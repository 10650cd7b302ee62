"""The demo's output folder: what the demo writes there and when a rerun may resume it.

``OUT/run.json`` marks a folder as a demo output (``"kind": "nemo-occ demo"``). It is written before
anything else and holds the resolved configuration, the seed and, per invocation, the command, the
package versions and the machine.

**Same configuration.** A rerun resumes a folder when :func:`results_config` of the new run equals
the one in its ``run.json``: the whole resolved configuration (``demo:`` and ``nemo_occ:`` blocks,
``--quick``, ``--steps``, ``--seed``, ``--fidelity-every`` all end up in it) except three settings
that change no number of any regime:

- ``regimes``: each regime trains in its own folder from the same warm start, seeds and data, so a
  rerun with other regimes adds or resumes those and the summary covers every finished regime;
- ``threads`` and ``rl.checkpoint_every``: how the run executes, not what it computes (a different
  thread count can change floating-point summation order, as a different machine does).

Anything else differs → the rerun is refused unless ``--overwrite``. ``--overwrite`` deletes only
what the demo writes, by name (:data:`TOP_LEVEL`, the regime folders' :data:`PER_REGIME` entries and
the temporary files of its atomic writes); other files stay. A folder without a demo ``run.json``
that holds anything else is never touched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nemo_occ.atomic_io import atomic_write, temporary_file_target
from nemo_occ.core.config import REGIMES, NemoOCCConfig
from nemo_occ.lab.demo.config import DemoConfig
from nemo_occ.lab.figures import FIGURE_FILES

__all__ = [
    "RUN_FILE",
    "DemoOutputError",
    "prepare_output",
    "regime_fingerprint",
    "results_config",
    "run_settings",
]

RUN_FILE = "run.json"
KIND = "nemo-occ demo"
# everything the demo writes at the top of OUT, and inside OUT/<regime>/ (``tb`` holds TensorBoard events)
TOP_LEVEL = (
    RUN_FILE,
    "warmstart.pt",
    "summary.json",
    "summary.md",
    *FIGURE_FILES,
    # the figures of earlier versions of the demo
    "curves.png",
    "occ_proxies.png",
    "fidelity.png",
)
PER_REGIME = ("metrics.jsonl", "checkpoint.pt", "tb")
_TB_EVENTS = "events.out.tfevents."
_NOT_RESULTS = {"regimes": True, "threads": True, "rl": {"checkpoint_every"}}


class DemoOutputError(ValueError):
    """``--out`` cannot be used as asked; the message says what to do instead."""


def results_config(cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig) -> dict:
    """The resolved configuration that decides the numbers (module docstring: "Same configuration")."""
    return json.loads(
        json.dumps({"demo": cfg.model_dump(exclude=_NOT_RESULTS), "nemo_occ": nemo_occ_cfg.model_dump()})
    )


def run_settings(cfg: DemoConfig) -> dict:
    """The settings left out of :func:`results_config`; recorded per invocation."""
    return cfg.model_dump(include=_NOT_RESULTS)


def regime_fingerprint(cfg: DemoConfig, nemo_occ_cfg: NemoOCCConfig, regime: str) -> dict:
    """What a regime's checkpoint must match to be resumed."""
    return {**results_config(cfg, nemo_occ_cfg), "regime": regime}


def _is_temp_of(name: str, names) -> bool:
    """A temporary file of :func:`atomic_write` for one of ``names`` (left behind by a hard kill)."""
    return temporary_file_target(name) in names


def _demo_entries(out: Path) -> tuple[list[Path], list[Path]]:
    """(what the demo wrote, anything else) in ``out``, files listed before their folders."""
    ours, foreign = [], []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name in REGIMES and entry.is_dir() and not entry.is_symlink():
            inner_ours, inner_foreign = [], []
            for sub in sorted(entry.iterdir()):
                if sub.name == "tb" and sub.is_dir() and not sub.is_symlink():
                    events = list(sub.iterdir())
                    (
                        inner_ours if all(e.name.startswith(_TB_EVENTS) for e in events) else inner_foreign
                    ).append(sub)
                elif (sub.name in PER_REGIME or _is_temp_of(sub.name, PER_REGIME)) and sub.is_file():
                    inner_ours.append(sub)
                else:
                    inner_foreign.append(sub)
            ours += inner_ours
            foreign += inner_foreign
            if not inner_foreign:
                ours.append(entry)
        elif (name in TOP_LEVEL or _is_temp_of(name, TOP_LEVEL)) and entry.is_file():
            ours.append(entry)
        else:
            foreign.append(entry)
    return ours, foreign


def _read_record(path: Path) -> dict | None:
    """The demo record in ``path`` (a run.json), or None when the file is not one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("kind") == KIND else None


def _flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _differences(old: dict, new: dict, limit: int = 3) -> str:
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "(unset)") != b.get(k, "(unset)"))
    shown = [
        f"{k} {json.dumps(a.get(k, '(unset)'))} → {json.dumps(b.get(k, '(unset)'))}" for k in keys[:limit]
    ]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _remove(entries: list[Path]) -> None:
    for p in entries:  # files before their folders; a regime folder is listed only once emptied
        if p.is_dir() and p.parent.name in REGIMES and p.name == "tb":
            shutil.rmtree(p)
        elif p.is_dir():
            p.rmdir()
        else:
            p.unlink()


def prepare_output(out: Path, identity: dict, invocation: dict, *, overwrite: bool) -> tuple[dict, bool]:
    """Make ``out`` ready for a run of ``identity`` and record ``invocation`` in its run.json.

    Returns (the run record, whether an earlier run of the same configuration is resumed). Raises
    :class:`DemoOutputError`, before touching anything, when ``out`` is a file, holds a demo run of
    another configuration (without ``overwrite``), or holds files the demo did not write and is not
    a demo output.
    """
    out = Path(out)
    flag = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise DemoOutputError(f"{flag} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)  # an OSError (full, read-only) is one line in nemo_occ.cli
    ours, foreign = _demo_entries(out)
    run_file = out / RUN_FILE
    record = _read_record(run_file) if run_file.exists() else None
    if run_file.exists() and record is None:
        raise DemoOutputError(
            f"{flag} has a run.json that is not a nemo-occ demo record; choose another --out"
        )
    if record is None and foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise DemoOutputError(
            f"{flag} is not empty ({names}) and is not a demo output folder (no run.json); "
            "choose an empty or new folder"
        )
    if record is None and ours and not overwrite:
        raise DemoOutputError(
            f"{flag} holds demo files but no run.json (written by an older nemo-occ?), so its configuration "
            "is unknown; add --overwrite to start fresh or choose another --out"
        )
    resume = record is not None and not overwrite
    if resume and record.get("config") != identity:
        changed = _differences(record.get("config", {}), identity)
        raise DemoOutputError(
            f"{flag} holds a demo run with another configuration ({changed}); "
            "rerun with its settings to resume, add --overwrite to start fresh, or choose another --out"
        )
    if overwrite:  # run.json goes last: an interrupted clean-up still marks the folder as the demo's
        _remove([p for p in ours if p != run_file])
        run_file.unlink(missing_ok=True)
    else:  # temporary files of writes that a hard kill interrupted
        _remove([p for p in ours if p.is_file() and p.name.endswith(".tmp")])
    if not resume:
        record = {
            "kind": KIND,
            "format": 1,
            "config": identity,
            "seed": identity["demo"]["seed"],
            "invocations": [],
        }
    record["invocations"].append(invocation)
    atomic_write(run_file, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    return record, resume
