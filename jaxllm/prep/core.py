"""`prepare`: inputs -> clean -> quality -> exact / near dedup -> augment -> tokenize -> curriculum -> shards.

Three streaming passes, so memory does not grow with the corpus text:
1. read, clean, filter and sign documents in worker processes (`DocStage`, order kept), deduplicate in
   this process (only hashes and MinHash bands are held), spool the kept ones to a temp ArrayRecord;
2. train (or load) the tokenizer on the spool, tokenize it in workers into a second spool;
3. score, bucket and order the records (a few numbers per record), then write the shards.
The output is a pure function of the inputs and the config: the worker count changes nothing.
"""

from __future__ import annotations

import array
import collections
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from jaxllm import JaxllmError
from jaxllm.prep import augment, curriculum
from jaxllm.prep.clean import clean, quality
from jaxllm.prep.config import PrepConfig
from jaxllm.prep.dedup import Deduplicator, MinHasher, exact_key
from jaxllm.prep.output import OutputDir, ShardWriter, Spool, SpoolTexts, length_histogram, render_report
from jaxllm.prep.parallel import batched, parallel_map
from jaxllm.prep.readers import Doc, Reader, resolve_inputs

_BATCH = 64  # documents per worker task
_READ_CHUNK = 512  # spool records read at once
_PARAPHRASE_BATCH = 32
STAGES = ("input", "clean", "quality", "exact_dedup", "near_dedup", "augment", "tokenize", "curriculum")


def prepare(inputs: list[str], output: str, cfg: PrepConfig | None = None) -> dict[str, Any]:
    """Prepares `inputs` (globs, folders, `tfds:NAME:SPLIT`) into ArrayRecord shards in `output`;
    returns the stats also written to `output/stats.json`."""
    cfg = cfg or PrepConfig()
    start = time.time()
    resolved = resolve_inputs(list(inputs))  # a missing input fails before the output is touched
    out = OutputDir(output, cfg.output.overwrite)
    try:
        return _prepare(resolved, [str(i) for i in inputs], out, cfg, start)
    except BaseException:
        out.discard()
        raise


class Processed(NamedTuple):
    """What a worker returns per document (text None: removed at `removed_at` for `reason`)."""

    text: str | None
    source: str
    value: float | None
    bytes_in: int
    bytes_clean: int
    removed_at: str
    reason: str
    changed: bool
    lines_removed: int
    key: int | None = None
    sig: np.ndarray | None = None
    variants: Sequence[str] = ()


class DocStage:
    """Clean + quality + dedup hashes + EDA variants of a batch of documents (runs in workers)."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.hasher = MinHasher(cfg.dedup) if cfg.dedup.near else None

    def __call__(self, batch: list[Doc]) -> list[Processed]:
        return [self.one(*doc) for doc in batch]

    def one(self, text: str, source: str, value: float | None) -> Processed:
        cfg = self.cfg
        size = nbytes(text)
        if cfg.clean.enabled:
            cleaned, reason = clean(text, cfg.clean)
            if cleaned is None:
                return Processed(None, source, value, size, 0, "clean", reason, True, 0)
        else:
            cleaned = text
        changed, clean_size, lines_removed = cleaned != text, nbytes(cleaned), 0
        if cfg.quality.enabled:
            kept, reason, lines_removed = quality(cleaned, cfg.quality)
            if kept is None:
                return Processed(None, source, value, size, clean_size, "quality", reason, changed, lines_removed)
            cleaned = kept
        key = exact_key(cleaned) if cfg.dedup.exact else None
        sig = self.hasher.signature(cleaned) if self.hasher is not None else None
        variants = augment.variants(cleaned, cfg.augment)
        return Processed(cleaned, source, value, size, clean_size, "", "", changed, lines_removed, key, sig, variants)


def _tokenize_batch(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Texts -> int32 token ids (runs in workers; the tokenizer is pickled to each worker once)."""
    return [token_ids(tokenizer, t) for t in texts]


def token_ids(tokenizer: Any, text: str) -> np.ndarray:
    """One text's ids (both runners tokenize with it)."""
    return np.asarray(tokenizer.encode(text), np.int32)


def _prepare(
    resolved: list[tuple[str, str]], inputs: list[str], out: OutputDir, cfg: PrepConfig, start: float
) -> dict[str, Any]:
    """The three passes of the module docstring, then stats.json and report.md."""
    stages = stage_counts(cfg)
    workers = cfg.num_workers or os.cpu_count() or 1
    kept = _Kept(out.temp("docs.spool"))
    _read_clean_dedup(resolved, cfg, stages, kept, workers)
    check_not_empty(stages, len(kept.spool))
    seconds = {"read_clean_filter_dedup": time.time() - start}
    tokens = _tokenize(cfg, kept.spool, out, workers) if cfg.tokenize.enabled and len(kept.spool) else None
    seconds["tokenize"] = time.time() - start - sum(seconds.values())
    length = np.asarray(tokens.counts if tokens is not None else kept.chars, np.float64)
    score, bucket, order = _curriculum(cfg, kept, tokens, length)
    shards, files = _write_shards(cfg, out, kept.spool, tokens, score, bucket, order)
    seconds["score_and_write"] = time.time() - start - sum(seconds.values())
    kept.spool.close()
    name, copied, total = "", False, None
    if tokens is not None:
        tokens.spool.close()
        name, copied, total = tokens.name, tokens.copied, int(sum(tokens.counts))
    stats = summarize(inputs, stages, cfg, out.path, name, copied, shards, total, length, score, bucket, start)
    stats["pass_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    write_outputs(out, stats, files, copied)
    return stats


class _Kept:
    """The documents pass 1 keeps: JSON records in a spool, and each one's length and field value."""

    def __init__(self, path: str):
        self.spool, self.chars, self.values = Spool(path), array.array("q"), array.array("d")

    def add(self, row: dict[str, Any]) -> None:
        self.spool.append(json.dumps(row, ensure_ascii=False).encode())
        self.chars.append(len(row["text"]))
        self.values.append(math.nan if row["value"] is None else row["value"])


class _Tokens(NamedTuple):
    """Pass 2's result: tokenizer name, whether its .model went to the output, each record's ids, their
    counts, id counts."""

    name: str
    copied: bool
    spool: Spool
    counts: array.array
    id_counts: np.ndarray


def _read_clean_dedup(
    resolved: list[tuple[str, str]], cfg: PrepConfig, stages: dict, kept: _Kept, workers: int
) -> None:
    """Pass 1: read, clean, filter and sign in workers, deduplicate here, augment; the documents kept go
    to `kept`, the counts to `stages`."""
    reader = Reader(cfg.input, cfg.curriculum.field)
    dedup = Deduplicator(cfg.dedup)
    paraphrase = augment.Paraphraser(cfg.augment) if cfg.augment.enabled and cfg.augment.paraphrase_model else None
    waiting: list[Processed] = []
    bar = tqdm(desc="prep: clean, filter, dedup", unit=" doc", disable=not cfg.progress)
    for results in parallel_map(DocStage(cfg), batched(reader.read(resolved), _BATCH), workers):
        bar.update(len(results))
        for r in results:
            if not count_doc(stages, r, "" if r.removed_at else dedup.check(r.key, r.sig)):
                continue
            for row in kept_rows(r):
                kept.add(row)
            if paraphrase is not None and augment.wants_paraphrase(r.text, cfg.augment):
                waiting.append(r)
                if len(waiting) == _PARAPHRASE_BATCH:
                    _add_paraphrases(paraphrase, waiting, kept, stages["augment"])
                    waiting = []
    _add_paraphrases(paraphrase, waiting, kept, stages["augment"])  # the last, short batch
    bar.close()
    finish_input(stages["input"], reader)
    if dedup.near is not None:
        stages["near_dedup"]["notes"]["candidate_pairs_checked"] = dedup.near.candidates_checked


def _add_paraphrases(paraphrase: augment.Paraphraser | None, docs: list[Processed], kept: _Kept, aug: dict) -> None:
    for doc, text in zip(docs, paraphrase([d.text for d in docs]) if docs else []):
        if text:
            kept.add({"text": text, "source": f"paraphrase:{doc.source}", "value": doc.value})
            _count_out(aug, nbytes(text))
            aug["notes"]["paraphrases"] += 1


def _tokenize(cfg: PrepConfig, spool: Spool, out: OutputDir, workers: int) -> _Tokens:
    """Pass 2: train (or load) the tokenizer on the kept documents, tokenize them in workers."""
    name, tokenizer, copied = load_prep_tokenizer(cfg, SpoolTexts(spool))
    if copied:
        shutil.copyfile(tokenizer.path, out.temp("tokenizer.model"))
    tokens_spool, counts, id_counts = Spool(out.temp("tokens.spool")), array.array("q"), np.zeros(0, np.int64)
    bar = tqdm(total=len(spool), desc="prep: tokenize", unit=" doc", disable=not cfg.progress)
    for ids_list in parallel_map(functools.partial(_tokenize_batch, tokenizer), _spool_texts(spool), workers):
        bar.update(len(ids_list))
        for ids in ids_list:
            tokens_spool.append(ids.tobytes())
            counts.append(len(ids))
        id_counts = add_counts(id_counts, np.bincount(np.concatenate(ids_list)))
    bar.close()
    return _Tokens(name, copied, tokens_spool, counts, id_counts)


def _curriculum(
    cfg: PrepConfig, kept: _Kept, tokens: _Tokens | None, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 3's scores: (score, bucket, write order) of the kept records."""
    n = len(kept.spool)
    rarity = None
    if tokens is not None and cfg.curriculum.enabled and cfg.curriculum.rarity_weight:
        log_freq = curriculum.log_frequencies(tokens.id_counts)
        rarity = np.asarray(
            [
                curriculum.rarity(np.frombuffer(b, np.int32), log_freq)
                for chunk in _chunks(n)
                for b in tokens.spool.read(chunk)
            ]
        )
    model_loss = None
    if n and cfg.curriculum.enabled and cfg.curriculum.model_weight:
        scorer = curriculum.ModelLoss(
            cfg.curriculum.model, cfg.curriculum.model_max_tokens, cfg.curriculum.model_batch_size
        )
        bar = tqdm(total=n, desc="prep: reference-model loss", unit=" doc", disable=not cfg.progress)
        model_loss = []
        for texts in _spool_texts(kept.spool):
            model_loss += scorer(texts)
            bar.update(len(texts))
        bar.close()
        model_loss = np.asarray(model_loss)
    return curriculum_order(cfg, length, rarity, np.asarray(kept.values, np.float64), model_loss)


def _write_shards(
    cfg: PrepConfig,
    out: OutputDir,
    spool: Spool,
    tokens: _Tokens | None,
    score: np.ndarray,
    bucket: np.ndarray,
    order: np.ndarray,
) -> tuple[list[dict], list[str]]:
    """Pass 3's output: the records in `order` into temp shards; (shard stats, file names)."""
    writer = ShardWriter(out, cfg.output.records_per_shard)
    bar = tqdm(total=len(spool), desc="prep: write shards", unit=" doc", disable=not cfg.progress)
    for chunk in _chunks(len(spool), order):
        docs = spool.read(chunk)
        token_bytes = tokens.spool.read(chunk) if tokens is not None else [None] * len(chunk)
        for i, doc, tb in zip(chunk, docs, token_bytes):
            ids = np.frombuffer(tb, np.int32) if tb is not None else None
            writer.write(*output_record(cfg, json.loads(doc), score[i], bucket[i], ids))
        bar.update(len(chunk))
    bar.close()
    files = writer.finish()
    return writer.shards, files


def curriculum_order(
    cfg: PrepConfig,
    length: np.ndarray,
    rarity: np.ndarray | None,
    values: np.ndarray,
    model_loss: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, bucket, write order) of the records, from per-record lengths, rarities, field values and
    reference-model losses."""
    score = curriculum.scores(cfg.curriculum, length, rarity, values, model_loss)
    bucket, order = curriculum.buckets_and_order(cfg.curriculum, score)
    return score, bucket, order


def kept_rows(r: Processed) -> list[dict[str, Any]]:
    """The records a document that passed dedup adds: itself, then its EDA variants."""
    rows = [{"text": r.text, "source": r.source, "value": r.value}]
    return rows + [{"text": v, "source": f"eda:{r.source}", "value": r.value} for v in r.variants]


def output_record(
    cfg: PrepConfig, row: dict, score: float, bucket: int, ids: np.ndarray | None
) -> tuple[bytes, int, int]:
    """One output record (JSON of text, score, bucket, source and tokens), its tokens and its text's bytes
    (both runners write these)."""
    record = {"text": row["text"], "score": round(float(score), 6), "bucket": int(bucket), "source": row["source"]}
    if ids is not None and cfg.tokenize.write_tokens:
        record["tokens"] = ids.tolist()
    return json.dumps(record, ensure_ascii=False).encode(), 0 if ids is None else len(ids), nbytes(row["text"])


def summarize(
    inputs: list[str],
    stages: dict,
    cfg: PrepConfig,
    out_path: str,
    tokenizer_name: str,
    tokenizer_copied: bool,
    shards: list[dict],
    tokens: int | None,
    length: np.ndarray,
    score: np.ndarray,
    bucket: np.ndarray,
    start: float,
) -> dict[str, Any]:
    """stats.json: inputs, config, every stage's counts (those of tokenize and curriculum filled in here),
    the shards, buckets and length histogram."""
    count_all(stages["tokenize"], stages["augment"])
    if tokens is not None:
        stages["tokenize"]["notes"].update(tokens=tokens, tokenizer=tokenizer_name)
    count_all(stages["curriculum"], stages["tokenize"])
    n = len(length)
    return {
        "inputs": inputs,
        "files": stages["input"]["notes"].pop("inputs", 0),
        "config": cfg.to_dict(),
        "stages": {name: _plain(st) for name, st in stages.items()},
        "tokenizer": os.path.join(out_path, "tokenizer.model") if tokenizer_copied else tokenizer_name,
        "output": {
            "records": n,
            "text_bytes": sum(s["text_bytes"] for s in shards),
            "tokens": tokens,
            "shards": shards,
            "buckets": [
                {"bucket": b, "records": int((bucket == b).sum()), "mean_score": float(score[bucket == b].mean())}
                for b in range(int(bucket.max()) + 1)
            ]
            if n and cfg.curriculum.enabled
            else [],
            "length_unit": "tokens" if tokens is not None else "chars",
            "length_histogram": length_histogram(length.astype(np.int64).tolist()),
        },
        "seconds": round(time.time() - start, 3),
    }


def write_outputs(out: OutputDir, stats: dict, files: list[str], tokenizer_copied: bool) -> None:
    """report.md and stats.json beside the temp shards, then everything renamed in (stats.json last); `out`
    is an `OutputDir` or the Beam runner's output."""
    out.write("report.md", render_report(stats).encode())
    out.write("stats.json", (json.dumps(stats, indent=2, default=str) + "\n").encode())
    out.commit(files + (["tokenizer.model"] if tokenizer_copied else []) + ["report.md", "stats.json"])


def load_prep_tokenizer(cfg: PrepConfig, documents: Sequence[str]):
    """(name for the stats, tokenizer, whether its .model file belongs in the output): the
    `tokenize.tokenizer` .model file (copied out) or model folder (read there), or one trained here."""
    from jaxllm.data.tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer  # pylint: disable=g-import-not-at-top
    from jaxllm.hf import hub  # pylint: disable=g-import-not-at-top

    given = os.path.expanduser(hub.local(cfg.tokenize.tokenizer, what="tokenizer"))
    try:
        tokenizer = load_tokenizer(given, cfg.tokenize.vocab_size, documents)
    except JaxllmError as e:
        raise JaxllmError(
            str(e).replace("data.vocab_size", "tokenize.vocab_size").replace("data.tokenizer", "tokenize.tokenizer")
        ) from None
    if os.path.isdir(given):
        return given, tokenizer, False  # a model folder's tokenizer (SentencePiece or tokenizer.json)
    if not given and not cfg.tokenize.vocab_size and tokenizer.vocab_size < DEFAULT_VOCAB_SIZE:
        print(
            f"jaxllm: note: prep: this corpus supports fewer than {DEFAULT_VOCAB_SIZE} tokenizer pieces; trained "
            f"{tokenizer.vocab_size} (set tokenize.vocab_size to choose)",
            file=sys.stderr,
        )
        name = f"trained, {tokenizer.vocab_size} pieces (capped: the corpus supports fewer than {DEFAULT_VOCAB_SIZE})"
        return name, tokenizer, True
    return (given or "trained"), tokenizer, True


# ------------------------------------------------------------------ counting helpers


def stage_counts(cfg: PrepConfig) -> dict[str, dict[str, Any]]:
    """Empty counts of every stage (`STAGES`), each marked enabled or not by `cfg`."""
    return {
        name: _stage(enabled)
        for name, enabled in zip(
            STAGES,
            (
                True,
                cfg.clean.enabled,
                cfg.quality.enabled,
                cfg.dedup.exact,
                cfg.dedup.near,
                cfg.augment.enabled,
                cfg.tokenize.enabled,
                cfg.curriculum.enabled,
            ),
        )
    }


def _stage(enabled: bool) -> dict[str, Any]:
    return {
        "enabled": enabled,
        "docs_in": 0,
        "docs_out": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "removed": collections.Counter(),
        "notes": collections.Counter(),
    }


def _count_in(stage: dict, size: int) -> None:
    stage["docs_in"] += 1
    stage["bytes_in"] += size


def _count_out(stage: dict, size: int) -> None:
    stage["docs_out"] += 1
    stage["bytes_out"] += size


def count_all(stage: dict, previous: dict) -> None:
    docs, size = previous["docs_out"], previous["bytes_out"]
    stage.update(docs_in=docs, docs_out=docs, bytes_in=size, bytes_out=size)


def count_doc(stages: dict, r: Processed, reason: str) -> bool:
    """Counts `r` through the stages clean .. augment, `reason` its dedup verdict ("": kept; not read for a
    document removed before dedup); True if it is kept."""
    clean_st, quality_st = stages["clean"], stages["quality"]
    exact_st, near_st, aug = stages["exact_dedup"], stages["near_dedup"], stages["augment"]
    _count_in(clean_st, r.bytes_in)
    if r.removed_at == "clean":
        clean_st["removed"][r.reason] += 1
        return False
    _count_out(clean_st, r.bytes_clean)
    clean_st["notes"]["changed"] += int(r.changed)
    _count_in(quality_st, r.bytes_clean)
    quality_st["notes"]["lines_removed"] += r.lines_removed
    if r.removed_at == "quality":
        quality_st["removed"][r.reason] += 1
        return False
    size = nbytes(r.text)
    _count_out(quality_st, size)
    _count_in(exact_st, size)
    if reason == "exact_duplicate":
        exact_st["removed"][reason] += 1
        return False
    _count_out(exact_st, size)
    _count_in(near_st, size)
    if reason:
        near_st["removed"][reason] += 1
        return False
    _count_out(near_st, size)
    _count_in(aug, size)
    _count_out(aug, size)
    for variant in r.variants:
        _count_out(aug, nbytes(variant))
        aug["notes"]["eda_variants"] += 1
    return True


def finish_input(stage: dict, reader: Reader) -> None:
    counts = reader.counts
    repaired = ("undecodable", "too_long_truncated", "too_long_line")
    removed = {k: v for k, v in reader.problems().items() if k not in repaired and k != "undecodable_dropped"}
    if counts["undecodable_dropped"]:
        removed["undecodable"] = counts["undecodable_dropped"]
    docs, size = counts["docs"], counts["bytes"]
    stage.update(docs_in=docs + sum(removed.values()), docs_out=docs, bytes_in=size, bytes_out=size)
    stage["removed"].update(removed)
    stage["notes"].update({k: counts[k] for k in repaired if counts[k]})
    stage["notes"]["inputs"] = counts["inputs"]
    if counts["undecodable_dropped"]:
        stage["notes"]["undecodable"] -= counts["undecodable_dropped"]
    if reader.unreadable:
        stage["notes"]["unreadable_files"] = "; ".join(reader.unreadable[:5])


def check_not_empty(stages: dict, records: int) -> None:
    """A run that keeps no record fails (nothing is written): an output without shards would pass for a
    complete, empty corpus. The error says what each stage removed."""
    if records:
        return
    removed = [f"{k} {v:,}" for st in stages.values() for k, v in dict(st["removed"]).items() if v]
    unreadable = stages["input"]["notes"].get("unreadable_files")
    raise JaxllmError(
        f"no usable record in the inputs ({stages['input']['docs_in']:,} documents read"
        + (f"; removed: {', '.join(removed)}" if removed else "")
        + (f"; unreadable: {unreadable}" if unreadable else "")
        + "); nothing was written. Check --input, input.text_field (the JSON/Parquet field of the text) and "
        "the clean/quality/dedup settings"
    )


def _plain(stage: dict) -> dict:
    return {k: dict(sorted(v.items())) if isinstance(v, collections.Counter) else v for k, v in stage.items()}


def add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b of two id counts, the shorter one padded with zeros (neither is changed)."""
    if len(b) > len(a):
        a, b = b, a
    total = a.copy()
    total[: len(b)] += b
    return total


def nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _chunks(n: int, order: np.ndarray | None = None) -> Iterator[list[int]]:
    indices = np.arange(n) if order is None else order
    for start in range(0, n, _READ_CHUNK):
        yield indices[start : start + _READ_CHUNK].tolist()


def _spool_texts(spool: Spool) -> Iterator[list[str]]:
    for chunk in _chunks(len(spool)):
        texts = [json.loads(b)["text"] for b in spool.read(chunk)]
        for start in range(0, len(texts), _BATCH):
            yield texts[start : start + _BATCH]
