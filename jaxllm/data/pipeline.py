"""Grain pipelines: documents -> split -> per-process shard -> shuffle -> tokenize -> pack -> shift -> batch.

Order matters. Each process slices its documents *before* tokenizing, so no host reads another's
data. Worker processes (`mp_prefetch`) only tokenize; packing and batching run after them in the main
process, so the batches do not depend on `num_workers` and a checkpoint restores them exactly.

Packing is `ConcatThenSplitIterDataset`: documents are concatenated and cut into `block_size + 1`
token blocks, so no token is padding in training and no document is truncated (the embedded corpus
has 100 KB documents that first-fit packing would cut off at `block_size`). A document cut across
blocks starts a new segment (positions restart at 0) in the next block; attention never crosses
segments, so nothing can see the cut-off context anyway.

SFT formats (`jaxllm.data.sft`) never cut an example across rows: each is truncated to
`block_size + 1` tokens and packed whole by `FirstFitPackIterDataset` (or padded alone in a row,
`packing=False`); its per-token mask decides which targets count.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from jaxllm import JaxllmError
from jaxllm.data import mixture, sft
from jaxllm.data.config import DataConfig, components, make_source, source_rows
from jaxllm.data.hashing import mix64
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer

Batch = dict[str, np.ndarray]

_SPLIT_SALT = 0x6A61786C6C6D  # fixes the train/val split: independent of cfg.seed, so runs compare
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)  # tokenize documents ahead
_PREFETCH_BATCHES = 4
_PACKING_BINS = 32  # SFT rows first-fit packed together (more bins fill rows better; batches still stream)


def make_train_iterator(
    cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator over this process's training batches."""
    local_batch = _local_batch_size(cfg, process_index, process_count)
    if cfg.mixture or cfg.curriculum_field:
        tokens = _mixed_tokens(cfg, tokenizer, process_index, process_count, local_batch)
    else:
        train_docs, _ = split_documents(cfg)
        tokens = _token_stream(cfg, tokenizer, train_docs, process_index, process_count, cfg.num_workers)
    if cfg.format == "text":
        batches = _pack_and_batch(tokens, cfg.block_size, local_batch,
                                  shuffle_window=cfg.shuffle_window if cfg.shuffle else 0,
                                  seed=_shuffle_seed(cfg.seed + 1))
    else:  # examples are already shuffled one by one; rows of whole examples need no window shuffle
        batches = _pack_examples_and_batch(tokens, cfg, local_batch)
    # A background thread builds the next batches while the train step runs (XLA releases the GIL).
    return iter(grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=_PREFETCH_BATCHES))


def _token_stream(cfg: DataConfig, tokenizer: Tokenizer, train_docs: grain.MapDataset, process_index: int,
                  process_count: int, num_workers: int, *salt: Any) -> grain.IterDataset:
    """This process's share of `train_docs`, shuffled every epoch, repeated forever, tokenized."""
    docs = train_docs[process_index::process_count]
    if len(docs) == 0:
        what = f"training documents{' of ' + '/'.join(map(str, salt)) if salt else ''}"
        raise JaxllmError(
            f"{len(train_docs)} {what} cannot feed {process_count} processes; add data or lower data.val_fraction"
        )
    if cfg.shuffle:
        docs = docs.shuffle(seed=_shuffle_seed(cfg.seed, *salt))
    docs = docs.repeat()  # reshuffles every epoch (upstream shuffle is reseeded per epoch)
    tokens = docs.map(tokenize_fn(cfg, tokenizer)).to_iter_dataset(_READ_OPTIONS)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app they are unparsed
            flags.FLAGS.mark_as_parsed()
        tokens = tokens.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return tokens


def _mixed_tokens(cfg: DataConfig, tokenizer: Tokenizer, process_index: int, process_count: int,
                  local_batch: int) -> grain.IterDataset:
    """One token stream per (source, curriculum stage) with documents, drawn by the mixture's weights."""
    stages = cfg.curriculum_schedule or None
    num_stages = len(stages[0][1]) if stages else 1
    streams, leaves, names, schedules = [], [], [], []
    for c, (name, comp) in enumerate(components(cfg)):
        schedules.append(cfg.mixture[c].weight if cfg.mixture else ((0.0, (1.0,)),))
        source = _documents(comp)
        train_idx, _ = split_indices(len(source), cfg.val_fraction)
        stage = curriculum_stages(comp, train_idx, num_stages) if stages else np.zeros(len(train_idx), np.int64)
        for s in range(num_stages):
            idx = train_idx[stage == s]
            if len(idx):
                leaves.append((c, s))
                names.append("/".join(x for x in (name, f"stage{s}" if stages else "") if x))
                streams.append((grain.MapDataset.source(_Take(source, idx)), name, s))
    weights = mixture.Weights(schedules, stages, leaves, names)
    workers = math.ceil(cfg.num_workers / len(streams)) if cfg.num_workers else 0  # the pool split between streams
    parents = [_token_stream(cfg, tokenizer, docs, process_index, process_count, workers, name, s)
               for docs, name, s in streams]
    return mixture.MixtureIterDataset(parents, weights, tokens_per_step=local_batch * (cfg.block_size + 1),
                                      seed=_shuffle_seed(cfg.seed, "mixture"))


def curriculum_stages(cfg: DataConfig, indices: np.ndarray, num_stages: int) -> np.ndarray:
    """The curriculum stage (`cfg.curriculum_field`, an integer) of each record at `indices` (a source
    without fields is refused when its DataConfig is built)."""
    rows = source_rows(cfg, (("curriculum_field", cfg.curriculum_field),))
    return np.asarray([mixture.stage_of(rows[int(i)], cfg.curriculum_field, rows.where(int(i)), num_stages)
                       for i in indices], np.int64)


def make_eval_iterator(
    cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """One deterministic pass over this process's validation batches (a fresh iterator per call).

    Runs in the main process: evaluation reads a few batches, and worker start-up would cost more.
    The last (or only) batch is filled up with padding rows (segment 0, loss weight 0) that count
    nothing, so any non-empty validation split is evaluated whole whatever the batch and block size;
    a process with no validation documents gets one all-padding batch. Processes may get different
    numbers of batches; take no more than the smallest process has.
    """
    local_batch = _local_batch_size(cfg, process_index, process_count)
    _, val_docs = split_documents(cfg)
    if len(val_docs) == 0:
        raise JaxllmError(f"the validation split is empty (data.val_fraction={cfg.val_fraction}); evaluation needs "
                          "at least one document: raise data.val_fraction or add data")
    docs = val_docs[process_index::process_count]
    tokens = docs.map(tokenize_fn(cfg, tokenizer)).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    if cfg.format == "text":
        batches = _pack_and_batch(tokens, cfg.block_size, local_batch, pad_last=True)
    else:
        batches = _pack_examples_and_batch(tokens, cfg, local_batch, pad_last=True)
    return iter(batches) if len(docs) else iter([_PadBatch(local_batch, cfg.block_size)(None)])


def check_splits(cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1) -> None:
    """Refuses, before any model is built, data that cannot train: an empty validation split, or a
    training split (this process's share) whose one epoch fills fewer rows than one batch."""
    local_batch = _local_batch_size(cfg, process_index, process_count)
    train_docs, val_docs = split_documents(cfg)
    if len(val_docs) == 0:
        raise JaxllmError(f"the validation split is empty ({len(train_docs)} documents, data.val_fraction="
                          f"{cfg.val_fraction}); evaluation needs at least one: raise data.val_fraction or add data")
    if cfg.mixture or cfg.curriculum_field:  # each stream repeats on its own; emptiness is checked per stream
        return
    docs, length = train_docs[process_index::process_count], cfg.block_size + 1
    tokenize, examples, total = tokenize_fn(cfg, tokenizer), [], 0
    for i in range(len(docs)):  # rows hold <= `length` tokens: once a batch's worth is here, it fills a batch
        examples.append(tokenize(docs[i]))
        total += len(examples[-1]["tokens"])
        if total >= local_batch * length:
            return
    if cfg.format == "text":
        rows = -(-total // length)
    else:  # as the training stream packs them (an example is never cut across rows)
        batches = _pack_examples_and_batch(grain.MapDataset.source(examples).to_iter_dataset(), cfg, local_batch,
                                           pad_last=True)
        rows = sum(int(np.any(b["segment_ids"] != 0, axis=1).sum()) for b in batches)
    if rows < local_batch:
        where = f" per process ({process_count} processes)" if process_count > 1 else ""
        raise JaxllmError(
            f"the training split is too small for one batch: {len(docs)} documents ({total:,} tokens){where} fill "
            f"{rows} row(s) of {length} tokens, but one batch needs {local_batch} rows (data.batch_size="
            f"{cfg.batch_size}); add data, or lower data.batch_size or data.block_size={cfg.block_size}")


def split_documents(cfg: DataConfig) -> tuple[grain.MapDataset, grain.MapDataset]:
    """(train, validation) documents of `cfg`'s sources (`sft` pieces for SFT formats), each source split
    on its own; the split is fixed for a given corpus size."""
    train, val = [], []
    for name, comp in components(cfg):
        source = _documents(comp)
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
    return source if cfg.format == "text" else sft.Texts(source)


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    """`cfg.tokenizer` (a `.model` file or a model folder), or one trained on `cfg`'s documents (cached)."""
    return load_tokenizer(cfg.tokenizer, cfg.vocab_size, () if cfg.tokenizer else document_texts(cfg))


def _documents(cfg: DataConfig) -> Sequence:
    """The documents of one source (not a mixture)."""
    return make_source(cfg) if cfg.format == "text" else sft.Examples(make_source(cfg), cfg)


def tokenize_fn(cfg: DataConfig, tokenizer: Tokenizer) -> Callable[[Any], dict[str, np.ndarray]]:
    """Document (or SFT pieces) -> {"tokens"} (and {"mask"}), as the pipeline tokenizes `cfg`'s source."""
    if cfg.format == "text":
        return _Tokenize(tokenizer, cfg.add_bos, cfg.add_eos)
    return sft.Tokenize(tokenizer, add_bos=cfg.add_bos, add_eos=cfg.add_eos, assistant_only=sft.assistant_only(cfg),
                        max_tokens=cfg.block_size + 1)


def _local_batch_size(cfg: DataConfig, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise JaxllmError(f"process_index={process_index} is outside [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise JaxllmError(
            f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    return cfg.batch_size // process_count


def _shuffle_seed(seed: int, *salt: Any) -> int:
    """A 32-bit seed for `shuffle`. Grain shuffles epoch e with seed + e, so seeds 0 and 1 would share
    epochs (0's second is 1's first); hashing the seed first keeps runs apart (and `salt`, streams)."""
    key = "-".join(map(str, ("jaxllm-shuffle", seed, *salt)))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def _pack_and_batch(tokens: grain.IterDataset, block_size: int, local_batch: int, *, shuffle_window: int = 0,
                    seed: int = 0, pad_last: bool = False) -> grain.IterDataset:
    packed = grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct={"tokens": block_size + 1})
    sequences = _JsonRestorable(packed).map(_shift)
    if shuffle_window > 1:  # a long document would otherwise fill many consecutive batches on its own
        sequences = grain.experimental.WindowShuffleIterDataset(sequences, window_size=shuffle_window, seed=seed)
    return _batch(sequences, local_batch, block_size, pad_last)


def _pack_examples_and_batch(tokens: grain.IterDataset, cfg: DataConfig, local_batch: int, *,
                             pad_last: bool = False) -> grain.IterDataset:
    """Whole SFT examples per row: first-fit packed, or one per row (a bin that holds one sequence)."""
    length = cfg.block_size + 1
    packed = grain.experimental.FirstFitPackIterDataset(
        tokens, length_struct={"tokens": length, "mask": length},
        num_packing_bins=max(local_batch, _PACKING_BINS) if cfg.packing else 1,
        max_sequences_per_bin=None if cfg.packing else 1, shuffle_bins=False,
    )
    return _batch(packed.map(_shift), local_batch, cfg.block_size, pad_last)


def _batch(rows: grain.IterDataset, local_batch: int, block_size: int, pad_last: bool) -> grain.IterDataset:
    """Batches of `local_batch` rows; a short last batch is dropped (training streams are endless) or,
    with `pad_last`, filled up with padding rows (a finite evaluation pass)."""
    if not pad_last:
        return rows.batch(local_batch, drop_remainder=True)
    return rows.batch(local_batch, drop_remainder=False).map(_PadBatch(local_batch, block_size))


class _PadBatch:
    """A batch filled up to `rows` rows with rows that count nothing: token 0, segment 0, loss weight 0
    (attention never crosses segments, so they change no real row). None gives a batch of padding."""

    def __init__(self, rows: int, block_size: int):
        self._rows, self._block_size = rows, block_size

    def __call__(self, batch: Batch | None) -> Batch:
        if batch is None:
            batch = {k: np.zeros((0, self._block_size), np.float32 if k == "loss_weights" else np.int32)
                     for k in ("inputs", "targets", "segment_ids", "positions", "loss_weights")}
        missing = self._rows - len(batch["inputs"])
        return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) if missing else v
                for k, v in batch.items()}


class _JsonRestorable(grain.IterDataset):
    """Makes ConcatThenSplit state survive JSON, as `grain.checkpoint` stores it (grain 0.2.18 bug).

    Its state holds `(-1, -1)` tuples meaning "no remainder"; JSON turns them into lists, which compare
    unequal, so a restore from a state without a remainder silently drops one document.
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonRestorableIterator(self._parent.__iter__())


class _JsonRestorableIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        slices = {key: tuple(value) for key, value in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


class _Take:
    """The documents of `source` at `indices`: a random-access source, so Grain slices it lazily."""

    def __init__(self, source: Sequence[str], indices: np.ndarray):
        self._source = source
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> str:
        return self._source[int(self._indices[index])]


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
    return {
        "inputs": tokens[:-1].astype(np.int32, copy=False),
        "targets": tokens[1:].astype(np.int32, copy=False),
        "segment_ids": segments[:-1].astype(np.int32, copy=False),
        "positions": packed["tokens_positions"][:-1].astype(np.int32, copy=False),
        "loss_weights": same_doc.astype(np.float32),
    }
