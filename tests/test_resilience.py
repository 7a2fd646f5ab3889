"""End to end: runs killed at random moments (a step, a checkpoint write, an evaluation, start-up) and
restarted, on 1 or 2 processes, log exactly the losses of an uninterrupted run; a process whose peer
died stops by itself in seconds with a one-line error (benchmarks/kill_soak.py, a short soak)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import kill_soak  # noqa: E402


def test_short_kill_soak_loses_nothing_and_never_hangs(tmp_path):
    report = kill_soak.main(
        [
            "--kills_single=2",
            "--kills_multi=3",
            "--multi_moments=steps,save,eval",
            "--seed=1",
            f"--workdir={tmp_path}",
            "--hang_timeout_s=300",
            "--lost_timeout_s=60",
        ]
    )
    assert report["hangs"] == 0 and report["failed_restarts"] == 0 and report["leftover_processes"] == 0, report
    assert report["kills"] + report["finished_before_kill"] == 5 and report["kills"] >= 4, report
    assert {"save", "eval"} <= set(report["moments"]), report  # a kill while writing and while evaluating
    # survivors of a dead peer stop by themselves, saying why, well within the heartbeat bound
    assert report["survivor_messages"] == len(report["survivor_exit_s"]) >= 2, report
    assert max(report["survivor_exit_s"]) < 45, report
    for part in ("single", "multi"):
        assert report[part]["all_equal"] and report[part]["losses_compared"] >= 10, report


def _wait_records(soak, workdir, procs, n, timeout=400):
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(soak._records(workdir)) >= n or any(p.poll() is not None for p in procs):
            return
        time.sleep(0.05)


@pytest.mark.parametrize("notified", [(1,), (0, 1)])
def test_sigterm_to_one_or_all_processes_saves_once_on_every_host_and_exits_zero(tmp_path, notified):
    """A preemption notice reaching one or both hosts: both checkpoint the same step and exit 0 in time;
    the run resumes from there (on another host count) with the uninterrupted run's losses."""
    import signal
    import time

    soak = kill_soak.Soak(str(tmp_path), 0, 300, 60, [])
    workdir = str(tmp_path / "run")
    procs = soak.start(workdir, kill_soak.ENDLESS, 2)
    _wait_records(soak, workdir, procs, 6)
    t0 = time.monotonic()
    for p in notified:
        procs[p].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], open(tmp_path / "run0.p0.log").read()[-3000:]
    assert time.monotonic() - t0 < 120  # checkpoint.preemption_deadline_s
    log = open(tmp_path / "run0.p0.log").read()
    stopped = max(r["step"] for r in soak._records(workdir) if r["split"] == "train")
    assert f"preemption signal: checkpoint saved at step {stopped}; exiting" in log
    assert str(stopped) in os.listdir(os.path.join(workdir, "checkpoints"))
    steps = stopped + 4
    assert soak.finish(workdir, steps, 1) and soak.finish(str(tmp_path / "ref"), steps, 1, keep=False)
    result = kill_soak.compare(soak._records(workdir), soak._records(str(tmp_path / "ref")))
    assert result["all_equal"] and result["losses_compared"] >= steps, result


def test_a_second_sigterm_exits_at_once(tmp_path):
    import signal
    import time

    kill_soak.OPTIONS = kill_soak.OPTIONS + ["train.eval_every=1", "train.eval_batches=200"]  # slow evaluations
    try:
        soak = kill_soak.Soak(str(tmp_path), 0, 300, 60, [])
        procs = soak.start(str(tmp_path / "run"), kill_soak.ENDLESS, 1)
    finally:
        kill_soak.OPTIONS = kill_soak.OPTIONS[:-2]
    _wait_records(soak, str(tmp_path / "run"), procs, 2)
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t0 = time.monotonic()
    procs[0].send_signal(signal.SIGTERM)
    code = procs[0].wait(timeout=30)
    assert time.monotonic() - t0 < 10 and code == 128 + signal.SIGTERM
    assert "a second SIGTERM: exiting now, without a checkpoint" in open(tmp_path / "run0.p0.log").read()


def test_a_preemption_checkpoint_late_for_its_deadline_exits_without_it():
    import subprocess

    script = (
        "import os, signal, time\n"
        "from jaxllm.train.loop import _StopFlag\n"
        "stop = _StopFlag(deadline_s=0.5)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.05)\n"
        "assert stop.requested\n"
        "time.sleep(30)  # a save that never finishes\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "not written within checkpoint.preemption_deadline_s=0.5; exiting without it" in result.stderr


def test_a_background_save_failing_mid_run_stops_the_run_at_once(tmp_path, monkeypatch):
    """Disk full while an async checkpoint is written: `train` stops at the step after the failed save
    with the one-line error, the step is not saved, and the run resumes from the checkpoint before it."""
    import errno
    import threading
    import time

    from orbax.checkpoint._src.serialization import serialization

    from jaxllm import JaxllmError
    from jaxllm.config import load_config
    from jaxllm.train.checkpoint import Checkpointer
    from jaxllm.train.loop import train
    from jaxllm.train.metrics import read_metrics

    overrides = [o for o in kill_soak.OPTIONS if not o.startswith(("distributed.", "mesh."))] + [
        "checkpoint.async_save=true",
        "mesh.data=-1",
    ]
    cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), [*overrides, "train.steps=30"])
    original = serialization.async_serialize_from_host

    writer_failed = threading.Event()

    async def full_on_second_save(*args, **kwargs):
        if os.path.isdir(tmp_path / "checkpoints" / "4"):  # the first checkpoint is whole; then the disk is full
            writer_failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(*args, **kwargs)

    original_check = Checkpointer.check

    def check_once_the_writer_is_done(self):
        # the writer thread's timing depends on machine load: let the failing background save finish
        # before the step's real check, so the step at which the run must stop is exact
        if self._pending not in (None, 4):
            assert writer_failed.wait(120)
            deadline = time.monotonic() + 120
            while self.manager.is_saving_in_progress() and time.monotonic() < deadline:
                time.sleep(0.01)
        original_check(self)

    monkeypatch.setattr(serialization, "async_serialize_from_host", full_on_second_save)
    monkeypatch.setattr(Checkpointer, "check", check_once_the_writer_is_done)
    with pytest.raises(JaxllmError) as info:
        train(cfg, str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "failed ([Errno 28] No space left on device); it is not saved" in message
    failed = int(message.split("/checkpoints/")[1].split(" ")[0])
    last_step = max(r["step"] for r in read_metrics(str(tmp_path)) if r["split"] == "train")
    assert last_step == failed, (failed, last_step)  # the next step stops the run: not one more is logged
    assert failed == 8 and sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [4]
    monkeypatch.undo()
    result = train(load_config(os.path.join(ROOT, "configs/tiny.py"), [*overrides, "train.steps=12"]), str(tmp_path))
    assert result["step"] == 12
