"""Orbax checkpoints of the train state and the global data-order state together, so resume is exact.

The data item is one JSON document for the whole job (`jaxllm.data.lanes`: every row's lane position),
gathered from all processes at save time and written once, so a checkpoint resumes on any number of
processes and any mesh.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxllm import JaxllmError, atomic
from jaxllm.config import check_number
from jaxllm.data import lanes

_PER_PROCESS_DATA = re.compile(r"process_(\d+)-of-(\d+)\.json$")  # grain's per-process iterator files


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`CheckpointConfig(**cfg.checkpoint)`."""

    every: int = 100  # save every N steps (and always at the end and on preemption); 0 = end only
    keep: int = 2  # most recent checkpoints kept
    keep_best: int = 1  # checkpoints with the lowest validation loss kept besides the recent ones
    async_save: bool = True  # write in a background thread while training goes on
    resume: bool = True  # continue from the latest checkpoint in the workdir if there is one
    init_from: str = ""  # a fresh run starts from these params: a Hugging Face folder or `jaxllm convert` output
    preemption_deadline_s: float = 120.0  # after SIGTERM: seconds to write the checkpoint in; 0 = no limit
    model_from_init: bool = False  # take the model's shapes from init_from's config (the model section then
    #                                sets only run switches: dtype, remat, scan_layers, dropout, ...)

    def __post_init__(self):
        check_number("checkpoint.preemption_deadline_s", self.preemption_deadline_s, low=0)  # 0 = no limit
        check_number("checkpoint.every", self.every, low=0, integer=True)
        check_number("checkpoint.keep", self.keep, low=1, integer=True)
        check_number("checkpoint.keep_best", self.keep_best, low=0, integer=True)


class Checkpointer:
    """A `CheckpointManager` whose items are the state (`StandardSave`) and the global data state (JSON).

    Restoring the latest checkpoint falls back past unreadable ones (truncated, missing a file): once
    every process agrees one is unreadable, process 0 moves it aside to `<step>.corrupt-<UTC time>` (kept
    for a post-mortem, never deleted; Orbax does not take that name for a step), says so in one line,
    and the newest that reads whole is used, so the run saves that step again and goes on. A save that
    fails (disk full, permission denied, a background writer's error) stops the run at once with a
    one-line `JaxllmError`; that step is never taken for saved, its temporary folder is removed, and
    the earlier checkpoints are left as they were. Orbax's own log records (warnings, tracebacks) go
    to `debug.log` beside the checkpoint folder, not to the terminal.
    """

    def __init__(self, directory: str, cfg: CheckpointConfig, warn: Callable[[str], None] | None = None):
        self.directory = checkpoint_dir(directory)
        policies = [pp.LatestN(max(cfg.keep, 1))]
        if cfg.keep_best > 0:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m["val_loss"],
                    reverse=True,
                    n=cfg.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.cfg = cfg
        self.warn = warn or _warn
        self._pending: int | None = None  # the step an async save is writing
        self._failed = False
        suffix = "" if jax.process_index() == 0 else f".process_{jax.process_index()}"
        self.debug_log = _DebugLog(f"{os.path.dirname(self.directory)}/debug{suffix}.log")
        logging.getLogger("absl").addFilter(self.debug_log)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None, *, val_loss: float | None = None) -> None:
        self.check()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = ocp.args.JsonSave(global_data_state(data_iter.get_state()))
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:  # disk full, no permission, ...: the step's folder stays a temporary one
            self._fail(step, e)
        self._pending = step if self.cfg.async_save else None

    def check(self) -> None:
        """Raises now if a background save has finished with an error (call once a step)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Waits for a background save; raises if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._fail(step, e)

    def _fail(self, step: int | None, error: BaseException) -> None:
        self._failed = True
        self.debug_log.write(f"saving step {step} failed:\n" + "".join(traceback.format_exception(error)))
        self._remove_unfinished(step)
        kept = [s for s in _finished_steps(self.directory) if step is None or s < step]
        errno_ = _errno(error)
        if errno_ == errno.ENOSPC:
            fix = "free disk space (or lower checkpoint.keep)"
        elif errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make {self.directory} writable"
        else:
            fix = "fix the cause"
        what = f"{self.directory}/{step}" if step is not None else f"a checkpoint in {self.directory}"
        if kept:
            then = (
                f"the earlier checkpoint{'s' if len(kept) > 1 else ''} (step{'s' if len(kept) > 1 else ''} "
                f"{', '.join(map(str, kept))}) {'are' if len(kept) > 1 else 'is'} intact: {fix}, then rerun to "
                f"resume from step {kept[-1]}"
            )
        else:
            then = f"there is no earlier checkpoint: {fix}, then rerun to start over"
        raise JaxllmError(
            f"saving {what} failed ({_reason(error)}); it is not saved, {then} (details in {self.debug_log.path})"
        ) from error

    def _remove_unfinished(self, step: int | None) -> None:
        """Removes the failed save's temporary folder (locally `<step>.orbax-checkpoint-tmp-*`; on gs://
        the step's folder without its commit file), so no half checkpoint is left behind."""
        if jax.process_index() != 0:
            return
        root = atomic.as_path(self.directory)
        prefix = "" if step is None else f"{step}."
        try:
            for path in list(root.iterdir()):
                unfinished = (path.name.startswith(prefix) and ".orbax-checkpoint-tmp" in path.name) or (
                    atomic.is_url(self.directory)
                    and path.name == str(step)
                    and not (path / "commit_success.txt").exists()
                )
                if unfinished:
                    path.rmtree()
        except OSError as e:  # the disk that failed the save may fail this too; the next run's manager retries
            self.debug_log.write(f"removing the unfinished checkpoint folder failed: {e!r}")

    def restore(
        self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None, *, set_aside: bool = False
    ) -> Any:
        """Restores onto `abstract_state`'s shardings (any mesh) and rewinds `data_iter` in place.

        `step` None: the newest checkpoint that reads whole, each unreadable newer one reported with
        `warn` (and, with `set_aside`, a training run's, moved aside so the run can save that step
        again); a checkpoint of another model or data config stops at once (older ones are no better)."""
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps or steps[0] is None:
            raise JaxllmError(f"no checkpoint in {self.directory}")
        found: list[tuple[int, str]] = []
        for i, s in enumerate(steps):
            if data_iter is not None:
                self._refuse_per_process_data(s)
            restored, reason = self._try_restore(s, abstract_state, data_iter)
            if reason is None:
                if data_iter is not None:
                    data_iter.set_state(restored["data"])
                for bad, why in found if set_aside else ():  # newer than `s`: the run saves those steps anew
                    self._set_aside(bad, why, s)
                return restored["state"]
            found.append((s, reason))
            if not set_aside and i + 1 < len(steps):
                self.warn(f"checkpoint {self.directory}/{s} is unreadable ({reason}); trying step {steps[i + 1]}")
        listed = "; ".join(f"step {s}: {why}" for s, why in found)
        raise JaxllmError(
            f"no checkpoint in {self.directory} can be restored, each is corrupt or incomplete "
            f"({listed}); move them away to start over, or use a fresh --workdir"
        )

    def _set_aside(self, step: int, reason: str, resumed: int) -> None:
        """Moves unreadable checkpoint `step` (every process agreed) to `<step>.corrupt-<UTC time>`:
        process 0 renames it while the others wait, then every manager forgets the step."""
        source = f"{self.directory}/{step}"
        target = f"{source}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        error = None
        if jax.process_index() == 0:
            n = 1
            while atomic.as_path(target + (f"-{n}" if n > 1 else "")).exists():
                n += 1
            target += f"-{n}" if n > 1 else ""
            try:
                atomic.as_path(source).rename(atomic.as_path(target))
            except OSError as e:
                error = e.strerror or str(e)
        if jax.process_count() > 1:
            moved = multihost_utils.process_allgather(np.array([error is None]))
            error = error or (None if bool(np.all(moved)) else "process 0 could not rename it")
        if error:
            raise JaxllmError(
                f"checkpoint {source} is unreadable ({reason}) and cannot be moved aside ({error}); "
                "move it out of the checkpoints folder, then rerun"
            )
        self.manager.reload()
        self.warn(f"checkpoint {source} is unreadable ({reason}); moved it to {target}, resuming from step {resumed}")

    def _try_restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> tuple[Any, str | None]:
        """(restored items, None), or (None, why step is unreadable) as every process agrees."""
        restored, reason = None, None
        try:
            saved = self.manager.item_metadata(step)["state"]
            if saved is None:
                raise FileNotFoundError("state/_METADATA is missing")
            saved_shapes = sorted(tuple(m.shape) for m in jax.tree.leaves(saved.tree))
        except Exception as e:  # a metadata file missing or truncated
            reason = f"its metadata does not read: {_reason(e)}"
        reason = _agreed(reason)  # no process starts a restore that another skips
        if reason is None:
            if saved_shapes != sorted(tuple(a.shape) for a in jax.tree.leaves(abstract_state)):
                raise JaxllmError(
                    f"checkpoint {self.directory}/{step} does not match this model (its arrays have "
                    "other shapes); resume with the model config it was saved with, or use a fresh "
                    "--workdir"
                )
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                items["data"] = ocp.args.JsonRestore()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                if data_iter is not None and not isinstance(restored["data"], dict):
                    reason = "its data state is missing"
            except Exception as e:  # truncated or missing array files, a missing item
                reason = _reason(e)
        reason = _agreed(reason)  # all resume from the same step, or none does
        return (restored, None) if reason is None else (None, reason)

    def _refuse_per_process_data(self, step: int) -> None:
        """An older jaxllm saved one data-iterator file per process; this one cannot continue those."""
        folder = os.path.join(self.directory, str(step), "data")
        names = os.listdir(folder) if os.path.isdir(folder) else []
        counts = {int(m.group(2)) for m in map(_PER_PROCESS_DATA.search, names) if m}
        if counts:
            n = max(counts)
            raise JaxllmError(
                f"checkpoint {self.directory}/{step} holds per-process data-iterator state ({n} process "
                f"file{'s' if n > 1 else ''}, an older jaxllm's format), which this version's global data order "
                f"cannot continue: resume it with {n} process{'es' if n > 1 else ''} and the jaxllm version that "
                "wrote it (its checkpoint is intact)"
            )

    def reached_preemption(self, step: int) -> bool:
        """True at the step the TPU/cluster preemption notice syncs on (all hosts agree)."""
        return bool(self.manager.reached_preemption(step))

    def close(self) -> None:
        """Waits for a background save (raising if it failed) and releases the manager."""
        try:
            if not self._failed:
                self.wait()
        finally:
            if not self._failed:
                self.manager.close()
            logging.getLogger("absl").removeFilter(self.debug_log)
            self.debug_log.close()


def _agreed(reason: str | None) -> str | None:
    """`reason` (None: this process reads the checkpoint), made the same decision on every process."""
    if jax.process_count() == 1:
        return reason
    ok = multihost_utils.process_allgather(np.array([reason is None]))
    return "another process cannot read it" if reason is None and not bool(np.all(ok)) else reason


class _DebugLog(logging.Filter):
    """Diverts Orbax's log records (warnings, the tracebacks of a failed save or restore) from the
    terminal to a file, opened at the first record (a clean run writes none); jaxllm says what failed,
    and what it did about it, in one line."""

    _FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(pathname)s:%(lineno)d: %(message)s")

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._file: atomic.Appender | None = None
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        self.write(self._FORMAT.format(record))
        return False

    def write(self, text: str) -> None:
        with self._lock:
            if self._file is None:
                self._file = atomic.Appender(self.path)
            self._file.write(text.rstrip("\n") + "\n")
            self._file.flush(force=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _finished_steps(directory: str) -> list[int]:
    """Steps whose folders are finished checkpoints (not an interrupted save's temporary folder)."""
    try:
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    except OSError:
        return []


def _errno(error: BaseException | None) -> int | None:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno:
            return error.errno
        text = str(error)
        if "No space left" in text:
            return errno.ENOSPC
        if "Permission denied" in text:
            return errno.EACCES
        if "Read-only file system" in text:
            return errno.EROFS
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _reason(error: BaseException) -> str:
    """The error's first line, cut to a readable length; for an array that does not read, TensorStore's
    own message (which file, what is wrong) instead of the spec dump Orbax wraps around it."""
    text = str(error).strip()
    if "See full TensorStore details" in text:  # "error while reading array index ...", then the spec
        cause, depth = error, 0
        while (cause.__cause__ or cause.__context__) is not None and depth < 10:
            cause, depth = cause.__cause__ or cause.__context__, depth + 1
        text = str(cause).strip() if cause is not error else text.split(" See full TensorStore details")[0]
        text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 240 else line[:237] + "..."


def global_data_state(local: dict[str, Any]) -> dict[str, Any]:
    """Every process's data state (the lanes of its rows) joined into the job's one state."""
    if jax.process_count() == 1:
        return lanes.merge_states([local])
    payload = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return lanes.merge_states([json.loads(bytes(row[:size]).decode()) for row, size in zip(gathered, sizes)])


def checkpoint_dir(directory: str) -> str:
    """`directory` as Orbax takes it: a local path made absolute, or a gs:// URL. Orbax's TensorStore
    writes arrays to local files and gs:// only, so other URLs are refused (callers check before a run)."""
    if atomic.is_url(directory) and not directory.startswith("gs://"):
        raise JaxllmError(
            f"checkpoints in {directory!r}: Orbax writes to local paths (a mounted bucket too) "
            "and gs:// only; use one of those for the workdir"
        )
    return atomic.location(directory)
