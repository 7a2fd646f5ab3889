"""`pytorch_model.bin` state dicts read without PyTorch and without running the file's code.

`torch.save` writes a zip archive: `<top>/data.pkl` (a pickle of the state dict), `<top>/data/<key>`
(one stored, uncompressed entry per storage) and `<top>/byteorder`. The pickle is read by an
unpickler that knows only the handful of globals a state dict uses; any other global (`os.system`,
`builtins.eval`, ...) is refused before it is called. Storages and tensors come out as lazy
descriptors, so opening a file reads its pickle only, and reading a tensor reads just the bytes
that tensor spans (several tensors may be views of one storage: tied weights, slices, transposes).
Descriptors and the allowed callables have no `__dict__` and refuse attribute writes, so a pickle's
BUILD opcode cannot alter them either.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from jaxllm import JaxllmError

# torch's legacy (pre-1.6) format starts with a pickle of this number
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGES = {  # torch.<Name>Storage -> element dtype
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "ShortStorage": np.int16,
    "IntStorage": np.int32,
    "LongStorage": np.int64,
    "BoolStorage": np.bool_,
}
_DTYPES = {  # torch.<dtype> (a _rebuild_tensor_v3 argument) -> numpy dtype
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "bool": np.bool_,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}


class _Malformed(Exception):
    """The pickle's calls have the wrong form for a state dict."""


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: Any  # None: torch.UntypedStorage (bytes)


@dataclasses.dataclass(frozen=True, slots=True)
class _DType:
    dtype: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Storage:
    """One `<top>/data/<key>` entry, as the pickle names it."""

    key: str
    dtype: Any


@dataclasses.dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor as a view of a storage: elements `offset + sum(index * stride)`."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: Any


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise _Malformed(f"expected a tuple of sizes, got {value!r:.80}")
    return tuple(value)


def _tensor(storage: Any, offset: Any, shape: Any, stride: Any, dtype: Any = None) -> TensorRef:
    if not isinstance(storage, Storage) or type(offset) is not int or offset < 0:
        raise _Malformed("a tensor without a storage")
    shape, stride = _ints(shape), _ints(stride)
    if len(shape) != len(stride):
        raise _Malformed(f"shape {shape} with stride {stride}")
    return TensorRef(storage, offset, shape, stride, storage.dtype if dtype is None else dtype)


def _rebuild_tensor(storage=None, offset=None, shape=None, stride=None, *_):
    return _tensor(storage, offset, shape, stride)


def _rebuild_tensor_v3(storage=None, offset=None, shape=None, stride=None, _grad=None, _hooks=None, dtype=None, *_):
    if not isinstance(dtype, _DType):
        raise _Malformed("_rebuild_tensor_v3 without a dtype")
    return _tensor(storage, offset, shape, stride, dtype.dtype)


def _rebuild_parameter(data=None, *_):
    if not isinstance(data, TensorRef):
        raise _Malformed("a parameter without a tensor")
    return data


class _Call:
    """An allowed callable as the pickle sees it: no `__dict__` and no settable attributes, so a BUILD
    opcode aimed at it fails instead of changing a function of this module."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Malformed(f"a pickle may not set {name!r} on a callable")

    def __call__(self, *args):
        return self._fn(*args)


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Call(collections.OrderedDict),
    ("torch._utils", "_rebuild_tensor"): _Call(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter),
    ("torch", "UntypedStorage"): _StorageType(None),
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()},
    **{("torch", name): _DType(dtype) for name, dtype in _DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Builds descriptors, never objects of the file's choosing: every global outside `_GLOBALS` is refused."""

    def __init__(self, stream, file: str):
        super().__init__(stream, encoding="utf-8")
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocol < 3): __builtin__.eval
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _GLOBALS:
            raise JaxllmError(
                f"{self.file}: refused to load: the pickle calls {module}.{name}; jaxllm reads only "
                "tensors from .bin files (convert it to safetensors with a tool you trust)"
            )
        return _GLOBALS[module, name]

    def persistent_load(self, pid: Any) -> Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
        ):
            raise _Malformed(f"unknown persistent id {pid!r:.80}")
        dtype = pid[1].dtype
        return Storage(pid[2], np.uint8 if dtype is None else dtype)


_UNPICKLING_ERRORS = (
    _Malformed,
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    struct.error,
    OverflowError,
    RecursionError,
)


class TorchFile:
    """The tensors of one `torch.save` zip archive; `read` reads one tensor's bytes."""

    def __init__(self, path: str):
        self.path = path
        if not zipfile.is_zipfile(path):
            raise JaxllmError(_not_a_zip(path))
        try:
            with zipfile.ZipFile(path) as archive:
                self._open(archive)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise JaxllmError(f"{path}: corrupt zip archive ({e})") from None

    def _open(self, archive: zipfile.ZipFile) -> None:
        pickles = sorted(
            (n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), key=lambda n: n.count("/")
        )
        if not pickles:
            raise JaxllmError(f"{self.path}: a zip archive without data.pkl; not a PyTorch checkpoint")
        top = pickles[0][: -len("data.pkl")]
        infos = {info.filename: info for info in archive.infolist()}
        order = f"{top}byteorder"
        self.big_endian = order in infos and archive.read(order).strip() == b"big"
        with archive.open(pickles[0]) as stream:
            try:
                state = _StateDictUnpickler(stream, self.path).load()
            except _UNPICKLING_ERRORS as e:
                raise JaxllmError(f"{self.path}: the pickle is corrupt or not a state dict ({e})") from None
        if not isinstance(state, dict):
            raise JaxllmError(f"{self.path}: holds a {type(state).__name__}, not a state dict of tensors")
        self.tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, TensorRef)}
        if not self.tensors:
            raise JaxllmError(f"{self.path}: holds no tensors")
        self._entries = {}
        for name, ref in self.tensors.items():
            info = infos.get(f"{top}data/{ref.storage.key}")
            if info is None:
                raise JaxllmError(
                    f"{self.path}: tensor {name!r}'s storage {ref.storage.key!r} is missing from the archive"
                )
            if (ref.offset + _span(ref)) * np.dtype(ref.dtype).itemsize > info.file_size:
                raise JaxllmError(f"{self.path}: tensor {name!r} reaches past the end of its storage")
            self._entries[name] = info

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a C-contiguous array: only the bytes it spans are read."""
        ref, info = self.tensors[name], self._entries[name]
        dtype = np.dtype(ref.dtype)
        start, count = ref.offset * dtype.itemsize, _span(ref) * dtype.itemsize
        raw = np.empty(count, np.uint8)
        try:
            with open(self.path, "rb") as f:
                if info.compress_type == zipfile.ZIP_STORED:
                    f.seek(_data_start(f, info, self.path) + start)
                    got = f.readinto(memoryview(raw))
                else:  # re-zipped with compression: stream (and discard) up to the tensor
                    with zipfile.ZipFile(f) as archive, archive.open(info) as entry:
                        entry.seek(start)
                        got = entry.readinto(memoryview(raw))
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise JaxllmError(f"{self.path}: cannot read tensor {name!r} ({e})") from None
        if got != count:
            raise JaxllmError(f"{self.path}: tensor {name!r} is cut short; the file is truncated")
        if self.big_endian and dtype.itemsize > 1:
            raw = raw.view(f">u{dtype.itemsize}").astype(f"<u{dtype.itemsize}").view(np.uint8)
        flat = raw.view(dtype)
        if _contiguous(ref):  # the buffer itself
            return flat.reshape(ref.shape)
        view = np.lib.stride_tricks.as_strided(
            flat, ref.shape, [s * dtype.itemsize for s in ref.stride], writeable=False
        )
        return np.ascontiguousarray(view)  # a transposed or strided view: copied into C order


def _span(ref: TensorRef) -> int:
    """Elements from the tensor's first to its last, inclusive (0 for an empty tensor)."""
    if 0 in ref.shape:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))


def _contiguous(ref: TensorRef) -> bool:
    """Whether the strides are C order's (a size-1 dimension's stride does not matter)."""
    expected = 1
    for n, s in zip(reversed(ref.shape), reversed(ref.stride)):
        if n != 1 and s != expected:
            return n == 0
        expected *= n
    return True


def _data_start(f, info: zipfile.ZipInfo, path: str) -> int:
    """Where a stored entry's bytes begin: after its local header, whose name/extra lengths may differ
    from the central directory's."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise JaxllmError(f"{path}: entry {info.filename} has a broken zip header; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _not_a_zip(path: str) -> str:
    """Why `path` (not a zip archive) cannot be read: torch's legacy format, a plain pickle, or garbage.
    A pickle is looked at through the same restricted unpickler, so nothing in it runs."""
    with open(path, "rb") as f:
        head = f.read(1)
        f.seek(0)
        if head == b"\x80":
            try:
                first = _StateDictUnpickler(f, path).load()
            except _UNPICKLING_ERRORS:
                first = None
            if first == LEGACY_MAGIC:
                return (
                    f"{path}: written in PyTorch's legacy (pre-1.6) format, which jaxllm does not read; re-save "
                    "it with torch.save (default zip format) or convert it to safetensors"
                )
    return f"{path}: not a PyTorch checkpoint (no torch.save zip archive: truncated, or another kind of file)"
