"""`jaxllm prep` as an Apache Beam pipeline: the same stages and the same output on any Beam runner.

    pip install 'jaxllm[beam]'
    jaxllm prep --input='corpus/*.jsonl' --output=prepared --runner=DirectRunner
    jaxllm prep --input='gs://B/raw/*.jsonl' --output=gs://B/prepared --runner=DataflowRunner \\
        --beam_options='--project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py'

On the same input the output equals the local runner's (`prepare`): the same records in the same
order and shards, the same tokenizer and the same stage counts in stats.json.

- Per-document work runs on the workers in parallel: reading (one task per file, then spread),
  cleaning, quality filters, MinHash signatures, augmentation, tokenization and shard writing.
- Dedup runs as shuffles. Exact dedup groups by exact key and keeps the earliest document. Near
  dedup groups by (band, band key) and compares each document with its bucket's earliest one: the
  rule `jaxllm.prep.dedup` states, so the verdicts are the local ones.
- A few steps need the whole corpus: the tokenizer's training sample, the curriculum's percentile
  ranks and the record order. They run on one worker over a few numbers per record (position,
  length, score), never the text.

A document's position is (input number, document number in that input, variant), the local order.
Paths go through Beam's FileSystems: local, gs://, s3:// or hdfs:// (with that Beam extra). Outputs
are written under OUTPUT/.prep-tmp-* and renamed in at the end, stats.json last, as locally.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxllm import JaxllmError

try:
    import apache_beam as beam
    from apache_beam import pvalue
    from apache_beam.io.filesystems import CompressionTypes, FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:
    raise JaxllmError("the Beam runner needs Apache Beam: pip install 'jaxllm[beam]' (or apache-beam)") from None

from jaxllm.prep import core, curriculum
from jaxllm.prep.config import PrepConfig
from jaxllm.prep.dedup import NearDuplicateIndex, near_match
from jaxllm.prep.output import OUR_FILES, SHARD_PATTERN, WRITER_OPTIONS
from jaxllm.prep.readers import KINDS, Reader, file_kind, resolve_inputs

_PARTIAL = "stats.partial.json"


def prepare_beam(
    inputs: Sequence[str],
    output: str,
    cfg: PrepConfig | None = None,
    *,
    runner: str = "DirectRunner",
    options: Sequence[str] = (),
) -> dict[str, Any]:
    """`prepare` on a Beam runner (`options`: Beam pipeline flags); returns the stats it writes."""
    cfg = cfg or PrepConfig()
    if cfg.augment.enabled and cfg.augment.paraphrase_model:
        raise JaxllmError(
            "augment.paraphrase_model runs a jaxllm model, which the Beam runner does not; prepare "
            "with --runner=local or set --config.augment.paraphrase_model=''"
        )
    try:
        from apache_beam.runners.runner import create_runner  # pylint: disable=g-import-not-at-top

        create_runner(runner)
    except ValueError as e:
        raise JaxllmError(
            f"--runner={runner!r}: {e}; use local, DirectRunner, DataflowRunner, FlinkRunner, "
            "SparkRunner or another Beam runner"
        ) from None
    start = time.time()
    resolved = _resolve(list(inputs))  # a missing input fails before the output is touched
    out = _Output(output, cfg.output.overwrite)
    try:
        try:
            with beam.Pipeline(runner=runner, options=PipelineOptions(list(options))) as pipeline:
                _build(pipeline, resolved, [str(i) for i in inputs], cfg, out)
        except Exception as e:  # a user error inside a worker arrives wrapped in the runner's traceback
            raise _unwrap(e) from None
        stats = json.loads(out.read(_PARTIAL))
        core.check_not_empty(stats["stages"], stats["output"]["records"])
        stats["seconds"] = round(time.time() - start, 3)
        stats["pass_seconds"] = {"beam_pipeline": stats["seconds"]}
        files = [s["file"] for s in stats["output"]["shards"]]
        core.write_outputs(out, stats, files, bool(stats.pop("_tokenizer_file")))  # stats.json as the local runner's
        return stats
    except BaseException:
        out.discard()
        raise


# ------------------------------------------------------------------ the pipeline


def _build(p, resolved: list[tuple[str, str]], inputs: list[str], cfg: PrepConfig, out: _Output) -> None:
    # ---- read, clean, filter, sign: (position, Processed) for every document read
    read = (
        p
        | "inputs" >> beam.Create(list(enumerate(resolved)))
        | "read" >> beam.FlatMap(_read, cfg).with_outputs("counts", main="docs")
    )
    processed = (
        read.docs
        | "spread documents" >> beam.Reshuffle()
        | "clean, filter, sign" >> beam.Map(lambda kv, stage: (kv[0], stage.one(*kv[1])), core.DocStage(cfg))
    )

    # ---- dedup: (position, (reason, candidates compared)) for every document that reached it
    reached = processed | "reached dedup" >> beam.Filter(lambda kv: kv[1].removed_at == "")
    if cfg.dedup.exact:
        exact = (
            reached
            | "by exact key" >> beam.Map(lambda kv: (kv[1].key, (kv[0], kv[1].sig)))
            | "group exact keys" >> beam.GroupByKey()
            | "earliest of each key" >> beam.FlatMap(_earliest_of_key)
        )
    else:
        exact = reached | "no exact dedup" >> beam.Map(lambda kv: (kv[0], ("", kv[1].sig)))
    exact_dups = (
        exact
        | "exact duplicates" >> beam.Filter(lambda kv: kv[1][0] != "")
        | "exact verdicts" >> beam.Map(lambda kv: (kv[0], ("exact_duplicate", 0)))
    )
    survivors = (
        exact
        | "exact survivors" >> beam.Filter(lambda kv: kv[1][0] == "")
        | "signatures" >> beam.Map(lambda kv: (kv[0], kv[1][1]))
    )
    if cfg.dedup.near:
        pairs = (
            survivors
            | "band buckets" >> beam.FlatMap(_band_buckets, NearDuplicateIndex(cfg.dedup))
            | "group buckets" >> beam.GroupByKey()
            | "compare with the earliest" >> beam.FlatMap(_compare_with_earliest, cfg.dedup.threshold)
        )
        near = (
            {"sig": survivors, "pairs": pairs}
            | "join candidates" >> beam.CoGroupByKey()
            | "near verdicts" >> beam.Map(_near_verdict)
        )
    else:
        near = survivors | "no near dedup" >> beam.Map(lambda kv: (kv[0], ("", 0)))
    verdicts = (exact_dups, near) | "verdicts" >> beam.Flatten()
    judged = (
        {"doc": processed, "verdict": verdicts}
        | "join verdicts" >> beam.CoGroupByKey()
        | "documents and verdicts" >> beam.Map(lambda kv: (kv[0], kv[1]["doc"][0], (kv[1]["verdict"] or [None])[0]))
    )
    stage_counts = judged | "count stages" >> beam.CombineGlobally(_StageCounts(cfg))
    input_counts = read.counts | "count inputs" >> beam.combiners.ToList()

    # ---- kept records, indexed in the local order
    kept = judged | "kept records" >> beam.FlatMap(_kept_records)
    index = (
        kept
        | "record lengths" >> beam.Map(lambda kv: (kv[0], len(kv[1]["text"]), kv[1]["value"]))
        | "all records" >> beam.combiners.ToList()
        | "index" >> beam.Map(_index)
    )

    # ---- tokenizer and tokens
    tokenize = cfg.tokenize.enabled
    if tokenize:
        picks = index | "tokenizer sample" >> beam.FlatMap(_sample_positions, cfg)
        sample = (
            {"pick": picks, "record": kept}
            | "join sample" >> beam.CoGroupByKey()
            | "sample texts"
            >> beam.FlatMap(lambda kv: [(kv[1]["pick"][0], kv[1]["record"][0]["text"])] if kv[1]["pick"] else [])
            | "whole sample" >> beam.combiners.ToList()
        )
        model = index | "train tokenizer" >> beam.Map(_train_tokenizer, cfg, pvalue.AsSingleton(sample))
        tokens = kept | "tokenize" >> beam.Map(
            lambda kv, model: (kv[0], core.token_ids(model[1], kv[1]["text"])), pvalue.AsSingleton(model)
        )
        counts = (
            tokens
            | "token counts" >> beam.Map(lambda kv: np.bincount(kv[1]))
            | "corpus token counts"
            >> beam.CombineGlobally(lambda counts: functools.reduce(core.add_counts, counts, np.zeros(0, np.int64)))
        )
        lengths = tokens | "token lengths" >> beam.Map(lambda kv: (kv[0], len(kv[1])))
        if cfg.curriculum.enabled and cfg.curriculum.rarity_weight:
            rarity = tokens | "rarity" >> beam.Map(
                lambda kv, c: (kv[0], curriculum.rarity(kv[1], curriculum.log_frequencies(c))),
                pvalue.AsSingleton(counts),
            )
        else:
            rarity = p | "no rarity" >> beam.Create([])
    else:
        model = p | "no tokenizer" >> beam.Create([("", None, False)])
        tokens = lengths = rarity = p | "no tokens" >> beam.Create([])

    # ---- curriculum order, then shards
    if cfg.curriculum.enabled and cfg.curriculum.model_weight:
        size = cfg.curriculum.model_batch_size
        loss = (
            kept
            | "batch for the reference model" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "reference-model loss" >> beam.ParDo(_ModelLoss(cfg))
        )
    else:
        loss = p | "no reference model" >> beam.Create([])
    scored = (
        {"length": lengths, "rarity": rarity, "loss": loss}
        | "join scores" >> beam.CoGroupByKey()
        | "all scores" >> beam.combiners.ToList()
        | "order" >> beam.Map(_order, cfg, tokenize, pvalue.AsSingleton(index), pvalue.AsSingleton(model))
    )
    ranks = scored | "ranks" >> beam.FlatMap(lambda s: s["ranks"])
    shards = (
        {"record": kept, "tokens": tokens, "rank": ranks}
        | "join records" >> beam.CoGroupByKey()
        | "to shards" >> beam.Map(_to_shard, cfg)
        | "group shards" >> beam.GroupByKey()
        | "write shards" >> beam.Map(_write_shard, out.tmp, pvalue.AsSingleton(index), cfg)
        | "all shards" >> beam.combiners.ToList()
    )
    _ = (
        p
        | "finish" >> beam.Create([None])
        | "stats"
        >> beam.Map(
            _finish,
            inputs,
            cfg,
            out.path,
            out.tmp,
            pvalue.AsSingleton(stage_counts),
            pvalue.AsSingleton(input_counts),
            pvalue.AsSingleton(model),
            pvalue.AsSingleton(scored),
            pvalue.AsSingleton(shards),
        )
    )


def _read(item, cfg: PrepConfig):
    """An input file -> ((input number, document number, 0), Doc)s, and its problem counts."""
    number, (kind, where) = item
    reader = Reader(cfg.input, cfg.curriculum.field, opener=_open)
    for i, doc in enumerate(reader.read([(kind, where)])):
        yield (number, i, 0), doc
    yield pvalue.TaggedOutput("counts", (number, dict(reader.counts), reader.unreadable))


class _ModelLoss(beam.DoFn):
    """Batches of (position, record) -> (position, mean loss under the reference model)."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.scorer = None

    def setup(self):
        c = self.cfg.curriculum
        self.scorer = curriculum.ModelLoss(c.model, c.model_max_tokens, c.model_batch_size)

    def process(self, batch):
        yield from zip([position for position, _ in batch], self.scorer([row["text"] for _, row in batch]))


# ------------------------------------------------------------------ dedup steps


def _band_buckets(item, index: NearDuplicateIndex):
    """Near dedup: (position, signature) -> ((band, band key), (position, signature)) for each band."""
    position, sig = item
    for band, key in enumerate(index.band_keys(sig)):
        yield (band, key), (position, sig)


def _earliest_of_key(item):
    """Exact dedup: the earliest document of a key survives (with its signature), the rest are duplicates."""
    _, members = item
    members = sorted(members, key=lambda m: m[0])
    yield members[0][0], ("", members[0][1])
    for position, _ in members[1:]:
        yield position, ("exact_duplicate", None)


def _compare_with_earliest(item, threshold: float):
    """Near dedup, one band bucket: every later member against the earliest -> (member, (earliest, match))."""
    _, members = item
    members = list(members)
    first_position, first_sig = min(members, key=lambda m: m[0])
    for position, sig in members:
        if position != first_position:
            yield position, (first_position, near_match(first_sig, sig, threshold))


def _near_verdict(item):
    position, joined = item
    earliest = dict(joined["pairs"])  # one comparison per distinct earlier document, as locally
    return position, ("near_duplicate" if any(earliest.values()) else "", len(earliest))


# ------------------------------------------------------------------ counting and ordering


class _StageCounts(beam.CombineFn):
    """The local runner's stage counts (clean .. augment), summed over documents in any order."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg

    def create_accumulator(self):
        return core.stage_counts(self.cfg)

    def add_input(self, acc, item):
        _, r, verdict = item
        reason, candidates = verdict or ("", 0)  # no verdict: removed before dedup
        if self.cfg.dedup.near and not r.removed_at and reason != "exact_duplicate":
            acc["near_dedup"]["notes"]["candidate_pairs_checked"] += candidates
        core.count_doc(acc, r, reason)
        return acc

    def merge_accumulators(self, accumulators):
        total, *rest = accumulators
        for acc in rest:
            for name, stage in acc.items():
                for key, value in stage.items():
                    if isinstance(value, collections.Counter):
                        total[name][key].update(value)  # keeps zero counts, as the local run does
                    elif key != "enabled":
                        total[name][key] += value
        return total

    def extract_output(self, acc):
        if self.cfg.dedup.near:
            acc["near_dedup"]["notes"]["candidate_pairs_checked"] += 0
        return acc


def _kept_records(item):
    (number, i, _), r, verdict = item
    if r.removed_at or verdict is None or verdict[0]:
        return
    for v, row in enumerate(core.kept_rows(r)):
        yield (number, i, v), row


def _index(records: list) -> dict[str, Any]:
    """Every kept record's position in the local order, with its length in characters and field value."""
    records = sorted(records)
    return {
        "positions": [r[0] for r in records],
        "chars": [r[1] for r in records],
        "values": [math.nan if r[2] is None else r[2] for r in records],
    }


def _sample_positions(index: dict, cfg: PrepConfig):
    """The records the local runner would train its tokenizer on (none when a tokenizer is given)."""
    from jaxllm.data.tokenizer import training_sample  # pylint: disable=g-import-not-at-top

    if cfg.tokenize.tokenizer or not index["positions"]:
        return
    chars = index["chars"]
    for i, _ in training_sample(len(chars), chars.__getitem__):
        yield index["positions"][i], i


def _train_tokenizer(index: dict, cfg: PrepConfig, sample: list) -> tuple[str, Any, bool]:
    """`core.load_prep_tokenizer` (the tokenizer goes to the workers) over the kept records, of which only
    the training sample is held: the sampler reads no other."""
    texts: list[str | None] = [None] * len(index["positions"])
    for i, text in sample:
        texts[i] = text
    return core.load_prep_tokenizer(cfg, texts) if texts else ("", None, False)


def _order(scores: list, cfg: PrepConfig, tokenize: bool, index: dict, model: tuple) -> dict[str, Any]:
    """Curriculum scores, buckets and write order over the whole corpus (the local pass 3)."""
    n = len(index["positions"])
    tokenized = tokenize and n > 0 and model[0] != ""
    by_position = {position: joined for position, joined in scores}

    def joined(key: str) -> list:  # the `key` score of every record, in the local order
        return [by_position[pos][key][0] for pos in index["positions"]]

    length = np.asarray(joined("length") if tokenized else index["chars"], np.float64)
    rarity = None
    if tokenized and cfg.curriculum.enabled and cfg.curriculum.rarity_weight:
        rarity = np.asarray(joined("rarity"))
    model_loss = None
    if n and cfg.curriculum.enabled and cfg.curriculum.model_weight:
        model_loss = np.asarray(joined("loss"))
    score, bucket, order = core.curriculum_order(
        cfg, length, rarity, np.asarray(index["values"], np.float64), model_loss
    )
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return {
        "ranks": [(pos, (int(rank[i]), float(score[i]), int(bucket[i]))) for i, pos in enumerate(index["positions"])],
        "length": length.tolist(),
        "score": score.tolist(),
        "bucket": bucket.tolist(),
        "tokens": int(length.sum()) if tokenized else None,
    }


def _to_shard(item, cfg: PrepConfig):
    _, joined = item
    row, (rank, score, bucket) = joined["record"][0], joined["rank"][0]
    ids = joined["tokens"][0] if joined["tokens"] else None
    return rank // cfg.output.records_per_shard, (rank, *core.output_record(cfg, row, score, bucket, ids))


def _write_shard(item, tmp: str, index: dict, cfg: PrepConfig) -> dict[str, Any]:
    """One shard's records in rank order into an ArrayRecord file (written locally, then copied)."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    shard, records = item
    records = sorted(records, key=lambda r: r[0])
    count = -(-len(index["positions"]) // cfg.output.records_per_shard)
    name = SHARD_PATTERN.format(index=shard, count=count)
    with tempfile.TemporaryDirectory() as local:
        path = os.path.join(local, name)
        writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
        for _, record, _, _ in records:
            writer.write(record)
        writer.close()
        _copy_to(path, FileSystems.join(tmp, name))
    return {
        "index": shard,
        "records": len(records),
        "text_bytes": sum(r[3] for r in records),
        "tokens": sum(r[2] for r in records),
        "file": name,
    }


def _finish(
    _,
    inputs: list[str],
    cfg: PrepConfig,
    out_path: str,
    tmp: str,
    stage_counts: dict,
    input_counts: list,
    model: tuple,
    scored: dict,
    shards: list,
) -> None:
    """stats (as the local runner builds them) and the tokenizer, into the temp folder."""
    stages = core.stage_counts(cfg)
    stages.update({k: v for k, v in stage_counts.items() if k not in ("input", "tokenize", "curriculum")})
    reader = Reader(cfg.input)
    for _, counts, unreadable in sorted(input_counts, key=lambda c: c[0]):
        reader.counts.update(counts)
        reader.unreadable += unreadable
    core.finish_input(stages["input"], reader)
    name, tokenizer, copy = model
    shards = [{k: v for k, v in s.items() if k != "index"} for s in sorted(shards, key=lambda s: s["index"])]
    stats = core.summarize(
        inputs,
        stages,
        cfg,
        out_path,
        name,
        copy,
        shards,
        scored["tokens"],
        np.asarray(scored["length"]),
        np.asarray(scored["score"]),
        np.asarray(scored["bucket"], np.int64),
        time.time(),
    )
    stats["runner"] = "beam"
    stats["_tokenizer_file"] = "tokenizer.model" if copy else ""
    if copy:
        _write_bytes(FileSystems.join(tmp, "tokenizer.model"), tokenizer.proto)
    _write_bytes(FileSystems.join(tmp, _PARTIAL), json.dumps(stats, default=str).encode())


# ------------------------------------------------------------------ files through Beam's FileSystems


def _is_remote(path: str) -> bool:
    return "://" in path


def _open(path: str):
    """A decompressed binary stream of `path` (a .gz is decompressed, as the local reader does)."""
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO)


def _write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def _copy_to(local: str, path: str) -> None:
    with open(local, "rb") as src, FileSystems.create(path) as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def _resolve(patterns: list[str]) -> list[tuple[str, str]]:
    """`resolve_inputs` for local patterns; remote globs (gs://...) are matched by Beam, in order."""
    out: dict[tuple[str, str], None] = {}
    for pattern in patterns:
        kind, _, rest = pattern.partition(":")
        forced = kind if kind in KINDS and kind != "tfds" and _is_remote(rest) else ""
        remote = rest if forced else pattern
        if not _is_remote(remote) or pattern.startswith("tfds:"):
            out.update(dict.fromkeys(resolve_inputs([pattern])))
            continue
        matched = sorted(m.path for result in FileSystems.match([remote]) for m in result.metadata_list)
        if not matched:
            raise JaxllmError(f"input {pattern!r} matches no files; fix the path or glob")
        out.update(dict.fromkeys((forced or file_kind(path), path) for path in matched))
    return list(out)


class _Output:
    """The output folder through Beam's FileSystems: temp files, then renamed in (`OutputDir`'s contract)."""

    def __init__(self, path: str, overwrite: bool):
        self.path = path if _is_remote(path) else os.path.abspath(os.path.expanduser(path))
        if not _is_remote(path) and os.path.exists(self.path) and not os.path.isdir(self.path):
            raise JaxllmError(f"--output {path!r} is a file; give a folder")
        self._old = [
            m.path
            for pattern in OUR_FILES
            for result in FileSystems.match([FileSystems.join(self.path, pattern)])
            for m in result.metadata_list
        ]
        if self._old and not overwrite:
            raise JaxllmError(
                f"--output {path!r} already holds prep output; pick another folder or pass "
                "--config.output.overwrite=true"
            )
        self.tmp = FileSystems.join(self.path, f".prep-tmp-{uuid.uuid4().hex[:12]}")
        try:
            if not _is_remote(self.path):
                os.makedirs(self.path, exist_ok=True)
            FileSystems.mkdirs(self.tmp)
        except Exception as e:  # OSError, or one of Beam's own IOError subclasses
            raise JaxllmError(f"cannot write to --output {path!r} ({e})") from None

    def temp(self, name: str) -> str:
        return FileSystems.join(self.tmp, name)

    def read(self, name: str) -> bytes:
        with FileSystems.open(self.temp(name)) as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        _write_bytes(self.temp(name), data)

    def commit(self, names: Iterable[str]) -> None:
        """Removes an earlier run's files, then renames the temp files in (the order given: stats.json last)."""
        if self._old:
            FileSystems.delete(self._old)
        for name in names:
            FileSystems.rename([self.temp(name)], [FileSystems.join(self.path, name)])
        self.discard()

    def discard(self) -> None:
        try:
            FileSystems.delete([self.tmp])
        except Exception:  # nothing to remove, or already removed
            pass


def _unwrap(error: Exception) -> Exception:
    """The JaxllmError a worker raised, without the runner's wrapping or its " [while running ...]"
    suffix; other errors stay as they are."""
    text, marker = str(error), "JaxllmError: "
    if not isinstance(error, JaxllmError):
        if marker not in text:
            return error
        text = text[text.rindex(marker) + len(marker) :]
    return JaxllmError(text.strip().splitlines()[0].split(" [while running")[0])
