"""``nemo-occ export`` / ``verify-export``: exit codes and readable errors (no Megatron-Bridge needed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nemo_occ.export import cli
from nemo_occ.export.hf_checkpoint import read_reference
from nemo_occ.export.hf_export import MANIFEST_FILE, write_hf_export
from tests._export_stand_in import install_stand_in_bridge, make_megatron_folder, start_stalled_export
from tests._export_synthetic import bridge_like_stream, make_reference_checkpoint, train_like

HAVE_BRIDGE = (
    importlib.util.find_spec("megatron.bridge") is not None if importlib.util.find_spec("megatron") else False
)
INDEX = "model.safetensors.index.json"


def _export_argv(ckpt, ref, out, *flags) -> list[str]:
    return ["export", "--megatron-ckpt", str(ckpt), "--hf-model", str(ref), "--out", str(out), *flags]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nemo-occ")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _one_error_line(err: str, words: str) -> None:
    assert err.startswith("nemo-occ: error:") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err, err


@pytest.fixture()
def glm_ref(tmp_path: Path) -> Path:
    make_reference_checkpoint(tmp_path / "ref", "glm4_moe")
    return tmp_path / "ref"


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return make_megatron_folder(tmp_path / "ckpt")


def _trained(ref: Path) -> dict:
    """A "trained" version of the tensors of a reference folder."""
    tensors = {}
    for shard in ref.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return train_like(tensors)


@pytest.fixture()
def bridge(glm_ref, monkeypatch) -> dict:
    """A stand-in Megatron-Bridge whose export is a "trained" version of the toy GLM reference."""
    return install_stand_in_bridge(monkeypatch, _trained(glm_ref), "glm4_moe")


def test_verify_export_passes_on_a_good_export(glm_ref, tmp_path, capsys):
    stream = bridge_like_stream(_trained(glm_ref), "glm4_moe")
    write_hf_export(stream, read_reference(glm_ref), tmp_path / "export", source="c", show_progress=False)
    assert run(["verify-export", str(tmp_path / "export"), "--reference", str(glm_ref)]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_verify_export_of_an_untrained_mtp_layer_fails_unless_allowed(glm_ref, capsys):
    no_manifest = ["verify-export", str(glm_ref), "--reference", str(glm_ref), "--no-manifest"]
    assert run(no_manifest) == 1
    assert "--allow-unchanged-mtp" in capsys.readouterr().err
    assert run([*no_manifest, "--allow-unchanged-mtp"]) == 0


def test_verify_export_fails_with_the_list_of_missing_tensors(glm_ref, tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    index = json.loads((glm_ref / INDEX).read_text())
    for name in ("model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"):
        del index["weight_map"][name]
    (export / INDEX).write_text(json.dumps(index))
    for shard in glm_ref.glob("*.safetensors"):
        (export / shard.name).symlink_to(shard)
    assert run(["verify-export", str(export), "--reference", str(glm_ref)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "model.layers.2.embed_tokens.weight  [MTP]" in err
    assert "tensors stored in shards but not in the index" in err  # the shard still holds them


@pytest.mark.parametrize(
    "argv, words",
    [
        (["verify-export", "{tmp}/nowhere", "--reference", "{ref}"], "is not a directory"),
        (
            ["verify-export", "{ref}", "--reference", "{tmp}/nowhere"],
            "neither a checkpoint folder nor a Hub id",
        ),
        (
            ["export", "--megatron-ckpt", "{tmp}/nowhere", "--hf-model", "{ref}", "--out", "{tmp}/o"],
            "not a directory",
        ),
        (
            ["export", "--megatron-ckpt", "{ckpt}", "--hf-model", "{ref}", "--out", "{ref}"],
            "is the --hf-model checkpoint",
        ),
        (
            ["export", "--megatron-ckpt", "{ckpt}", "--hf-model", "{ref}", "--out", "{ckpt}/iter_0000010/hf"],
            "is inside the --megatron-ckpt checkpoint",
        ),
        (
            ["export", "--megatron-ckpt", "{tmp}", "--hf-model", "{ref}", "--out", "{tmp}/o"],
            "is not a Megatron checkpoint",
        ),
    ],
)
def test_user_mistakes_print_one_error_line_and_return_2(glm_ref, ckpt, tmp_path, capsys, argv, words):
    argv = [a.format(tmp=tmp_path, ref=glm_ref, ckpt=ckpt) for a in argv]
    assert run(argv) == 2
    _one_error_line(capsys.readouterr().err, words)


def test_export_rejects_unsupported_models_before_loading_anything(ckpt, tmp_path, glm_ref, capsys):
    config = json.loads((glm_ref / "config.json").read_text())
    (glm_ref / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    assert run(_export_argv(ckpt, glm_ref, tmp_path / "o")) == 2
    assert "model_type='qwen3_moe'" in capsys.readouterr().err


def test_export_of_mimo_asks_for_trust_remote_code(ckpt, tmp_path, capsys):
    make_reference_checkpoint(tmp_path / "mimo", "mimo")
    assert run(_export_argv(ckpt, tmp_path / "mimo", tmp_path / "o")) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


@pytest.mark.skipif(
    HAVE_BRIDGE, reason="Megatron-Bridge is installed; this checks the message when it is absent"
)
def test_export_without_megatron_bridge_says_so(ckpt, tmp_path, glm_ref, capsys):
    assert run(_export_argv(ckpt, glm_ref, tmp_path / "o")) == 2
    _one_error_line(capsys.readouterr().err, "needs Megatron-Bridge")
    assert not (tmp_path / "o").exists()


def test_registration_is_import_light():
    code = (
        "import argparse, sys\n"
        "from nemo_occ.export import cli\n"
        "cli.register(argparse.ArgumentParser().add_subparsers())\n"
        "print(sorted(m for m in ('torch', 'safetensors', 'megatron', 'megatron.bridge') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_cli_routes_verify_export(glm_ref, capsys):
    from nemo_occ.cli import main

    argv = ["verify-export", str(glm_ref), "--reference", str(glm_ref), "--allow-unchanged-mtp", "--no-manifest"]
    assert main(argv) == 0
    assert "PASSED" in capsys.readouterr().out


# ---- with a stand-in Megatron-Bridge: --out safety, leftovers, room, checkpoint errors ------------


def _snapshot(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def test_export_through_the_cli_names_the_iteration_it_loaded(bridge, glm_ref, tmp_path, capsys):
    ckpt = make_megatron_folder(tmp_path / "weights", iterations=(100, 200))
    assert run(_export_argv(ckpt, glm_ref, tmp_path / "out", "--no-progress")) == 0
    assert bridge["load_megatron_model"] == str(ckpt / "iter_0000200")
    assert "from iter_0000200 to" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["megatron_iteration_dir"] == "iter_0000200"
    )


@pytest.mark.parametrize("target", ["{ref}", "{ref}/sub", "{ckpt}", "{ckpt}/iter_0000010", "{link}"])
def test_overwrite_never_deletes_an_input_checkpoint(bridge, glm_ref, ckpt, tmp_path, capsys, target):
    (tmp_path / "link").symlink_to(glm_ref)
    out = target.format(ref=glm_ref, ckpt=ckpt, link=tmp_path / "link")
    before = _snapshot(glm_ref), _snapshot(ckpt)
    assert run(_export_argv(ckpt, glm_ref, out, "--overwrite")) == 2
    _one_error_line(capsys.readouterr().err, "checkpoint")
    assert (_snapshot(glm_ref), _snapshot(ckpt)) == before
    assert "load_megatron_model" not in bridge


def test_overwrite_refuses_a_folder_without_a_manifest(bridge, glm_ref, ckpt, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run(_export_argv(ckpt, glm_ref, out, "--overwrite")) == 2
    _one_error_line(capsys.readouterr().err, "only replaces an earlier nemo-occ export")
    assert (out / "notes.txt").read_text() == "keep me" and "load_megatron_model" not in bridge
    (out / "notes.txt").unlink()
    (out / MANIFEST_FILE).write_text('{"nemo_occ_version": "0.1.0"}')  # an earlier export
    assert run(_export_argv(ckpt, glm_ref, out, "--overwrite", "--no-progress")) == 0


def test_leftovers_of_killed_runs_are_reported_and_removed_only_when_asked(
    bridge, glm_ref, ckpt, tmp_path, capsys
):
    out = tmp_path / "glm"
    killed = start_stalled_export(tmp_path / "ref-killed", out)  # then killed outright, as by the OOM killer
    killed.kill()
    killed.wait()
    running = start_stalled_export(
        tmp_path / "ref-running", out
    )  # an export to the same --out, still running
    try:
        (dead,) = set(tmp_path.glob(".glm.partial-*")) - {
            p for p in tmp_path.glob(f".glm.partial-*-{running.pid}-*")
        }
        (alive,) = tmp_path.glob(f".glm.partial-*-{running.pid}-*")
        elsewhere = tmp_path / ".glm.partial-node-b-77-ijkl9012"  # written from another host
        moved = tmp_path / ".glm.old-0123abcd"  # an --overwrite interrupted between its two renames
        for folder in (elsewhere, moved):
            folder.mkdir()
            (folder / "model-00001-of-00003.safetensors").write_bytes(b"partial")

        assert run(_export_argv(ckpt, glm_ref, out, "--no-progress")) == 0
        err = capsys.readouterr().err
        assert (
            f"nemo-occ: warning: found {dead}: unfinished export (process {killed.pid} on this host, no longer running); --remove-stale-partial deletes it\n"
            in err
        )
        assert (
            f"found {alive}: unfinished export (process {running.pid} on this host, still running)\n" in err
        )
        assert f"found {elsewhere}: unfinished export (process 77 on host node-b; cannot tell" in err
        assert f"found {moved}: an earlier export moved aside" in err
        assert all(f.is_dir() for f in (dead, alive, elsewhere, moved))  # reported, nothing deleted

        argv = _export_argv(ckpt, glm_ref, out, "--overwrite", "--remove-stale-partial", "--no-progress")
        assert run(argv) == 0
        assert f"nemo-occ: warning: removed {dead}" in capsys.readouterr().err
        assert not dead.exists() and not elsewhere.exists()
        assert alive.is_dir() and moved.is_dir()  # a running export's folder and a complete export: kept
    finally:
        running.kill()
        running.wait()


def test_out_must_be_writable_before_the_model_is_loaded(bridge, glm_ref, ckpt, capsys):
    probe = Path("/sys/nemo-occ-write-test")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here; this test needs a folder nobody (root included) can write in")
    assert run(_export_argv(ckpt, glm_ref, "/sys/nemo-occ-export")) == 2
    _one_error_line(capsys.readouterr().err, "cannot write in /sys")
    assert "load_megatron_model" not in bridge


def test_out_must_have_room_for_the_reference_before_the_model_is_loaded(
    bridge, glm_ref, ckpt, tmp_path, capsys
):
    index = json.loads((glm_ref / INDEX).read_text())
    index["metadata"]["total_size"] = 10**18  # a million terabytes
    (glm_ref / INDEX).write_text(json.dumps(index))
    assert run(_export_argv(ckpt, glm_ref, tmp_path / "out")) == 2
    _one_error_line(capsys.readouterr().err, "it needs 931322574.6 GiB")
    assert "load_megatron_model" not in bridge


def test_incomplete_reference_fails_before_loading_naming_the_shard(bridge, glm_ref, ckpt, tmp_path, capsys):
    (glm_ref / "model-00002-of-00003.safetensors").unlink()
    assert run(_export_argv(ckpt, glm_ref, tmp_path / "out")) == 2
    _one_error_line(capsys.readouterr().err, "shard(s) model-00002-of-00003.safetensors listed in its")
    assert "load_megatron_model" not in bridge and not (tmp_path / "out").exists()


def test_a_step_folder_instead_of_policy_weights_gets_a_hint(bridge, glm_ref, tmp_path, capsys):
    step = tmp_path / "step_200"
    make_megatron_folder(step / "policy" / "weights")
    assert run(_export_argv(step, glm_ref, tmp_path / "out")) == 2
    _one_error_line(capsys.readouterr().err, f"{step / 'policy' / 'weights'} exists: pass that.")


def test_megatron_checkpointing_exception_becomes_a_user_error(glm_ref, ckpt, tmp_path, monkeypatch, capsys):
    from megatron.core.dist_checkpointing.core import CheckpointingException

    error = CheckpointingException(f"{ckpt}/iter_0000010 is not a distributed checkpoint")
    install_stand_in_bridge(monkeypatch, _trained(glm_ref), "glm4_moe", load_error=error)
    assert run(_export_argv(ckpt, glm_ref, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "is not a distributed checkpoint). Pass the folder holding the iter_* folders")
    assert "policy/weights" in err and not (tmp_path / "out").exists()


def test_a_corrupt_reference_shard_is_one_line_naming_the_file(glm_ref, capsys):
    shard = glm_ref / "model-00001-of-00003.safetensors"
    shard.write_bytes(b"\x10" + shard.read_bytes()[1:])
    assert run(["verify-export", str(glm_ref), "--reference", str(glm_ref)]) == 2
    _one_error_line(capsys.readouterr().err, f"{shard} is not a readable safetensors file")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "big"])
def test_max_mtp_change_must_be_a_finite_positive_number(glm_ref, capsys, value):
    with pytest.raises(SystemExit) as info:
        run(["verify-export", str(glm_ref), "--reference", str(glm_ref), "--max-mtp-change", value])
    assert info.value.code == 2
    assert "--max-mtp-change: must be a finite number > 0" in capsys.readouterr().err


# ---- Ctrl-C ----------------------------------------------------------------------------------------


def _run_catching_ctrl_c(argv: list[str]) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command: it prints a traceback")


def test_ctrl_c_mid_export_is_one_line_exit_130_and_leaves_no_partial_folder(
    bridge, glm_ref, ckpt, tmp_path, monkeypatch, capsys
):
    auto_bridge = sys.modules["megatron.bridge"].AutoBridge
    export_hf_weights = auto_bridge.export_hf_weights
    seen = []

    def interrupted_stream(self, model, **kwargs):
        for i, item in enumerate(export_hf_weights(self, model, **kwargs)):
            if i == 15:  # the first shard is written by now
                seen.extend(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-"))
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(auto_bridge, "export_hf_weights", interrupted_stream)
    assert _run_catching_ctrl_c(_export_argv(ckpt, glm_ref, tmp_path / "out", "--no-progress")) == 130
    assert capsys.readouterr().err == "nemo-occ: interrupted; nothing was written\n"
    assert len(seen) == 1  # the partial folder existed ...
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # ... and is gone


def test_ctrl_c_while_the_export_is_moved_into_place_finishes_it_first(
    bridge, glm_ref, ckpt, tmp_path, monkeypatch, capsys, request
):
    import os
    import signal

    from nemo_occ import atomic_io as atomic

    # What a terminal's Ctrl-C meets. Set here, not assumed: a job started in the background by a
    # non-interactive shell begins with SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    replace = os.replace

    def replace_after_ctrl_c(src, dst):
        if Path(dst).name == "out":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right at the final rename
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_after_ctrl_c)
    assert _run_catching_ctrl_c(_export_argv(ckpt, glm_ref, tmp_path / "out", "--no-progress")) == 130
    err = capsys.readouterr().err
    assert (
        err == f"nemo-occ: interrupted; the export was finished first and is complete in {tmp_path / 'out'}\n"
    )
    assert (tmp_path / "out" / MANIFEST_FILE).is_file() and not list(tmp_path.glob(".out.*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_during_verify_export_is_one_line_exit_130(glm_ref, monkeypatch, capsys):
    from nemo_occ.export import verify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify_export", interrupted)
    assert _run_catching_ctrl_c(["verify-export", str(glm_ref), "--reference", str(glm_ref)]) == 130
    assert capsys.readouterr().err == "nemo-occ: interrupted; nothing was written\n"
