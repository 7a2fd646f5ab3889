"""Experiment trackers: Weights & Biases and MLflow runs fed with exactly the records of metrics.jsonl.

`MetricsWriter` (process 0) owns a `Trackers`: every record it writes to metrics.jsonl goes to each
tracker as `{split}/{name}` (train/loss, val/perplexity, ...) at its step, and the resolved config goes
with the tracker run's start (W&B config; MLflow params, flattened to `model.num_layers` keys). Each
tracker is an optional extra (`pip install 'jaxllm[wandb]'`, `'jaxllm[mlflow]'`); one that is missing, or
that fails to start, log or close, says so in one line and is dropped: a tracker never stops training.

A restart from a checkpoint continues the same tracker run: its id is kept in the workdir (`wandb_id`,
`mlflow_run_id`); a run that starts at step 0 (nothing restored; metrics.jsonl starts anew) starts new ones.
The restart goes back to the last checkpoint, so the steps between it and the last step logged before
are trained, and written to metrics.jsonl, again. A tracker run gets each step once: the steps it holds
already are not sent again (W&B would drop a step below its last one; MLflow would keep both values), so
it keeps the values logged the first time: the same losses (a resume is exact), other timings. The steps
it lacks but metrics.jsonl kept (a tracker first named on the restart, its id file gone, W&B's stream
behind at a kill) are sent first, from metrics.jsonl. What a run holds: MLflow's store and an online W&B
run say; an offline W&B run cannot, so it is taken to hold what metrics.jsonl held (W&B buffers its
offline file: a process killed with SIGKILL can leave that session's last steps, or all, out of it).
"""

from __future__ import annotations

import os
import secrets
import string
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxllm import JaxllmError, atomic

KNOWN = ("tensorboard", "wandb", "mlflow")  # tensorboard: the event files MetricsWriter writes itself
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}  # name -> (module, pip package)


def check(names: Sequence[str], key: str = "train.trackers") -> None:
    """Refuses a tracker name jaxllm does not know (a typo would otherwise log nowhere)."""
    for name in names:
        if name not in KNOWN:
            raise JaxllmError(f"unknown tracker {name!r} in {key}; known: {', '.join(KNOWN)}")


def warn(message: str, kind: str = "warning") -> None:
    """One line on stderr, above the progress bar."""
    from tqdm import tqdm

    tqdm.write(f"jaxllm: {kind}: {message}", file=sys.stderr)


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _run_name(workdir: str) -> str:
    """The workdir's last folder name: the default project / experiment and the run's name."""
    path = workdir.rstrip("/") if atomic.is_url(workdir) else os.path.abspath(workdir)
    return path.rsplit("/", 1)[-1] or "jaxllm"


def _read_id(workdir: str, filename: str) -> str:
    path = atomic.as_path(os.path.join(workdir, filename))
    return path.read_text().strip() if path.exists() else ""


def _write_id(workdir: str, filename: str, run_id: str) -> None:
    atomic.write(os.path.join(workdir, filename), run_id + "\n")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _values(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics: `{split}/{name}` -> number ("nan"/"inf" back to floats)."""
    split, out = record.get("split", "train"), {}
    for key, value in record.items():
        if key in ("step", "split"):
            continue
        try:
            out[f"{split}/{key}"] = float(value)
        except (TypeError, ValueError):  # a text value: not a metric
            continue
    return out


class _WandB:
    """A W&B run named after the workdir, in project `WANDB_PROJECT` (else the workdir's name)."""

    name, id_file = "wandb", "wandb_id"

    def __init__(self, workdir: str, **_):
        self.workdir, self.run = workdir, None

    def start(self, config: Mapping[str, Any], resume: bool) -> int | None:
        """Starts or continues the run; returns the last step it holds (-1: none; None: cannot tell)."""
        import wandb

        stored = _read_id(self.workdir, self.id_file) if resume else ""
        run_id = stored or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        name = _run_name(self.workdir)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or name, name=name, id=run_id, resume="allow")
        self.run.config.update(dict(config), allow_val_change=True)  # a resumed run may change e.g. train.steps
        if not stored:
            _write_id(self.workdir, self.id_file, run_id)
            return -1
        return self.run.step - 1 if self.run.resumed else None  # only W&B's server knows (not offline)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)  # one W&B row per step: train and val at a step merge

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class _MLflow:
    """An MLflow run named after the workdir, in experiment `MLFLOW_EXPERIMENT_NAME` (else the workdir's
    name), on `train.mlflow_tracking_uri`, else `MLFLOW_TRACKING_URI`, else MLflow's default store."""

    name, id_file = "mlflow", "mlflow_run_id"

    def __init__(self, workdir: str, mlflow_tracking_uri: str = "", **_):
        self.workdir, self.uri = workdir, mlflow_tracking_uri
        self.client = self.run_id = None

    def start(self, config: Mapping[str, Any], resume: bool) -> int | None:
        """Starts or continues the run; returns the last step it holds (-1: none)."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri or None)
        stored, run = _read_id(self.workdir, self.id_file) if resume else "", None
        if stored:
            try:
                run = self.client.get_run(stored)
            except MlflowException:  # a run of another tracking store: start a new one here
                run = None
        if run is None:
            name = _run_name(self.workdir)
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
            run = self.client.create_run(experiment_id, run_name=name)
            _write_id(self.workdir, self.id_file, run.info.run_id)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        # params cannot change in MLflow: a resumed run adds the keys it lacks (config.json holds the latest)
        params = [Param(k, v[:6000]) for k, v in _flatten(config).items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        if run.info.run_id != stored:
            return -1
        return max(
            (
                m.step
                for key in ("train/loss", "val/loss")  # every record has its split's loss
                for m in self.client.get_metric_history(self.run_id, key)
            ),
            default=-1,
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


TRACKERS = {"wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The trackers of one run on process 0; each fails alone, with one line, never stopping the run.

    `previous` is metrics.jsonl as found at start (before a resume trims it to `initial_step`).
    """

    def __init__(
        self,
        names: Sequence[str],
        workdir: str,
        *,
        previous: Sequence[Mapping[str, Any]] = (),
        initial_step: int = 0,
        mlflow_tracking_uri: str = "",
    ):
        check(names)
        self._pending = [
            TRACKERS[n](workdir, mlflow_tracking_uri=mlflow_tracking_uri) for n in dict.fromkeys(names) if n in TRACKERS
        ]
        self._live: list[Any] = []
        self._skip_through: dict[str, int] = {}
        self._resume = initial_step > 0  # a run from step 0 (nothing restored) is a new tracker run too
        self._logged_through = max((int(r.get("step", 0)) for r in previous), default=-1)
        self._history = [r for r in previous if r.get("step", 0) <= initial_step] if initial_step > 0 else []

    def start(self, config: Mapping[str, Any]) -> None:
        """Starts (or continues) each tracker's run with the resolved config, and sends it the steps of
        metrics.jsonl it lacks."""
        pending, self._pending = self._pending, []
        for tracker in pending:
            module, package = EXTRAS[tracker.name]
            try:
                __import__(module)
                held = tracker.start(config, resume=self._resume)
            except Exception as e:  # noqa: BLE001  (a tracker never stops training)
                if isinstance(e, ImportError) and e.name == module:
                    warn(
                        f"train.trackers names {tracker.name}, which is not installed (pip install "
                        f"'jaxllm[{tracker.name}]' or pip install {package}); training goes on without it",
                        "note",
                    )
                else:
                    warn(f"the {tracker.name} tracker failed to start ({_why(e)}); training goes on without it")
                    self._close_quietly(tracker)
                continue
            self._live.append(tracker)
            held = self._logged_through if held is None else held
            self._skip_through[tracker.name] = held
            for record in self._history:
                if int(record.get("step", 0)) > held:
                    self._send(tracker, record)

    def write(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl record to every live tracker (not to one whose run holds that step already)."""
        if self._pending:
            self.start({})
        step = int(record.get("step", 0))
        for tracker in list(self._live):
            if step > self._skip_through[tracker.name]:
                self._send(tracker, record)

    def _send(self, tracker, record: Mapping[str, Any]) -> None:
        values = _values(record)
        if not values:
            return
        try:
            tracker.log(int(record.get("step", 0)), values)
        except Exception as e:  # noqa: BLE001
            warn(
                f"the {tracker.name} tracker failed to log step {record.get('step')} ({_why(e)}); training goes "
                "on without it"
            )
            self._live.remove(tracker)
            self._close_quietly(tracker)

    def close(self) -> None:
        live, self._live, self._pending = self._live, [], []
        for tracker in live:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                warn(f"the {tracker.name} tracker failed to close ({_why(e)})")

    @staticmethod
    def _close_quietly(tracker) -> None:
        try:
            tracker.close()
        except Exception:  # noqa: BLE001  (already reported as failed)
            pass


def log_artifacts(
    workdir: str, names: Sequence[str], folders: Mapping[str, str], *, mlflow_tracking_uri: str = ""
) -> None:
    """Logs exported folders (adapter/, merged/, model/) as artifacts of the workdir's MLflow run, on
    process 0; a failure is one warning line."""
    import jax

    if "mlflow" not in names or not folders or jax.process_index() != 0:
        return
    run_id = ""
    try:
        from mlflow.tracking import MlflowClient

        run_id = _read_id(workdir, _MLflow.id_file)
        if not run_id:
            return  # the tracker did not start during training (already reported)
        client = MlflowClient(tracking_uri=mlflow_tracking_uri or None)
        for name, path in folders.items():
            client.log_artifacts(run_id, path, artifact_path=name)
    except ImportError:
        return  # reported when the run started
    except Exception as e:  # noqa: BLE001
        warn(f"the mlflow tracker failed to log the exported folders to run {run_id} ({_why(e)})")
