"""Orbax checkpoints of the train state and the Grain iterator together, so resume is exact."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxllm import JaxllmError, atomic


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
        self.directory = checkpoint_dir(directory)
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
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None) -> Any:
        """Restores onto `abstract_state`'s shardings (any mesh) and rewinds `data_iter` in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise JaxllmError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except JaxllmError:
            raise
        except Exception as e:  # corrupt files, another model's shapes, a missing item
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise JaxllmError(f"checkpoint {self.directory}/{step} is corrupt or does not match this model "
                              f"({reason}); delete it, or use a fresh --workdir") from e
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True at the step the TPU/cluster preemption notice syncs on (all hosts agree)."""
        return bool(self.manager.reached_preemption(step))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(directory: str) -> str:
    """`directory` as Orbax takes it: a local path made absolute, or a gs:// URL. Orbax's TensorStore
    writes arrays to local files and gs:// only, so other URLs are refused (callers check before a run)."""
    if atomic.is_url(directory) and not directory.startswith("gs://"):
        raise JaxllmError(f"checkpoints in {directory!r}: Orbax writes to local paths (a mounted bucket too) "
                          "and gs:// only; use one of those for the workdir")
    return atomic.location(directory)

