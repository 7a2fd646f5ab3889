"""Throughput/MFU arithmetic and the metrics writer: metrics.jsonl + TensorBoard + a tqdm bar + the experiment
trackers (W&B, MLflow: `jaxllm.train.trackers`), on process 0 only.

The workdir may be a local path or a URL (gs://...): files go through `jaxllm.atomic`, TensorBoard's
event files too (tensorboardX's own gs:// writer would need google-cloud-storage). On an object store
metrics.jsonl and the event files are rewritten whole every 30 s and at the end (no appends there).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxllm import atomic
from jaxllm.train.trackers import Trackers

# Dense (no sparsity) bf16 peak TFLOP/s of one chip / GPU, keyed by a readable device name.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
}

# (substring of the normalised `device.device_kind`, key above); first match wins, so specific before general.
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("tpu v5 lite", "TPU v5 lite"),
    ("tpu v5e", "TPU v5 lite"),
    ("tpu v5", "TPU v5p"),  # JAX reports v5p as "TPU v5p" (older runtimes: "TPU v5")
    ("tpu v6 lite", "TPU v6 lite"),
    ("tpu v6e", "TPU v6 lite"),
    ("tpu v4", "TPU v4"),
    ("h100 pcie", "H100 PCIe"),
    ("h100", "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    ("h200", "H200"),
    ("a100", "A100"),
)


def peak_tflops(device: Any) -> float | None:
    """Peak bf16 TFLOP/s of a JAX device (or a device_kind string); None for CPU or an unknown chip."""
    if getattr(device, "platform", None) == "cpu":
        return None
    kind = device if isinstance(device, str) else str(getattr(device, "device_kind", ""))
    kind = " ".join(kind.lower().replace("-", " ").replace("_", " ").split())
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            return PEAK_BF16_TFLOPS[key]
    return None


def step_metrics(
    *, step_time_s: float, tokens: int, flops_per_token: float, num_devices: int, peak: float | None
) -> dict[str, float | None]:
    """Throughput of one step: tokens/s, achieved TFLOP/s per device, and MFU against `peak`."""
    if step_time_s <= 0 or num_devices <= 0:
        raise ValueError(f"step_time_s ({step_time_s}) and num_devices ({num_devices}) must be positive")
    tflops_per_device = flops_per_token * tokens / step_time_s / num_devices / 1e12
    return {
        "tokens_per_s": tokens / step_time_s,
        "tflops_per_device": tflops_per_device,
        "mfu": tflops_per_device / peak if peak else None,
    }


def _json_value(value: Any) -> Any:
    """Numbers as JSON numbers; nan/inf as strings so every line stays valid JSON."""
    if isinstance(value, (bool, int, str)):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def read_metrics(workdir: str, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """All records of `workdir/metrics.jsonl`, oldest first ([] when there is none).

    A line that is not a record (not UTF-8, not JSON, not an object with an integer "step": a hand edit,
    a disk fault) is skipped, all such lines reported in one warning (`warn`, default stderr); a last
    line cut short without its newline (the process was killed while writing it) is dropped quietly."""
    path = atomic.as_path(os.path.join(workdir, "metrics.jsonl"))
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records, skipped = [], []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            record, why = None, "not UTF-8"
        except (ValueError, RecursionError):  # not JSON, or past the parser's nesting / digit limits
            record, why = None, "not JSON"
        else:
            step = record.get("step") if isinstance(record, dict) else None
            why = None if isinstance(step, int) and not isinstance(step, bool) else "not a record with a step"
        if why is None:
            records.append(record)
        elif i < len(lines) - 1:  # (the last piece has no newline after it: a write cut short)
            skipped.append(f"line {i + 1}: {why}")
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        (warn or _warn)(
            f"{path}: skipped {len(skipped)} line{'s' if len(skipped) > 1 else ''} that "
            f"{'are' if len(skipped) > 1 else 'is'} not a metrics record ({', '.join(skipped[:3])}{more})"
        )
    return records


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class MetricsWriter:
    """Writes metrics to `workdir/metrics.jsonl`, TensorBoard and a progress bar; no-op off process 0.

    On a restart, records after `initial_step` (all of them when the run starts at step 0) are dropped
    first, by an atomic rewrite that also drops lines that are not records: they came from a run the
    restored checkpoint does not contain, and would otherwise appear twice.
    """

    def __init__(
        self,
        workdir: str,
        *,
        is_primary: bool,
        total_steps: int,
        initial_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
        trackers: Sequence[str] = (),
        mlflow_tracking_uri: str = "",
    ):
        self.workdir = workdir
        self.is_primary = is_primary
        self._trackers: Trackers | None = None  # W&B / MLflow (jaxllm.train.trackers): started by write_config
        self._jsonl = self._tb = self._bar = None
        if not is_primary:
            return
        atomic.as_path(workdir).mkdir(parents=True, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        previous = read_metrics(workdir) if atomic.as_path(path).exists() else None
        if set(trackers) - {"tensorboard"}:  # given the records before a resume trims them: a continued run has them
            self._trackers = Trackers(
                trackers,
                workdir,
                previous=previous or [],
                initial_step=initial_step,
                mlflow_tracking_uri=mlflow_tracking_uri,
            )
        if previous is not None:
            kept = [r for r in previous if r["step"] <= initial_step] if initial_step > 0 else []
            atomic.write(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = atomic.Appender(path)
        if tensorboard:
            from tensorboardX import SummaryWriter, record_writer

            if atomic.is_url(workdir):  # the scheme's event files through `atomic.Appender`
                record_writer.register_writer_factory(workdir.split("://", 1)[0], _EventFiles())

            self._tb = SummaryWriter(
                logdir=os.path.join(workdir, "tensorboard"), flush_secs=30, purge_step=initial_step + 1
            )
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=1.0,
                unit="step",
            )

    def write(self, step: int, metrics: Mapping[str, float | None], *, prefix: str = "train") -> None:
        """Records one step's metrics under `prefix` ("train", "val"); None values are skipped."""
        if not self.is_primary:
            return
        values = {k: v for k, v in metrics.items() if v is not None}
        record = {"step": int(step), "split": prefix, **{k: _json_value(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._trackers is not None:
            self._trackers.write(record)
        if self._tb is not None:
            for name, value in values.items():
                if not isinstance(value, str):
                    self._tb.add_scalar(f"{prefix}/{name}", float(value), global_step=int(step))
        if self._bar is not None and prefix == "train":
            postfix = {}
            if "loss" in values:
                postfix["loss"] = f"{float(values['loss']):.4f}"
            if "tokens_per_s" in values:
                postfix["tok/s"] = f"{float(values['tokens_per_s']):,.0f}"
            self._bar.set_postfix(postfix, refresh=False)
            self.advance(step)

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step` between metric lines (cheap: tqdm redraws at most once a second)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def log(self, message: str) -> None:
        """Prints a line above the progress bar (process 0 only)."""
        if not self.is_primary:
            return
        from tqdm import tqdm

        tqdm.write(message)

    def write_config(self, config: str | Mapping[str, Any]) -> None:
        """Saves the resolved config as `workdir/config.json`, atomically so a crash never leaves half a file."""
        if not self.is_primary:
            return
        text = config if isinstance(config, str) else json.dumps(config, indent=2, sort_keys=True, default=str)
        atomic.write(os.path.join(self.workdir, "config.json"), text if text.endswith("\n") else text + "\n")
        if self._trackers is not None:
            self._trackers.start(json.loads(text))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush(force=True)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes everything; safe to call twice."""
        for part in (self._bar, self._tb, self._jsonl, self._trackers):
            if part is not None:
                part.close()
        self._jsonl = self._tb = self._bar = self._trackers = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _EventFiles:
    """tensorboardX's writer factory for a URL scheme: event files through `atomic.Appender`."""

    def open(self, path: str) -> atomic.Appender:
        return atomic.Appender(path)

    def directory_check(self, path: str) -> None:
        atomic.as_path(path).mkdir(parents=True, exist_ok=True)
