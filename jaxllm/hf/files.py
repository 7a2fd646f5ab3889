"""The files of a checkpoint folder, read as untrusted input: JSON configs and shard indexes, safetensors
and `torch.save` (.bin) tensor files. A malformed file is one `JaxllmError` line naming the file and
what is wrong with it, whatever the file holds.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxllm import JaxllmError
from jaxllm.hf.torch_pickle import TorchFile


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in `path` (a missing file is the caller's to explain: OSError propagates)."""
    with open(path, "rb") as f:
        text = f.read()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; nesting or an integer past the parser's limits
        reason = str(e)[:200] if isinstance(e, ValueError) else "nested too deeply"
        raise JaxllmError(f"{path} is not valid JSON ({reason}); the file is truncated or corrupt") from None
    if not isinstance(value, dict):
        raise JaxllmError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def inside(folder: str, file: Any, named_in: str) -> str:
    """`folder/file` for a relative `file` that stays inside `folder`; anything else is refused."""
    if not isinstance(file, str) or not file:
        raise JaxllmError(f"{named_in}: file name {file!r} is not a string")
    norm = os.path.normpath(file)
    if os.path.isabs(file) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise JaxllmError(f"{named_in}: refused file {file!r}: weight files must lie inside the model folder")
    return os.path.join(folder, norm)


def read_weight_map(index: str, folder: str) -> dict[str, str]:
    """Tensor name -> shard path from a `*.index.json`, each shard checked to lie inside `folder` and exist."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise JaxllmError(f'{index}: no "weight_map" object of tensor name -> file; the index is corrupt')
    where = {}
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise JaxllmError(f"{index}: weight_map[{name!r}] is {file!r}, not a file name")
        where[name] = inside(folder, file, index)
    for file in sorted(set(where.values())):
        if not os.path.isfile(file):
            raise JaxllmError(f"{file}: shard listed in {index} is missing; download the whole checkpoint")
    return where


class SafetensorsFile:
    """The tensors of one safetensors file; opened per read, so no memory map keeps it resident."""

    def __init__(self, path: str):
        self.path = path
        with self._open() as f:
            try:
                self.shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            except SafetensorError as e:
                raise JaxllmError(f"{path}: corrupt safetensors file ({e})") from None

    def _open(self):
        try:
            return safe_open(self.path, framework="numpy")
        except SafetensorError as e:
            raise JaxllmError(f"{self.path}: not a valid safetensors file ({e}); truncated or corrupt") from None

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def read(self, name: str) -> np.ndarray:
        with self._open() as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as e:
                raise JaxllmError(f"{self.path}: cannot read tensor {name!r} ({e}); truncated or corrupt") from None
            except TypeError as e:  # safetensors < 0.8: no bfloat16 in numpy
                raise JaxllmError(
                    f"{self.path}: cannot read tensor {name!r} ({e}); pip install -U 'safetensors>=0.8'"
                ) from None


def open_tensor_file(path: str) -> SafetensorsFile | TorchFile:
    """A reader of `path` by its extension: .safetensors, or .bin (read without running its pickle)."""
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(".bin"):
        return TorchFile(path)
    raise JaxllmError(f"{path}: not a .safetensors or .bin weight file")
