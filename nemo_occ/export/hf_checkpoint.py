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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
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
# Side files that make up the tokenizer (transformers' save_pretrained names, plus tiktoken/jinja files).
_TOKENIZER_NAMES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")
_TOKENIZER_SUFFIXES = (".model", ".tiktoken", ".jinja")
# Bytes per element of each safetensors dtype string (to size a checkpoint without an index total).
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


def is_tokenizer_file(name: str) -> bool:
    """Is a side file (by name) part of the tokenizer, so that an export must carry it unchanged?"""
    return name.startswith("tokenizer") or name in _TOKENIZER_NAMES or name.endswith(_TOKENIZER_SUFFIXES)


@contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open`` whose errors name the file (safetensors' own message does not)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # SafetensorError, OSError: both mean the file cannot be used as it is
        raise ValueError(f"{path} is not a readable safetensors file ({err}).") from err
    with handle as f:
        yield f


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
    directory: Path | None = None
    """The local folder (None for a Hub checkpoint, whose tensor values are not at hand)."""
    index_total_size: int | None = None
    """``metadata.total_size`` of the index, if it has one (bytes of all tensors)."""
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    """Metadata of the tensors whose shard could be read (may be a subset of ``weight_map``)."""
    shard_keys: dict[str, set[str]] = field(default_factory=dict)
    """Keys actually stored in each shard that could be read (local checkpoints only)."""
    missing_shards: list[str] = field(default_factory=list)
    """Shards listed in the weight map that do not exist (local checkpoints only)."""
    side_files: list[Path] = field(default_factory=list)
    """Config, tokenizer and remote-code files to copy next to exported weights."""

    def total_bytes(self) -> int:
        """Bytes of all tensors: the index's ``total_size``, else summed from the shard headers."""
        if self.index_total_size is not None:
            return self.index_total_size
        return sum(DTYPE_BYTES.get(m.dtype, 4) * prod(m.shape) for m in self.tensors.values())

    def check_complete(self, role: str) -> None:
        """Raise unless every shard of the index exists and holds the tensors the index puts there.

        An export takes each tensor's dtype from the reference's shard headers and verification compares
        against them; a reference with a shard missing would silently pass those tensors unchecked.
        """
        if self.missing_shards:
            raise ValueError(
                f"{role} {self.source} is incomplete: shard(s) {', '.join(self.missing_shards)} listed in its "
                f"{INDEX_FILE} do not exist. Restore them (e.g. download the checkpoint again) and rerun."
            )
        absent = sorted(name for name in self.weight_map if name not in self.tensors)
        if absent:
            shard = self.weight_map[absent[0]]
            raise ValueError(
                f"{role} {self.source} is inconsistent: {len(absent)} tensor(s) of its index are not in the shard "
                f"it names, e.g. {absent[0]} in {shard}. Restore the checkpoint and rerun."
            )


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


def _total_size(index: Mapping[str, Any], *, where: str) -> int | None:
    metadata = index.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is None:
        return None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise ValueError(f"{where}: metadata.total_size must be a non-negative integer, got {total!r}.")
    return total


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
    total_size = None
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = _weight_map_from_index(index, where=str(index_path))
        total_size = _total_size(index, where=str(index_path))
    elif (directory / SINGLE_FILE).is_file():
        with open_safetensors(directory / SINGLE_FILE) as f:
            weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
    else:
        raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}.")

    info = CheckpointInfo(
        source=str(directory),
        config=config,
        weight_map=weight_map,
        directory=directory,
        index_total_size=total_size,
    )
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not path.is_file():
            info.missing_shards.append(shard)
            continue
        with open_safetensors(path) as f:
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
