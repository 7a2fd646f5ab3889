"""The global data order: every training batch is a function of the config and the step alone.

Row r of every global batch (r < B = data.batch_size) comes from *lane* r. A lane reads the documents at
global positions r, r + B, r + 2B, ... of its *streams* (a stream: the training documents of one source,
or one curriculum stage of it, shuffled anew every epoch and repeated), packs them into `block_size + 1`
token rows, and, for pretraining text, shuffles its rows in windows of W steps. A process builds only
the lanes of the rows its devices hold, so it reads about 1/P of the documents, and the batches do not
depend on the number of processes, devices or workers.

A lane's position is a few integers: how many documents it drew from each stream, the tokens drawn (the
step a mixture schedule is read at), the document in progress and how far into it. The position at the
start of the current window is what a checkpoint keeps, for every lane (`merge_states` joins the
processes' `get_state`s), so any process count
restores it: a process rebuilds the window from there and skips the rows already trained on.

Which stream a lane reads next (a mixture or curriculum) is drawn with a counter-based hash of (seed,
lane, draw), at the weights of the lane's step (its tokens drawn / (block_size + 1)).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxllm import JaxllmError
from jaxllm.data import mixture

# {"tokens"} (pretraining), {"tokens", "mask"} (SFT), or a preference pair: {"tokens", "mask", "lengths"
# [n_chosen, n_rejected]} (+ "ref_logps" [2], "doc_index"), two sequences end to end
Example = dict[str, np.ndarray]
Row = dict[str, np.ndarray]  # _shift's output: inputs, targets, segment_ids, positions, loss_weights

FORMAT = "jaxllm-global-data-order/1"  # the data state a checkpoint holds
_AHEAD = 2  # documents each (lane, stream) has tokenized ahead of need
SFT_BINS = 4  # SFT rows a lane first-fit packs at once
_SFT_WINDOW = 8  # SFT rows a lane packs per window (open rows are flushed at its end)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a lane needs; picklable, so worker processes can read and tokenize documents."""

    streams: tuple[grain.MapDataset, ...]  # random access, endless: position -> document
    tokenize: Callable[[Any], Example]
    weights: mixture.Weights | None  # None: one stream
    batch_size: int
    block_size: int
    window: int  # rows of a lane's window
    sft: bool  # whole examples first-fit packed; else concatenated and cut into rows
    packing: bool  # SFT: several examples per row
    shuffle_seed: int | None  # permutes each text window's rows; None: stream order
    draw_seed: int

    def row_length(self) -> int:
        return self.block_size + 1


class _Reader:
    """Reads and tokenizes (stream, position) documents ahead of need in threads or worker processes."""

    def __init__(self, plan: Plan, num_threads: int, num_workers: int):
        if num_workers:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
            self._pool = cf.ProcessPoolExecutor(
                num_workers, mp_context=ctx, initializer=_init_worker, initargs=(plan.streams, plan.tokenize)
            )
            self._fn = _read_in_worker
        else:
            self._pool = cf.ThreadPoolExecutor(max(num_threads, 1), thread_name_prefix="jaxllm-read")
            self._fn = _Read(plan.streams, plan.tokenize)
        self._futures: dict[tuple[int, int], cf.Future] = {}

    def prefetch(self, stream: int, position: int) -> None:
        key = (stream, position)
        if key not in self._futures:
            self._futures[key] = self._pool.submit(self._fn, stream, position)

    def get(self, stream: int, position: int) -> Example:
        self.prefetch(stream, position)
        return self._futures.pop((stream, position)).result()

    def clear(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()

    def close(self) -> None:
        self.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Read:
    def __init__(self, streams, tokenize):
        self._streams, self._tokenize = streams, tokenize

    def __call__(self, stream: int, position: int) -> Example:
        return self._tokenize(self._streams[stream][position])


_WORKER_READ: _Read | None = None


def _init_worker(streams, tokenize) -> None:
    global _WORKER_READ
    _WORKER_READ = _Read(streams, tokenize)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose training process was killed (no chance to shut the pool down) exits too."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _read_in_worker(stream: int, position: int) -> Example:
    return _WORKER_READ(stream, position)


class _Lane:
    """Lane `r`'s documents: draws the next stream, reads its next document, tracks the position.

    `pos` = [tokens drawn, stream of the document in progress (-1: none), tokens of it consumed,
    documents drawn from stream 0, from stream 1, ...]."""

    def __init__(self, plan: Plan, reader: _Reader, r: int, pos: Sequence[int]):
        self.plan, self.reader, self.r = plan, reader, r
        self._draw_seed = _lane_seed(plan.draw_seed, r)
        self.seek(pos)

    def seek(self, pos: Sequence[int]) -> None:
        """Continues from `pos`, reading the next documents of every stream ahead."""
        self.pos, self._example = [int(x) for x in pos], None  # _example: the document in progress, once read
        for s, count in enumerate(self.pos[3:]):
            for k in range(count, count + _AHEAD):
                self.reader.prefetch(s, self._position(k))

    def _position(self, k: int) -> int:
        return self.r + k * self.plan.batch_size

    def current(self) -> tuple[Example, int]:
        """The document in progress and the tokens of it already used (draws the next when none)."""
        tokens, doc, offset, *counts = self.pos
        if doc < 0:
            doc = self._draw(tokens, sum(counts))
            example = self.reader.get(doc, self._position(counts[doc]))
            counts[doc] += 1
            self.pos = [tokens + len(example["tokens"]), doc, 0, *counts]
            self._example, offset = example, 0
            for k in range(counts[doc], counts[doc] + _AHEAD):
                self.reader.prefetch(doc, self._position(k))
        elif self._example is None:  # restored: read the document in progress again
            self._example = self.reader.get(doc, self._position(counts[doc] - 1))
        return self._example, offset

    def consume(self, n: int) -> None:
        self.pos[2] += n
        if self.pos[2] >= len(self._example["tokens"]):
            self.pos[1], self.pos[2], self._example = -1, 0, None

    def _draw(self, tokens: int, draws: int) -> int:
        if self.plan.weights is None:
            return 0
        cumulative = np.cumsum(self.plan.weights(tokens / self.plan.row_length()))
        u = mixture.uniform(self._draw_seed, draws)
        return min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), len(cumulative) - 1)


def _lane_seed(seed: int, r: int) -> int:
    return int.from_bytes(hashlib.sha256(f"jaxllm-lane-{seed}-{r}".encode()).digest()[:8], "little")


def text_rows(cursor, length: int, count: int | None, pad_last: bool) -> list[dict[str, np.ndarray]]:
    """Up to `count` rows of `length` tokens (None: until the cursor ends): documents concatenated and cut
    across rows; the part of a document cut off starts a new segment (positions from 0) in the next row."""
    rows = []
    while count is None or len(rows) < count:
        pieces, fill = [], 0
        while fill < length:
            got = cursor.current()
            if got is None:
                break
            example, offset = got
            take = min(length - fill, len(example["tokens"]) - offset)
            if take > 0:
                pieces.append((example["tokens"][offset : offset + take], None))
            cursor.consume(take)
            fill += take
        if fill < length and (not pad_last or not pieces):
            break
        rows.append(_row(pieces, length))
        if fill < length:
            break
    return rows


def sft_rows(cursor, length: int, window: int, packing: bool) -> list[dict[str, np.ndarray]]:
    """One window of rows of whole examples, first-fit packed into `SFT_BINS` open rows (one example per
    row without packing); when the window's rows are all open and an example fits none, they are flushed
    and that example waits for the next window. Fewer rows only where the cursor ends. A preference pair
    fits in the first `length - 1` slots, so each sequence's last token is an input, not only a target."""
    done, open_rows, bins = [], [], SFT_BINS if packing else 1  # open: [examples, fill]
    while True:
        got = cursor.current()
        if got is None:
            break
        example, _ = got
        n = len(example["tokens"])
        if n == 0:
            cursor.consume(0)
            continue
        room = length - 1 if "lengths" in example else length
        fit = next((b for b in open_rows if packing and b[1] + n <= room), None)
        if fit is not None:
            fit[0].append(example)
            fit[1] += n
            cursor.consume(n)
            continue
        if len(done) + len(open_rows) >= window:
            break
        if len(open_rows) >= bins:
            done.append(open_rows.pop(0))
        open_rows.append([[example], n])
        cursor.consume(n)
    done += open_rows
    return [_row([seq for e in examples for seq in _sequences(e)], length) for examples, _ in done]


def _sequences(example: Example) -> list[tuple]:
    """(tokens, mask, values at the first position) of each sequence of an example: a pair's are two."""
    if "lengths" not in example:
        return [(example["tokens"], example["mask"], {})]
    cut = int(example["lengths"][0])
    out = []
    for j, part in enumerate((slice(None, cut), slice(cut, None))):
        first = {"ref_logps": example["ref_logps"][j]} if "ref_logps" in example else {}
        if "doc_index" in example:
            first["doc_index"] = example["doc_index"]
        out.append((example["tokens"][part], example["mask"][part], first))
    return out


# Fields a row may carry at each sequence's first position: (dtype, value elsewhere)
FIRST_POSITION_FIELDS = {"ref_logps": (np.float32, 0), "doc_index": (np.int32, -1)}


def pad_row(length: int, fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A row of padding only (segment 0 everywhere: no target counts), with `FIRST_POSITION_FIELDS` `fields`."""
    return _row([], length, fields)


def _row(pieces: Sequence[tuple], length: int, fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Pieces (tokens, mask or None[, {field: value at its first position}]) -> one padded row: tokens,
    segment ids 1, 2, ... (0 = padding), positions from 0 in each."""
    tokens = np.zeros(length, np.int32)
    segments = np.zeros(length, np.int32)
    positions = np.zeros(length, np.int32)
    masks = np.zeros(length, np.int32) if pieces and pieces[0][1] is not None else None
    fields = set(fields) | {k for piece in pieces[:1] for k in (piece[2] if len(piece) > 2 else {})}
    row = {"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions}
    row.update({k: np.full(length, FIRST_POSITION_FIELDS[k][1], FIRST_POSITION_FIELDS[k][0]) for k in fields})
    fill = 0
    for seg, (ids, mask, *first) in enumerate(pieces, 1):
        n = len(ids)
        tokens[fill : fill + n] = ids
        segments[fill : fill + n] = seg
        positions[fill : fill + n] = np.arange(n)
        if masks is not None:
            masks[fill : fill + n] = mask
        for key, value in (first[0] if first else {}).items():
            row[key][fill] = value
        fill += n
    if masks is not None:
        row["mask"] = masks
    return row


class GlobalOrderDataset(grain.IterDataset):
    """The batches of the lanes at `rows` (this process's rows of the global batch), in row order."""

    def __init__(self, plan: Plan, rows: Sequence[int], shift: Callable, num_threads: int, num_workers: int):
        super().__init__()
        self.plan, self.rows, self.shift = plan, list(rows), shift
        self.num_threads, self.num_workers = num_threads, num_workers

    def __iter__(self) -> grain.DatasetIterator:
        return _GlobalOrderIterator(self)

    def __str__(self) -> str:
        return f"GlobalOrderDataset(rows {self.rows[0]}..{self.rows[-1]} of {self.plan.batch_size})"


class _GlobalOrderIterator(grain.DatasetIterator):
    def __init__(self, ds: GlobalOrderDataset):
        super().__init__()
        self._ds, self._plan = ds, ds.plan
        self._reader: _Reader | None = None
        self._lanes: dict[int, _Lane] = {}
        self._step = 0
        self._starts = {r: [0, -1, 0] + [0] * len(ds.plan.streams) for r in ds.rows}  # window-start positions
        self._window: dict[int, list[Row]] | None = None

    def _open(self) -> None:
        if self._reader is None:
            self._reader = _Reader(self._plan, self._ds.num_threads, self._ds.num_workers)
            self._lanes = {r: _Lane(self._plan, self._reader, r, self._starts[r]) for r in self._ds.rows}

    def __next__(self) -> dict[str, np.ndarray]:
        self._open()
        plan = self._plan
        if self._window is None:
            window = self._step // plan.window
            self._window = {r: self._fill(lane, window) for r, lane in self._lanes.items()}
        i = self._step % plan.window
        rows = [self._window[r][i] for r in self._ds.rows]
        self._step += 1
        if self._step % plan.window == 0:
            self._window = None
            self._starts = {r: list(lane.pos) for r, lane in self._lanes.items()}
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def _fill(self, lane: _Lane, window: int) -> list[Row]:
        plan = self._plan
        if plan.sft:
            rows = sft_rows(lane, plan.row_length(), plan.window, plan.packing)
        else:
            rows = text_rows(lane, plan.row_length(), plan.window, pad_last=False)
            if plan.shuffle_seed is not None and plan.window > 1:
                order = np.random.default_rng([plan.shuffle_seed, lane.r, window]).permutation(len(rows))
                rows = [rows[j] for j in order]
        return [self._ds.shift(row) for row in rows]

    def get_state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": self._step,
            "window": self._plan.window,
            "streams": len(self._plan.streams),
            "batch_size": self._plan.batch_size,
            "lanes": {str(r): list(pos) for r, pos in self._starts.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        check_state(state, self._plan)
        self._step = int(state["step"])
        self._starts = {r: [int(x) for x in state["lanes"][str(r)]] for r in self._ds.rows}
        self._window = None
        if self._reader is not None:
            self._reader.clear()
            for r, lane in self._lanes.items():
                lane.seek(self._starts[r])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def check_state(state: Any, plan: Plan) -> None:
    """Refuses a data state this plan cannot continue, saying what differs."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise JaxllmError(
            "the data state is not a global data-order state (saved by another jaxllm version); "
            "resume with the version that saved it"
        )
    saved = (state["batch_size"], state["window"], state["streams"])
    if saved != (plan.batch_size, plan.window, len(plan.streams)):
        raise JaxllmError(
            f"the checkpoint's data order was saved with data.batch_size={saved[0]}, {saved[2]} source streams and "
            f"{saved[1]}-row windows; this config has {plan.batch_size}, {len(plan.streams)} and {plan.window}: "
            "resume with the data settings it was saved with"
        )
    missing = [r for r in range(plan.batch_size) if str(r) not in state["lanes"]]
    if missing:
        raise JaxllmError(
            f"the checkpoint's data state lacks rows {missing[:8]} of the global batch; it is "
            "incomplete: resume from an earlier checkpoint"
        )


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One global state from each process's (each holds the lanes of its rows; they agree on the rest)."""
    merged = dict(states[0], lanes={})
    for state in states:
        if {k: v for k, v in state.items() if k != "lanes"} != {k: v for k, v in merged.items() if k != "lanes"}:
            raise JaxllmError(
                f"processes disagree on the data step ({state['step']} vs {merged['step']}); "
                "every process must run the same config and steps"
            )
        merged["lanes"].update(state["lanes"])
    merged["lanes"] = dict(sorted(merged["lanes"].items(), key=lambda kv: int(kv[0])))
    return merged


class ListCursor:
    """A cursor over a finite sequence of examples (evaluation, split checks)."""

    def __init__(self, examples):
        self._examples = iter(examples)
        self._current: Example | None = None
        self._offset = 0

    def current(self) -> tuple[Example, int] | None:
        if self._current is None:
            self._current, self._offset = next(self._examples, None), 0
            if self._current is None:
                self._examples = iter(())
                return None
        return self._current, self._offset

    def consume(self, n: int) -> None:
        self._offset += n
        if self._offset >= len(self._current["tokens"]):
            self._current = None


def lane_rows(examples, length: int, sft: bool, packing: bool):
    """All rows of `length` tokens a finite lane of `examples` packs into (evaluation): SFT examples whole
    (`packing`: several per row), else text concatenated, its last row padded."""
    cursor = ListCursor(examples)
    if not sft:
        yield from text_rows(cursor, length, None, pad_last=True)
        return
    while rows := sft_rows(cursor, length, _SFT_WINDOW, packing):
        yield from rows


def sft_window(packing: bool) -> int:
    return _SFT_WINDOW if packing else 1
