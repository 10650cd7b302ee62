"""Every file nemo-occ reads back loads without running code (``nemo_occ.safe_load``).

A planted pickle whose unpickling would create a marker file is refused at each kind of load site: the
loader every nemo-occ state goes through, the demo through its command line, and megatron-core's
``common.pt`` read inside ``nemo-occ export``. A scan of the package keeps new load sites on it. (The
NeMo-RL worker's OCC state: ``tests/nemo_rl/test_nemo_rl_worker.py``.)
"""


import ast
import os
from pathlib import Path

import pytest
import torch

from nemo_occ.safe_load import UnreadableStateError, load_state, weights_only_loads

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_occ"


class RunsCodeWhenUnpickled:
    """Unpickling this calls ``Path.touch(marker)``: what a planted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path, **state) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 3, **state, "payload": RunsCodeWhenUnpickled(marker)}, path)
    return path


def test_the_planted_file_does_run_code_under_plain_pickle(tmp_path):
    """The fixture is real: without weights_only its code runs (so the tests below can fail)."""
    marker = tmp_path / "code-ran"
    torch.load(plant(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_load_state_refuses_a_planted_pickle_in_one_line(tmp_path):
    marker = tmp_path / "code-ran"
    path = plant(tmp_path / "ckpt.pt", marker)
    with pytest.raises(UnreadableStateError) as info:
        load_state(path, what_to_do="move it away")
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message and str(path) in message and message.endswith("(move it away)")


def test_load_state_reads_what_nemo_occ_writes(tmp_path):
    state = {"step": 2, "lambdas": [0.5, -1.0], "nested": {"t": torch.arange(3.0), "name": "occ", "x": None}}
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_state(tmp_path / "ok.pt")
    assert loaded["lambdas"] == [0.5, -1.0] and loaded["nested"]["name"] == "occ"
    assert torch.equal(loaded["nested"]["t"], torch.arange(3.0))


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04 truncated"])
def test_a_broken_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(UnreadableStateError, match="is not a complete torch file") as info:
        load_state(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_megatron_common_pt_is_read_weights_only_inside_the_export(tmp_path, monkeypatch):
    """megatron-core reads common.pt with torch's default weights_only, which the environment can turn off."""
    from megatron.core import dist_checkpointing

    marker = tmp_path / "code-ran"
    plant(tmp_path / "iter_0000010" / "common.pt", marker)
    (tmp_path / "iter_0000010" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's environment may say so
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        dist_checkpointing.load_common_state_dict(str(tmp_path / "iter_0000010"))
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # and the environment is as it was
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    # the same read outside the block runs the planted code: the block is what stops it
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        dist_checkpointing.load_common_state_dict(str(tmp_path / "iter_0000010"))
    assert marker.exists()


def test_nemo_occ_export_loads_the_checkpoint_weights_only(tmp_path, monkeypatch, capsys):
    """The export command runs the conversion inside weights_only_loads and refuses a planted pickle in one line."""
    import pickle

    import nemo_occ.export.bridge_export as bridge_export
    from nemo_occ.cli import main

    seen = []

    def export(*args, **kwargs):
        seen.append(os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"))
        raise pickle.UnpicklingError("Weights only load failed ...\nmany lines")

    monkeypatch.setattr(bridge_export, "export_megatron_to_hf", export)
    assert (
        main(["export", "--megatron-ckpt", str(tmp_path), "--hf-model", "ref", "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert seen == ["1"] and err.count("\n") == 1, err
    assert "it was not loaded, because loading it could run code it contains" in err


def _load_calls(tree: ast.AST) -> list[str]:
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = f"{owner.id if isinstance(owner, ast.Name) else '?'}.{node.func.attr}"
            if name in {"torch.load", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load",
                        "numpy.load", "np.load", "dill.load", "cloudpickle.load"}:  # fmt: skip
                calls.append(f"{name} line {node.lineno}")
    return calls


def test_every_load_site_in_the_package_goes_through_safe_load():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        calls = _load_calls(ast.parse(path.read_text()))
        if calls and path.name != "safe_load.py":
            found[str(path.relative_to(PACKAGE))] = calls
    assert found == {}, "load these through nemo_occ.safe_load.load_state"
    # the scan does see a load site
    assert _load_calls(ast.parse("import torch\ntorch.load(p)\n")) == ["torch.load line 2"]
