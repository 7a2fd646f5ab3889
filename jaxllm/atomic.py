"""Atomic writes: a file or a folder appears whole, under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def write(path: str, data: str | bytes) -> None:
    """Writes `data` to a temporary file beside `path`, flushes it to disk and renames it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def folder(path: str) -> Iterator[str]:
    """Yields a temporary folder beside `path` to fill; when the block ends without an error it takes
    `path`'s place (a folder already there is moved aside first and deleted after), else it is deleted."""
    path = os.path.abspath(os.path.expanduser(path))
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
