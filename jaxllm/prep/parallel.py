"""An order-keeping, bounded-memory process-pool map: the one piece of prep that uses all cores."""

from __future__ import annotations

import collections
import itertools
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_WORKER_FN: Callable | None = None  # set once per worker process by the pool initializer


def _init_worker(fn: Callable) -> None:
    global _WORKER_FN  # pylint: disable=global-statement
    _WORKER_FN = fn


def _call_worker(item: Any) -> Any:
    return _WORKER_FN(item)


def parallel_map(fn: Callable, items: Iterable, workers: int, inflight_per_worker: int = 4) -> Iterator:
    """`map(fn, items)` over `workers` spawned processes, results in input order, at most
    `workers * inflight_per_worker` items read ahead (memory stays flat); in-process for workers <= 1."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(fn,)) as pool:
        for item in items:
            pending.append(pool.apply_async(_call_worker, (item,)))
            if len(pending) >= workers * inflight_per_worker:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def batched(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch
