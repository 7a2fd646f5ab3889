"""Orbax checkpoints of the train state and the global data-order state together, so resume is exact.

The data item is one JSON document for the whole job (`jaxllm.data.lanes`: every row's lane position),
gathered from all processes at save time and written once, so a checkpoint resumes on any number of
processes and any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxllm import JaxllmError
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
    model_from_init: bool = False  # take the model's shapes from init_from's config (the model section then
    #                                sets only run switches: dtype, remat, scan_layers, dropout, ...)


class Checkpointer:
    """A `CheckpointManager` whose items are the state (`StandardSave`) and the data iterator."""

    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        policies = [pp.LatestN(max(cfg.keep, 1))]
        if cfg.keep_best > 0:
            policies.append(pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=cfg.keep_best,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None, *, val_loss: float | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = ocp.args.JsonSave(global_data_state(data_iter.get_state()))
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None) -> Any:
        """Restores onto `abstract_state`'s shardings (any mesh) and rewinds `data_iter` in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise JaxllmError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            self._refuse_per_process_data(step)
            items["data"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except JaxllmError:
            raise
        except Exception as e:  # corrupt files, another model's shapes, a missing item
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise JaxllmError(f"checkpoint {self.directory}/{step} is corrupt or does not match this model "
                              f"({reason}); delete it, or use a fresh --workdir") from e
        if data_iter is not None:
            data_iter.set_state(restored["data"])
        return restored["state"]

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
                "wrote it (its checkpoint is intact)")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True at the step the TPU/cluster preemption notice syncs on (all hosts agree)."""
        return bool(self.manager.reached_preemption(step))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def global_data_state(local: dict[str, Any]) -> dict[str, Any]:
    """Every process's data state (the lanes of its rows) joined into the job's one state."""
    if jax.process_count() == 1:
        return lanes.merge_states([local])
    payload = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return lanes.merge_states([json.loads(bytes(row[:size]).decode()) for row, size in zip(gathered, sizes)])


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
