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
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from jaxllm import JaxllmError
from jaxllm.data.prep import augment, curriculum
from jaxllm.data.prep.clean import clean, quality
from jaxllm.data.prep.config import PrepConfig
from jaxllm.data.prep.dedup import Deduplicator, MinHasher, exact_key
from jaxllm.data.prep.parallel import batched, parallel_map
from jaxllm.data.prep.output import OutputDir, ShardWriter, Spool, SpoolTexts, length_histogram, render_report, write_json
from jaxllm.data.prep.readers import Doc, Reader, resolve_inputs

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
    key: int | None
    sig: np.ndarray | None
    variants: list[str]


class DocStage:
    """Clean + quality + dedup hashes + EDA variants of a batch of documents (runs in workers)."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.hasher = MinHasher(cfg.dedup) if cfg.dedup.near else None

    def __call__(self, batch: list[Doc]) -> list[Processed]:
        return [self.one(*doc) for doc in batch]

    def one(self, text: str, source: str, value: float | None) -> Processed:
        cfg = self.cfg
        size = _nbytes(text)
        if cfg.clean.enabled:
            cleaned, reason = clean(text, cfg.clean)
            if cleaned is None:
                return Processed(None, source, value, size, 0, "clean", reason, True, 0, None, None, [])
        else:
            cleaned = text
        changed, clean_size, lines_removed = cleaned != text, _nbytes(cleaned), 0
        if cfg.quality.enabled:
            kept, reason, lines_removed = quality(cleaned, cfg.quality)
            if kept is None:
                return Processed(None, source, value, size, clean_size, "quality", reason, changed, lines_removed,
                                 None, None, [])
            cleaned = kept
        key = exact_key(cleaned) if cfg.dedup.exact else None
        sig = self.hasher.signature(cleaned) if self.hasher is not None else None
        return Processed(cleaned, source, value, size, clean_size, "", "", changed, lines_removed, key, sig,
                         augment.variants(cleaned, cfg.augment))


class TokenizeStage:
    """Texts -> int32 token ids (runs in workers; the tokenizer loads once per process)."""

    def __init__(self, tokenizer: str):
        self.path = tokenizer  # a .model file or a model folder
        self._tokenizer = None

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self._tokenizer is None:
            from jaxllm.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

            self._tokenizer = load_tokenizer(self.path)
        return [np.asarray(self._tokenizer.encode(t), np.int32) for t in texts]

    def __getstate__(self) -> dict:
        return {"path": self.path, "_tokenizer": None}


def _prepare(resolved: list[tuple[str, str]], inputs: list[str], out: OutputDir, cfg: PrepConfig,
             start: float) -> dict[str, Any]:
    stages = {name: _stage(enabled) for name, enabled in zip(STAGES, (
        True, cfg.clean.enabled, cfg.quality.enabled, cfg.dedup.exact, cfg.dedup.near, cfg.augment.enabled,
        cfg.tokenize.enabled, cfg.curriculum.enabled))}
    workers = cfg.num_workers or os.cpu_count() or 1
    spool = Spool(out.temp("docs.spool"))
    chars, values = array.array("q"), array.array("d")

    def keep(text: str, source: str, value: float | None) -> None:
        spool.append(json.dumps({"text": text, "source": source, "value": value}, ensure_ascii=False).encode())
        chars.append(len(text))
        values.append(math.nan if value is None else value)

    # ---- pass 1: read, clean, filter, dedup, augment
    reader = Reader(cfg.input, cfg.curriculum.field)
    dedup = Deduplicator(cfg.dedup)
    paraphrase = augment.Paraphraser(cfg.augment) if cfg.augment.enabled and cfg.augment.paraphrase_model else None
    waiting: list[Processed] = []
    aug = stages["augment"]

    def paraphrase_waiting() -> None:
        for doc, text in zip(waiting, paraphrase([d.text for d in waiting]) if waiting else []):
            if text:
                keep(text, f"paraphrase:{doc.source}", doc.value)
                _count_out(aug, text)
                aug["notes"]["paraphrases"] += 1
        waiting.clear()

    bar = tqdm(desc="prep: clean, filter, dedup", unit=" doc", disable=not cfg.progress)
    for results in parallel_map(DocStage(cfg), batched(reader.read(resolved), _BATCH), workers):
        bar.update(len(results))
        for r in results:
            if not _account(stages, r):
                continue
            if not _count_dedup(stages, r, dedup.check(r.key, r.sig)):
                continue
            keep(r.text, r.source, r.value)
            for variant in r.variants:
                keep(variant, f"eda:{r.source}", r.value)
                _count_variant(aug, variant)
            if paraphrase is not None and augment.wants_paraphrase(r.text, cfg.augment):
                waiting.append(r)
                if len(waiting) == _PARAPHRASE_BATCH:
                    paraphrase_waiting()
    if paraphrase is not None:
        paraphrase_waiting()
    bar.close()
    _finish_input(stages["input"], reader)
    if dedup.near is not None:
        stages["near_dedup"]["notes"]["candidate_pairs_checked"] = dedup.near.candidates_checked

    seconds = {"read_clean_filter_dedup": time.time() - start}
    # ---- pass 2: tokenizer and tokens
    tok = stages["tokenize"]
    n = len(spool)
    _count_all(tok, stages["augment"])
    tokens_spool, num_tokens, token_counts, tokenizer_file, tokenizer_name = None, None, None, "", ""
    if cfg.tokenize.enabled and n:
        tokenizer_name, tokenizer_file = _tokenizer(cfg, spool, out)
        tokens_spool = Spool(out.temp("tokens.spool"))
        num_tokens, token_counts = array.array("q"), np.zeros(0, np.int64)
        stage = TokenizeStage(out.temp("tokenizer.model") if tokenizer_file else cfg.tokenize.tokenizer)
        bar = tqdm(total=n, desc="prep: tokenize", unit=" doc", disable=not cfg.progress)
        for ids_list in parallel_map(stage, _spool_texts(spool), workers):
            bar.update(len(ids_list))
            for ids in ids_list:
                tokens_spool.append(ids.tobytes())
                num_tokens.append(len(ids))
            token_counts = _add_counts(token_counts, ids_list)
        bar.close()
        tok["notes"].update(tokens=int(sum(num_tokens)), tokenizer=tokenizer_name)

    seconds["tokenize"] = time.time() - start - sum(seconds.values())
    # ---- pass 3: curriculum and shards
    length = np.asarray(num_tokens if num_tokens is not None else chars, np.float64)
    rarity = None
    if tokens_spool is not None and cfg.curriculum.enabled and cfg.curriculum.rarity_weight:
        log_freq = curriculum.log_frequencies(token_counts)
        rarity = np.asarray([curriculum.rarity(np.frombuffer(b, np.int32), log_freq)
                             for chunk in _chunks(n) for b in tokens_spool.read(chunk)])
    model_loss = None
    if n and cfg.curriculum.enabled and cfg.curriculum.model_weight:
        scorer = curriculum.ModelLoss(cfg.curriculum.model, cfg.curriculum.model_max_tokens,
                                      cfg.curriculum.model_batch_size)
        bar = tqdm(total=n, desc="prep: reference-model loss", unit=" doc", disable=not cfg.progress)
        model_loss = []
        for texts in _spool_texts(spool):
            model_loss += scorer(texts)
            bar.update(len(texts))
        bar.close()
        model_loss = np.asarray(model_loss)
    score, bucket, order = curriculum_order(cfg, length, rarity, np.asarray(values, np.float64), model_loss)
    _count_all(stages["curriculum"], tok)
    writer = ShardWriter(out, cfg.output.records_per_shard)
    bar = tqdm(total=n, desc="prep: write shards", unit=" doc", disable=not cfg.progress)
    for chunk in _chunks(n, order):
        docs = spool.read(chunk)
        token_bytes = tokens_spool.read(chunk) if tokens_spool is not None else [None] * len(chunk)
        for i, doc, tb in zip(chunk, docs, token_bytes):
            row = json.loads(doc)
            ids = np.frombuffer(tb, np.int32) if tb is not None else None
            writer.write(output_record(cfg, row, score[i], bucket[i], ids), tokens=0 if ids is None else len(ids),
                         text_bytes=_nbytes(row["text"]))
        bar.update(len(chunk))
    bar.close()
    files = writer.finish()
    seconds["score_and_write"] = time.time() - start - sum(seconds.values())
    spool.close()
    if tokens_spool is not None:
        tokens_spool.close()
    stats = summarize(inputs, stages, cfg, out.path, tokenizer_name, tokenizer_file, writer.shards,
                      None if num_tokens is None else int(sum(num_tokens)), length, score, bucket, start)
    stats["pass_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    write_outputs(out, stats, files, tokenizer_file)
    return stats


def curriculum_order(cfg: PrepConfig, length: np.ndarray, rarity: np.ndarray | None, values: np.ndarray,
                     model_loss: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, bucket, write order) of the records, from per-record lengths, rarities, field values and
    reference-model losses."""
    score = curriculum.scores(cfg.curriculum, length, rarity, values, model_loss)
    bucket, order = curriculum.buckets_and_order(cfg.curriculum, score)
    return score, bucket, order


def output_record(cfg: PrepConfig, row: dict, score: float, bucket: int, ids: np.ndarray | None) -> bytes:
    """One output record: JSON of text, score, bucket, source (and tokens)."""
    record = {"text": row["text"], "score": round(float(score), 6), "bucket": int(bucket), "source": row["source"]}
    if ids is not None and cfg.tokenize.write_tokens:
        record["tokens"] = ids.tolist()
    return json.dumps(record, ensure_ascii=False).encode()


def summarize(inputs: list[str], stages: dict, cfg: PrepConfig, out_path: str, tokenizer_name: str,
              tokenizer_file: str, shards: list[dict], tokens: int | None, length: np.ndarray, score: np.ndarray,
              bucket: np.ndarray, start: float) -> dict[str, Any]:
    """stats.json: inputs, config, every stage's counts, the shards, buckets and length histogram."""
    n = len(length)
    return {
        "inputs": inputs,
        "files": stages["input"]["notes"].pop("inputs", 0),
        "config": cfg.to_dict(),
        "stages": {name: _plain(st) for name, st in stages.items()},
        "tokenizer": os.path.join(out_path, "tokenizer.model") if tokenizer_file else tokenizer_name,
        "output": {
            "records": n,
            "text_bytes": sum(s["text_bytes"] for s in shards),
            "tokens": tokens,
            "shards": shards,
            "buckets": [{"bucket": b, "records": int((bucket == b).sum()), "mean_score": float(score[bucket == b].mean())}
                        for b in range(int(bucket.max()) + 1)] if n and cfg.curriculum.enabled else [],
            "length_unit": "tokens" if tokens is not None else "chars",
            "length_histogram": length_histogram(length.astype(np.int64).tolist()),
        },
        "seconds": round(time.time() - start, 3),
    }


def write_outputs(out: OutputDir, stats: dict, files: list[tuple[str, str]], tokenizer_file: str) -> None:
    """report.md and stats.json beside the temp shards, then everything renamed in (stats.json last)."""
    with open(out.temp("report.md"), "w") as f:
        f.write(render_report(stats))
    write_json(out.temp("stats.json"), stats)
    out.commit(files + ([("tokenizer.model", "tokenizer.model")] if tokenizer_file else [])
               + [("report.md", "report.md"), ("stats.json", "stats.json")])


def _tokenizer(cfg: PrepConfig, spool: Spool, out: OutputDir) -> tuple[str, str]:
    """(tokenizer name for the stats, temp file name if a .model was written to the output, else "")."""
    name, tokenizer, copy = load_prep_tokenizer(cfg, SpoolTexts(spool))
    if not copy:
        return name, ""
    shutil.copyfile(tokenizer.path, out.temp("tokenizer.model"))
    return name, "tokenizer.model"


def load_prep_tokenizer(cfg: PrepConfig, documents: Sequence[str]):
    """(name for the stats, tokenizer, whether its .model file belongs in the output): the
    `tokenize.tokenizer` .model file (copied out) or model folder (read there), or one trained here."""
    from jaxllm.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

    given = os.path.expanduser(cfg.tokenize.tokenizer)
    try:
        tokenizer = load_tokenizer(given, cfg.tokenize.vocab_size, documents)
    except JaxllmError as e:
        raise JaxllmError(str(e).replace("data.vocab_size", "tokenize.vocab_size")
                          .replace("data.tokenizer", "tokenize.tokenizer")) from None
    if os.path.isdir(given):
        return given, tokenizer, False  # a model folder's tokenizer (SentencePiece or tokenizer.json)
    return (given or "trained"), tokenizer, True


# ------------------------------------------------------------------ counting helpers


def _stage(enabled: bool) -> dict[str, Any]:
    return {"enabled": enabled, "docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0,
            "removed": collections.Counter(), "notes": collections.Counter()}


def _count_in(stage: dict, text: str, size: int | None = None) -> None:
    stage["docs_in"] += 1
    stage["bytes_in"] += _nbytes(text) if size is None else size


def _count_out(stage: dict, text: str, size: int | None = None) -> None:
    stage["docs_out"] += 1
    stage["bytes_out"] += _nbytes(text) if size is None else size


def _count_all(stage: dict, previous: dict) -> None:
    stage.update(docs_in=previous["docs_out"], docs_out=previous["docs_out"], bytes_in=previous["bytes_out"],
                 bytes_out=previous["bytes_out"])


def _count_dedup(stages: dict, r: Processed, reason: str) -> bool:
    """Counts a document that reached dedup through the dedup stages (its verdict `reason`) into
    augment; True if it is kept."""
    size = _nbytes(r.text)
    if reason == "exact_duplicate":
        stages["exact_dedup"]["removed"][reason] += 1
        return False
    _count_out(stages["exact_dedup"], r.text, size)
    _count_in(stages["near_dedup"], r.text, size)
    if reason:
        stages["near_dedup"]["removed"][reason] += 1
        return False
    _count_out(stages["near_dedup"], r.text, size)
    _count_in(stages["augment"], r.text, size)
    _count_out(stages["augment"], r.text, size)
    return True


def _count_variant(aug: dict, variant: str) -> None:
    _count_out(aug, variant)
    aug["notes"]["eda_variants"] += 1


def _account(stages: dict, r: Processed) -> bool:
    """Counts `r` into the clean / quality / exact_dedup stages; True if it reaches dedup."""
    clean_st, quality_st = stages["clean"], stages["quality"]
    clean_st["docs_in"] += 1
    clean_st["bytes_in"] += r.bytes_in
    if r.removed_at == "clean":
        clean_st["removed"][r.reason] += 1
        return False
    clean_st["docs_out"] += 1
    clean_st["bytes_out"] += r.bytes_clean
    clean_st["notes"]["changed"] += int(r.changed)
    quality_st["docs_in"] += 1
    quality_st["bytes_in"] += r.bytes_clean
    quality_st["notes"]["lines_removed"] += r.lines_removed
    if r.removed_at == "quality":
        quality_st["removed"][r.reason] += 1
        return False
    size = _nbytes(r.text)
    _count_out(quality_st, r.text, size)
    _count_in(stages["exact_dedup"], r.text, size)
    return True


def _finish_input(stage: dict, reader: Reader) -> None:
    counts = reader.counts
    repaired = ("undecodable", "too_long_truncated", "too_long_line")
    removed = {k: v for k, v in reader.problems().items() if k not in repaired and k != "undecodable_dropped"}
    if counts["undecodable_dropped"]:
        removed["undecodable"] = counts["undecodable_dropped"]
    stage.update(docs_out=counts["docs"], bytes_out=counts["bytes"], bytes_in=counts["bytes"],
                 docs_in=counts["docs"] + sum(removed.values()))
    stage["removed"].update(removed)
    stage["notes"].update({k: counts[k] for k in repaired if counts[k]})
    stage["notes"]["inputs"] = counts["inputs"]
    if counts["undecodable_dropped"]:
        stage["notes"]["undecodable"] -= counts["undecodable_dropped"]
    if reader.unreadable:
        stage["notes"]["unreadable_files"] = "; ".join(reader.unreadable[:5])


def _plain(stage: dict) -> dict:
    return {k: dict(sorted(v.items())) if isinstance(v, collections.Counter) else v for k, v in stage.items()}


def _add_counts(counts: np.ndarray, ids_list: list[np.ndarray]) -> np.ndarray:
    if not ids_list:
        return counts
    batch = np.bincount(np.concatenate(ids_list), minlength=len(counts)) if sum(map(len, ids_list)) else counts * 0
    if len(batch) > len(counts):
        counts = np.concatenate([counts, np.zeros(len(batch) - len(counts), np.int64)])
    counts[: len(batch)] += batch
    return counts


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _chunks(n: int, order: np.ndarray | None = None) -> Iterator[list[int]]:
    indices = np.arange(n) if order is None else order
    for start in range(0, n, _READ_CHUNK):
        yield indices[start: start + _READ_CHUNK].tolist()


def _spool_texts(spool: Spool) -> Iterator[list[str]]:
    for chunk in _chunks(len(spool)):
        texts = [json.loads(b)["text"] for b in spool.read(chunk)]
        for start in range(0, len(texts), _BATCH):
            yield texts[start: start + _BATCH]
