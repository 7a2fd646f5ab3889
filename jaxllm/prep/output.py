"""Where prep writes: temporary files while it runs, then shards, tokenizer, stats.json and report.md.

Everything is written to a temp folder and moved into DIR only at the end, shards first and
`stats.json` last (an earlier run's stats.json is removed first), so a crash never leaves shards that
look complete (a finished run is one with a stats.json), and a failed run leaves nothing but is
cleaned up. A local DIR holds its temp folder (`DIR/.prep-tmp-*`) and files are renamed in; for a
bucket (gs://...) the temp folder is local (it needs the output's size on local disk) and files are
uploaded through `jaxllm.atomic`, each object whole, stats.json last.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import tempfile
from typing import Any

from jaxllm import JaxllmError, atomic

SHARD_PATTERN = "data-{index:05d}-of-{count:05d}.array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access (Grain shuffles) reads one record
OUR_FILES = ("data-*-of-*.array_record", "tokenizer.model", "stats.json", "report.md")  # an earlier run's, replaced


class OutputDir:
    """The output folder: temp files while running, `commit` moves them in."""

    def __init__(self, path: str, overwrite: bool):
        self.path, self.remote = atomic.location(path), atomic.is_url(path)
        root = atomic.as_path(self.path)
        if root.exists() and not root.is_dir():
            raise JaxllmError(f"--output {path!r} is a file; give a folder")
        old = [os.fspath(p) for pattern in OUR_FILES for p in root.glob(pattern)]
        self._old = sorted(old, key=lambda p: os.path.basename(p) != "stats.json")  # stats.json goes first
        if self._old and not overwrite:
            raise JaxllmError(
                f"--output {path!r} already holds prep output; pick another folder or pass "
                "--config.output.overwrite=true"
            )
        if self.remote:
            atomic.check_writable(self.path, "--output")  # before the run, not after it
            self.tmp = tempfile.mkdtemp(prefix="jaxllm-prep-")
            return
        try:
            os.makedirs(self.path, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=".prep-tmp-", dir=self.path)
        except OSError as e:
            raise JaxllmError(f"cannot write to --output {path!r} ({e.strerror or e})") from None

    def temp(self, name: str) -> str:
        """A local path in the temp folder."""
        return os.path.join(self.tmp, name)

    def write(self, name: str, data: bytes) -> None:
        with open(self.temp(name), "wb") as f:
            f.write(data)

    def commit(self, names: list[str]) -> None:
        """Moves the named temp files into the folder, in order, after removing an earlier run's files."""
        for old in self._old:
            atomic.as_path(old).unlink(missing_ok=True)
        for name in names:
            if self.remote:
                atomic.copy(self.temp(name), os.path.join(self.path, name))
            else:
                os.replace(self.temp(name), os.path.join(self.path, name))
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class ShardWriter:
    """Records (bytes) into temp shards of at most `per_shard` records; `finish` renames them i-of-n."""

    def __init__(self, out: OutputDir, per_shard: int):
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

        self._module, self._out, self._per_shard = array_record_module, out, per_shard
        self._writer = None
        self.shards: list[dict[str, Any]] = []

    def write(self, record: bytes, tokens: int, text_bytes: int) -> None:
        if self._writer is None or self.shards[-1]["records"] == self._per_shard:
            self._close()
            name = f"shard-{len(self.shards):05d}.tmp"
            self._writer = self._module.ArrayRecordWriter(self._out.temp(name), WRITER_OPTIONS)
            self.shards.append({"tmp": name, "records": 0, "text_bytes": 0, "tokens": 0})
        self._writer.write(record)
        shard = self.shards[-1]
        shard["records"] += 1
        shard["text_bytes"] += text_bytes
        shard["tokens"] += tokens

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> list[str]:
        """The shards' final names, which their temp files (and each shard's `file` stat) now have."""
        self._close()
        for i, shard in enumerate(self.shards):
            shard["file"] = SHARD_PATTERN.format(index=i, count=len(self.shards))
            os.replace(self._out.temp(shard.pop("tmp")), self._out.temp(shard["file"]))
        return [shard["file"] for shard in self.shards]


class Spool:
    """A temporary ArrayRecord file of intermediate records, written once, then read in any order."""

    def __init__(self, path: str):
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

        self._module, self.path = array_record_module, path
        self._writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
        self._reader = None
        self.count = 0

    def append(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def read(self, indices: list[int]) -> list[bytes]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader is None:
            self._reader = self._module.ArrayRecordReader(self.path)
        return self._reader.read(indices) if indices else []

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        for handle in (self._writer, self._reader):
            if handle is not None:
                handle.close()
        self._writer = self._reader = None


class SpoolTexts:
    """The texts of a spool of JSON records, as a random-access sequence (tokenizer training reads it)."""

    def __init__(self, spool: Spool):
        self._spool = spool

    def __len__(self) -> int:
        return len(self._spool)

    def __getitem__(self, index: int) -> str:
        return json.loads(self._spool.read([int(index)])[0])["text"]


def length_histogram(lengths: list[int] | Any) -> list[dict[str, int]]:
    """Counts of lengths in power-of-two bins [lo, hi)."""
    counts = collections.Counter(0 if n <= 0 else int(math.log2(n)) + 1 for n in lengths)
    return [{"lo": 0 if b == 0 else 2 ** (b - 1), "hi": 2**b if b else 1, "count": counts[b]} for b in sorted(counts)]


def render_report(stats: dict) -> str:
    """stats.json as Markdown a person reads: in/out, what each stage removed, tokens, lengths."""
    out = stats["output"]
    lines = [
        "# Data preparation report",
        "",
        f"Inputs: {', '.join(stats['inputs'])}",
        "",
        f"- documents read: {stats['stages']['input']['docs_out']:,} ({_mb(stats['stages']['input']['bytes_out'])})",
        f"- records written: {out['records']:,} ({_mb(out['text_bytes'])} of text) in {len(out['shards'])} shard(s)",
    ]
    if out.get("tokens") is not None:
        lines.append(f"- tokens: {out['tokens']:,} (tokenizer `{stats.get('tokenizer', '')}`)")
    lines.append(f"- time: {stats['seconds']:.1f} s")
    lines += [
        "",
        "## Stages",
        "",
        "| stage | on | docs in | docs out | MB in | MB out | removed |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, st in stats["stages"].items():
        removed = ", ".join(f"{k}: {v:,}" for k, v in st.get("removed", {}).items()) or "-"
        lines.append(
            f"| {name} | {'yes' if st.get('enabled', True) else 'no'} | {st['docs_in']:,} | "
            f"{st['docs_out']:,} | {st['bytes_in'] / 1e6:.3f} | {st['bytes_out'] / 1e6:.3f} | {removed} |"
        )
    notes = [(name, k, v) for name, st in stats["stages"].items() for k, v in st.get("notes", {}).items()]
    if notes:
        lines += [
            "",
            "Notes: "
            + "; ".join(f"{name}.{k} = {v:,}" if isinstance(v, int) else f"{name}.{k} = {v}" for name, k, v in notes),
        ]
    lines += ["", "## Shards", "", "| file | records | MB of text | tokens |", "|---|---:|---:|---:|"]
    for shard in out["shards"]:
        lines.append(
            f"| {shard['file']} | {shard['records']:,} | {shard['text_bytes'] / 1e6:.3f} | {shard['tokens']:,} |"
        )
    if out.get("buckets"):
        lines += [
            "",
            "## Curriculum buckets (0 = easiest)",
            "",
            "| bucket | records | mean score |",
            "|---:|---:|---:|",
        ]
        for b in out["buckets"]:
            lines.append(f"| {b['bucket']} | {b['records']:,} | {b['mean_score']:.3f} |")
    unit = out["length_unit"]
    lines += ["", f"## Length histogram ({unit} per record)", "", f"| {unit} | records | |", "|---|---:|---|"]
    top = max((h["count"] for h in out["length_histogram"]), default=1)
    for h in out["length_histogram"]:
        bar = "#" * max(1, round(40 * h["count"] / top))
        lines.append(f"| {h['lo']:,}-{h['hi'] - 1:,} | {h['count']:,} | `{bar}` |")
    return "\n".join(lines) + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
