"""Sources: random-access sequences of rows that Grain's `MapDataset.source` reads.

For `data.format="text"` a source hands out each row's document as a `str` (`data.text_field` of a
record); for the SFT formats it hands out the whole row as a dict of plain Python values, once it has
checked that the row holds the fields the format needs (`jaxllm.data.sft` renders it).
Each source checks what it can at construction (globs match, files non-empty, every JSONL row parses
and has the needed fields), so a bad input fails before training starts, with the file and row to fix.
Sources are picklable: Grain ships them to its worker processes.
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxllm import JaxllmError
from jaxllm.data.corpus import embedded_documents, embedded_preference_records, embedded_sft_records

_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # one or more blank lines

# Longest JSONL line (one document) a source reads, newline included. Tokenizing a document holds about
# 50 bytes per byte of it (2.6 GB for a 54 MB line), so a longer one is refused, naming file and line:
# split it into several rows.
MAX_LINE_BYTES = 16 << 20

# (config key, field name) pairs a row must hold, e.g. (("text_field", "text"),); the key names the fix.
Fields = tuple[tuple[str, str], ...]
# `jaxllm finetune` flags (autotrain's) that set the preference columns, named where one is missing
AUTOTRAIN_FLAGS = {
    "prompt_field": "--prompt_text_column",
    "chosen_field": "--text_column",
    "rejected_field": "--rejected_text_column",
}


class RowSource:
    """Base of every source: subclasses give `_row(index)` (a str or a dict) and `where(index)`."""

    _fields: Fields = (("text_field", "text"),)
    _whole_row: bool = False  # True: hand out dict rows (SFT formats); False: the text of the text field

    def __getitem__(self, index: int) -> str | dict[str, Any]:
        return self._select(self._row(index), self.where(index))

    def _row(self, index: int) -> str | dict[str, Any]:
        raise NotImplementedError

    def where(self, index: int) -> str:
        raise NotImplementedError

    def _select(self, row: Any, where: str) -> str | dict[str, Any]:
        if not self._whole_row:
            return row if isinstance(row, str) else _field_text(row, self._fields[0], where)
        if isinstance(row, str):  # a plain-text document: only a text-field format can read it
            (key, field), *rest = self._fields
            if key != "text_field" or rest:
                names = ", ".join(repr(f) for _, f in self._fields)
                raise JaxllmError(
                    f"{where}: plain text, but data.format needs fields {names}; "
                    "use a source of JSON/Parquet records or data.format='sft_text'"
                )
            return {field: row}
        return check_fields(_plain(row), self._fields, where)


class FileRows(RowSource):
    """Rows numbered across files: subclasses set `_files`, `_starts` (the global index of each file's
    first row) and `_len`, and read a row by (file, row in it)."""

    _files: list[str]
    _starts: list[int]
    _len: int

    def __len__(self) -> int:
        return self._len

    def _locate(self, index: int) -> tuple[int, int]:
        file_id = bisect.bisect_right(self._starts, index) - 1
        return file_id, index - self._starts[file_id]

    def where(self, index: int) -> str:
        file_id, row = self._locate(index)
        return f"{self._files[file_id]}: row {row}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._files)} files, {len(self)} rows)"


class CachedFileRows(FileRows):
    """File rows that keep decoded data in each process that reads them (`_cache`, guarded by `_lock`):
    neither is pickled; `__setstate__` sets both up empty."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()


class EmbeddedSource(RowSource):
    """The corpus shipped with Python (see `jaxllm.data.corpus`)."""

    _load, _noun, _plural = staticmethod(embedded_documents), "embedded document", "documents"

    def __init__(self, fields: Fields = RowSource._fields, whole_row: bool = False):
        self._rows = self._load()
        self._fields, self._whole_row = fields, whole_row

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, index: int) -> str | dict[str, Any]:
        return self._rows[index]

    def where(self, index: int) -> str:
        return f"{self._noun} {index}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} {self._plural})"


class EmbeddedSftSource(EmbeddedSource):
    """Question/answer records about Python shipped with it, in every SFT format (`jaxllm.data.corpus`)."""

    _load, _noun, _plural = staticmethod(embedded_sft_records), "embedded_sft record", "records"

    def __init__(self, fields: Fields = RowSource._fields, whole_row: bool = False):
        super().__init__(fields, whole_row)
        self[0]  # fail now if the format's fields are not the records'


class EmbeddedPreferenceSource(EmbeddedSftSource):
    """The embedded_sft questions, each with its own answer (chosen) and another's (rejected)."""

    _load, _noun, _plural = staticmethod(embedded_preference_records), "embedded_preference record", "records"


class TextSource(RowSource):
    """Plain UTF-8 text files: one document per file, or per blank-line-separated paragraph."""

    def __init__(
        self, patterns: Sequence[str], split: str = "file", fields: Fields = RowSource._fields, whole_row: bool = False
    ):
        self._files = expand_globs(patterns, "text")
        self._fields, self._whole_row = fields, whole_row
        for path in self._files:
            if os.path.getsize(path) == 0:
                raise JaxllmError(f"text file {path!r} is empty; remove it or narrow data.paths")
        self._paragraphs: list[str] | None = None
        if split == "paragraph":
            self._paragraphs = []
            for path in self._files:
                blocks = [b.strip("\n") for b in _PARAGRAPH_BREAK.split(_read_text(path))]
                blocks = [b for b in blocks if b.strip()]
                if not blocks:
                    raise JaxllmError(f"text file {path!r} has only whitespace; remove it or narrow data.paths")
                self._paragraphs.extend(blocks)
        elif split != "file":
            raise JaxllmError(f"data.text_split={split!r} is not known; use 'file' or 'paragraph'")

    def __len__(self) -> int:
        return len(self._files) if self._paragraphs is None else len(self._paragraphs)

    def _row(self, index: int) -> str:
        if self._paragraphs is not None:
            return self._paragraphs[index]
        return _read_text(self._files[index])

    def where(self, index: int) -> str:
        return self._files[index] if self._paragraphs is None else f"text paragraph {index}"

    def __repr__(self) -> str:
        return f"TextSource({len(self._files)} files, {len(self)} documents)"


class JsonlSource(RowSource):
    """JSON Lines files; each non-blank line is an object holding the fields the format reads.

    Every row is parsed and checked once up front (a bad row fails now, naming file:line); only byte
    offsets and line numbers are kept, so memory does not grow with the corpus text. A line longer than
    `MAX_LINE_BYTES` is refused without being read whole.
    """

    def __init__(self, patterns: Sequence[str], fields: Fields = RowSource._fields, whole_row: bool = False):
        self._files = expand_globs(patterns, "jsonl")
        self._fields, self._whole_row = fields, whole_row
        file_ids, offsets, linenos = [], [], []
        for file_id, path in enumerate(self._files):
            rows = 0
            with open(path, "rb") as f:
                offset = lineno = 0
                while line := f.readline(MAX_LINE_BYTES + 1):
                    lineno += 1
                    if len(line) > MAX_LINE_BYTES:
                        raise JaxllmError(
                            f"{path}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes (the most one "
                            "row may hold); split that document into several rows"
                        )
                    if line.strip():
                        file_ids.append(file_id)
                        offsets.append(offset)
                        linenos.append(lineno)
                        self._select(_parse_json(line, f"{path}:{lineno}"), f"{path}:{lineno}")
                        rows += 1
                    offset += len(line)
            if rows == 0:
                raise JaxllmError(f"JSONL file {path!r} has no rows; remove it or narrow data.paths")
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._linenos = np.asarray(linenos, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def _row(self, index: int) -> Any:
        with open(self._files[self._file_ids[index]], "rb") as f:
            f.seek(int(self._offsets[index]))
            return _parse_json(f.readline(MAX_LINE_BYTES + 1), self.where(index))

    def where(self, index: int) -> str:
        return f"{self._files[self._file_ids[index]]}:{self._linenos[index]}"

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._files)} files, {len(self)} rows, fields={self._fields})"


class ArrayRecordSource(RowSource):
    """ArrayRecord files whose records are UTF-8 text, or JSON objects holding the format's fields."""

    def __init__(self, patterns: Sequence[str], fields: Fields = RowSource._fields, whole_row: bool = False):
        import grain  # pylint: disable=g-import-not-at-top
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

        self._files = expand_globs(patterns, "array_record")
        self._fields, self._whole_row = fields, whole_row
        counts = []
        for path in self._files:
            try:
                reader = array_record_module.ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()
            except (RuntimeError, ValueError, OSError) as e:
                raise JaxllmError(f"{path!r} is not a readable ArrayRecord file ({e})") from None
            if counts[-1] == 0:
                raise JaxllmError(f"ArrayRecord file {path!r} has no records; remove it or narrow data.paths")
        self._starts = np.cumsum([0] + counts[:-1]).tolist()
        self._records = grain.sources.ArrayRecordDataSource(list(self._files))
        self[0]  # fail now, not mid-training, if the records hold neither text nor the field

    def __len__(self) -> int:
        return len(self._records)

    def _row(self, index: int) -> str | dict[str, Any]:
        data = self._records[index]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise JaxllmError(f"{self.where(index)} is not UTF-8 text or JSON") from None
        if text.lstrip().startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return text  # plain text that happens to start with a brace
        return text

    def where(self, index: int) -> str:
        file_id = bisect.bisect_right(self._starts, index) - 1
        return f"{self._files[file_id]}: record {index - self._starts[file_id]}"

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._files)} files, {len(self)} records)"


class TfdsSource(RowSource):
    """A TFDS dataset already prepared in `data_dir` (array_record format); never downloads."""

    def __init__(
        self, name: str, split: str, data_dir: str, fields: Fields = RowSource._fields, whole_row: bool = False
    ):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

        if not name:
            raise JaxllmError("data.source='tfds' needs data.tfds_name, e.g. 'my_dataset/config:1.0.0'")
        where = f"TFDS dataset {name!r} split {split!r}" + (f" in {data_dir!r}" if data_dir else "")
        try:
            self._examples = tfds.data_source(
                name, split=split, data_dir=os.path.expanduser(data_dir) if data_dir else None, download=False
            )
        except Exception as e:  # TFDS raises many types; all mean "not there / not usable"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JaxllmError(
                f"cannot open {where}: {first_line}; prepare it there first (array_record format) and "
                "check data.tfds_name, data.tfds_split and data.tfds_data_dir"
            ) from None
        if len(self._examples) == 0:
            raise JaxllmError(f"{where} is empty; pick another data.tfds_split")
        self._fields, self._whole_row = fields, whole_row
        self._name = where
        self[0]  # fail now if a needed field is missing

    def __len__(self) -> int:
        return len(self._examples)

    def _row(self, index: int) -> dict[str, Any]:
        return self._examples[index]

    def where(self, index: int) -> str:
        return f"{self._name}, example {index}"

    def __repr__(self) -> str:
        return f"TfdsSource({self._name}, {len(self)} examples)"


def expand_globs(patterns: Sequence[str], kind: str) -> list[str]:
    """Sorted files matched by `patterns` (first occurrence wins); a pattern matching nothing is an error."""
    if not patterns:
        raise JaxllmError(f"data.source={kind!r} needs data.paths, e.g. data.paths=('corpus/*.{kind}',)")
    files: dict[str, None] = {}
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matched:
            raise JaxllmError(f"data.paths pattern {pattern!r} matches no files; fix the path or glob")
        files.update(dict.fromkeys(matched))
    return list(files)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise JaxllmError(f"text file {path!r} is not UTF-8 (byte {e.start}); convert it or drop it") from None


def _parse_json(line: bytes, where: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a number past int's digit limit, deep nesting
        raise JaxllmError(f"{where}: not valid JSON ({type(e).__name__}: {e}); fix or delete that line") from None


def check_fields(row: Any, fields: Fields, where: str) -> Any:
    """`row` itself, once it is an object holding every field of `fields`."""
    if not isinstance(row, dict):
        names = ", ".join(repr(f) for _, f in fields)
        raise JaxllmError(f"{where}: expected an object with field(s) {names}, got {type(row).__name__}")
    for key, field in fields:
        if field not in row:
            keys = ", ".join(map(repr, sorted(row))) or "none"
            flag = f" (finetune: {AUTOTRAIN_FLAGS[key]})" if key in AUTOTRAIN_FLAGS else ""
            raise JaxllmError(
                f"{where}: no field {field!r} (fields: {keys}); set data.{key}{flag} to the field that holds it"
            )
    return row


def _field_text(row: Any, field: tuple[str, str], where: str) -> str:
    """`row[field]` as str; bytes are decoded, anything else is the user's data to fix."""
    name = field[1]
    value = check_fields(row, (field,), where)[name]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise JaxllmError(f"{where}: field {name!r} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise JaxllmError(f"{where}: field {name!r} holds {type(value).__name__}, expected text")
    return value


def _plain(value: Any) -> Any:
    """TFDS / JSON / Arrow values as plain Python: bytes -> str, arrays -> lists, numpy scalars -> items."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value
