"""`jaxllm` run as a user runs it, for the end-to-end tests: on N local processes from the project root
(configs/... paths are relative to it), and stopped by a preemption notice once it has done enough."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

from jaxllm.distributed import launch_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_from_root(cmd: list[str], num_processes: int, devices_per_process: int, timeout: float) -> list[int]:
    """Each process's exit status of `cmd` on `num_processes` local processes, started in the project root."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return launch_local(cmd, num_processes=num_processes, devices_per_process=devices_per_process, timeout=timeout)
    finally:
        os.chdir(cwd)


def preempt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> tuple[str, str]:
    """Sends SIGTERM to `proc` once `ready()` holds (or it has ended); its (stdout, stderr) after it exits."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=timeout)
