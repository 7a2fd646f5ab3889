"""Distributed start-up: a real two-process CPU cluster through launch_local and "auto" mode."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import pytest

from jaxllm import JaxllmError
from jaxllm.distributed import DistributedConfig, initialize, launch_local, lost_peer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}

TWO_PROCESS_SCRIPT = """
import os
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxllm.distributed import DistributedConfig, initialize, is_primary

initialize(DistributedConfig())  # "auto": picks up the JAXLLM_* variables launch_local set
initialize(DistributedConfig())  # idempotent
assert jax.process_count() == 2, jax.process_count()
assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
assert is_primary() == (jax.process_index() == 0)

mesh = Mesh(np.array(jax.devices()), ("d",))
local = np.full((2,), jax.process_index() + 1, np.float32)  # process 0 holds [1, 1], process 1 holds [2, 2]
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local, (4,))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
assert float(total) == 6.0, float(total)
ids = multihost_utils.process_allgather(np.array([10 + jax.process_index()]))
assert ids.ravel().tolist() == [10, 11], ids
# A file per process, not stdout: Gloo's C++ logging shares the child's stdout and can split a printed line.
with open(os.path.join(os.environ["RESULT_DIR"], f"p{jax.process_index()}"), "w") as f:
    f.write(f"OK {jax.process_index()} {float(total)}")
"""


def test_two_processes_reduce_across_hosts(capsys, tmp_path):
    codes = launch_local(
        [sys.executable, "-c", TWO_PROCESS_SCRIPT],
        num_processes=2,
        devices_per_process=2,
        env={**ENV, "RESULT_DIR": str(tmp_path)},
        timeout=300,
    )
    out = capsys.readouterr().out
    assert codes == [0, 0], out
    assert [(tmp_path / f"p{i}").read_text() for i in range(2)] == ["OK 0 6.0", "OK 1 6.0"], out


def test_failing_process_stops_the_others(capsys):
    script = (
        "import os, sys\n"
        "from jaxllm.distributed import DistributedConfig, initialize\n"
        "if os.environ['JAXLLM_PROCESS_ID'] == '1': sys.exit(3)\n"
        "initialize(DistributedConfig())  # blocks: process 1 never joins\n"
    )
    start = time.monotonic()
    codes = launch_local([sys.executable, "-c", script], num_processes=2, env=ENV, timeout=600, grace_s=2)
    assert codes[1] == 3
    assert codes[0] != 0  # stopped, not finished
    assert time.monotonic() - start < 300  # stopped when process 1 failed, not at the 600 s deadline


def test_timeout_stops_everything():
    start = time.monotonic()
    codes = launch_local([sys.executable, "-c", "import time; time.sleep(60)"], num_processes=2, timeout=1, grace_s=1)
    assert all(c < 0 for c in codes), codes
    assert time.monotonic() - start < 45  # killed at the deadline, not left to finish the 60 s sleep


def test_child_environment(capsys, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # launch_local defaults it to cpu
    script = (
        "import os; print(os.environ['JAXLLM_COORDINATOR_ADDRESS'], os.environ['JAXLLM_NUM_PROCESSES'], "
        "os.environ['JAXLLM_PROCESS_ID'], os.environ['JAX_PLATFORMS'], os.environ.get('XLA_FLAGS', '-'), "
        "os.environ.get('JAXLLM_LOCAL_DEVICE_IDS', '-'))"
    )
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"}
    assert launch_local([sys.executable, "-c", script], num_processes=2, devices_per_process=3, port=4321, env=env) == [
        0,
        0,
    ]
    lines = sorted(capsys.readouterr().out.splitlines())
    flags = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3"
    assert lines == [f"[p0] 127.0.0.1:4321 2 0 cpu {flags} -", f"[p1] 127.0.0.1:4321 2 1 cpu {flags} -"]

    # On accelerators each process owns its own slice of the host's devices.
    assert launch_local(
        [sys.executable, "-c", script],
        num_processes=2,
        devices_per_process=2,
        port=4321,
        env={"JAX_PLATFORMS": "cuda", "XLA_FLAGS": ""},
    ) == [0, 0]
    lines = sorted(capsys.readouterr().out.splitlines())
    assert [line.split()[-1] for line in lines] == ["0,1", "2,3"]
    assert all(line.split()[4] == "cuda" for line in lines)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "coordinator_address"),
        ({"coordinator_address": "10.0.0.1"}, "host:port"),
        ({"coordinator_address": "10.0.0.1:1234"}, "num_processes"),
        ({"coordinator_address": "10.0.0.1:1234", "num_processes": 2}, "process_id"),
        ({"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 2}, "process_id"),
    ],
)
def test_explicit_mode_missing_fields_is_a_user_error(kwargs, match):
    with pytest.raises(JaxllmError, match=match):
        initialize(DistributedConfig(mode="explicit", **kwargs))
    assert not jax.distributed.is_initialized()


def test_bad_mode_and_collectives_are_user_errors():
    with pytest.raises(JaxllmError, match="mode"):
        DistributedConfig(mode="slurm")
    with pytest.raises(JaxllmError, match="cpu_collectives"):
        DistributedConfig(cpu_collectives="nccl")


def test_timeouts_must_be_positive_seconds():
    for name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        with pytest.raises(JaxllmError, match=f"distributed.{name} must be a positive number of seconds"):
            DistributedConfig(**{name: 0})


def test_explicit_mode_passes_the_heartbeat_and_shutdown_timeouts(joins):
    initialize(
        DistributedConfig(
            mode="explicit",
            coordinator_address="10.0.0.1:1234",
            num_processes=2,
            process_id=1,
            heartbeat_timeout=15,
            shutdown_timeout=7,
        )
    )
    assert joins[0]["heartbeat_timeout_seconds"] == 15 and joins[0]["shutdown_timeout_seconds"] == 7


def test_lost_peer_errors_are_told_apart_only_in_multi_process_runs(monkeypatch):
    gloo = RuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error: Connection reset by peer")
    assert not lost_peer(gloo)  # one process: nothing to lose
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert lost_peer(gloo)
    assert lost_peer(RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Barrier_id: CheckpointManager:save"))
    assert not lost_peer(RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 1.2 GiB"))
    assert not lost_peer(JaxllmError("data.batch_size=3 is not divisible by the 2 processes"))


def test_auto_with_partial_env_is_a_user_error(monkeypatch):
    monkeypatch.setenv("JAXLLM_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.delenv("JAXLLM_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAXLLM_PROCESS_ID", raising=False)
    with pytest.raises(JaxllmError, match="JAXLLM_NUM_PROCESSES"):
        initialize(DistributedConfig())


def test_import_leaves_jax_config_alone():
    script = (
        "import jax\n"
        "jax.config.update('jax_cpu_collectives_implementation', 'mpi')\n"
        "import jaxllm.distributed\n"
        "from jax._src import xla_bridge\n"
        "assert jax.config.jax_cpu_collectives_implementation == 'mpi'\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


_CLUSTER_VARS = (
    "JAXLLM_COORDINATOR_ADDRESS",
    "JAXLLM_NUM_PROCESSES",
    "JAXLLM_PROCESS_ID",
    "JAXLLM_TPU_POD",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_NNODES",
    "SLURM_STEP_NUM_NODES",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_GPUS_ON_NODE",
    "CUDA_VISIBLE_DEVICES",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


@pytest.fixture
def joins(monkeypatch):
    """Records what `initialize` would pass to jax.distributed.initialize, in a clean cluster environment."""
    for name in _CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_auto_under_slurm_one_task_per_node_uses_every_gpu(joins, monkeypatch):
    for k, v in {
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "4",
        "SLURM_NNODES": "4",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }.items():
        monkeypatch.setenv(k, v)
    initialize(DistributedConfig())
    assert joins == [
        {
            "local_device_ids": list(range(8)),
            "initialization_timeout": 300,
            "heartbeat_timeout_seconds": 100,
            "shutdown_timeout_seconds": 60,
        }
    ]


def test_auto_under_slurm_one_task_per_gpu_lets_jax_pick(joins, monkeypatch):
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}.items():
        monkeypatch.setenv(k, v)
    initialize(DistributedConfig(initialization_timeout=60, heartbeat_timeout=20, shutdown_timeout=5))
    assert joins == [
        {
            "local_device_ids": None,
            "initialization_timeout": 60,
            "heartbeat_timeout_seconds": 20,
            "shutdown_timeout_seconds": 5,
        }
    ]


@pytest.mark.parametrize(
    "var, value",
    [
        ("TPU_WORKER_HOSTNAMES", "t-w-0,t-w-1"),
        ("MEGASCALE_COORDINATOR_ADDRESS", "10.0.0.2:8080"),
        ("JAXLLM_TPU_POD", "1"),
    ],
)
def test_auto_on_tpu_pod_lets_jax_detect(joins, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    initialize(DistributedConfig())
    assert joins == [
        {
            "local_device_ids": None,
            "initialization_timeout": 300,
            "heartbeat_timeout_seconds": 100,
            "shutdown_timeout_seconds": 60,
        }
    ]


def test_mode_none_ignores_the_cluster(joins, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    initialize(DistributedConfig(mode="none"))
    assert joins == []


def test_auto_single_host_joins_nothing(joins, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # one-host TPU VM
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    initialize(DistributedConfig())
    assert joins == []
