"""CSV, Arrow and JSON-array rows for the data pipeline, as Hugging Face data sets ship them (a module of
its own: it imports pyarrow, and only when used).

`csv`: comma-separated files with a header row; the columns the format reads are text (str), quoted
values may span lines. `arrow`: Arrow IPC files, stream format (the `datasets` cache's `.arrow` files)
or file format. `json`: `.json` files, each a JSON array of objects or JSON lines. Random access by
row; a CSV or JSON array is read whole once per process, Arrow files are memory-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from jaxllm import JaxllmError
from jaxllm.data.sources import CachedFileRows, Fields, FileRows, JsonlSource, RowSource, check_fields, expand_globs


class _TableSource(CachedFileRows):
    """Rows of whole-file Arrow tables (one per file), read lazily in each process that reads them."""

    _kind = ""

    def __init__(self, patterns: Sequence[str], fields: Fields = RowSource._fields, whole_row: bool = False):
        self._files = expand_globs(patterns, self._kind)
        self._fields, self._whole_row = fields, whole_row
        self.__setstate__({})
        counts = []
        for file_id, path in enumerate(self._files):
            table = self._table(file_id)
            if table.num_rows == 0:
                raise JaxllmError(f"{self._kind} file {path!r} has no rows; remove it or narrow data.paths")
            check_fields(dict.fromkeys(table.column_names), fields, f"{path}: row 0")
            counts.append(table.num_rows)
        self._starts = np.cumsum([0] + counts[:-1]).tolist()
        self._len = sum(counts)

    def _read(self, path: str) -> pa.Table:
        raise NotImplementedError

    def _table(self, file_id: int) -> pa.Table:
        with self._lock:
            if file_id not in self._cache:
                self._cache[file_id] = self._read(self._files[file_id])
            return self._cache[file_id]

    def _row(self, index: int) -> dict[str, Any]:
        file_id, row = self._locate(index)
        table = self._table(file_id)
        return {name: table.column(name)[row].as_py() for _, name in self._fields}


class CsvSource(_TableSource):
    """CSV files with a header row, as `datasets` exports them; the format's columns read as text."""

    _kind = "csv"

    def _read(self, path: str) -> pa.Table:
        text = {name: pa.string() for _, name in self._fields}
        try:
            return pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=text),
            )
        except (pa.ArrowInvalid, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JaxllmError(f"{path!r} is not a readable CSV file ({first}); fix it or narrow data.paths") from None


class ArrowSource(_TableSource):
    """Arrow IPC files: the stream format `datasets` writes to its cache, or the file format."""

    _kind = "arrow"

    def _read(self, path: str) -> pa.Table:
        try:
            try:
                return pa.ipc.open_stream(pa.memory_map(path)).read_all()
            except pa.ArrowInvalid:
                return pa.ipc.open_file(pa.memory_map(path)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise JaxllmError(
                f"{path!r} is not an Arrow IPC file, stream or file format ({e}); fix it or narrow data.paths"
            ) from None


class JsonSource(FileRows):
    """`.json` files as `datasets` reads them: a JSON array of objects (held in memory), or JSON lines."""

    def __init__(self, patterns: Sequence[str], fields: Fields = RowSource._fields, whole_row: bool = False):
        self._files = expand_globs(patterns, "json")
        self._fields, self._whole_row = fields, whole_row
        self._parts: list[Any] = []
        for path in self._files:
            with open(path, "rb") as f:
                head = f.read(4096).lstrip()
            self._parts.append(self._array(path) if head.startswith(b"[") else JsonlSource([path], fields, whole_row))
        self._starts = np.cumsum([0] + [len(p) for p in self._parts[:-1]]).tolist()
        self._len = sum(len(p) for p in self._parts)

    def _array(self, path: str) -> list[Any]:
        try:
            with open(path, "rb") as f:
                rows = json.load(f)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or past the parser's limits
            raise JaxllmError(
                f"{path}: not valid JSON ({str(e)[:200] or 'nested too deeply'}); fix the file or narrow data.paths"
            ) from None
        if not rows:
            raise JaxllmError(f"JSON file {path!r} holds an empty array; remove it or narrow data.paths")
        return [self._select(row, f"{path}: item {i}") for i, row in enumerate(rows)]

    def __getitem__(self, index: int) -> str | dict[str, Any]:
        part, row = self._locate(index)
        return self._parts[part][row]

    def where(self, index: int) -> str:
        part, row = self._locate(index)
        if isinstance(self._parts[part], list):
            return f"{self._files[part]}: item {row}"
        return self._parts[part].where(row)
