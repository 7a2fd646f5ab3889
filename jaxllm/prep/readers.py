"""Streaming readers of prep inputs: plain text, JSON / JSONL, Parquet, CSV, Arrow and TFDS, one document at a
time; a Hugging Face Hub data set (or a local data set folder) with `:SPLIT` stands for that split's files.

Unlike the training sources (`jaxllm.data.sources`), which refuse a bad corpus up front, these count
what is wrong (an empty file, bytes that are not UTF-8, a row without the text field, a document
past the size cap) and go on: a crawl always holds some of each. Only a missing input is an error.
Memory stays flat: files are read line by line (a line is read at most `max_doc_bytes` at a time).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from jaxllm import JaxllmError
from jaxllm.prep.config import InputConfig

# (text, source, field value): what every reader yields; `field value` feeds the curriculum field score.
Doc = tuple[str, str, float | None]

KINDS = ("text", "json", "parquet", "csv", "arrow", "tfds")
_EXTENSIONS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


def resolve_inputs(patterns: list[str]) -> list[tuple[str, str]]:
    """(kind, path or `name:split`) of every input, in the order given; files of a glob sorted.

    `tfds:NAME:SPLIT` names a prepared TFDS dataset; `text:`, `json:`, `parquet:`, `csv:` or `arrow:`
    before a glob forces the format; otherwise it follows the extension (`.jsonl`, `.json`, `.parquet`,
    `.csv`, `.arrow`, an optional `.gz`; anything else is text). A folder stands for every file under it.
    A Hugging Face Hub data set `org/name[@rev]`, then optionally `:SPLIT` or `:CONFIG:SPLIT` (default
    train), or a local data set folder with `:SPLIT`, stands for that split's files, found as the
    `datasets` library finds them (`jaxllm.data.splits`).
    """
    from jaxllm.data import splits  # pylint: disable=g-import-not-at-top

    if not patterns:
        raise JaxllmError("give at least one input: --input=GLOB (repeatable), or tfds:NAME:SPLIT")
    out: dict[tuple[str, str], None] = {}
    for pattern in patterns:
        ref = splits.parse_ref(pattern)
        if ref and (ref[2] or not os.path.isdir(os.path.expanduser(ref[0]))):
            data_set, config, split = ref
            for path in splits.split_files(data_set, split or "train", config)[1]:
                out[(file_kind(path), path)] = None
            continue
        kind, _, rest = pattern.partition(":")
        if kind == "tfds":
            name, _, split = rest.partition(":")
            if not name:
                raise JaxllmError(f"input {pattern!r}: write tfds:NAME:SPLIT, e.g. tfds:my_dataset:train")
            out[("tfds", f"{name}:{split or 'train'}")] = None
            continue
        forced = kind if kind in KINDS and rest else ""
        pattern_path = os.path.expanduser(rest if forced else pattern)
        if os.path.isdir(pattern_path):
            pattern_path = os.path.join(pattern_path, "**", "*")
        matched = sorted(p for p in glob.glob(pattern_path, recursive=True) if os.path.isfile(p))
        if not matched:
            raise JaxllmError(f"input {pattern!r} matches no files; fix the path or glob")
        for path in matched:
            out[(forced or file_kind(path), path)] = None
    return list(out)


def file_kind(path: str) -> str:
    stem = path[:-3] if path.endswith(".gz") else path
    return _EXTENSIONS.get(os.path.splitext(stem)[1].lower(), "text")


class Reader:
    """Yields the documents of resolved inputs and counts what it had to skip or repair."""

    def __init__(self, cfg: InputConfig, value_field: str = "", opener: Callable[[str], BinaryIO] | None = None):
        self.cfg = cfg
        self.value_field = value_field
        self.opener = opener or _open  # path -> binary stream, decompressed (Beam passes its FileSystems)
        self.counts: collections.Counter = collections.Counter()
        self.unreadable: list[str] = []

    def read(self, inputs: list[tuple[str, str]]) -> Iterator[Doc]:
        for kind, where in inputs:
            self.counts["inputs"] += 1
            if kind == "tfds":
                yield from self._tfds(where)
                continue
            try:
                with self.opener(where) as f:
                    yield from getattr(self, f"_{kind}")(f, where)
            except OSError as e:  # unreadable file (permissions, bad gzip): counted, the rest goes on
                self.counts["unreadable_file"] += 1
                self.unreadable.append(f"{where}: {e.strerror or e}")

    # ------------------------------------------------------------------ formats

    def _text(self, f: BinaryIO, where: str) -> Iterator[Doc]:
        if self.cfg.text_split == "file":
            data = f.read(self.cfg.max_doc_bytes + 1)
            if len(data) > self.cfg.max_doc_bytes:
                data = self._too_long(data)
            if data is not None:
                yield from self._emit(data, where, empty="empty_file")
            return
        block: list[bytes] = []
        blocks = 0
        for line, whole in _lines(f, self.cfg.max_doc_bytes):
            if whole and not line.strip():
                if block:
                    blocks += 1
                    yield from self._paragraph(block, where)
                block = []
                continue
            if not whole:
                self.counts["too_long_line"] += 1
            block.append(line)
        if block:
            blocks += 1
            yield from self._paragraph(block, where)
        if not blocks:
            self.counts["empty_file"] += 1

    def _paragraph(self, block: list[bytes], where: str) -> Iterator[Doc]:
        data = b"".join(block).rstrip(b"\r\n")
        if len(data) > self.cfg.max_doc_bytes:
            data = self._too_long(data)
        if data is not None:
            yield from self._emit(data, where)

    def _json(self, f: BinaryIO, where: str) -> Iterator[Doc]:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        if not first:
            self.counts["empty_file"] += 1
            return
        if first == b"[":  # one JSON array of rows
            rows = self._loads(first + f.read())
            for row in rows if isinstance(rows, list) else []:
                yield from self._row(row, where)
            return
        pending = first
        for line, whole in _lines(f, self.cfg.max_doc_bytes):
            line, pending = pending + line, b""
            if not whole:  # a JSON line past the cap cannot be parsed in part: dropped
                self.counts["too_long_dropped"] += 1
                continue
            if line.strip():
                yield from self._row(self._loads(line), where)
        if pending.strip():
            yield from self._row(self._loads(pending), where)

    def _parquet(self, f: BinaryIO, where: str) -> Iterator[Doc]:
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

        try:
            pfile = pq.ParquetFile(f)
        except Exception:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not Parquet"
            self.counts["unreadable_file"] += 1
            return
        names = set(pfile.schema_arrow.names)
        if pfile.metadata.num_rows == 0:
            self.counts["empty_file"] += 1
            return
        if self.cfg.text_field not in names:
            self.counts["missing_field"] += pfile.metadata.num_rows
            return
        columns = [self.cfg.text_field] + ([self.value_field] if self.value_field in names else [])
        yield from self._batches(pfile.iter_batches(batch_size=1024, columns=columns), where)

    def _csv(self, f: BinaryIO, where: str) -> Iterator[Doc]:
        import pyarrow as pa  # pylint: disable=g-import-not-at-top
        import pyarrow.csv as pacsv  # pylint: disable=g-import-not-at-top

        try:
            batches = pacsv.open_csv(
                f,
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types={self.cfg.text_field: pa.string()}),
            )
            yield from self._batches(batches, where)
        except pa.ArrowInvalid:  # not CSV, or malformed from some row on: the rest of the file is skipped
            self.counts["unreadable_file"] += 1

    def _arrow(self, f: BinaryIO, where: str) -> Iterator[Doc]:
        import pyarrow as pa  # pylint: disable=g-import-not-at-top

        try:
            try:
                batches = pa.ipc.open_stream(f)  # the `datasets` cache's format
            except pa.ArrowInvalid:
                f.seek(0)
                batches = pa.ipc.open_file(f)
                batches = (batches.get_batch(i) for i in range(batches.num_record_batches))
            yield from self._batches(batches, where)
        except pa.ArrowInvalid:
            self.counts["unreadable_file"] += 1

    def _batches(self, batches: Iterator[Any], where: str) -> Iterator[Doc]:
        """The rows of Arrow record batches (CSV, Arrow and Parquet inputs)."""
        empty = True
        for batch in batches:
            names = set(batch.schema.names)
            if self.cfg.text_field not in names:
                self.counts["missing_field"] += batch.num_rows
                empty = empty and batch.num_rows == 0
                continue
            columns = [self.cfg.text_field] + ([self.value_field] if self.value_field in names else [])
            for row in batch.select(columns).to_pylist():
                empty = False
                yield from self._row(row, where)
        if empty:
            self.counts["empty_file"] += 1

    def _tfds(self, name_split: str) -> Iterator[Doc]:
        from jaxllm.data.sources import TfdsSource  # pylint: disable=g-import-not-at-top  (slow import)

        name, split = name_split.split(":", 1)
        source = TfdsSource(
            name, split, self.cfg.tfds_data_dir, fields=(("text_field", self.cfg.text_field),), whole_row=True
        )
        for i in range(len(source)):
            try:
                row = source[i]
            except JaxllmError:
                self.counts["missing_field"] += 1
                continue
            yield from self._row(row, f"tfds:{name_split}")

    # ------------------------------------------------------------------ rows and bytes

    def _row(self, row: Any, where: str) -> Iterator[Doc]:
        if row is None:
            return
        if not isinstance(row, dict):
            self.counts["not_an_object"] += 1
            return
        if self.cfg.text_field not in row:
            self.counts["missing_field"] += 1
            return
        value = row[self.cfg.text_field]
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        if not isinstance(value, bytes):
            self.counts["not_text"] += 1
            return
        if len(value) > self.cfg.max_doc_bytes:
            self.counts["too_long_dropped"] += 1
            return
        number = row.get(self.value_field) if self.value_field else None
        number = float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None
        yield from self._emit(value, where, number=number)

    def _emit(self, data: bytes, where: str, *, number: float | None = None, empty: str = "empty") -> Iterator[Doc]:
        if not data.strip():
            self.counts[empty] += 1
            return
        text = self._decode(data)
        if text is None:
            return
        data = text.encode("utf-8")  # bytes as the next stages count them (repairs change the size)
        self.counts["docs"] += 1
        self.counts["bytes"] += len(data)
        yield text, where, number

    def _decode(self, data: bytes) -> str | None:
        """UTF-8 text of `data`; bytes that are not UTF-8 are counted and repaired, or the text dropped."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.counts["undecodable"] += 1
            if self.cfg.decode_errors == "skip":
                self.counts["undecodable_dropped"] += 1
                return None
            return data.decode("utf-8", self.cfg.decode_errors)

    def _loads(self, line: bytes) -> Any:
        """A parsed JSON value, or None (counted: bad JSON, or dropped as undecodable)."""
        text = self._decode(line)
        if text is None:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # bad JSON, a number past int's digit limit, deep nesting
            self.counts["bad_json"] += 1
            return None

    def _too_long(self, data: bytes) -> bytes | None:
        """Plain text past the cap: cut at the last line end (or UTF-8 boundary) before it, or dropped."""
        if self.cfg.too_long == "skip":
            self.counts["too_long_dropped"] += 1
            return None
        self.counts["too_long_truncated"] += 1
        data = data[: self.cfg.max_doc_bytes]
        cut = data.rfind(b"\n")
        if cut > 0:
            return data[:cut]
        end = len(data)
        while end > 0 and data[end - 1] & 0xC0 == 0x80:  # continuation bytes of a cut character
            end -= 1
        return data[: end - 1] if end > 0 and data[end - 1] >= 0xC0 else data[:end]

    def problems(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.counts.items()) if k not in ("docs", "bytes", "inputs")}


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(f: BinaryIO, cap: int) -> Iterator[tuple[bytes, bool]]:
    """(line, whole) of a binary file; a line longer than `cap` yields its first `cap` bytes (and a
    line end) with whole=False, and the rest of it is skipped without being held in memory."""
    while line := f.readline(cap + 1):
        if len(line) <= cap or line.endswith(b"\n"):
            yield line, True
            continue
        while (rest := f.readline(cap + 1)) and not rest.endswith(b"\n"):
            pass
        yield line[:cap] + b"\n", False
