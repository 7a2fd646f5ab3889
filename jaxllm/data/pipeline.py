"""Grain pipelines: documents -> split -> global data order (lanes) -> tokenize -> pack -> shift -> batch.

The sequence of global batches is a function of the config and the step only: row r of every batch is
lane r's (`jaxllm.data.lanes`), and each process reads only the documents of the lanes of its rows, so
1 or 64 processes, any mesh and any `num_workers` see the same batches, and the data state a checkpoint
holds is global (every lane's position: a few integers each).

Pretraining text is concatenated and cut into `block_size + 1` token rows within a lane, so no token is
padding in training and no document is truncated (the embedded corpus has 100 KB documents that
first-fit packing would cut off at `block_size`). A document cut across rows starts a new segment
(positions restart at 0) in the next row; attention never crosses segments, so nothing can see the
cut-off context anyway. Each lane shuffles its rows in windows (`data.shuffle_window` rows of the
global stream shared among the lanes), so a long document's rows spread out.

SFT formats (`jaxllm.data.sft`) never cut an example across rows: each is truncated to
`block_size + 1` tokens and packed whole, first-fit into a few open rows per lane (or padded alone in a
row, `packing=False`); its per-token mask decides which targets count. A preference pair
(`jaxllm.data.preference`) is two such sequences, chosen then rejected, packed whole into one row.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from jaxllm import JaxllmError
from jaxllm.data import lanes, mixture, preference, sft
from jaxllm.data.config import DataConfig, components, make_source, source_rows
from jaxllm.data.hashing import mix64
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer

Batch = dict[str, np.ndarray]

_SPLIT_SALT = 0x6A61786C6C6D  # fixes the train/val split: independent of cfg.seed, so runs compare
_READ_THREADS = 2  # threads reading and tokenizing documents ahead (with data.num_workers=0)
_PREFETCH_BATCHES = 4
_REF_LOGPS_WITH_MIXTURE = (
    "precomputed reference log-probs (preference.precompute_ref_logps) do not combine with "
    "data.mixture or data.curriculum_field; drop one"
)


def make_train_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | None = None,
    ref_logps: np.ndarray | None = None,
) -> grain.DatasetIterator:
    """Endless, checkpointable iterator over this process's rows of the global training batches.

    `rows`: the rows of the global batch this process's devices hold (`sharding.process_rows`); by
    default the `process_index`-th of `process_count` equal contiguous slices. Its state (`get_state`)
    holds the lanes of these rows; `lanes.merge_states` joins every process's into the global one,
    which `set_state` accepts on any process count.
    `ref_logps` (preference): float [training documents, 2], each pair's reference log-prob sums (chosen,
    rejected) by its index in `preference_documents(cfg)[0]`; batches then carry `ref_logps`.
    """
    rows = _rows(cfg, process_index, process_count, rows)
    ds = lanes.GlobalOrderDataset(
        train_plan(cfg, tokenizer, ref_logps), rows, _shift, num_threads=_READ_THREADS, num_workers=cfg.num_workers
    )
    # A background thread builds the next batches while the train step runs (XLA releases the GIL).
    return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_PREFETCH_BATCHES))


def train_plan(cfg: DataConfig, tokenizer: Tokenizer, ref_logps: np.ndarray | None = None) -> lanes.Plan:
    """The global data order of `cfg`: streams, their weights, packing and windows (see `lanes`)."""
    streams, weights = _streams(cfg, ref_logps)
    if cfg.format != "text":  # examples are already shuffled one by one; rows of whole examples need no window
        window = lanes.sft_window(cfg.packing)
    else:  # `shuffle_window` rows of the global stream: each lane shuffles its share of them
        window = max(1, -(-cfg.shuffle_window // cfg.batch_size)) if cfg.shuffle and cfg.shuffle_window > 1 else 1
    return lanes.Plan(
        streams=tuple(streams),
        tokenize=tokenize_fn(cfg, tokenizer),
        weights=weights,
        batch_size=cfg.batch_size,
        block_size=cfg.block_size,
        window=window,
        sft=cfg.format != "text",
        packing=cfg.packing,
        shuffle_seed=_shuffle_seed(cfg.seed + 1) if window > 1 else None,
        draw_seed=_shuffle_seed(cfg.seed, "mixture"),
    )


def _streams(
    cfg: DataConfig, ref_logps: np.ndarray | None = None
) -> tuple[list[grain.MapDataset], mixture.Weights | None]:
    """One endless document stream per (source, curriculum stage) with documents, and their weights."""
    if not (cfg.mixture or cfg.curriculum_field):
        train_docs, _ = split_documents(cfg)
        return [_stream(cfg, _attach(cfg, train_docs, ref_logps, "training"))], None
    if ref_logps is not None:
        raise JaxllmError(_REF_LOGPS_WITH_MIXTURE)
    stages = cfg.curriculum_schedule or None
    num_stages = len(stages[0][1]) if stages else 1
    streams, leaves, names, schedules = [], [], [], []
    for c, (name, comp) in enumerate(components(cfg)):
        schedules.append(cfg.mixture[c].weight if cfg.mixture else ((0.0, (1.0,)),))
        source = _documents(comp)
        train_idx, _ = split_indices(len(source), 0.0 if comp.valid_paths else cfg.val_fraction)
        stage = curriculum_stages(comp, train_idx, num_stages) if stages else np.zeros(len(train_idx), np.int64)
        for s in range(num_stages):
            idx = train_idx[stage == s]
            if len(idx):
                leaves.append((c, s))
                names.append("/".join(x for x in (name, f"stage{s}" if stages else "") if x))
                streams.append(_stream(cfg, grain.MapDataset.source(_Take(source, idx)), name, s))
    return streams, mixture.Weights(schedules, stages, leaves, names)


def _stream(cfg: DataConfig, docs: grain.MapDataset, *salt: Any) -> grain.MapDataset:
    """`docs` shuffled every epoch (seeded by the config alone) and repeated: position -> document."""
    if len(docs) == 0:
        raise JaxllmError(
            f"no training documents{' in ' + '/'.join(map(str, salt)) if salt else ''}; add data "
            "or lower data.val_fraction"
        )
    if cfg.shuffle:
        docs = docs.shuffle(seed=_shuffle_seed(cfg.seed, *salt))
    return docs.repeat()  # reshuffles every epoch (upstream shuffle is reseeded per epoch)


def curriculum_stages(cfg: DataConfig, indices: np.ndarray, num_stages: int) -> np.ndarray:
    """The curriculum stage (`cfg.curriculum_field`, an integer) of each record at `indices` (a source
    without fields is refused when its DataConfig is built)."""
    rows = source_rows(cfg, (("curriculum_field", cfg.curriculum_field),))
    return np.asarray(
        [mixture.stage_of(rows[int(i)], cfg.curriculum_field, rows.where(int(i)), num_stages) for i in indices],
        np.int64,
    )


def make_eval_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | None = None,
    ref_logps: np.ndarray | None = None,
) -> Iterator[Batch]:
    """One deterministic pass over this process's rows of the global validation batches.

    Lane r of the global batch packs validation documents r, r + B, r + 2B, ... (B = data.batch_size),
    so the batches are the same on any number of processes. Rows of a lane that has run out (and the
    rest of its last row) are padding (segment 0, loss weight 0), which counts nothing: the split is
    evaluated whole whatever the batch and block size. A process runs out when its lanes do (at least
    one batch, all padding if it has no documents); the global pass lasts as long as the longest lane,
    so a process that ran out feeds padding until every process has (`jaxllm.distributed.until_all_done`).
    Runs in the main process: evaluation reads a few batches, and worker start-up would cost more.
    `ref_logps` (preference): as `make_train_iterator`'s, float [validation documents, 2].
    """
    _, val_docs = split_documents(cfg)
    if len(val_docs) == 0:
        raise JaxllmError(
            f"the validation split is empty (data.val_fraction={cfg.val_fraction}); evaluation needs "
            "at least one document: raise data.val_fraction or add data"
        )
    docs = _attach(cfg, val_docs, ref_logps, "validation")
    fields = () if ref_logps is None else ("ref_logps",)
    return _pass(cfg, tokenizer, docs, _rows(cfg, process_index, process_count, rows), fields)


def make_reference_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """One pass over a split's preference pairs ("train" or "val"), packed as evaluation packs them, whose
    batches also carry `doc_index` int32 [B, L]: the pair's index in `preference_documents(cfg)` at each
    sequence's first input position (read it where positions == 0 and segment_ids > 0; odd segments are
    chosen), -1 elsewhere. What precomputing reference log-probs reads; the pass covers the split once
    over all processes' rows, so each process fills the entries of its rows' pairs."""
    if cfg.format != "preference":
        raise JaxllmError(f"reference log-probs are computed for preference pairs, not data.format={cfg.format!r}")
    if split not in ("train", "val"):
        raise JaxllmError(f"split={split!r}: use 'train' or 'val'")
    docs = preference.Attached(preference_documents(cfg)[split == "val"], index=True)
    return _pass(cfg, tokenizer, docs, _rows(cfg, process_index, process_count, rows), ("doc_index",))


def check_pairs(cfg: DataConfig) -> None:
    """Renders and tokenizes every preference pair of both splits once, so a bad row (a missing column, an
    answer truncation leaves empty) stops a run in one line before it compiles, not at the step that
    would read it."""
    tokenize = tokenize_fn(cfg, tokenizer_for(cfg))
    for docs in split_documents(cfg):
        for i in range(len(docs)):
            tokenize(docs[i])


def preference_documents(cfg: DataConfig) -> tuple[Sequence[preference.Pair], Sequence[preference.Pair]]:
    """(train, validation) preference pairs in split order: a pair's index here is the row of its
    `ref_logps` entry; `len` of each is the first dimension of that split's `ref_logps` array."""
    if cfg.format != "preference":
        raise JaxllmError(f"preference_documents reads data.format='preference', not {cfg.format!r}")
    if cfg.mixture or cfg.curriculum_field:
        raise JaxllmError(_REF_LOGPS_WITH_MIXTURE)
    return split_documents(cfg)


def _pass(
    cfg: DataConfig, tokenizer: Tokenizer, docs: Sequence, rows: list[int], fields: Sequence[str]
) -> Iterator[Batch]:
    """Lane r packs `docs` r, r + B, r + 2B, ...: one deterministic pass, the same on any process count."""
    tokenize, n = tokenize_fn(cfg, tokenizer), len(docs)
    per_lane = [_lane_rows(cfg, (tokenize(docs[g]) for g in range(r, n, cfg.batch_size))) for r in rows]
    return _eval_batches(per_lane, cfg.block_size, fields)


def _eval_batches(per_lane: list[Iterator], block_size: int, fields: Sequence[str] = ()) -> Iterator[Batch]:
    pad = _shift(lanes.pad_row(block_size + 1, fields))
    first = True
    while True:
        got = [next(lane, None) for lane in per_lane]
        if all(row is None for row in got) and not first:
            return
        first = False
        shifted = [pad if row is None else _shift(row) for row in got]
        yield {k: np.stack([row[k] for row in shifted]) for k in pad}


def check_splits(cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1) -> None:
    """Refuses, before any model is built, data that cannot train: an empty validation split, or a
    training split whose one epoch fills fewer rows than one global batch. (The process arguments are
    kept for callers; the data order is global, so the answer does not depend on them.)"""
    train_docs, val_docs = split_documents(cfg)
    if len(val_docs) == 0:
        raise JaxllmError(
            f"the validation split is empty ({len(train_docs)} documents, data.val_fraction="
            f"{cfg.val_fraction}); evaluation needs at least one: raise data.val_fraction or add data"
        )
    if cfg.mixture or cfg.curriculum_field:  # each stream repeats on its own; emptiness is checked per stream
        return
    length, tokenize = cfg.block_size + 1, tokenize_fn(cfg, tokenizer)
    examples, total = [], 0
    for i in range(len(train_docs)):  # rows hold <= `length` tokens: once a batch's worth is here, it fills a batch
        examples.append(tokenize(train_docs[i]))
        total += len(examples[-1]["tokens"])
        if total >= cfg.batch_size * length:
            return
    rows = sum(1 for _ in _lane_rows(cfg, examples))
    if rows < cfg.batch_size:
        raise JaxllmError(
            f"the training split is too small for one batch: {len(train_docs)} documents ({total:,} tokens) fill "
            f"{rows} row(s) of {length} tokens, but one batch needs {cfg.batch_size} rows (data.batch_size="
            f"{cfg.batch_size}); add data, or lower data.batch_size or data.block_size={cfg.block_size}"
        )


def _lane_rows(cfg: DataConfig, examples) -> Iterator[dict[str, np.ndarray]]:
    return lanes.lane_rows(examples, cfg.block_size + 1, cfg.format != "text", cfg.packing)


def split_documents(cfg: DataConfig) -> tuple[grain.MapDataset, grain.MapDataset]:
    """(train, validation) documents of `cfg`'s sources (`sft` pieces for SFT formats), each source split
    on its own; the split is fixed for a given corpus size. With `data.valid_paths`, training reads every
    document of `data.paths` and validation those files."""
    train, val = [], []
    for name, comp in components(cfg):
        source = _documents(comp)
        if comp.valid_paths:
            train.append(source)
            val.append(_documents(dataclasses.replace(comp, paths=comp.valid_paths, valid_paths=())))
            continue
        train_idx, val_idx = split_indices(len(source), cfg.val_fraction)
        if len(train_idx) == 0:
            where = f"data.mixture.{name}" if name else "the source"
            raise JaxllmError(f"{where} has {len(source)} documents and none are left for training; add data")
        train.append(_Take(source, train_idx))
        val.append(_Take(source, val_idx))
    return grain.MapDataset.source(_Concat(train)), grain.MapDataset.source(_Concat(val))


def split_indices(num_docs: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) document indices; val = the `round(n * fraction)` lowest index hashes.

    Ranking by a hash of the index (not a seeded permutation) keeps a document's side of the split
    stable across seeds, and mostly stable when the corpus grows.
    """
    num_val = int(round(num_docs * val_fraction))
    if val_fraction > 0 and num_docs >= 2:
        num_val = max(num_val, 1)
    num_val = min(num_val, num_docs - 1) if num_docs else 0
    order = np.argsort(mix64(np.arange(num_docs, dtype=np.uint64) ^ np.uint64(_SPLIT_SALT)), kind="stable")
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def document_texts(cfg: DataConfig) -> Sequence[str]:
    """The text of every document of `cfg`'s source as the model reads it (SFT rows rendered)."""
    source = _Concat([_documents(comp) for _, comp in components(cfg)])
    if cfg.format == "preference":
        return preference.Texts(source)
    return source if cfg.format == "text" else sft.Texts(source)


def _documents(cfg: DataConfig) -> Sequence:
    """The documents of one source (not a mixture)."""
    if cfg.format == "preference":
        return preference.Pairs(make_source(cfg), cfg)
    return make_source(cfg) if cfg.format == "text" else sft.Examples(make_source(cfg), cfg)


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    """`cfg.tokenizer` (a `.model` file or a model folder), or one trained on `cfg`'s documents (cached)."""
    return load_tokenizer(cfg.tokenizer, cfg.vocab_size, () if cfg.tokenizer else document_texts(cfg))


def tokenize_fn(cfg: DataConfig, tokenizer: Tokenizer) -> Callable[[Any], dict[str, np.ndarray]]:
    """Document (or SFT pieces) -> {"tokens"} (and {"mask"}), as the pipeline tokenizes `cfg`'s source."""
    if cfg.format == "text":
        return _Tokenize(tokenizer, cfg.add_bos, cfg.add_eos)
    if cfg.format == "preference":
        return preference.Tokenize(tokenizer, cfg)
    return sft.Tokenize(
        tokenizer,
        add_bos=cfg.add_bos,
        add_eos=cfg.add_eos,
        assistant_only=sft.assistant_only(cfg),
        max_tokens=cfg.block_size + 1,
    )


def _rows(cfg: DataConfig, process_index: int, process_count: int, rows: Sequence[int] | None) -> list[int]:
    """The rows of the global batch this process reads: `rows`, or its equal contiguous slice."""
    if rows is not None:
        rows = [int(r) for r in rows]
        if not rows or any(not 0 <= r < cfg.batch_size for r in rows) or len(set(rows)) != len(rows):
            raise JaxllmError(f"rows {rows[:8]} are not distinct rows of the data.batch_size={cfg.batch_size} batch")
        return rows
    if not 0 <= process_index < process_count:
        raise JaxllmError(f"process_index={process_index} is outside [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise JaxllmError(
            f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    local = cfg.batch_size // process_count
    return list(range(process_index * local, (process_index + 1) * local))


def _shuffle_seed(seed: int, *salt: Any) -> int:
    """A 32-bit seed for `shuffle`. Grain shuffles epoch e with seed + e, so seeds 0 and 1 would share
    epochs (0's second is 1's first); hashing the seed first keeps runs apart (and `salt`, streams)."""
    key = "-".join(map(str, ("jaxllm-shuffle", seed, *salt)))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


class _Take:
    """The documents of `source` at `indices`: a random-access source, so Grain slices it lazily."""

    def __init__(self, source: Sequence[str], indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> str:
        return self._source[int(self._indices[index])]


def _attach(cfg: DataConfig, docs: grain.MapDataset, ref_logps: np.ndarray | None, split: str) -> grain.MapDataset:
    """`docs` with each pair's `ref_logps` entry attached, or `docs` alone."""
    if ref_logps is None:
        return docs
    if cfg.format != "preference":
        raise JaxllmError(f"ref_logps are reference log-probs of preference pairs, not of data.format={cfg.format!r}")
    return grain.MapDataset.source(preference.Attached(docs, ref_logps, split))


class _Concat:
    """Several random-access sources end to end (one source: itself, so nothing changes)."""

    def __new__(cls, parts: Sequence[Sequence]):
        if len(parts) == 1:
            return parts[0]
        return super().__new__(cls)

    def __init__(self, parts: Sequence[Sequence]):
        self._parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self._starts, index) - 1
        return self._parts[part][index - self._starts[part]]


class _Tokenize:
    """Document -> {"tokens": int32 ids} with BOS/EOS per config (a class so workers can pickle it)."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
        self._tokenizer = tokenizer
        self._prefix, self._suffix = sft.special_ids(tokenizer, add_bos, add_eos)

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = self._prefix + self._tokenizer.encode(text) + self._suffix
        return {"tokens": np.asarray(ids, dtype=np.int32)}


def _shift(packed: dict[str, np.ndarray]) -> Batch:
    """Next-token pairs from a `block_size + 1` block; only same-document, non-pad targets count (and,
    for SFT, only targets the example's mask marks)."""
    tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
    same_doc = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
    if "mask" in packed:
        same_doc &= packed["mask"][1:] != 0
    out = {
        "inputs": tokens[:-1].astype(np.int32, copy=False),
        "targets": tokens[1:].astype(np.int32, copy=False),
        "segment_ids": segments[:-1].astype(np.int32, copy=False),
        "positions": packed["tokens_positions"][:-1].astype(np.int32, copy=False),
        "loss_weights": same_doc.astype(np.float32),
    }
    for key in lanes.FIRST_POSITION_FIELDS:  # preference: a value at each sequence's first input position
        if key in packed:
            out[key] = packed[key][:-1]
    return out
