"""``nemo-occ export`` / ``verify-export``: exit codes and readable errors (no Megatron-Bridge needed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_occ.export import cli
from nemo_occ.export.synthetic import make_reference_checkpoint

HAVE_BRIDGE = (
    importlib.util.find_spec("megatron.bridge") is not None if importlib.util.find_spec("megatron") else False
)


def _export_argv(ckpt, ref, out) -> list[str]:
    return ["export", "--megatron-ckpt", str(ckpt), "--hf-model", str(ref), "--out", str(out)]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nemo-occ")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def glm_ref(tmp_path: Path) -> Path:
    make_reference_checkpoint(tmp_path / "ref", "glm4_moe")
    return tmp_path / "ref"


def test_verify_export_passes_on_a_good_export(glm_ref, capsys):
    assert run(["verify-export", str(glm_ref), "--reference", str(glm_ref)]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_verify_export_fails_with_the_list_of_missing_tensors(glm_ref, tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    index = json.loads((glm_ref / "model.safetensors.index.json").read_text())
    for name in ("model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"):
        del index["weight_map"][name]
    (export / "model.safetensors.index.json").write_text(json.dumps(index))
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
        (["export", "--megatron-ckpt", "{tmp}", "--hf-model", "{ref}", "--out", "{ref}"], "already exists"),
    ],
)
def test_user_mistakes_print_one_error_line_and_return_1(glm_ref, tmp_path, capsys, argv, words):
    argv = [a.format(tmp=tmp_path, ref=glm_ref) for a in argv]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("nemo-occ: error:") and words in err and "Traceback" not in err


def test_export_rejects_unsupported_models_before_loading_anything(tmp_path, glm_ref, capsys):
    config = json.loads((glm_ref / "config.json").read_text())
    (glm_ref / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    assert run(_export_argv(tmp_path, glm_ref, tmp_path / "o")) == 1
    assert "model_type='qwen3_moe'" in capsys.readouterr().err


def test_export_of_mimo_asks_for_trust_remote_code(tmp_path, capsys):
    make_reference_checkpoint(tmp_path / "mimo", "mimo")
    argv = _export_argv(tmp_path, tmp_path / "mimo", tmp_path / "o")
    assert run(argv) == 1
    assert "--trust-remote-code" in capsys.readouterr().err


@pytest.mark.skipif(
    HAVE_BRIDGE, reason="Megatron-Bridge is installed; this checks the message when it is absent"
)
def test_export_without_megatron_bridge_says_so(tmp_path, glm_ref, capsys):
    assert run(_export_argv(tmp_path, glm_ref, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "needs Megatron-Bridge" in err and "Traceback" not in err
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

    assert main(["verify-export", str(glm_ref), "--reference", str(glm_ref)]) == 0
    assert "PASSED" in capsys.readouterr().out
