"""A stand-in ``megatron.bridge`` and a Megatron checkpoint folder, for export tests without Bridge.

``AutoBridge``'s methods have the real signatures (Megatron-Bridge 0.4+, read from
``megatron/bridge/models/conversion/auto_bridge.py``; ``test_real_bridge_has_the_interface_we_call``
checks them where Bridge is installed). The checkpoint folder is laid out like NeMo-RL's
``policy/weights`` (``iter_*`` folders holding ``run_config.yaml`` and torch_dist ``metadata.json``)
but holds no weights: only the stand-in can "load" it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import torch

from tests._export_synthetic import bridge_like_stream

_STALLED_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nemo_occ.export.hf_checkpoint import read_reference
    from nemo_occ.export.hf_export import write_hf_export
    from tests._export_synthetic import bridge_like_stream, make_reference_checkpoint, train_like

    ref, out = Path(sys.argv[1]), Path(sys.argv[2])
    trained = train_like(make_reference_checkpoint(ref, "glm4_moe"))

    def stream():
        for i, item in enumerate(bridge_like_stream(trained, "glm4_moe")):
            if i == 15:  # the first shard is written
                print("writing", flush=True)
                time.sleep(300)
            yield item

    write_hf_export(stream(), read_reference(ref), out, source="ckpt", show_progress=False)
    """
)


def start_stalled_export(ref: Path, out: Path) -> subprocess.Popen:
    """An export to ``out`` in a child process, stopped mid-write (after it printed ``writing``)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_EXPORT, str(ref), str(out)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline().strip()
    if line != "writing":
        child.kill()
        raise RuntimeError(f"the export child did not start: {line!r} {child.stderr.read()}")
    return child


def make_megatron_folder(path: Path, iterations: tuple[int, ...] = (10,)) -> Path:
    for iteration in iterations:
        folder = path / f"iter_{iteration:07d}"
        folder.mkdir(parents=True)
        (folder / "run_config.yaml").write_text("model: {}\n")
        (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return path


class _MTPLayer(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.eh_proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.eh_proj.weight.copy_(weight)


class ToyMegatron(torch.nn.Module):
    """Holds ``module.mtp.layers.0.eh_proj.weight`` like a Float16Module-wrapped GPTModel."""

    def __init__(self, eh_proj: torch.Tensor):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.mtp = torch.nn.Module()
        self.module.mtp.layers = torch.nn.ModuleList([_MTPLayer(eh_proj)])
        self.module.output_layer = torch.nn.Linear(2, 2)


def install_stand_in_bridge(monkeypatch, tensors, model_type, *, eh_proj=None, load_error=None) -> dict:
    """Put a stand-in ``megatron.bridge`` into ``sys.modules``; return the dict its calls are logged in.

    ``export_hf_weights`` yields ``tensors`` as GLM45Bridge/MimoBridge would (MiMo's ``input_proj``
    passed through unswapped); ``load_error`` is raised by ``load_megatron_model`` instead.
    """
    calls: dict = {}
    eh_proj = torch.zeros(2, 4) if eh_proj is None else eh_proj

    class AutoBridge:
        @classmethod
        def from_hf_pretrained(cls, path, **kwargs):
            calls["from_hf_pretrained"] = (path, kwargs)
            return cls()

        def load_megatron_model(self, path, *, mp_overrides=None, **kwargs):
            calls["load_megatron_model"] = path
            if load_error is not None:
                raise load_error
            return [ToyMegatron(eh_proj)]

        def export_hf_weights(
            self,
            model,
            cpu=False,
            show_progress=True,
            conversion_tasks=None,
            merge_adapter_weights=True,
            weight_dtype=None,
        ):
            calls["export_hf_weights"] = {"cpu": cpu, "show_progress": show_progress}
            return bridge_like_stream(tensors, model_type, swap_input_proj=False)

    @contextlib.contextmanager
    def temporary_distributed_context(backend="gloo"):
        calls["backend"] = backend
        yield

    bridge = types.ModuleType("megatron.bridge")
    bridge.AutoBridge = AutoBridge
    training = types.ModuleType("megatron.bridge.training")
    load_save = types.ModuleType("megatron.bridge.training.model_load_save")
    load_save.temporary_distributed_context = temporary_distributed_context
    modules = {
        "megatron.bridge": bridge,
        "megatron.bridge.training": training,
        "megatron.bridge.training.model_load_save": load_save,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls
