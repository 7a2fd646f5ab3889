"""Experiment trackers through W&B's and MLflow's own code, offline: a tiny `jaxllm train` run logged to a
W&B offline run (read back from its .wandb files) and to an MLflow file store holds what metrics.jsonl
holds; a restart from an earlier checkpoint continues both runs without logging a step twice;
`jaxllm finetune --log mlflow` logs the exported model; a tracker that fails or is missing never stops
training; unknown tracker names are refused."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

from wandb.proto import wandb_internal_pb2  # noqa: E402

from jaxllm import JaxllmError  # noqa: E402
from jaxllm.config import load_config  # noqa: E402
from jaxllm.train.metrics import MetricsWriter, read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "model.num_layers=2",
    "model.embed_dim=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.mlp_dim=128",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.vocab_size=512",
    "data.block_size=32",
    "data.batch_size=8",
    "train.log_every=1",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.progress=false",
    "checkpoint.every=4",
    "generate.max_new_tokens=0",
]
DETERMINISTIC = ("loss", "lr", "grad_norm", "tokens", "perplexity")  # equal on a replayed step; timings are not


def _env(root, cache: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    return dict(
        env,
        WANDB_MODE="offline",
        WANDB_DIR=str(root),
        WANDB_CACHE_DIR=str(root / "wandb-cache"),
        WANDB_CONFIG_DIR=str(root / "wandb-config"),
        WANDB_DATA_DIR=str(root / "wandb-data"),
        MLFLOW_TRACKING_URI=f"file:{root}/mlruns",
        MLFLOW_ALLOW_FILE_STORE="true",  # MLflow 3 keeps file stores behind this switch
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        PYTHONPATH=ROOT,
        JAXLLM_CACHE_DIR=cache or os.environ["JAXLLM_CACHE_DIR"],
    )  # the session's tokenizer cache


def _jaxllm(env, *argv):
    """`jaxllm ...` in a process of its own (one CPU device: compiles fast); its result is stdout's last line."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def wandb_records(path: str) -> list:
    """The records of a .wandb file (W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks
    with a CRC-32 over kind + data), parsed with W&B's own protobuf schema."""
    data = open(path, "rb").read()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), data[:7]
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_session(run_dir: str) -> dict:
    """One offline session's run record, config and history ({step: {key: value}})."""
    (path,) = [os.path.join(run_dir, f) for f in os.listdir(run_dir) if f.endswith(".wandb")]
    out = {"run": None, "config": {}, "history": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            out["history"][record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


def _expected(records) -> dict:
    """metrics.jsonl records as W&B / MLflow rows: {step: {split/name: value}}."""
    rows = {}
    for r in records:
        rows.setdefault(r["step"], {}).update(
            {f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "split")}
        )
    return rows


def _assert_rows(got: dict, want: dict, keys=None):
    assert sorted(got) == sorted(want)
    for step in want:
        names = [k for k in want[step] if keys is None or k.split("/", 1)[1] in keys]
        assert names and {k: got[step][k] for k in names} == pytest.approx(
            {k: want[step][k] for k in names}, rel=1e-6
        ), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step `jaxllm train` run logged to W&B and MLflow; its last checkpoint (6) deleted; then resumed
    by `jaxllm finetune` to step 8 from checkpoint 4 (steps 5 and 6 are trained and written to
    metrics.jsonl a second time) and exported."""
    root = tmp_path_factory.mktemp("trackers")
    env, workdir = _env(root, str(tmp_path_factory.getbasetemp() / "jaxllm-cache")), root / "tinyrun"
    overrides = [f"--config.{o}" for o in (*SMALL, "train.trackers=('wandb','mlflow')")]
    _jaxllm(env, "train", "--config=configs/tiny.py", f"--workdir={workdir}", *overrides, "--config.train.steps=6")
    first = {
        "records": read_metrics(str(workdir)),
        "wandb_id": (workdir / "wandb_id").read_text().strip(),
        "mlflow_run_id": (workdir / "mlflow_run_id").read_text().strip(),
        "sessions": sorted(os.listdir(root / "wandb")),
    }
    shutil.rmtree(workdir / "checkpoints" / "6")
    proc, result = _jaxllm(
        env, "finetune", "--config=configs/tiny.py", f"--project_name={workdir}", "--max_steps=8", *overrides
    )
    assert "resumed from" in proc.stdout + proc.stderr
    return {
        "root": root,
        "workdir": workdir,
        "first": first,
        "records": read_metrics(str(workdir)),
        "written": result["written"],
    }


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(runs):
    first = runs["first"]
    (session_dir,) = [d for d in first["sessions"] if d.startswith("offline-run-")]
    session = wandb_session(str(runs["root"] / "wandb" / session_dir))
    assert session["run"].run_id == first["wandb_id"] and session_dir.endswith(first["wandb_id"])
    assert (session["run"].project, session["run"].display_name) == ("tinyrun", "tinyrun")  # the workdir's name
    assert session["config"]["model"]["num_layers"] == 2 and session["config"]["train"]["steps"] == 6
    want = _expected(first["records"])
    assert sorted(want) == list(range(1, 7)) and "val/loss" in want[4] and "train/grad_norm" in want[1]
    _assert_rows(session["history"], want)  # every metric at its step, train/ and val/ as in metrics.jsonl
    assert not (runs["workdir"] / "tensorboard").exists()  # a tracker like the others: not named, not written


def test_one_wandb_run_spans_a_restart_without_a_step_twice(runs):
    first, records = runs["first"], runs["records"]
    assert (runs["workdir"] / "wandb_id").read_text().strip() == first["wandb_id"]
    sessions = sorted(d for d in os.listdir(runs["root"] / "wandb") if d.startswith("offline-run-"))
    assert len(sessions) == 2 and all(d.endswith("-" + first["wandb_id"]) for d in sessions)
    before, after = (wandb_session(str(runs["root"] / "wandb" / d)) for d in sessions)
    assert after["run"].run_id == first["wandb_id"] and after["config"]["train"]["steps"] == 8
    # steps 5 and 6 ran again from checkpoint 4: the W&B run keeps the first values, and gets 7 and 8 now
    assert sorted(after["history"]) == [7, 8]
    final = _expected(records)
    _assert_rows(after["history"], {s: final[s] for s in (7, 8)})
    _assert_rows(
        {s: before["history"][s] for s in (5, 6)}, {s: final[s] for s in (5, 6)}, DETERMINISTIC
    )  # an exact resume: the kept values are the losses metrics.jsonl now holds


def test_mlflow_run_holds_metrics_jsonl_and_continues_after_a_restart(runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    first, records = runs["first"], runs["records"]
    run_id = (runs["workdir"] / "mlflow_run_id").read_text().strip()
    assert run_id == first["mlflow_run_id"]  # one MLflow run across the restart
    client = MlflowClient(f"file:{runs['root']}/mlruns")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tinyrun"
    assert client.get_experiment(run.info.experiment_id).name == "tinyrun"
    assert run.data.params["model.num_layers"] == "2" and run.data.params["optim.learning_rate"] == "0.003"
    assert run.data.params["train.steps"] == "6"  # MLflow params are set once; config.json holds the latest
    logged = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            assert key not in logged.get(m.step, {}), f"{key} logged twice at step {m.step}"
            logged.setdefault(m.step, {})[key] = m.value
    kept, final = _expected(first["records"]), _expected(records)
    assert sorted(logged) == list(range(1, 9))
    _assert_rows({s: logged[s] for s in range(1, 7)}, kept)  # the first run's values, val at 6 included
    _assert_rows({s: logged[s] for s in (7, 8)}, {s: final[s] for s in (7, 8)})


def test_finetune_logs_the_exported_model_to_the_mlflow_run(runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert set(runs["written"]) == {"model"}  # lora.r=0: the whole model, as a Hugging Face folder
    client = MlflowClient(f"file:{runs['root']}/mlruns")
    files = {f.path for f in client.list_artifacts(runs["first"]["mlflow_run_id"], "model")}
    assert {"model/config.json", "model/model.safetensors"} <= files, files


def test_a_tracker_failing_at_start_warns_once_and_the_run_finishes(tmp_path):
    workdir = tmp_path / "run"
    proc, result = _jaxllm(
        _env(tmp_path),
        "train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *[
            f"--config.{o}"
            for o in (
                *SMALL,
                "train.steps=3",
                "train.trackers=('tensorboard','mlflow')",
                "train.mlflow_tracking_uri=bogus://nowhere",
            )
        ],
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("jaxllm: warning:")]
    assert len(warnings) == 1 and "the mlflow tracker failed to start" in warnings[0], proc.stderr[-2000:]
    assert "bogus://nowhere" in warnings[0] and "training goes on without it" in warnings[0]
    assert result["step"] == 3 and [r["step"] for r in read_metrics(str(workdir)) if r["split"] == "train"] == [1, 2, 3]
    assert os.listdir(workdir / "tensorboard")  # the other trackers go on
    assert not (workdir / "mlflow_run_id").exists()


def test_a_tracker_failing_mid_run_warns_once_and_metrics_go_on(tmp_path, capsys, monkeypatch):
    """The MLflow store vanishes after the run started: one warning, then MLflow is left out."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store, workdir = tmp_path / "mlruns", str(tmp_path / "run")
    with MetricsWriter(
        workdir,
        is_primary=True,
        total_steps=4,
        progress=False,
        tensorboard=False,
        trackers=("mlflow",),
        mlflow_tracking_uri=f"file:{store}",
    ) as writer:
        writer.write_config({"model": {"num_layers": 2}, "seed": 0})
        writer.write(1, {"loss": 2.0, "lr": float("nan")})
        run_id = open(os.path.join(workdir, "mlflow_run_id")).read().strip()
        history = MlflowClient(f"file:{store}").get_metric_history(run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == [(1, 2.0)]
        shutil.rmtree(store)
        for step in (2, 3, 4):
            writer.write(step, {"loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("jaxllm: warning:") == 1 and "the mlflow tracker failed to log step 2" in err, err
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]


def test_an_uninstalled_tracker_is_a_one_line_note_with_the_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    with MetricsWriter(
        str(tmp_path), is_primary=True, total_steps=1, progress=False, tensorboard=False, trackers=("wandb",)
    ) as writer:
        writer.write_config({"seed": 0})
        writer.write(1, {"loss": 2.0})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllm: note: train.trackers names wandb, which is not installed")
    assert "pip install 'jaxllm[wandb]'" in lines[0]
    assert read_metrics(str(tmp_path))[0]["loss"] == 2.0 and not (tmp_path / "wandb_id").exists()


def test_unknown_tracker_names_are_refused_in_one_line():
    import argparse

    from jaxllm.autotrain import add_arguments, flags_to_config
    from jaxllm.train.start import parse

    cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), ["train.trackers=('tensorboard','wandbb')"])
    with pytest.raises(JaxllmError) as info:
        parse(cfg)
    assert str(info.value) == "unknown tracker 'wandbb' in train.trackers; known: tensorboard, wandb, mlflow"
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(JaxllmError, match=r"^--log comet is not a tracker; use none, tensorboard, wandb, mlflow$"):
        flags_to_config(p.parse_args(["--config", os.path.join(ROOT, "configs/tiny.py"), "--log", "comet"]), [])
    for flag, trackers in (("none", ()), ("wandb", ("wandb",)), ("tensorboard", ("tensorboard",))):
        cfg, _ = flags_to_config(p.parse_args(["--config", os.path.join(ROOT, "configs/tiny.py"), "--log", flag]), [])
        assert tuple(cfg.train.trackers) == trackers
    assert tuple(load_config(os.path.join(ROOT, "configs/tiny.py")).train.trackers) == ("tensorboard",)


def test_a_tracker_run_new_on_a_resume_gets_the_kept_history_first(tmp_path, monkeypatch):
    """MLflow first named when a run resumes from step 2 of 4 logged: its new run gets steps 1-2 from
    metrics.jsonl, then the steps trained now, as metrics.jsonl holds them."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    workdir, uri = str(tmp_path / "run"), f"file:{tmp_path}/mlruns"
    with MetricsWriter(workdir, is_primary=True, total_steps=4, progress=False, tensorboard=False) as writer:
        for step in (1, 2, 3, 4):
            writer.write(step, {"loss": float(step)})
    with MetricsWriter(
        workdir,
        is_primary=True,
        total_steps=4,
        initial_step=2,
        progress=False,
        tensorboard=False,
        trackers=("mlflow",),
        mlflow_tracking_uri=uri,
    ) as writer:
        writer.write_config({"seed": 0})
        for step in (3, 4):
            writer.write(step, {"loss": 10.0 + step})
    run_id = open(os.path.join(workdir, "mlflow_run_id")).read().strip()
    history = [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")]
    assert (
        history == [(r["step"], r["loss"]) for r in read_metrics(workdir)] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    )


def test_a_continued_tracker_run_gets_the_steps_it_lacks_and_no_step_twice(tmp_path, monkeypatch):
    """MLflow holds steps 1-2, metrics.jsonl 1-4 (steps 3-4 ran without it); a resume from step 3 sends
    MLflow step 3 from metrics.jsonl and the retrained step 4, and leaves 1-2 as they were."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    workdir, uri = str(tmp_path / "run"), f"file:{tmp_path}/mlruns"
    options = dict(is_primary=True, total_steps=4, progress=False, tensorboard=False, mlflow_tracking_uri=uri)
    with MetricsWriter(workdir, trackers=("mlflow",), **options) as writer:
        writer.write_config({"seed": 0})
        for step in (1, 2):
            writer.write(step, {"loss": float(step)})
    with MetricsWriter(workdir, initial_step=2, **options) as writer:
        for step in (3, 4):
            writer.write(step, {"loss": float(step)})
    with MetricsWriter(workdir, initial_step=3, trackers=("mlflow",), **options) as writer:
        writer.write_config({"seed": 0})
        writer.write(4, {"loss": 14.0})
        writer.write(4, {"loss": 24.0}, prefix="val")
    client = MlflowClient(uri)
    run_id = open(os.path.join(workdir, "mlflow_run_id")).read().strip()
    assert [run.info.run_id for run in client.search_runs([client.get_run(run_id).info.experiment_id])] == [run_id]
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert (
        history
        == [(r["step"], r["loss"]) for r in read_metrics(workdir) if r["split"] == "train"]
        == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0)]
    )
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")] == [(4, 24.0)]


def test_a_run_from_step_0_starts_new_tracker_runs(tmp_path, monkeypatch):
    """Nothing restored (checkpoint.resume=false, or no checkpoint yet): metrics.jsonl and the tracker run
    both start anew; the earlier MLflow run keeps its steps."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    workdir, uri = str(tmp_path / "run"), f"file:{tmp_path}/mlruns"
    options = dict(
        is_primary=True, total_steps=2, progress=False, tensorboard=False, trackers=("mlflow",), mlflow_tracking_uri=uri
    )
    run_ids = []
    for loss in (5.0, 3.0):
        with MetricsWriter(workdir, **options) as writer:
            writer.write_config({"seed": 0})
            writer.write(1, {"loss": loss})
        run_ids.append(open(os.path.join(workdir, "mlflow_run_id")).read().strip())
    assert run_ids[0] != run_ids[1]
    client = MlflowClient(uri)
    assert [[(m.step, m.value) for m in client.get_metric_history(r, "train/loss")] for r in run_ids] == [
        [(1, 5.0)],
        [(1, 3.0)],
    ]


def test_one_wandb_run_spans_a_preemption_kill_and_resume(tmp_path):
    """SIGTERM mid-run (a preemption: the run checkpoints and exits), then the same command again: both
    offline sessions are the one W&B run, and together they hold every step of metrics.jsonl once."""
    from runs import preempt_when

    env, workdir = _env(tmp_path), tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "jaxllm.cli",
        "train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *[
            f"--config.{o}"
            for o in (
                *SMALL,
                "train.eval_every=0",
                "checkpoint.every=0",
                "optim.decay_steps=500",
                "train.trackers=wandb",
            )
        ],
    ]
    proc = subprocess.Popen(
        [*argv, "--config.train.steps=500"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = preempt_when(proc, lambda: len(read_metrics(str(workdir), warn=lambda line: None)) >= 3)
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["preempted"] and 3 <= stopped["step"] < 500
    end = stopped["step"] + 2
    _jaxllm(env, *argv[3:], f"--config.train.steps={end}")
    run_id = (workdir / "wandb_id").read_text().strip()
    sessions = sorted(d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-"))
    assert len(sessions) == 2 and all(d.endswith("-" + run_id) for d in sessions)
    before, after = (wandb_session(str(tmp_path / "wandb" / d)) for d in sessions)
    assert before["run"].run_id == after["run"].run_id == run_id
    assert not set(before["history"]) & set(after["history"])  # no step twice
    _assert_rows({**before["history"], **after["history"]}, _expected(read_metrics(str(workdir))))
    assert sorted(after["history"]) == list(range(stopped["step"] + 1, end + 1))
