"""What a Hugging Face safetensors checkpoint contains, read without loading any tensor.

A checkpoint is described by its ``config.json``, its weight map (``model.safetensors.index.json``,
or the keys of a single ``model.safetensors``) and, where the shard files are at hand, each tensor's
shape and dtype from the safetensors headers (dtype strings as in the format: ``BF16``, ``F32``, ...).

A reference given as a Hub name is read through ``huggingface_hub`` (optional): the small files are
downloaded and tensor shapes come from the remote safetensors headers (HTTP range requests), so no
weights are downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Files never copied from a reference next to the exported weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json")
# Small files fetched from the Hub for a reference given by name.
_HUB_SMALL_FILES = ["*.json", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class TensorMeta:
    """Shape and safetensors dtype string of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class CheckpointInfo:
    """The description of one HF safetensors checkpoint."""

    source: str
    config: dict[str, Any]
    weight_map: dict[str, str]
    """tensor name -> shard file name, as a loader sees it."""
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    """Metadata of the tensors whose shard could be read (may be a subset of ``weight_map``)."""
    shard_keys: dict[str, set[str]] = field(default_factory=dict)
    """Keys actually stored in each shard that could be read (local checkpoints only)."""
    missing_shards: list[str] = field(default_factory=list)
    """Shards listed in the weight map that do not exist (local checkpoints only)."""
    side_files: list[Path] = field(default_factory=list)
    """Config, tokenizer and remote-code files to copy next to exported weights."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return data


def check_shard_name(filename: object, *, where: str) -> str:
    """A shard name from an index must be a plain ``*.safetensors`` file name inside the folder."""
    if (
        not isinstance(filename, str)
        or not filename.endswith(".safetensors")
        or Path(filename).name != filename
    ):
        raise ValueError(f"{where}: shard name {filename!r} must be a plain '*.safetensors' file name.")
    return filename


def _weight_map_from_index(index: Mapping[str, Any], *, where: str) -> dict[str, str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{where} has no 'weight_map' (tensor name -> shard file).")
    return {str(name): check_shard_name(file, where=where) for name, file in weight_map.items()}


def read_local_checkpoint(directory: str | Path, *, require_config: bool = True) -> CheckpointInfo:
    """Describe a local HF checkpoint folder (index, shard headers, side files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory.")
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        config = _read_json(config_path)
    elif require_config:
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a Hugging Face checkpoint folder?")
    else:
        config = {}

    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _weight_map_from_index(_read_json(index_path), where=str(index_path))
    elif (directory / SINGLE_FILE).is_file():
        with safe_open(directory / SINGLE_FILE, framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
    else:
        raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}.")

    info = CheckpointInfo(source=str(directory), config=config, weight_map=weight_map)
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not path.is_file():
            info.missing_shards.append(shard)
            continue
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            info.shard_keys[shard] = keys
            for key in keys:
                piece = f.get_slice(key)
                info.tensors[key] = TensorMeta(tuple(piece.get_shape()), piece.get_dtype())
    info.side_files = [
        p
        for p in sorted(directory.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(_WEIGHT_SUFFIXES)
        and p.name not in _WEIGHT_INDEXES
    ]
    return info


def read_hub_checkpoint(repo_id: str) -> CheckpointInfo:
    """Describe a Hub checkpoint from its small files and remote safetensors headers (no weights)."""
    try:
        from huggingface_hub import get_safetensors_metadata, snapshot_download
    except ImportError as err:
        raise ImportError(
            f"'{repo_id}' is not a local folder, and reading it from the Hugging Face Hub needs "
            "huggingface_hub (pip install huggingface_hub). Or pass the local checkpoint folder instead."
        ) from err
    try:
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_SMALL_FILES))
        remote = get_safetensors_metadata(repo_id)
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise ValueError(
            f"Could not read '{repo_id}' from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Check the name and your network/token, or pass a local checkpoint folder."
        ) from err
    config_path = local / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"Hub repository '{repo_id}' has no {CONFIG_FILE}.")
    weight_map = {name: check_shard_name(file, where=repo_id) for name, file in remote.weight_map.items()}
    info = CheckpointInfo(source=repo_id, config=_read_json(config_path), weight_map=weight_map)
    for file_meta in remote.files_metadata.values():
        for name, tensor in file_meta.tensors.items():
            info.tensors[name] = TensorMeta(tuple(tensor.shape), str(tensor.dtype))
    info.side_files = [
        p
        for p in sorted(local.iterdir())
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_INDEXES
    ]
    return info


def read_reference(name_or_path: str | Path) -> CheckpointInfo:
    """A reference checkpoint: a local folder if one exists at that path, else a Hub repository id."""
    path = Path(name_or_path)
    if path.is_dir():
        return read_local_checkpoint(path)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(
            f"Reference '{name_or_path}' is neither a checkpoint folder nor a Hub id like 'zai-org/GLM-4.5-Air'."
        )
    return read_hub_checkpoint(str(name_or_path))
