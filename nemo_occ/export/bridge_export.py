"""Export a Megatron (torch_dist) checkpoint to Hugging Face with its MTP layers, via Megatron-Bridge.

Megatron-Bridge does the conversion; nemo-occ writes and checks the result:

    bridge = AutoBridge.from_hf_pretrained(hf_model)
    with temporary_distributed_context("gloo"):              # single-process CPU export
        model = bridge.load_megatron_model(iteration_dir)     # collapses TP/PP/EP to 1
        stream = bridge.export_hf_weights(model, cpu=True)    # (hf_name, tensor) pairs
        write_hf_export(stream, reference, out, ...)          # fix-ups, shards, verify, rename

``save_hf_pretrained`` is deliberately not used: with ``strict=True`` it skips every shard whose key
set the stream did not complete (GLM's MTP aliases have no mapping, Megatron-Bridge #4188/#4189),
and it writes directly into the output folder.

Megatron-Bridge imports Transformer Engine, so this module is only exercised where the NeMo-RL /
Megatron-Bridge container is available (test marker ``megatron_bridge``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch

from nemo_occ.export.hf_checkpoint import read_reference
from nemo_occ.export.hf_export import ExportResult, write_hf_export
from nemo_occ.export.manifest import TrainingStep
from nemo_occ.export.models import mtp_layout
from nemo_occ.export.target import check_export_target, check_room
from nemo_occ.export.verify import ValueLimits

_EH_PROJ = re.compile(r"(?:^|\.)mtp\.layers\.(\d+)\.eh_proj\.weight$")
# A dense MTP layer's gated MLP input projection (MoE experts and shared experts have other names).
_DENSE_FC1 = re.compile(r"(?:^|\.)mtp\.layers\.(\d+)\.(?:mtp_model_layer|transformer_layer)\.mlp\.linear_fc1\.weight$")
# What makes a folder a loadable checkpoint: Bridge's run config, or a torch_dist checkpoint's metadata.
_CHECKPOINT_MARKERS = ("run_config.yaml", "metadata.json")
_WHERE = "NeMo-RL writes it to <results>/step_<N>/policy/weights"


def _iteration_number(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("iter_"))
    except ValueError:
        return -1


def resolve_iteration_dir(megatron_ckpt: str | Path) -> Path:
    """The ``iter_*`` folder an export loads: the highest-numbered one inside ``megatron_ckpt``, else itself.

    The same rule as Megatron-Bridge's ``AutoBridge.load_megatron_model`` (names that are not
    ``iter_<int>`` rank last); resolving it here lets the manifest record the folder actually loaded
    and lets a folder that is not a checkpoint fail before anything is loaded.
    """
    given = Path(megatron_ckpt)
    if not given.is_dir():
        raise FileNotFoundError(f"--megatron-ckpt {given} is not a directory ({_WHERE}).")
    iterations = [f for f in given.iterdir() if f.is_dir() and f.name.startswith("iter_")]
    folder = max(iterations, key=_iteration_number) if iterations else given
    if not any((folder / marker).is_file() for marker in _CHECKPOINT_MARKERS):
        hint = next(
            (
                f" {c} exists: pass that."
                for c in (given / "policy" / "weights", given / "weights")
                if c.is_dir()
            ),
            "",
        )
        raise ValueError(
            f"--megatron-ckpt {given} is not a Megatron checkpoint: {folder} has no "
            f"{' or '.join(_CHECKPOINT_MARKERS)}. Pass the folder holding the iter_* folders ({_WHERE}).{hint}"
        )
    return folder


_STEP_FOLDER = re.compile(r"step_(\d+)")


def training_step_of(iteration_dir: Path) -> TrainingStep:
    """The training step ``iteration_dir`` was saved at, for the manifest (``verify-export --expect-step``).

    NeMo-RL saves every step's Megatron weights as ``step_<N>/policy/weights/iter_0000000`` (the
    iteration folder is always 0 there): the ``step_<N>`` folder up to three levels above wins, and the
    ``total_steps`` of its ``training_info.json``, if present, must agree. Otherwise (Megatron-Bridge's
    own training) the iteration number ``iter_<N>`` is the step. An ``iter_0000000`` outside a
    ``step_<N>`` folder says nothing: the step is recorded as unknown.
    """
    folder = iteration_dir.absolute()
    for above in (folder, *list(folder.parents)[:3]):
        match = _STEP_FOLDER.fullmatch(above.name)
        if not match:
            continue
        step, info = int(match.group(1)), above / "training_info.json"
        recorded = None
        if info.is_file():
            try:
                recorded = json.loads(info.read_text()).get("total_steps")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
                raise ValueError(f"{info} is not a JSON object ({err}); was the checkpoint save interrupted?") from err
        if isinstance(recorded, int) and recorded != step:
            raise ValueError(
                f"{info} says total_steps={recorded}, but its folder is {above.name}: which step is this "
                "checkpoint? Export from an untouched NeMo-RL step folder."
            )
        return TrainingStep(step, f"the folder name {above}")
    iteration = _iteration_number(folder)
    if iteration > 0:
        return TrainingStep(iteration, f"the Megatron iteration folder {folder}")
    return TrainingStep(None, f"unknown: no step_<N> folder above {folder}, and its iteration number says nothing")


def _mtp_weights(model_chunks: Iterable[torch.nn.Module], pattern: re.Pattern) -> dict[int, torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            match = pattern.search(name)
            if match:
                found[int(match.group(1))] = param.detach().to("cpu")
    return found


def megatron_eh_proj_weights(model_chunks: Iterable[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """``{mtp_layer: eh_proj weight}`` from Megatron model chunks (wrappers like ``module.`` allowed)."""
    return _mtp_weights(model_chunks, _EH_PROJ)


def megatron_dense_fc1_weights(model_chunks: Iterable[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """``{mtp_layer: linear_fc1 weight}`` of dense MTP layers (GLM45Bridge drops their export, see fixups)."""
    return _mtp_weights(model_chunks, _DENSE_FC1)


def _bridge_version() -> str | None:
    for dist in ("megatron-bridge", "megatron_bridge"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def export_megatron_to_hf(
    megatron_ckpt: str | Path,
    hf_model: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    trust_remote_code: bool = False,
    limits: ValueLimits | None = None,
    remove_stale_partials: bool = False,
) -> ExportResult:
    """Export ``megatron_ckpt`` as an HF checkpoint shaped like ``hf_model`` into ``out``, MTP included.

    ``megatron_ckpt`` is a Megatron-Bridge/NeMo-RL checkpoint folder (an ``iter_*`` folder, or its
    parent: the newest iteration is taken). ``hf_model`` is the HF checkpoint the model was trained
    from (local folder, or Hub id). Everything that can be checked without the model (inputs, ``out``,
    space) is checked before it is loaded. Raises ``ExportVerificationError`` if the result does not
    match.
    """
    # long on purpose: the export's steps in order (load, stream, fix up, write, verify), each a call; kept
    # as one script to read
    iteration_dir = resolve_iteration_dir(megatron_ckpt)
    step = training_step_of(iteration_dir)
    reference = read_reference(hf_model)
    reference.check_complete("--hf-model")
    layout = mtp_layout(reference.config)
    inputs = {"--hf-model": reference.directory, "--megatron-ckpt": Path(megatron_ckpt)}
    check_export_target(out, inputs=inputs, overwrite=overwrite)
    if layout.model_type == "mimo" and not trust_remote_code:
        raise ValueError("MiMo's Hugging Face config and model are remote code: add --trust-remote-code.")
    check_room(out, reference=reference, remove_stale_partials=remove_stale_partials)

    try:
        from megatron.bridge import AutoBridge
        from megatron.bridge.training.model_load_save import temporary_distributed_context
        from megatron.core.dist_checkpointing.core import CheckpointingException
    except ImportError as err:
        raise ImportError(
            f"nemo-occ export needs Megatron-Bridge (>= 0.4 for MiMo), which could not be imported ({err}). "
            "Run it inside the NeMo-RL container, or install megatron-bridge with Transformer Engine."
        ) from err

    bridge = AutoBridge.from_hf_pretrained(str(hf_model), trust_remote_code=trust_remote_code)
    with temporary_distributed_context(backend="gloo"):
        try:
            model = bridge.load_megatron_model(str(iteration_dir))
        except CheckpointingException as err:
            message = str(err).replace("\n", " ")
            raise ValueError(
                f"--megatron-ckpt {megatron_ckpt}: Megatron cannot load {iteration_dir} as a checkpoint "
                f"({message}). Pass the folder holding the iter_* folders ({_WHERE})."
            ) from err
        eh_proj = megatron_eh_proj_weights(model) if layout.input_proj else None
        fc1 = megatron_dense_fc1_weights(model) if layout.gated_fc1 else None
        stream = bridge.export_hf_weights(model, cpu=True, show_progress=False)
        return write_hf_export(
            stream,
            reference,
            out,
            source=str(iteration_dir.absolute()),
            megatron_eh_proj=eh_proj,
            megatron_fc1=fc1,
            overwrite=overwrite,
            show_progress=show_progress,
            limits=limits,
            inputs=inputs,
            training_step=step,
            extra_manifest={
                "megatron_checkpoint": str(Path(megatron_ckpt).absolute()),
                "megatron_iteration_dir": iteration_dir.name,
                "megatron_bridge_version": _bridge_version(),
            },
        )
