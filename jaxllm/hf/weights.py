"""Streaming load of safetensors or .bin weights (straight into sharded device arrays); sharded, atomic
safetensors save.

Loading never holds the model twice in host memory: tensors are read one at a time (each file is
opened per read, so no memory map keeps a whole shard resident) and placed on the devices at once;
a scanned model's [L, ...] leaves are filled layer by layer in one host buffer per leaf, placed, and
freed before the next leaf.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from safetensors.numpy import save_file

from jaxllm import JaxllmError, atomic, tree
from jaxllm import sharding as shd
from jaxllm.hf.config import hf_config_from_model, hf_num_labels, model_config_from_hf, score_pad_token_id
from jaxllm.hf.files import SafetensorsFile, open_tensor_file, read_json_object, read_weight_map
from jaxllm.hf.layout import SCORE, Group, global_groups, layer_groups
from jaxllm.hf.torch_pickle import TorchFile
from jaxllm.models import lora
from jaxllm.models.config import DTYPES, ModelConfig, dtype_name
from jaxllm.models.decoder import Decoder, abstract_params

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class TensorFiles:
    """Where each tensor of a checkpoint folder lives: safetensors (`model.safetensors`, or shards +
    index) or, in a folder without them, `torch.save` files (`pytorch_model.bin`, or shards + index)
    read without running their pickles. Each file is opened when first read; tensors the layout does
    not use (rotary `inv_freq` buffers, ...) are never read."""

    def __init__(self, folder: str):
        self.folder = folder
        self._files: dict[str, SafetensorsFile | TorchFile] = {}
        listed = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        safetensors = [f for f in listed if f.endswith(".safetensors")]
        bins = [f for f in listed if f.startswith("pytorch_model") and f.endswith(".bin")]
        for index in (INDEX, BIN_INDEX):
            if os.path.isfile(os.path.join(folder, index)) and (index == INDEX or not safetensors):
                self.where = read_weight_map(os.path.join(folder, index), folder)
                return
        if not safetensors and not bins:
            raise JaxllmError(
                f"{folder}: no {SINGLE}, {INDEX}, {BIN_SINGLE} or {BIN_INDEX}; not a Hugging Face "
                "model folder with weights"
            )
        self.where = {}
        for file in [os.path.join(folder, f) for f in safetensors or bins]:
            self.where.update({name: file for name in self._file(file).keys()})

    def _file(self, path: str) -> SafetensorsFile | TorchFile:
        if path not in self._files:
            self._files[path] = open_tensor_file(path)
        return self._files[path]

    def resolve(self, name: str) -> str:
        """The stored name of `name`; original BLOOM checkpoints drop the "transformer." prefix."""
        if name in self.where:
            return name
        bare = name.removeprefix("transformer.")
        if bare in self.where:
            return bare
        raise JaxllmError(
            f"{self.folder}: tensor {name!r} is missing from the checkpoint; it does not match "
            "its config.json (or the download is incomplete)"
        )

    def read(self, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
        """Tensor `name` as stored (dtype included), checked to have `shape` unless that is None."""
        stored = self.resolve(name)
        file = self.where[stored]
        tensors = self._file(file)
        if stored not in tensors.keys():
            raise JaxllmError(f"{file}: tensor {stored!r} is missing from this file, though the index lists it here")
        if shape is not None and tuple(tensors.shape(stored)) != tuple(shape):
            raise JaxllmError(
                f"{file}: tensor {stored!r} has shape {tuple(tensors.shape(stored))} but config.json "
                f"implies {tuple(shape)}; the weights and config.json disagree"
            )
        return tensors.read(stored)

    def names(self) -> list[str]:
        """Every stored tensor name, in the checkpoint's order."""
        return list(self.where)


def _one_device_mesh() -> Mesh:
    return shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """A host buffer whose data starts on a 64-byte boundary: the CPU backend then adopts it as the
    device buffer instead of copying it (a copy would be freed only some time after placement)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _place(host: np.ndarray, sharding) -> jax.Array:
    """`host` on the devices of `sharding` (each process passes the full array; only its own devices'
    slices are transferred); on one CPU device, without a copy."""
    if sharding.is_fully_addressable:
        return jax.device_put(host, sharding, may_alias=True)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _converted(group: Group, files: TensorFiles, layer: int | None) -> tuple[np.ndarray, ...]:
    names = [n.format(i=layer) for n in group.hf_names]
    return group.to_jax(*(files.read(n, s) for n, s in zip(names, group.hf_shapes)))


def fresh_score(source_labels: int, num_labels: int, source: str) -> bool:
    """Whether a model of `num_labels` loads from `source` (whose config has `source_labels`) with a fresh
    score head: a causal LM (0) starting a score model does; a score model loads only as itself."""
    if source_labels and source_labels != num_labels:
        raise JaxllmError(
            f"{source} is a score model (num_labels={source_labels}, no lm_head); load it with "
            f"model.num_labels={source_labels}"
        )
    return num_labels > 0 and not source_labels


def load_params(
    files: TensorFiles,
    cfg: ModelConfig,
    mesh: Mesh,
    *,
    quantized: ModelConfig | None = None,
    score_key: jax.Array | None = None,
) -> dict:
    """The params of `cfg` from `files`, each leaf placed with its logical-axis sharding on `mesh`.
    With `quantized` (the same model with `quantization` set), each projection kernel is quantized as
    soon as it is placed and its float copy freed: the float base is never whole in memory. With
    `score_key` (a causal LM loaded as a score model), the score head is drawn from it, normal(init_std)
    as the decoder initialises it, and the checkpoint's lm_head is not read."""
    boxed = abstract_params(cfg)
    shardings, abstract = shd.shardings_for(boxed, mesh), shd.unbox(boxed)
    q_shardings = None if quantized is None else shd.shardings_for(abstract_params(quantized), mesh)
    dtype = cfg.jnp_param_dtype
    params: dict = {}

    def put(path, host):
        want = tree.get(abstract, path).shape
        if host.shape != want:  # a layout bug, not a user error: the group's shapes come from cfg
            raise AssertionError(f"{'/'.join(path)}: converted shape {host.shape} != {want}")
        if host.dtype != dtype or host.ctypes.data % 64 or not host.flags.c_contiguous:
            buffer = _aligned_empty(host.shape, dtype)
            buffer[...] = host
            host = buffer
        tree.put(params, path, _place(host, tree.get(shardings, path)))
        if q_shardings is not None and lora.is_quantized_kernel(path, quantized):
            module = tree.get(params, path[:-1])
            module.update(lora.quantize_kernel(path, module.pop("kernel"), quantized, q_shardings))

    for group in global_groups(cfg):
        if score_key is not None and group.hf_names == (SCORE,):
            path = group.paths[0]
            shape, init = tree.get(abstract, path).shape, nn.initializers.normal(cfg.init_std)
            draw = jax.jit(lambda key: init(key, shape, dtype), out_shardings=tree.get(shardings, path))
            tree.put(params, path, draw(score_key))
            continue
        for path, array in zip(group.paths, _converted(group, files, None)):
            put(path, array)
    for group in layer_groups(cfg):
        if cfg.scan_layers:  # one [L, ...] host buffer per leaf, filled layer by layer
            buffers = [_aligned_empty(tree.get(abstract, ("layers", *p)).shape, dtype) for p in group.paths]
            for i in range(cfg.num_layers):
                for buffer, array in zip(buffers, _converted(group, files, i)):
                    buffer[i] = array
            for path, buffer in zip(group.paths, buffers):
                put(("layers", *path), buffer)
            del buffers
        else:
            for i in range(cfg.num_layers):
                for path, array in zip(group.paths, _converted(group, files, i)):
                    put((f"layers_{i}", *path), array)
    if q_shardings is not None:
        return lora.quantize_params(params, quantized, q_shardings, in_place=True)  # norms to float32
    missing = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(abstract)
        if not tree.has(params, tuple(k.key for k in p))
    ]
    if missing:
        raise AssertionError(f"no Hugging Face tensor maps to {missing}")
    return params


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise JaxllmError(
            f"{path} not found; point at a Hugging Face model folder (config.json + safetensors or .bin weights)"
        )
    return read_json_object(path)


def load_pretrained(
    path: str,
    dtype: Any = "float32",
    mesh: Mesh | None = None,
    *,
    compute_dtype: Any = None,
    score_key: jax.Array | None = None,
    **overrides: Any,
) -> tuple[Decoder, dict]:
    """(Decoder, params) from a Hugging Face folder: `dtype` is the param dtype (and the compute dtype
    unless `compute_dtype` is given); `mesh` defaults to one device; `overrides` set other ModelConfig
    fields (scan_layers, attention, remat, dropouts, ...). A *ForSequenceClassification folder gives a
    score model; `num_labels=1` on a causal LM's folder gives one with a fresh score head (`score_key`,
    default key 0)."""
    path, dtype = os.path.expanduser(path), dtype_name(dtype)
    compute_dtype = dtype if compute_dtype is None else dtype_name(compute_dtype, "compute_dtype")
    config = read_config(path)
    cfg = model_config_from_hf(config, param_dtype=dtype, dtype=compute_dtype, **overrides)
    fresh = fresh_score(hf_num_labels(config), cfg.num_labels, path)
    files = TensorFiles(path)
    key = (jax.random.key(0) if score_key is None else score_key) if fresh else None
    return Decoder(cfg), load_params(files, cfg, mesh if mesh is not None else _one_device_mesh(), score_key=key)


def hf_tensors(cfg: ModelConfig, params: dict, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) in checkpoint order, one layer at a time: embeddings, layers, final norm, head."""

    def emit(group, leaves, layer):
        for name, array in zip(group.hf_names, group.to_hf(*leaves)):
            yield name.format(i=layer), np.ascontiguousarray(array.astype(dtype, copy=False))

    groups = global_groups(cfg)
    first = [g for g in groups if g.paths[0][0] in ("embed_tokens", "embed_norm")]
    for group in first:
        yield from emit(group, [shd.to_host(tree.get(params, p)) for p in group.paths], None)
    for i in range(cfg.num_layers):
        for group in layer_groups(cfg):
            if cfg.scan_layers:
                leaves = [shd.to_host(tree.get(params, ("layers", *p))[i]) for p in group.paths]
            else:
                leaves = [shd.to_host(tree.get(params, (f"layers_{i}", *p))) for p in group.paths]
            yield from emit(group, leaves, i)
    for group in groups[len(first) :]:
        yield from emit(group, [shd.to_host(tree.get(params, p)) for p in group.paths], None)


def parse_size(size: int | str) -> int:
    """Bytes in 5000000, "5GB" (10^9) or "5GiB" (2^30), as transformers reads max_shard_size."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise JaxllmError(f"max_shard_size={size!r}; write bytes or e.g. '500MB' / '5GB' / '4GiB'")
    unit = (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


def save_pretrained(
    model: Decoder,
    params: dict,
    path: str,
    *,
    dtype: Any = "float32",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    config_updates: dict[str, Any] | None = None,
) -> None:
    """Writes config.json + safetensors (sharded with an index past `max_shard_size`) that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads. Written through `atomic.folder`:
    locally renamed into place, so a crash never leaves a half-written checkpoint; on an object store
    (gs://) uploaded with config.json last. `config_updates` adds keys to config.json (e.g. bos_token_id).
    A score model (num_labels > 0) is a *ForSequenceClassification whose pad_token_id is never a
    sequence's last token (`score_pad_token_id` of the pad, EOS and BOS ids in `config_updates`)."""
    cfg, path = model.cfg, atomic.location(path)
    params = nn.meta.unbox(params.get("params", params) if len(params) == 1 else params)
    dtype = dtype_name(dtype)
    config = {**hf_config_from_model(cfg, dtype), **(config_updates or {})}
    if cfg.num_labels:
        given = config.get("pad_token_id")
        config["pad_token_id"] = score_pad_token_id(given, config.get("eos_token_id"), config.get("bos_token_id"))
        if config["pad_token_id"] != given:
            logging.warning(
                "score model export: pad_token_id=%s (given: %s); transformers scores each row at its "
                "last token that is not pad_token_id, which must be the last token jaxllm scored",
                config["pad_token_id"],
                given,
            )
    limit = parse_size(max_shard_size)
    if atomic.as_path(path).exists() and list(atomic.as_path(path).iterdir()) and not overwrite:
        raise JaxllmError(f"{path} exists and is not empty; choose a new folder or pass overwrite=True")
    tensors = hf_tensors(cfg, params, DTYPES[dtype])
    if jax.process_index() != 0:  # every process joins the gathers in hf_tensors; one writes
        for _ in tensors:
            pass
    else:
        save_tensors(tensors, path, config, max_shard_size=limit, overwrite=True)


def save_tensors(
    tensors: Iterator[tuple[str, np.ndarray]],
    path: str,
    config: dict[str, Any],
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    files: tuple[str, ...] = (),
) -> None:
    """Writes (name, array) pairs as they come into safetensors shards (an index past `max_shard_size`),
    `config` as config.json and copies of `files`, atomically (`atomic.folder`, config.json last)."""
    path, limit = atomic.location(path), parse_size(max_shard_size)
    if not overwrite and atomic.as_path(path).exists() and list(atomic.as_path(path).iterdir()):
        raise JaxllmError(f"{path} exists and is not empty; choose a new folder")
    with atomic.folder(path, last=["config.json"]) as tmp:
        for file in files:
            shutil.copyfile(file, os.path.join(tmp, os.path.basename(file)))
        _finish(tmp, _write_shards(tmp, tensors, limit), config)


def _write_shards(folder: str, tensors: Iterator[tuple[str, np.ndarray]], limit: int) -> list[dict[str, int]]:
    """Writes shard files as they fill (at most one shard in host memory); returns their tensor sizes."""
    shards: list[dict[str, int]] = []
    pending: dict[str, np.ndarray] = {}

    def flush():
        save_file(pending, os.path.join(folder, f"shard-{len(shards):05d}"), metadata={"format": "pt"})
        shards.append({name: array.nbytes for name, array in pending.items()})
        pending.clear()

    size = 0
    for name, array in tensors:
        if pending and size + array.nbytes > limit:
            flush()
            size = 0
        pending[name] = array
        size += array.nbytes
    if pending:
        flush()
    return shards


def _finish(folder: str, shards: list[dict[str, int]], config: dict[str, Any]) -> None:
    """Names the shards as transformers does and writes the index (if sharded) and config.json."""
    if len(shards) == 1:
        os.rename(os.path.join(folder, "shard-00000"), os.path.join(folder, SINGLE))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.rename(os.path.join(folder, f"shard-{i:05d}"), os.path.join(folder, name))
            weight_map.update({tensor: name for tensor in shard})
        total = sum(sum(shard.values()) for shard in shards)
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
