"""End to end: a run whose latest checkpoint is damaged sets it aside and trains on past it (1 and 2
processes); a save that fails says so in one line and leaves no temporary folder; metrics.jsonl with
lines that are not records, or from steps the restored checkpoint lacks, never stops a resume; a
refused run leaves no folder behind."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from jaxllm import JaxllmError
from jaxllm.config import load_config
from jaxllm.train.checkpoint import CheckpointConfig, Checkpointer
from jaxllm.train.loop import train
from jaxllm.train.metrics import MetricsWriter, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = [
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
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.progress=false",
    "checkpoint.every=2",
    "checkpoint.keep=5",
    "optim.warmup_steps=2",
    "optim.decay_steps=20",
    "generate.max_new_tokens=0",
    "mesh.data=-1",
]
DAMAGES = {10: "truncated largest file", 8: "_METADATA deleted", 6: "random bytes", 4: "data state damaged"}


def _config(steps, *extra):
    return load_config(os.path.join(ROOT, "configs/tiny.py"), [*OPTIONS, f"train.steps={steps}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained to step 10 with checkpoints at steps 2, 4, ..., 10 (each test damages a copy)."""
    workdir = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxllm-cache"))
        assert train(_config(10), str(workdir))["step"] == 10
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["2", "4", "6", "8", "10"]
    return workdir


def _copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def _largest_file(folder):
    files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
    return max(files, key=os.path.getsize)


def _damage(step_dir, how):
    if how == "truncated largest file":
        path = _largest_file(step_dir)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "_METADATA deleted":
        os.remove(step_dir / "state" / "_METADATA")
    elif how == "random bytes":
        path = _largest_file(step_dir)
        with open(path, "wb") as f:
            f.write(os.urandom(os.path.getsize(path)))
    elif how == "data state damaged":
        path = step_dir / "data" / "metadata"
        with open(path, "wb") as f:
            f.write(os.urandom(os.path.getsize(path)))


def _set_aside(workdir, output, resumed):
    """{step: the folder it was moved to}, from the one-line warnings (process 0's); each folder exists."""
    moved = {}
    for line in output.splitlines():
        if "is unreadable" in line:
            found = re.fullmatch(
                rf"(?:\[p0\] )?warning: checkpoint {re.escape(str(workdir))}/checkpoints/(\d+) "
                rf"is unreadable \((.+)\); moved it to (\S+), resuming from step {resumed}",
                line,
            )
            assert found, line
            assert "TensorStore" not in line and "bound method" not in line and len(line) < 500, line
            step, target = int(found.group(1)), found.group(3)
            assert step not in moved, output[-4000:]  # one line per step, from process 0 alone
            assert re.fullmatch(rf"{step}\.corrupt-\d{{8}}T\d{{6}}Z", os.path.basename(target)), target
            assert os.path.dirname(target) == str(workdir / "checkpoints") and os.path.isdir(target), target
            moved[step] = target
    return moved


def _check_trained_past(workdir, final, corrupt):
    """The run finished at `final` with its checkpoint; the `corrupt` steps' folders are set aside and
    are no steps to Orbax (nor removed by it); every train step is logged once."""
    names = os.listdir(workdir / "checkpoints")
    assert str(final) in names and not any("orbax-checkpoint-tmp" in n for n in names), names
    assert sorted(int(n.split(".")[0]) for n in names if ".corrupt-" in n) == sorted(corrupt), names
    ckpt = Checkpointer(str(workdir / "checkpoints"), CheckpointConfig())  # (a new manager cleans up tmp folders)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    assert steps == [4, 6, 8, 10, final], steps  # checkpoint.keep=5: the steps set aside are saved anew
    assert len([n for n in os.listdir(workdir / "checkpoints") if ".corrupt-" in n]) == len(corrupt)
    logged = [r["step"] for r in read_metrics(str(workdir)) if r["split"] == "train"]
    assert logged == list(range(1, final + 1)), logged


def test_a_run_sets_each_kind_of_unreadable_checkpoint_aside_and_trains_past_it(trained, tmp_path, capfd, caplog):
    """Steps 10, 8, 6, 4 each damaged another way: each is set aside in one line, the run resumes from
    step 2, saves those steps anew and finishes. metrics.jsonl also holds lines that are not records
    and records of the steps after 2: one warning, and each step is logged once in the end."""
    workdir = _copy(trained, tmp_path)
    for step, how in DAMAGES.items():
        _damage(workdir / "checkpoints" / str(step), how)
    with open(workdir / "metrics.jsonl", "ab") as f:
        f.write(
            b'\xff\xfe{"step": 3}\n'
            + b"not json\n"
            + b"42\n"
            + b'{"step": 11, "split": "train", "stale": 1}\n'
            + b'{"step": 12, "spl'
        )  # (a last line cut short: dropped quietly)
    capfd.readouterr()
    assert train(_config(12), str(workdir))["step"] == 12
    err = capfd.readouterr().err
    assert sorted(_set_aside(workdir, err, resumed=2)) == sorted(DAMAGES), err[-4000:]
    orbax = [r.getMessage() for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname]
    assert not orbax, orbax  # Orbax's warnings ("could not be restored ...") go to debug.log, not the terminal
    warnings = [line for line in err.splitlines() if "metrics.jsonl" in line]
    assert len(warnings) == 1 and "skipped 3 lines that are not a metrics record" in warnings[0], err[-3000:]
    assert all(why in warnings[0] for why in ("not UTF-8", "not JSON", "not a record with a step")), warnings
    _check_trained_past(workdir, 12, DAMAGES)
    text = (workdir / "metrics.jsonl").read_bytes().decode("utf-8")  # the garbage and the stale record are gone
    assert not any(json.loads(line).get("stale") for line in text.splitlines())


def test_two_processes_agree_to_set_a_corrupt_checkpoint_aside(trained, tmp_path, capfd):
    from runs import launch_from_root

    workdir = _copy(trained, tmp_path)
    _damage(workdir / "checkpoints" / "10", "truncated largest file")
    cmd = [
        sys.executable,
        "-m",
        "jaxllm.cli",
        "train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.train.steps=12",
    ] + [f"--config.{o}" for o in OPTIONS]
    codes = launch_from_root(cmd, num_processes=2, devices_per_process=2, timeout=300)
    captured = capfd.readouterr()
    out = captured.out + captured.err
    assert codes == [0, 0], out[-4000:]
    assert "4 devices, 2 processes" in out
    assert list(_set_aside(workdir, out, resumed=8)) == [10], out[-4000:]
    _check_trained_past(workdir, 12, [10])


def test_a_failed_save_prints_one_line_and_leaves_no_temporary_folder(trained, tmp_path):
    """The disk is full when step 12 is written (in the background): one line on stderr naming the
    checkpoints that are intact and the debug log; Orbax's tracebacks are in that log, not on stderr."""
    workdir = _copy(trained, tmp_path)
    script = (
        "import errno, sys\n"
        "from orbax.checkpoint._src.serialization import serialization\n"
        "async def full(*args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "serialization.async_serialize_from_host = full\n"
        "from jaxllm.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    cmd = [
        sys.executable,
        "-c",
        script,
        "train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.train.steps=14",
        "--config.checkpoint.async_save=true",
    ] + [f"--config.{o}" for o in OPTIONS]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-5000:]  # no Orbax traceback, no absl error lines
    assert lines[0].startswith(f"jaxllm: error: saving {workdir}/checkpoints/12 failed ([Errno 28] No space left")
    assert "it is not saved, the earlier checkpoints (steps 2, 4, 6, 8, 10) are intact" in lines[0], lines[0]
    assert f"details in {workdir}/debug.log" in lines[0]
    log = open(workdir / "debug.log").read()
    assert "Traceback" in log and "No space left on device" in log
    names = set(os.listdir(workdir / "checkpoints"))
    assert names == {"2", "4", "6", "8", "10"}, names  # no 12.orbax-checkpoint-tmp-*


def test_a_restart_from_step_0_starts_a_fresh_log(tmp_path):
    def run(steps, initial_step):
        with MetricsWriter(
            str(tmp_path), is_primary=True, total_steps=4, initial_step=initial_step, progress=False, tensorboard=False
        ) as writer:
            for step in steps:
                writer.write(step, {"loss": float(step)})

    run([1, 2, 3], 0)  # killed before its first checkpoint
    run([1, 2], 0)  # the restart has nothing to restore
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    run([3, 4], 2)  # resumed from step 2
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_read_metrics_skips_lines_that_are_not_records_in_one_warning(tmp_path):
    with open(tmp_path / "metrics.jsonl", "wb") as f:
        f.write(b'{"step": 1, "loss": 2.0}\n[1, 2]\n{"loss": 3}\n\x80\n{"step": "2"}\n{"step": 2, "loss": 1.5}\n{"st')
    warnings = []
    assert read_metrics(str(tmp_path), warn=warnings.append) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert len(warnings) == 1 and "skipped 4 lines" in warnings[0] and "and 1 more" in warnings[0], warnings


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    cfg = _config(4, "data.block_size=128")  # longer than model.max_seq_len: refused before any work
    with pytest.raises(JaxllmError, match="exceeds model.max_seq_len"):
        train(cfg, str(tmp_path / "new" / "run"))
    assert not os.path.exists(tmp_path / "new")
    (tmp_path / "mine").mkdir()  # a folder the user made is theirs
    with pytest.raises(JaxllmError, match="exceeds model.max_seq_len"):
        train(cfg, str(tmp_path / "mine"))
    assert os.path.isdir(tmp_path / "mine")
