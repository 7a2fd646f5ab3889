"""Metrics: peak-FLOP lookup, MFU arithmetic, and what MetricsWriter leaves on disk."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from types import SimpleNamespace

import jax
import pytest
from etils import epath
from tensorboardX.proto import event_pb2

from jaxllm import JaxllmError
from jaxllm.train.metrics import MetricsWriter, peak_tflops, read_metrics, step_metrics


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5e", 197.0),
        ("TPU v5p", 459.0),
        ("TPU v5", 459.0),
        ("TPU v6 lite", 918.0),
        ("TPU v6e", 918.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("nvidia h100-pcie", 756.0),
        ("NVIDIA H200", 989.0),
        ("Some Future Chip", None),
    ],
)
def test_peak_tflops_matches_device_kind(kind, expected):
    assert peak_tflops(SimpleNamespace(platform="gpu", device_kind=kind)) == expected
    assert peak_tflops(kind) == expected


def test_peak_tflops_is_none_on_cpu():
    assert peak_tflops(jax.devices("cpu")[0]) is None


def test_step_metrics_arithmetic():
    # 6 GFLOP/token * 2048 tokens / 0.5 s / 4 devices = 6.144 TFLOP/s per device; 6.144 / 197 peak.
    m = step_metrics(step_time_s=0.5, tokens=2048, flops_per_token=6e9, num_devices=4, peak=197.0)
    assert m["tokens_per_s"] == pytest.approx(4096.0)
    assert m["tflops_per_device"] == pytest.approx(6.144)
    assert m["mfu"] == pytest.approx(6.144 / 197.0)
    assert step_metrics(step_time_s=1.0, tokens=1, flops_per_token=1.0, num_devices=1, peak=None)["mfu"] is None
    with pytest.raises(ValueError):
        step_metrics(step_time_s=0.0, tokens=1, flops_per_token=1.0, num_devices=1, peak=None)


def _read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """A minimal TFRecord reader: u64 length, u32 crc, payload, u32 crc; payloads are Event protos."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    files = list(epath.Path(logdir).glob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            assert len(payload) == length, "truncated record"
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_writer_jsonl_tensorboard_and_config(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, is_primary=True, total_steps=10, progress=True) as writer:
        writer.write_config({"model": {"num_layers": 2}, "seed": 0})
        writer.write(1, {"loss": 2.5, "tokens_per_s": 1000.0, "mfu": None})
        writer.write(2, {"loss": float("nan"), "grad_norm": float("inf")})
        writer.write(2, {"loss": 2.25}, prefix="val")
        writer.log("hello")
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]  # every line is strict JSON
    assert lines == [
        {"step": 1, "split": "train", "loss": 2.5, "tokens_per_s": 1000.0},
        {"step": 2, "split": "train", "loss": "nan", "grad_norm": "inf"},
        {"step": 2, "split": "val", "loss": 2.25},
    ]
    assert read_metrics(workdir) == lines
    assert json.loads((tmp_path / "config.json").read_text()) == {"model": {"num_layers": 2}, "seed": 0}
    assert not glob.glob(str(tmp_path / "config.json.tmp*"))

    scalars = _read_scalars(str(tmp_path / "tensorboard"))
    assert scalars["train/loss"][0] == (1, 2.5)
    assert scalars["train/loss"][1][0] == 2 and math.isnan(scalars["train/loss"][1][1])
    assert scalars["val/loss"] == [(2, 2.25)]
    assert scalars["train/tokens_per_s"] == [(1, 1000.0)]
    assert "train/mfu" not in scalars


def test_writer_config_from_json_string(tmp_path):
    with MetricsWriter(str(tmp_path), is_primary=True, total_steps=1, progress=False, tensorboard=False) as w:
        w.write_config(json.dumps({"a": 1}))
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


def test_non_primary_writer_writes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    with MetricsWriter(workdir, is_primary=False, total_steps=10) as writer:
        writer.write_config({"a": 1})
        writer.write(1, {"loss": 1.0})
        writer.log("quiet")
    assert not os.path.exists(workdir)
    assert read_metrics(workdir) == []


def test_resume_drops_records_the_checkpoint_does_not_contain(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, is_primary=True, total_steps=6, progress=False) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    # The checkpoint was at step 3; steps 4-5 are re-run after the restart.
    with MetricsWriter(workdir, is_primary=True, total_steps=6, initial_step=3, progress=False) as writer:
        for step in range(4, 7):
            writer.write(step, {"loss": 10.0 + step})
    assert [(r["step"], r["loss"]) for r in read_metrics(workdir)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 14.0),
        (5, 15.0),
        (6, 16.0),
    ]


def test_object_store_workdir(memory_root):
    """A URL workdir (memory:// standing in for gs://): metrics.jsonl, config.json and TensorBoard events
    are written there, metrics.jsonl is whole at every forced flush, and resume trims it as locally."""
    workdir = memory_root
    with MetricsWriter(workdir, is_primary=True, total_steps=6, progress=False) as writer:
        writer.write_config({"seed": 1})
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
        writer.flush()
        assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5]
    root = epath.Path(workdir)
    assert json.loads((root / "config.json").read_text()) == {"seed": 1}
    assert _read_scalars(str(root / "tensorboard"))["train/loss"] == [(s, float(s)) for s in range(1, 6)]
    with MetricsWriter(workdir, is_primary=True, total_steps=6, initial_step=3, progress=False) as writer:
        writer.write(4, {"loss": 14.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(workdir)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0)]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp objects left behind


def test_unknown_scheme_and_missing_filesystem_package_are_user_errors(monkeypatch):
    with pytest.raises(JaxllmError, match="nosuch:// is not a filesystem"):
        MetricsWriter("nosuch://bucket/run", is_primary=True, total_steps=1)
    import fsspec

    from jaxllm import atomic

    def missing(protocol):
        raise ImportError(protocol)

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    monkeypatch.setattr(atomic, "_check_backend", atomic._check_backend.__wrapped__)
    monkeypatch.setattr(atomic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(JaxllmError, match=r"gs:// paths need the gcsfs package: pip install gcsfs"):
        MetricsWriter("gs://bucket/run", is_primary=True, total_steps=1)
