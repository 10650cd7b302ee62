"""Every misuse of the command line gets one line on stderr, a known exit status, and changes nothing.

One table, ``MISUSES``, over every command (demo, study, train --check, export, verify-export, info,
slurm/submit.sh --dry-run): the command line, the one stderr line it must print (a regular expression
over the whole line), the exit status, and what the row needs. Every row runs in a folder of the
user's files (a note, a folder of their own, a reference checkpoint, a Megatron checkpoint folder, a
full disk and a read-only one); a fingerprint of every file and folder under it before and after
proves that the misuse changed nothing (no file changed, none created, no folder left behind).

The full and read-only disks are real tmpfs mounts where this process may mount (root), and otherwise
a patched file system that fails every write below the folder with ENOSPC / EROFS, the errors the
kernel gives. Rows that only validate arguments stop before any training starts (no row trains).
Ctrl-C rows run the command in a child process, send SIGINT to its process group (what a terminal
does) once it is working, and check exit status 130, one line, and that no file is half-written.
New commands add rows here.
"""


import builtins
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nemo_occ.cli import main
from tests._export_stand_in import install_stand_in_bridge, make_megatron_folder
from tests._export_synthetic import make_reference_checkpoint, train_like

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "grpo-occ-mimo-7b-rl-1n8g-h100-tp2-smoke.yaml"


@dataclass(frozen=True)
class Misuse:
    """One row: ``argv`` (``{home}``, ``{full}``, ``{ro}``, ``{ckpt}``, ``{ref}`` are filled in), the line."""

    id: str
    argv: list[str]
    line: str  # regular expression the single stderr line must match in full
    code: int = 2
    needs: frozenset[str] = field(default_factory=frozenset)  # "bridge": a stand-in Megatron-Bridge


def row(id: str, argv: str, line: str, code: int = 2, needs: tuple[str, ...] = ()) -> Misuse:
    return Misuse(id, argv.split(), line, code, frozenset(needs))


NO_ROOM = r"No space left on device; free space or choose another --out"
READ_ONLY = r"Read-only file system"
MISUSES = [
    # -- nemo-occ itself
    row("no such command", "bogus", r"nemo-occ: error: argument COMMAND: invalid choice: 'bogus' .*\(see nemo-occ --help\)"),
    # -- demo
    row("demo: steps not a number", "demo --steps x", r"nemo-occ demo: error: argument --steps: invalid int value: 'x' \(see nemo-occ demo --help\)"),
    row("demo: zero steps", "demo --steps 0", r"nemo-occ demo: --steps 0: Input should be greater than 0"),
    row("demo: unknown regime", "demo --regimes bogus", r"nemo-occ demo: --regimes bogus: unknown regime\(s\) \['bogus'\]; choose from none, detach, ce, policy, occ"),
    row("demo: negative fidelity", "demo --fidelity-every -1", r"nemo-occ demo: --fidelity-every -1: Input should be greater than or equal to 0"),
    row("demo: missing config", "demo --config {home}/missing.yaml", r"nemo-occ demo: --config .*/missing.yaml: no such file"),
    row("demo: typo in config", "demo --config {home}/typo.yaml", r"nemo-occ demo: --config .*/typo.yaml: invalid nemo-occ configuration: demo.stepz: unknown key \(remove it or check its spelling\)"),
    row("demo: out is a file", "demo --quick --out {home}/notes.txt", r"nemo-occ demo: --out .*/notes.txt is a file; give a folder \(it is created if missing\)"),
    row("demo: out is someone's folder", "demo --quick --out {home}/mine", r"nemo-occ demo: --out .*/mine is not empty \(a.txt\) and is not a demo output folder \(no run.json\); choose an empty or new folder"),
    row("demo: out on a full disk", "demo --quick --out {full}/demo/new", rf"nemo-occ demo: error: .*: {NO_ROOM}"),
    row("demo: out on a read-only disk", "demo --quick --out {ro}/demo", rf"nemo-occ demo: error: .*: {READ_ONLY}; choose an --out you may write to"),
    # -- study
    row("study: negative minutes", "study --quick --max-minutes -5", r"nemo-occ study: --max-minutes -5: give a number of minutes > 0"),
    row("study: nan minutes", "study --quick --max-minutes nan", r"nemo-occ study: --max-minutes nan: give a number of minutes > 0"),
    row("study: minutes not a number", "study --max-minutes soon", r"nemo-occ study: error: argument --max-minutes: invalid float value: 'soon' \(see nemo-occ study --help\)"),
    row("study: zero steps", "study --steps 0", r"nemo-occ study: --steps 0: give at least 1"),
    row("study: a seed twice", "study --seeds 0 0", r"nemo-occ study: --seeds 0 0: name each seed once"),
    row("study: sweep seed not a seed", "study --sweep-seeds 7", r"nemo-occ study: --sweep-seeds 7: each must be one of --seeds"),
    row("study: unknown variant", "study --quick --only bogus", r"nemo-occ study: --only bogus: choose from detach, occ, policy, ce, .*"),
    row("study: negative probes", "study --probe-minibatches -1", r"nemo-occ study: --probe-minibatches must be >= 0 and --probe-checkpoints >= 1"),
    row("study: more probes than steps", "study --quick --probe-checkpoints 99", r"nemo-occ study: --probe-checkpoints 99 exceeds the \d+ RL steps"),
    row("study: missing config", "study --config {home}/missing.yaml", r"nemo-occ study: --config .*/missing.yaml: no such file"),
    row("study: out is a file", "study --quick --out {home}/notes.txt", r"nemo-occ study: --out .*/notes.txt is a file; give a folder \(it is created if missing\)"),
    row("study: out is someone's folder", "study --quick --out {home}/mine", r"nemo-occ study: --out .*/mine is not empty and is not a study folder \(no study.json\); choose another --out"),
    row("study: out on a full disk", "study --quick --out {full}/study/new", rf"nemo-occ study: error: .*: {NO_ROOM}"),
    row("study: out on a read-only disk", "study --quick --out {ro}/study", rf"nemo-occ study: error: .*: {READ_ONLY}; choose an --out you may write to"),
    # -- train --check (the recipe check; NeMo-RL's own keys: tests/nemo_rl/test_nemo_rl_preflight.py)
    row("train: no recipe given", "train --check", r"nemo-occ train: error: the following arguments are required: --config \(see nemo-occ train --help\)"),
    row("train: missing recipe", "train --config {home}/missing.yaml --check", r"error: recipe file not found: .*/missing.yaml"),
    row("train: broken YAML", "train --config {home}/broken.yaml --check", r"error: .*/broken.yaml:\d+:\d+: YAML syntax error: .*"),
    # -- export (its own flags and checks: tests/export/test_export_cli.py)
    row("export: no arguments", "export", r"nemo-occ export: error: the following arguments are required: --megatron-ckpt, --hf-model, --out \(see nemo-occ export --help\)"),
    row("export: missing checkpoint", "export --megatron-ckpt {home}/nope --hf-model {ref} --out {home}/o", r"nemo-occ: error: --megatron-ckpt .*/nope is not a directory \(.*\)\."),
    row("export: not a checkpoint", "export --megatron-ckpt {home}/mine --hf-model {ref} --out {home}/o", r"nemo-occ: error: --megatron-ckpt .*/mine is not a Megatron checkpoint: .*"),
    row("export: missing reference", "export --megatron-ckpt {ckpt} --hf-model {home}/nope --out {home}/o", r"nemo-occ: error: Reference '.*/nope' is neither a checkpoint folder nor a Hub id .*"),
    row("export: out exists", "export --megatron-ckpt {ckpt} --hf-model {ref} --out {home}/mine", r"nemo-occ: error: .*/mine already exists; choose another --out or pass --overwrite to replace it\."),
    row("export: out inside the reference", "export --megatron-ckpt {ckpt} --hf-model {ref} --out {ref}/x", r"nemo-occ: error: --out .*/x is inside the --hf-model checkpoint .*; choose a folder outside it\."),
    row("export: no Megatron-Bridge", "export --megatron-ckpt {ckpt} --hf-model {ref} --out {home}/o", r"nemo-occ: error: nemo-occ export needs Megatron-Bridge .*could not be imported .*"),
    row("export: nan limit", "export --megatron-ckpt {ckpt} --hf-model {ref} --out {home}/o --max-mtp-change nan", r"nemo-occ export: error: argument --max-mtp-change: must be a finite number > 0, got 'nan' \(see nemo-occ export --help\)"),
    row("export: out on a full disk", "export --megatron-ckpt {ckpt} --hf-model {ref} --out {full}/export", r"nemo-occ: error: (not enough disk space for --out .*/full/export: it needs .*, .*/full has .* free \(.* short\)\. Nothing was written; free some space or choose another --out|--out .*/full/export: cannot write in .*/full \(No space left on device\)\.)", needs=("bridge",)),
    row("export: out on a read-only disk", "export --megatron-ckpt {ckpt} --hf-model {ref} --out {ro}/export", rf"nemo-occ: error: --out .*/ro/export: cannot write in .*/ro \({READ_ONLY}\)\.", needs=("bridge",)),
    # -- verify-export
    row("verify: missing export", "verify-export {home}/nope --reference {ref}", r"nemo-occ: error: .*/nope is not a directory\."),
    row("verify: missing reference", "verify-export {ref} --reference {home}/nope", r"nemo-occ: error: Reference '.*/nope' is neither a checkpoint folder nor a Hub id .*"),
    row("verify: not a checkpoint", "verify-export {home}/mine --reference {ref}", r"nemo-occ: error: .*/mine has neither model.safetensors.index.json nor model.safetensors\."),
    row("verify: corrupt shard", "verify-export {home}/corrupt --reference {ref}", r"nemo-occ: error: .*/corrupt/model-00001-of-00003.safetensors is not a readable safetensors file .*"),
    # -- info
    row("info: unknown flag", "info --bogus", r"nemo-occ: error: unrecognized arguments: --bogus \(see nemo-occ --help\)"),
    # -- a state file from elsewhere (nemo_occ.safe_load)
    row("demo: planted checkpoint", "demo --quick --regimes none --out {home}/demo-run", r"nemo-occ demo: error: .*/none/checkpoint.pt holds objects other than numbers, lists, dicts and tensors \(.*\), so nemo-occ did not write it; it was not loaded, because loading it could run code \(add --overwrite to start fresh or choose another --out\)"),
]  # fmt: skip


# ---- the user's files ---------------------------------------------------------------------------


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: a folder's mode; a file's mode, size, mtime and sha256."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            if path.is_dir():  # its entries are compared one by one; its own mtime moves with any of them
                seen[str(path.relative_to(root))] = (True, st.st_mode)
            else:
                seen[str(path.relative_to(root))] = (False, st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return seen


def _can_mount() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("mount") is not None


class PatchedDisk:
    """Fail every write below ``root`` with ``error`` (ENOSPC: full, EROFS: read-only), as the kernel would."""

    def __init__(self, monkeypatch, root: Path, error: int):
        self.root, self.error = root.resolve(), error
        real_os_open, real_mkdir, real_open = os.open, os.mkdir, io.open

        def refuse(path):
            raise OSError(self.error, os.strerror(self.error), os.fspath(path))

        def os_open(path, flags, mode=0o777, *, dir_fd=None):
            if self._below(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_os_open(path, flags, mode, dir_fd=dir_fd)

        def mkdir(path, mode=0o777, *, dir_fd=None):
            if self._below(path):
                refuse(path)
            return real_mkdir(path, mode, dir_fd=dir_fd)

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and self._below(file) and set(mode) & set("wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)

    def _below(self, path) -> bool:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(self.root)


@pytest.fixture(params=["tmpfs", "patched"])
def disks(request, tmp_path, monkeypatch):
    """(full, read-only) folders: real tmpfs mounts, or the patched file system."""
    full, ro = tmp_path / "home" / "full", tmp_path / "home" / "ro"
    full.mkdir(parents=True)
    ro.mkdir()
    if request.param == "tmpfs":
        if not _can_mount():
            pytest.skip("mounting a tmpfs needs root on Linux; the patched file system covers these rows")
        mounted = []
        for folder, options in ((full, "size=64k"), (ro, "ro,size=64k")):
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]).returncode:
                pytest.skip("this machine does not let root mount a tmpfs")
            mounted.append(folder)
            request.addfinalizer(lambda f=folder: subprocess.run(["umount", "-l", str(f)], check=False))
        fd = os.open(full / "fill", os.O_WRONLY | os.O_CREAT)
        try:  # fill it: the next write finds no space
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
    else:
        (full / "fill").write_bytes(b"\0" * 4096)
        PatchedDisk(monkeypatch, full, errno.ENOSPC)
        PatchedDisk(monkeypatch, ro, errno.EROFS)
    return full, ro


@pytest.fixture
def home(tmp_path) -> dict[str, Path]:
    """The user's files the rows point at."""
    home = tmp_path / "home"
    (home / "mine").mkdir(parents=True, exist_ok=True)
    (home / "mine" / "a.txt").write_text("the user's own file\n")
    (home / "notes.txt").write_text("notes\n")
    (home / "typo.yaml").write_text("demo:\n  stepz: 3\n")
    (home / "broken.yaml").write_text("nemo_occ: [regime\n")
    ref = home / "ref"
    make_reference_checkpoint(ref, "glm4_moe")
    corrupt = home / "corrupt"
    shutil.copytree(ref, corrupt)
    shard = corrupt / "model-00001-of-00003.safetensors"
    shard.write_bytes(b"\x10" + shard.read_bytes()[1:])
    ckpt = make_megatron_folder(home / "ckpt")
    return {"home": home, "ref": ref, "ckpt": ckpt}


def _plant_demo_checkpoint(home: Path) -> Path:
    """A demo folder of the --quick configuration whose none/checkpoint.pt runs code when unpickled."""
    import torch

    from nemo_occ.lab.demo.config import load_demo_config
    from nemo_occ.lab.demo.output import prepare_output, results_config
    from tests.test_safe_load import RunsCodeWhenUnpickled

    cfg, nemo_occ_cfg = load_demo_config(None, quick=True, overrides={})
    out = home / "demo-run"
    prepare_output(out, results_config(cfg, nemo_occ_cfg), {"command": "earlier run"}, overwrite=False)
    (out / "none").mkdir()
    torch.save(
        {"step": 1, "payload": RunsCodeWhenUnpickled(home / "code-ran")}, out / "none" / "checkpoint.pt"
    )
    return out


def _one_line(err: str, pattern: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line:\n{err}"
    assert re.fullmatch(pattern, err.rstrip("\n")), f"{err!r} does not match {pattern!r}"


@pytest.mark.parametrize(
    "misuse",
    [m for m in MISUSES if "{full}" not in " ".join(m.argv) and "{ro}" not in " ".join(m.argv)],
    ids=lambda m: m.id,
)
def test_misuse(misuse, home, capsys, monkeypatch):
    _check(misuse, home, None, capsys, monkeypatch)


@pytest.mark.parametrize(
    "misuse",
    [m for m in MISUSES if "{full}" in " ".join(m.argv) or "{ro}" in " ".join(m.argv)],
    ids=lambda m: m.id,
)
def test_misuse_on_a_full_or_read_only_disk(misuse, home, disks, capsys, monkeypatch):
    _check(misuse, home, disks, capsys, monkeypatch)


class ReachedTraining(BaseException):  # not an Exception: no command may turn it into a message
    pass


def _no_training(monkeypatch) -> None:
    """A row that got past its check would train for minutes: fail it at once instead."""
    import nemo_occ.lab.demo.run as demo_run
    import nemo_occ.lab.study.run as study_run

    def refuse(*args, **kwargs):
        raise ReachedTraining("a misuse row got past the checks into training")

    monkeypatch.setattr(demo_run, "_run", refuse)
    monkeypatch.setattr(study_run, "_train", refuse)
    monkeypatch.setattr(study_run, "_probe", refuse)


def _check(misuse: Misuse, home: dict, disks, capsys, monkeypatch) -> None:
    _no_training(monkeypatch)
    places = {k: str(v) for k, v in home.items()}
    if disks is not None:
        places.update(full=str(disks[0]), ro=str(disks[1]))
    if "bridge" in misuse.needs:
        from safetensors.torch import load_file

        tensors = {}
        for shard in home["ref"].glob("*.safetensors"):
            tensors.update(load_file(shard))
        install_stand_in_bridge(monkeypatch, train_like(tensors), "glm4_moe")
    planted = misuse.id == "demo: planted checkpoint"
    if planted:
        demo_run = _plant_demo_checkpoint(home["home"])
        record_before = json.loads((demo_run / "run.json").read_text())
    monkeypatch.chdir(home["home"])
    before = fingerprint(home["home"])
    try:
        code = main([a.format(**places) for a in misuse.argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == misuse.code, err
    _one_line(err, misuse.line)
    assert out == ""
    after = fingerprint(home["home"])
    if planted:  # the demo records each invocation in its run.json before it reads a checkpoint
        record = json.loads((demo_run / "run.json").read_text())
        assert record["invocations"][:-1] == record_before["invocations"]
        assert {**record, "invocations": []} == {**record_before, "invocations": []}
        before.pop("demo-run/run.json"), after.pop("demo-run/run.json")
        assert not (home["home"] / "code-ran").exists()
    assert after == before


def test_every_command_has_a_row():
    from nemo_occ.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    covered = {m.argv[0] for m in MISUSES} | {"slurm/submit.sh"}
    assert set(subparsers.choices) <= covered, set(subparsers.choices) - covered


# ---- slurm/submit.sh --dry-run (bash: nothing to patch) -------------------------------------------

SUBMIT_MISUSES = [
    ("nodes not a number", ["{recipe}", "x"], {}, r"error: NODES must be a positive integer, got 'x'"),
    ("missing recipe", ["{home}/nope.yaml", "1"], {}, r"error: recipe .*/nope.yaml not found \(.*\)"),
    ("no container", ["{recipe}", "1"], {"CONTAINER": None}, r"error: set CONTAINER to the NeMo-RL container image"),
    ("no NeMo-RL tree", ["{recipe}", "1"], {"NEMO_RL_ROOT": None}, r"error: set NEMO_RL_ROOT to a NeMo-RL checkout .*"),
    ("no ray.sub", ["{recipe}", "1"], {"NEMO_RL_ROOT": "{home}"}, r"error: .*/ray.sub not found: .*"),
    ("checkout not mounted", ["{recipe}", "1"], {"MOUNTS": "/data:/data"}, r"error: MOUNTS='/data:/data' does not mount the checkout .*"),
    ("no account", ["{recipe}", "1", "--", "-p", "batch"], {}, r"error: pass the Slurm account after '--' .*"),
    ("nodes as an sbatch flag", ["{recipe}", "1", "--", "-A", "a", "-p", "b", "-t", "1:00:00", "-N", "2"], {}, r"error: give the node count as NODES, not as an sbatch flag"),
]  # fmt: skip


@pytest.mark.parametrize("case", SUBMIT_MISUSES, ids=lambda c: c[0])
def test_submit_misuse(case, home, tmp_path):
    _, args, env_changes, pattern = case
    tree = tmp_path / "nemo-rl"
    tree.mkdir()
    (tree / "ray.sub").write_text("#!/bin/bash\nCONTAINER=$CONTAINER\nCOMMAND=${COMMAND:-}\n")
    places = {"home": str(home["home"]), "recipe": str(RECIPE.relative_to(ROOT))}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "RAY_SUB", "MOUNTS"))}
    env.update(CONTAINER="nvcr.io/nvidia/nemo-rl:test", NEMO_RL_ROOT=str(tree), PYTHON=sys.executable)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value.format(**places)
    before = fingerprint(home["home"])
    result = subprocess.run(
        ["bash", "slurm/submit.sh", "--dry-run", *(a.format(**places) for a in args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    _one_line(result.stderr, pattern)
    assert result.stdout == "" and fingerprint(home["home"]) == before


# ---- Ctrl-C ------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _as_a_shell_starts_it() -> None:
    """The child's SIGINT as a shell leaves it for a command: default action, not blocked. (An ignored or
    blocked SIGINT is inherited through exec; in a full test session something leaves the pytest process
    so, and the Ctrl-C tests then saw their command run to the end. Not yet traced: see the closing note.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _ctrl_c(argv: list[str], cwd: Path, working, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``nemo-occ argv``; once ``working()`` is true, Ctrl-C (SIGINT to its process group)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "nemo_occ", *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=_as_a_shell_starts_it,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not working(child):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the command never got to work"
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def _nothing_half_written(root: Path) -> None:
    """No temporary or partial file is left, and every file the command wrote reads back whole."""
    from nemo_occ.safe_load import load_state

    for path in root.rglob("*"):
        assert not re.search(r"\.tmp$|\.partial-", path.name), path
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".pt":
            load_state(path)


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["demo", "study"])
def test_ctrl_c_while_training_is_one_line_exit_130_and_nothing_half_written(command, tmp_path):
    out = tmp_path / "out"
    first_file = out / ("run.json" if command == "demo" else "study.json")
    result = _ctrl_c(
        [command, "--quick", "--no-progress", "--out", str(out)], tmp_path, lambda _: first_file.exists()
    )
    # 130, or ended by the SIGINT itself (-2 here), which a shell reports as 130 too: after the command has
    # answered, an interrupt that lands in a native thread of torch's can end the process by the signal
    # (seen in about one run in three, after the one line was printed and nothing was left half written)
    assert result.returncode in (130, -signal.SIGINT), result.stderr
    *progress, last = result.stderr.splitlines(keepends=True)  # the study logs what it starts and ends
    own = (f"nemo-occ {command}: ", "[", "    ")  # its header, "[n] <job> (...)", "    <job>: done in ..."
    assert all(line.startswith(own) and "interrupt" not in line.lower() for line in progress), result.stderr
    assert "Traceback" not in result.stderr  # from this process or a worker of the study's
    _one_line(last, rf"nemo-occ {command}: interrupted; rerun the same command to resume")
    _nothing_half_written(out)


@needs_proc
def test_ctrl_c_during_info_is_one_line_exit_130(tmp_path):
    before = fingerprint(tmp_path)
    result = _ctrl_c(["info"], tmp_path, lambda child: bool(_children(child.pid)))
    assert result.returncode == 130, result.stderr
    _one_line(result.stderr, r"nemo-occ info: interrupted")
    assert fingerprint(tmp_path) == before


# ---- a command whose module cannot be imported ------------------------------------------------------


def test_a_command_that_cannot_import_is_one_line_and_info_still_reports(tmp_path, monkeypatch, capsys):
    """A package a command needs is missing or broken: that command says so; nemo-occ info still runs."""
    import nemo_occ.cli as cli

    broken = tmp_path / "broken_command_for_test.py"
    broken.write_text("import a_package_that_is_not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli._COMMAND_MODULES, "broken_command_for_test", ("broken",))
    assert main(["broken", "--any", "flag"]) == 2
    _one_line(
        capsys.readouterr().err,
        r"nemo-occ broken: unavailable here \(ModuleNotFoundError: No module named "
        r"'a_package_that_is_not_installed_here'\); `nemo-occ info` reports the environment",
    )
    from nemo_occ import info

    monkeypatch.setattr(info, "_probe", lambda code, python=sys.executable: (False, "skipped in this test"))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "nemo-occ broken     unavailable (ModuleNotFoundError: No module named" in out
    assert main(["demo", "--steps", "0"]) == 2  # the other commands still work


def test_a_missing_package_is_one_line_naming_it(tmp_path):
    """A package the command imports when it runs is not installed (here: pydantic, blocked)."""
    code = "import sys; sys.modules['pydantic'] = None; from nemo_occ.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "demo", "--steps", "3", "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    _one_line(
        result.stderr,
        r"nemo-occ demo: error: needs the Python package pydantic, which is not installed here "
        r"\(`nemo-occ info` reports the environment\)",
    )
    assert list(tmp_path.iterdir()) == []


# ---- nothing a user can do nothing about --------------------------------------------------------------

_EXPORT_WITH_STAND_IN = """
import sys
import pytest
from pathlib import Path
from safetensors.torch import load_file
from tests._export_stand_in import install_stand_in_bridge
from nemo_occ.cli import main
from tests._export_synthetic import train_like

ckpt, ref, out = sys.argv[1:]
tensors = {}
for shard in Path(ref).glob("*.safetensors"):
    tensors.update(load_file(shard))
install_stand_in_bridge(pytest.MonkeyPatch(), train_like(tensors), "glm4_moe")
sys.exit(main(["export", "--megatron-ckpt", ckpt, "--hf-model", ref, "--out", out, "--no-progress"]))
"""


@pytest.mark.slow
def test_export_prints_no_warning_a_user_cannot_act_on(home, tmp_path):
    """megatron-core warns at import that Transformer Engine / Apex are absent (4 warnings, 8 lines here)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="")
    result = subprocess.run(
        [sys.executable, "-c", _EXPORT_WITH_STAND_IN, str(home["ckpt"]), str(home["ref"]), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert "Exported" in result.stdout
