"""Document sources: random-access sequences of `str` documents that Grain's `MapDataset.source` reads.

Each source checks what it can at construction (globs match, files non-empty, every JSONL row parses
and has the text field), so a bad input fails before training starts, with the file and line to fix.
Sources are picklable: Grain ships them to its worker processes.
"""

from __future__ import annotations

import bisect
import functools
import glob
import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm import JaxllmError
from jaxllm.data.corpus import embedded_documents

if TYPE_CHECKING:
    from jaxllm.data.pipeline import DataConfig

_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # one or more blank lines


class EmbeddedSource:
    """The corpus shipped with Python (see `jaxllm.data.corpus`)."""

    def __init__(self):
        self._docs = embedded_documents()

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        return self._docs[index]

    def __repr__(self) -> str:
        return f"EmbeddedSource({len(self)} documents)"


class TextSource:
    """Plain UTF-8 text files: one document per file, or per blank-line-separated paragraph."""

    def __init__(self, patterns: Sequence[str], split: str = "file"):
        self._files = expand_globs(patterns, "text")
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

    def __getitem__(self, index: int) -> str:
        if self._paragraphs is not None:
            return self._paragraphs[index]
        return _read_text(self._files[index])

    def __repr__(self) -> str:
        return f"TextSource({len(self._files)} files, {len(self)} documents)"


class JsonlSource:
    """JSON Lines files; each non-blank line is an object whose `field` holds one document.

    Every row is parsed once up front (a bad row fails now, naming file:line); only byte offsets are
    kept, so memory does not grow with the corpus.
    """

    def __init__(self, patterns: Sequence[str], field: str):
        self._files = expand_globs(patterns, "jsonl")
        self._field = field
        file_ids, offsets = [], []
        for file_id, path in enumerate(self._files):
            rows = 0
            with open(path, "rb") as f:
                offset = 0
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        _jsonl_text(line, path, lineno, field)
                        file_ids.append(file_id)
                        offsets.append(offset)
                        rows += 1
                    offset += len(line)
            if rows == 0:
                raise JaxllmError(f"JSONL file {path!r} has no rows; remove it or narrow data.paths")
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> str:
        path = self._files[self._file_ids[index]]
        with open(path, "rb") as f:
            f.seek(int(self._offsets[index]))
            return _jsonl_text(f.readline(), path, None, self._field)

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._files)} files, {len(self)} rows, field={self._field!r})"


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 text, or JSON objects holding the text in `field`."""

    def __init__(self, patterns: Sequence[str], field: str):
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
        import grain  # pylint: disable=g-import-not-at-top

        self._files = expand_globs(patterns, "array_record")
        self._field = field
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

    def __getitem__(self, index: int) -> str:
        data = self._records[index]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise JaxllmError(f"{self._where(index)} is not UTF-8 text or JSON") from None
        if text.lstrip().startswith("{"):
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                return text  # plain text that happens to start with a brace
            return _field_text(row, self._field, self._where(index))
        return text

    def _where(self, index: int) -> str:
        file_id = bisect.bisect_right(self._starts, index) - 1
        return f"{self._files[file_id]}: record {index - self._starts[file_id]}"

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._files)} files, {len(self)} records)"


class TfdsSource:
    """A TFDS dataset already prepared in `data_dir` (array_record format); never downloads."""

    def __init__(self, name: str, split: str, data_dir: str, field: str):
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
        self._field = field
        self._where = where
        self[0]  # fail now if the text field is missing

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> str:
        return _field_text(self._examples[index], self._field, f"{self._where}, example {index}")

    def __repr__(self) -> str:
        return f"TfdsSource({self._where}, {len(self)} examples)"


SOURCE_NAMES: tuple[str, ...] = ("embedded", "text", "jsonl", "array_record", "tfds")


def make_source(cfg: DataConfig) -> Sequence[str]:
    """The document source named by `cfg.source` (cached: a JSONL scan runs once, not every eval)."""
    return _make_source(
        cfg.source, cfg.paths, cfg.text_field, cfg.text_split, cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir
    )


@functools.lru_cache(maxsize=4)
def _make_source(
    source: str,
    paths: tuple[str, ...],
    field: str,
    text_split: str,
    tfds_name: str,
    tfds_split: str,
    tfds_dir: str,
) -> Sequence[str]:
    if source == "embedded":
        return EmbeddedSource()
    if source == "text":
        return TextSource(paths, text_split)
    if source == "jsonl":
        return JsonlSource(paths, field)
    if source == "array_record":
        return ArrayRecordSource(paths, field)
    if source == "tfds":
        return TfdsSource(tfds_name, tfds_split, tfds_dir, field)
    raise JaxllmError(f"data.source={source!r} is not known; use one of {', '.join(SOURCE_NAMES)}")


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


def _jsonl_text(line: bytes, path: str, lineno: int | None, field: str) -> str:
    where = f"{path}:{lineno}" if lineno is not None else path
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxllmError(f"{where}: not valid JSON ({e}); fix or delete that line") from None
    return _field_text(row, field, where)


def _field_text(row: Any, field: str, where: str) -> str:
    """`row[field]` as str; bytes are decoded, anything else is the user's data to fix."""
    if not isinstance(row, dict):
        raise JaxllmError(f"{where}: expected a JSON object with field {field!r}, got {type(row).__name__}")
    if field not in row:
        keys = ", ".join(map(repr, sorted(row))) or "none"
        raise JaxllmError(f"{where}: no field {field!r} (fields: {keys}); set data.text_field to the text field")
    value = row[field]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise JaxllmError(f"{where}: field {field!r} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise JaxllmError(f"{where}: field {field!r} holds {type(value).__name__}, expected text")
    return value
