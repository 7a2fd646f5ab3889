"""Paths and atomic writes: every file or folder jaxllm writes where a user pointed goes through here.

A path is a local path or a URL that `etils.epath` (Orbax's filesystem layer) opens: gs:// (needs
gcsfs: `pip install 'jaxllm[gcs]'`, or TensorFlow), s3:// (s3fs), az:// (adlfs). What "whole or not at
all" means differs by filesystem:

- Local (POSIX, also a gcsfuse mount): a file is written to a temp file beside it, fsynced and renamed
  over its name; a folder is filled as a temp folder beside it and renamed into place. Readers see the
  old or the new version whole, never a part.
- Object stores (any URL): an object appears whole when its upload completes, so `write` uploads straight
  to the name. There is no rename (fsspec's is a server-side copy + delete) and no folder: `copy` streams
  to a hidden temp object and copies that to the name, so a failed stream leaves no object under it;
  `folder` fills a local temp folder, then uploads it file by file with its `last` files (the ones
  readers look for: config.json, adapter_config.json) last, and removes those first when it replaces an
  older folder. A folder whose last file is there is whole; without it, it is partial (a crash in the
  middle) and is rewritten by the next run.
- Appends (metrics.jsonl, TensorBoard events): a local file is appended to and flushed as it goes; an
  object cannot be appended to, so `Appender` keeps the content and rewrites the object at most every
  `interval` seconds and on close: after a crash up to that much of the tail is missing.

Checkpoints are Orbax's own (`train/checkpoint.py`): it writes local paths and gs:// only, finalising
a step by a rename locally and by a commit marker on gs://.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator

from etils import epath

from jaxllm import JaxllmError

# URL scheme -> (fsspec protocol, the package that implements it), for epath's fsspec backend.
_FSSPEC = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs"), "az": ("az", "adlfs")}
_CHUNK = 16 << 20


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store location (gs://B/x) rather than a local path."""
    return "://" in os.fspath(path)


def location(path: str | os.PathLike) -> str:
    """`path` as jaxllm stores and prints it: a URL as given (checked), a local path absolute."""
    return os.fspath(as_path(path))


def as_path(path: str | os.PathLike) -> epath.Path:
    """The epath of `path` (a local one made absolute, `~` expanded); an unknown URL scheme, or one
    whose filesystem package is missing, is a one-line error."""
    text = os.fspath(path)
    if not is_url(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    scheme = text.split("://", 1)[0]
    try:
        result = epath.Path(text)
    except KeyError:
        raise JaxllmError(
            f"{text!r}: {scheme}:// is not a filesystem jaxllm can write to; use a local path, gs://, s3:// or az://"
        ) from None
    _check_backend(scheme)
    return result


@functools.cache
def _check_backend(scheme: str) -> None:
    if scheme not in _FSSPEC or (scheme == "gs" and importlib.util.find_spec("tensorflow") is not None):
        return  # epath reads gs:// through tf.io.gfile when TensorFlow is installed
    protocol, package = _FSSPEC[scheme]
    import fsspec  # pylint: disable=g-import-not-at-top

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        raise JaxllmError(
            f"{scheme}:// paths need the {package} package: pip install {package}"
            + (" (or 'jaxllm[gcs]')" if scheme == "gs" else "")
        ) from None


def write(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` whole: locally a temp file beside it, fsynced and renamed over it; on an
    object store one upload (the object appears when it completes)."""
    data = data.encode() if isinstance(data, str) else data
    if is_url(path):
        target = as_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    with _local_temp(os.fspath(as_path(path))) as f:
        f.write(data)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies file `src` (local or a URL) to `dst` whole, streaming (shards can be large)."""
    with as_path(src).open("rb") as reader:
        if not is_url(dst):
            with _local_temp(os.fspath(as_path(dst))) as f:
                shutil.copyfileobj(reader, f, _CHUNK)
            return
        target = as_path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with tmp.open("wb") as f:
                shutil.copyfileobj(reader, f, _CHUNK)
            tmp.replace(target)  # a server-side copy: the object appears whole
        except BaseException:
            with contextlib.suppress(Exception):
                tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _local_temp(path: str) -> Iterator[io.BufferedWriter]:
    """A binary file to fill; when the block ends without an error it is fsynced and renamed over `path`."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def folder(path: str | os.PathLike, *, last: Iterable[str] = ()) -> Iterator[str]:
    """Yields a local temporary folder to fill; when the block ends without an error it takes `path`'s
    place (a folder already there is replaced), else it is deleted. Locally the folder is renamed into
    place (an old one moved aside first); on an object store its files are uploaded, `last` ones last."""
    if is_url(path):
        tmp = tempfile.mkdtemp(prefix="jaxllm-upload-")
        try:
            yield tmp
            _upload(tmp, as_path(path), list(last))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    path = os.fspath(as_path(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
            os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _upload(local: str, target: epath.Path, last: list[str]) -> None:
    """Replaces object folder `target` by local folder `local`: old `last` files removed first, then the
    rest of the old folder; new files uploaded with the `last` ones at the end."""
    if target.exists():
        for name in last:
            (target / name).unlink(missing_ok=True)
        target.rmtree(missing_ok=True)
    names = sorted(os.path.relpath(os.path.join(root, f), local) for root, _, files in os.walk(local) for f in files)
    for name in sorted(names, key=lambda n: (n in last, last.index(n) if n in last else 0, n)):
        copy(os.path.join(local, name), target / name)


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Creates folder `path` and checks that a file can be written in it: before a run, not after."""
    probe = f".jaxllm-write-check-{uuid.uuid4().hex[:12]}"
    try:
        if not is_url(path):
            local = os.fspath(as_path(path))
            os.makedirs(local, exist_ok=True)
            with tempfile.TemporaryFile(dir=local, prefix=probe):
                pass
            return
        target = as_path(path)
        target.mkdir(parents=True, exist_ok=True)
        (target / probe).write_bytes(b"")
        (target / probe).unlink(missing_ok=True)
    except JaxllmError:
        raise
    except Exception as e:  # noqa: BLE001 (OSError, or a storage client's own: credentials, permissions)
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise JaxllmError(f"{what} {os.fspath(path)!r} is not a writable folder ({reason}); choose another") from None


class Appender:
    """A file written by appending (metrics.jsonl, TensorBoard events). Locally an append-mode file,
    flushed on `flush`; on an object store the whole content, rewritten at most every `interval`
    seconds on `flush` and always on `flush(force=True)` and `close` (an object has no append)."""

    def __init__(self, path: str | os.PathLike, *, interval: float = 30.0):
        self.path, self.interval = as_path(path), interval
        self._remote, self._lock = is_url(path), threading.Lock()  # TensorBoard flushes from its own thread
        if self._remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
            self._uploaded_at, self._dirty = time.monotonic(), False
            self._file = None
        else:
            os.makedirs(os.fspath(self.path.parent), exist_ok=True)
            self._file = open(os.fspath(self.path), "ab")  # noqa: SIM115 (closed in close())

    def write(self, data: str | bytes) -> None:
        data = data.encode() if isinstance(data, str) else data
        with self._lock:
            if self._file is not None:
                self._file.write(data)
            else:
                self._data += data
                self._dirty = True

    def flush(self, force: bool = False) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
            elif self._dirty and (force or time.monotonic() - self._uploaded_at >= self.interval):
                self.path.write_bytes(bytes(self._data))
                self._uploaded_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()
                self._file = None
        elif self._remote:
            self.flush(force=True)


def missing_root(path: str | os.PathLike) -> str | None:
    """The outermost folder of local `path` that does not exist yet (creating `path` creates it), or None:
    `path` exists, or is a URL (an object store has no empty folders to leave behind)."""
    if is_url(path):
        return None
    missing, folder = None, os.fspath(as_path(path))
    while not os.path.lexists(folder):
        missing, parent = folder, os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


@contextlib.contextmanager
def no_leftovers(*paths: str | os.PathLike) -> Iterator[None]:
    """A block that may create the folders `paths`: if it raises, the folders it created that hold no file
    are removed again (a refused run leaves nothing behind); folders that existed before are kept."""
    created = {root for root in (missing_root(p) for p in paths if p) if root}
    try:
        yield
    except BaseException:
        for root in created:
            remove_if_empty(root)
        raise


def remove_if_empty(path: str | os.PathLike) -> bool:
    """Removes local folder `path` if it holds no file (only empty folders); True if it did. Folders that
    gained a file meanwhile stay (an rmdir removes only an empty folder)."""
    root = os.fspath(as_path(path))
    if any(files for _, _, files in os.walk(root)):
        return False
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -entry[0].count(os.sep)):
        try:
            os.rmdir(folder)
        except OSError:
            return False
    return True
