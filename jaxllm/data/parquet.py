"""Parquet rows for the data pipeline (a module of its own: it imports pyarrow, and only when used)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jaxllm import JaxllmError
from jaxllm.data.sources import CachedFileRows, Fields, RowSource, check_fields, expand_globs

_CACHE_BYTES = 256 << 20  # decoded row groups kept per process: random access reads whole groups


class ParquetSource(CachedFileRows):
    """Parquet files, as Hugging Face `datasets` exports them (`data/train-00000-of-00001.parquet`).

    Random access by row reads one row group (only the columns the format needs) and keeps recently
    decoded groups in memory; files are opened lazily, in each process that reads them.
    """

    def __init__(self, patterns: Sequence[str], fields: Fields = RowSource._fields, whole_row: bool = False):
        self._files = expand_globs(patterns, "parquet")
        self._fields, self._whole_row = fields, whole_row
        self._group_starts, counts = [], []
        for path in self._files:
            try:
                meta = pq.read_metadata(path)
                names = meta.schema.to_arrow_schema().names
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not Parquet"
                raise JaxllmError(f"{path!r} is not a readable Parquet file ({e})") from None
            if meta.num_rows == 0:
                raise JaxllmError(f"Parquet file {path!r} has no rows; remove it or narrow data.paths")
            check_fields(dict.fromkeys(names), fields, f"{path}: row 0")
            rows_per_group = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._group_starts.append(np.cumsum([0] + rows_per_group[:-1]).tolist())
            counts.append(meta.num_rows)
        self._starts = np.cumsum([0] + counts[:-1]).tolist()
        self._len = sum(counts)
        self.__setstate__(self.__dict__)

    def _row(self, index: int) -> dict[str, Any]:
        file_id, row = self._locate(index)
        group = bisect.bisect_right(self._group_starts[file_id], row) - 1
        table = self._row_group(file_id, group)
        offset = row - self._group_starts[file_id][group]
        return {name: table.column(name)[offset].as_py() for name in table.column_names}

    def _row_group(self, file_id: int, group: int):
        key = (file_id, group)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with pq.ParquetFile(self._files[file_id]) as f:
            table = f.read_row_group(group, columns=[name for _, name in self._fields])
        with self._lock:
            self._cache[key] = table
            while len(self._cache) > 1 and sum(t.nbytes for t in self._cache.values()) > _CACHE_BYTES:
                self._cache.popitem(last=False)
        return table
