"""Two real JAX processes on 127.0.0.1 (gloo) train, checkpoint, and resume through `jaxllm train`."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from runs import launch_from_root  # noqa: E402

from jaxllm.train.metrics import read_metrics  # noqa: E402

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
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.progress=false",
    "checkpoint.every=2",
    "optim.decay_steps=6",
    "mesh.data=2",
    "mesh.fsdp=2",
    "generate.max_new_tokens=4",
]


def _train(workdir, steps, capsys):
    cmd = [
        sys.executable,
        "-m",
        "jaxllm.cli",
        "train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
    ] + [f"--config.{o}" for o in SMALL]
    codes = launch_from_root(cmd, num_processes=2, devices_per_process=2, timeout=400)
    captured = capsys.readouterr()
    return codes, captured.out + captured.err


def test_two_processes_train_checkpoint_and_resume(tmp_path, capsys):
    codes, out = _train(tmp_path, 4, capsys)
    assert codes == [0, 0], out[-4000:]
    assert "4 devices, 2 processes" in out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    # one global data state (every row's lane), not one file per process
    data_files = os.listdir(tmp_path / "checkpoints" / "4" / "data")
    assert not any(f.startswith("process_") for f in data_files), data_files
    codes, out = _train(tmp_path, 6, capsys)
    assert codes == [0, 0], out[-4000:]
    assert "resumed from" in out
    records = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # process 0 alone writes metrics
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not nan


CHAIN = [
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
    "data.shuffle_window=24",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.progress=false",
    "checkpoint.every=2",
    "checkpoint.async_save=false",
    "optim.decay_steps=10",
    "generate.max_new_tokens=0",
]


def _launch(workdir, steps, processes, devices, mesh, capsys):
    data, fsdp = mesh
    cmd = [
        sys.executable,
        "-m",
        "jaxllm.cli",
        "train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        f"--config.mesh.data={data}",
        f"--config.mesh.fsdp={fsdp}",
    ]
    codes = launch_from_root(
        cmd + [f"--config.{o}" for o in CHAIN], num_processes=processes, devices_per_process=devices, timeout=600
    )
    captured = capsys.readouterr()
    assert codes == [0] * processes, (captured.out + captured.err)[-4000:]
    return captured.out + captured.err


def test_resume_on_other_process_counts_and_meshes_is_exact(tmp_path, capsys):
    """One run handed 1 -> 2 -> 4 -> 2 -> 1 processes (and data/fsdp meshes) logs the losses of an
    uninterrupted run: the global batches and the data state do not depend on the process count."""
    _launch(tmp_path / "ref", 10, 1, 4, (4, 1), capsys)
    chain = [(2, 1, 2, (2, 1)), (4, 2, 2, (2, 2)), (6, 4, 1, (4, 1)), (8, 2, 1, (2, 1)), (10, 1, 4, (2, 2))]
    for steps, processes, devices, mesh in chain:
        out = _launch(tmp_path / "chain", steps, processes, devices, mesh, capsys)
        assert steps == 2 or f"resumed from {tmp_path / 'chain' / 'checkpoints'}/{steps - 2}" in out, out[-3000:]
    ref = {(r["split"], r["step"]): r["loss"] for r in read_metrics(str(tmp_path / "ref"))}
    got = {(r["split"], r["step"]): r["loss"] for r in read_metrics(str(tmp_path / "chain"))}
    assert [k for k in got if k[0] == "train"] == [("train", s) for s in range(1, 11)]
    for key, loss in got.items():
        if key in ref:  # float tolerance only: meshes reduce in other orders
            assert abs(loss - ref[key]) <= 2e-5 * abs(ref[key]), (key, loss, ref[key])
    assert ("val", 10) in got
