"""Multi-process start-up: join the JAX distributed runtime on pods, SLURM and local N-process runs.

`initialize` must run before anything touches a JAX backend (even `jax.devices()`), so the train loop
calls it first. Importing this module changes no JAX state.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import JaxllmError

MODES = ("auto", "none", "explicit")
CPU_COLLECTIVES = ("gloo", "mpi")

# Set by `launch_local` (and readable by anyone launching processes by hand) for "auto" mode.
ENV_COORDINATOR = "JAXLLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLLM_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXLLM_LOCAL_DEVICE_IDS"  # optional, comma-separated
# Set by launch/tpu_pod.sh: GCE TPU VMs reached over ssh carry no topology env vars (JAX reads the metadata server).
ENV_TPU_POD = "JAXLLM_TPU_POD"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """`DistributedConfig(**cfg.distributed)`: how this process finds the others."""

    mode: str = "auto"  # "auto": env vars / SLURM / TPU pod, else single process; "none"; "explicit": fields below
    coordinator_address: str = ""  # "host:port" of process 0 (explicit mode)
    num_processes: int = 0  # total processes (explicit mode)
    process_id: int = -1  # this process, 0..num_processes-1 (explicit mode)
    local_device_ids: tuple[int, ...] = ()  # accelerators this process owns; () = all visible
    cpu_collectives: str = "gloo"  # cross-process collectives on the CPU backend: "gloo" or "mpi"
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a process counts as lost; the others then stop
    shutdown_timeout: int = 60  # seconds a finishing process waits for the others at exit

    def __post_init__(self):
        if self.mode not in MODES:
            raise JaxllmError(f"distributed.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise JaxllmError(
                f"distributed.cpu_collectives={self.cpu_collectives!r}; use one of {', '.join(CPU_COLLECTIVES)}"
            )
        for name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise JaxllmError(
                    f"distributed.{name} must be a positive number of seconds, got {getattr(self, name)!r}"
                )
        if self.mode == "explicit":
            _check_explicit(self)


def _check_explicit(cfg: DistributedConfig) -> None:
    host, _, port = cfg.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise JaxllmError(
            f"distributed.coordinator_address={cfg.coordinator_address!r} must be host:port "
            "of process 0 in explicit mode, e.g. --config.distributed.coordinator_address=10.0.0.1:1234"
        )
    if cfg.num_processes < 1:
        raise JaxllmError("explicit distributed mode needs --config.distributed.num_processes=N (N >= 1)")
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise JaxllmError(
            f"distributed.process_id={cfg.process_id} must be in [0, {cfg.num_processes}); "
            "set --config.distributed.process_id for each process"
        )


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise JaxllmError(f"environment variable {name}={os.environ[name]!r} must be an integer") from None


def config_from_env(base: DistributedConfig) -> DistributedConfig | None:
    """The explicit config described by JAXLLM_* env vars, or None when they are not all set."""
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    present = [n for n in names if os.environ.get(n)]
    if not present:
        return None
    if len(present) != len(names):
        missing = ", ".join(n for n in names if n not in present)
        raise JaxllmError(f"{', '.join(present)} set but {missing} missing; set all three or none")
    ids = os.environ.get(ENV_LOCAL_DEVICE_IDS, "")
    try:
        local_ids = tuple(int(i) for i in ids.split(",") if i.strip())
    except ValueError:
        raise JaxllmError(f"{ENV_LOCAL_DEVICE_IDS}={ids!r} must be comma-separated integers") from None
    return dataclasses.replace(
        base,
        mode="explicit",
        coordinator_address=os.environ[ENV_COORDINATOR],
        num_processes=_env_int(ENV_NUM_PROCESSES),
        process_id=_env_int(ENV_PROCESS_ID),
        local_device_ids=local_ids or base.local_device_ids,
    )


def _under_multitask_slurm() -> bool:
    try:
        return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def _slurm_local_device_ids(cfg: DistributedConfig) -> list[int] | None:
    """All of a node's GPUs when SLURM runs one task per node.

    Left to itself JAX gives each SLURM task only GPU `SLURM_LOCALID`, right for one task per GPU but a
    silent 1/8 of an 8-GPU host with one task per node. None = let JAX decide.
    """
    if cfg.local_device_ids:
        return list(cfg.local_device_ids)
    nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or ""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or ""
    if not (nodes.isdigit() and tasks.isdigit()) or nodes != tasks:
        return None
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = len(visible) or int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0)
    return list(range(count)) if count else None


def _on_multihost_tpu() -> bool:
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")) or bool(os.environ.get(ENV_TPU_POD))


def _join(cfg: DistributedConfig, **kwargs) -> None:
    """`jax.distributed.initialize(**kwargs)` with `cfg`'s CPU collectives (only the CPU client reads the
    flag; gloo is JAX 0.10's default, but it is set so "mpi" takes effect and the choice is visible here) and
    timeouts: how long to wait for processes to join, to hear a heartbeat (a process silent longer is lost:
    the coordination service fails every other's pending barrier and stops it) and for the others at exit."""
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    try:
        jax.distributed.initialize(
            initialization_timeout=cfg.initialization_timeout,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
            shutdown_timeout_seconds=cfg.shutdown_timeout,
            **kwargs,
        )
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise JaxllmError(
                "jaxllm.distributed.initialize ran after JAX was already used (e.g. jax.devices()); call it first"
            ) from e
        raise


def initialize(cfg: DistributedConfig) -> None:
    """Joins the distributed runtime `cfg` describes; a second call is a no-op."""
    if cfg.mode == "none" or jax.distributed.is_initialized():
        return
    if cfg.mode == "auto":
        explicit = config_from_env(cfg)
        if explicit is None:
            if _under_multitask_slurm() or _on_multihost_tpu():  # JAX reads SLURM_* / TPU metadata itself
                _join(cfg, local_device_ids=_slurm_local_device_ids(cfg) if _under_multitask_slurm() else None)
            return
        cfg = explicit
    # (explicit fields were validated when the config was built.) "deactivate": explicit means explicit;
    # SLURM/OMPI env vars must not silently rewrite our settings.
    _join(
        cfg,
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=list(cfg.local_device_ids) or None,
        cluster_detection_method="deactivate",
    )


# Errors a collective or the coordination service raises when another process has gone away.
_LOST_PEER = (
    "gloo",
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "heartbeat",
    "unavailable",
    "deadline_exceeded",
    "barrier",
    "coordination service",
    "socket closed",
)


def lost_peer(error: BaseException) -> bool:
    """Whether `error` (raised in a multi-process run) says another process has died or been cut off."""
    if not jax.distributed.is_initialized() or jax.process_count() == 1 or isinstance(error, JaxllmError):
        return False
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, (RuntimeError, ValueError, OSError)) and any(s in text for s in _LOST_PEER)


def exit_lost_peer(error: BaseException, code: int = 3) -> None:
    """Says in one line that another process is gone and ends this one now: a normal exit would wait
    at the shutdown barrier for the dead process (and then abort)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    print(
        f"jaxllm: error: process {jax.process_index()} of {jax.process_count()} lost contact with another "
        f"process ({first[:300]}); it has died or been cut off, so this one stops too: restart every process "
        "to resume from the latest checkpoint",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(code)


def is_primary() -> bool:
    """Process 0 writes metrics, configs and logs; the others stay quiet. Before (or without) joining a
    distributed runtime this process is the only one, and no JAX backend is started to find that out."""
    if not jax.distributed.is_initialized():
        return True
    return _state().process_id == 0


def _state():
    from jax._src import distributed as _distributed  # pylint: disable=g-import-not-at-top

    return _distributed.global_state


_agreements = [0]  # every process makes the same calls in the same order, so the n-th key is the same everywhere


def broadcast_str(value: str, timeout_s: int = 3600) -> str:
    """Process 0's `value`, on every process, through the coordination service's key-value store (no
    device collective: usable before any JAX backend starts). A single process gets its own value."""
    if not jax.distributed.is_initialized():
        return value
    _agreements[0] += 1
    key, client = f"jaxllm/agree/{_agreements[0]}", _state().client
    if _state().process_id == 0:
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, timeout_s * 1000)


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches the barrier `name` (a no-op on a single process)."""
    if jax.distributed.is_initialized():
        _agreements[0] += 1
        _state().client.wait_at_barrier(f"jaxllm/{name}/{_agreements[0]}", timeout_s * 1000)


def until_all_done(batches: Iterable[dict]) -> Iterator[dict]:
    """`batches`, then, while another process still has some, batches of the last one's shapes that count
    nothing (zeros: segment 0, weight 0), so every process takes part in every step of a pass."""
    last = None
    for batch in itertools.chain(batches, itertools.repeat(None)):
        if jax.process_count() > 1:  # hosts may run out at different batches: go on while any has rows
            if not bool(np.any(multihost_utils.process_allgather(np.array([batch is not None])))):
                return
            batch = {k: np.zeros_like(v) for k, v in last.items()} if batch is None else batch
        elif batch is None:
            return
        last = batch
        yield batch


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _child_env(
    base: Mapping[str, str], process_id: int, num_processes: int, devices_per_process: int, port: int
) -> dict[str, str]:
    env = dict(base)
    env.update(
        {ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(process_id)}
    )
    if not env.get("JAX_PLATFORMS"):  # a laptop rehearsal by default; JAX_PLATFORMS=cuda splits local GPUs
        env["JAX_PLATFORMS"] = "cpu"
    if env["JAX_PLATFORMS"].split(",")[0].strip() == "cpu":
        flags = [
            f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
        ]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    else:  # one host's accelerators split between the processes
        first = process_id * devices_per_process
        env[ENV_LOCAL_DEVICE_IDS] = ",".join(str(i) for i in range(first, first + devices_per_process))
    return env


def _pump(stream: IO[bytes], prefix: str, lock: threading.Lock, out: IO[str]) -> None:
    """Copies a child's stream line by line with a prefix (stdout and stderr apart, so lines stay whole)."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the survivors, then SIGKILL: a peer of a dead process blocks in collectives forever."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            _kill_group(p, signal.SIGKILL)
            p.wait()


def launch_local(
    command: list[str],
    num_processes: int,
    devices_per_process: int = 1,
    port: int = 0,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    grace_s: float = 5.0,
) -> list[int]:
    """Runs `command` as N cooperating JAX processes on this machine; returns their exit codes.

    Each child gets JAXLLM_* env vars that `initialize` (mode "auto") turns into a 127.0.0.1 cluster.
    If one child fails (or `timeout` seconds pass) the rest are stopped so the call never hangs.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise JaxllmError("launch_local needs num_processes >= 1 and devices_per_process >= 1")
    if not command:
        raise JaxllmError("launch_local needs a command to run, e.g. -- jaxllm train --config=...")
    port = port or free_port()
    base = {**os.environ, **(env or {})}
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    try:
        for pid in range(num_processes):
            proc = subprocess.Popen(
                command,
                env=_child_env(base, pid, num_processes, devices_per_process, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # own process group: killing it takes grandchildren
            procs.append(proc)
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                pump = threading.Thread(target=_pump, args=(stream, f"[p{pid}] ", lock, out), daemon=True)
                pump.start()
                pumps.append(pump)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]  # poll every child: `any(...)` would stop at the first live one
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes) or (deadline is not None and time.monotonic() > deadline):
                _stop(procs, grace_s)
                break
            time.sleep(0.05)
    finally:  # KeyboardInterrupt or a failed start: leave no orphans
        _stop(procs, grace_s)
        for pump in pumps:
            pump.join(timeout=5)
    return [p.returncode for p in procs]
