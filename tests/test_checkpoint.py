"""Orbax checkpoints: restore onto another mesh, retention (last K + best), clear errors when corrupt."""

import os
import shutil

import jax
import numpy as np
import pytest

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train import step as st
from jaxllm.train.checkpoint import (
    CheckpointConfig,
    Checkpointer,
)
from jaxllm.train.optimizer import OptimConfig, make_optimizer

CFG = ModelConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=8, mlp_dim=64, max_seq_len=32, dtype="float32")


def _state(mesh_cfg, model_cfg=CFG):
    model = Decoder(model_cfg)
    tx, _ = make_optimizer(OptimConfig(), 10)
    mesh = shd.make_mesh(mesh_cfg)
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0))
    boxed = st.abstract_state(model, tx)
    return state, shd.placed(boxed, shardings)


def test_restore_onto_a_different_mesh(tmp_path):
    state, _ = _state(shd.MeshConfig(data=1, fsdp=8))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(async_save=True))
    ckpt.save(3, state)
    ckpt.wait()
    _, abstract_tp = _state(shd.MeshConfig(data=2, tensor=4))
    restored = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).restore(abstract_tp)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract_tp)):
        assert a.sharding.is_equivalent_to(want.sharding, a.ndim)
    kernel = restored.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec[2] == "tensor" and kernel.sharding.mesh.shape["tensor"] == 4


def test_keeps_last_k_plus_best(tmp_path):
    state, _ = _state(shd.MeshConfig(data=8))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(keep=2, keep_best=1, async_save=False))
    val = {2: 3.0, 4: 1.5, 6: 2.0, 8: 2.5}
    for step in range(1, 10):
        ckpt.save(step, state, val_loss=val.get(step))
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9]  # best (val 1.5) and the two most recent
    assert ckpt.latest_step() == 9


def test_corrupt_and_incompatible_checkpoints_give_clear_errors(tmp_path):
    state, abstract = _state(shd.MeshConfig(data=8))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(async_save=False))
    ckpt.save(1, state)
    ckpt.wait()
    other = ModelConfig(**{**CFG.__dict__, "embed_dim": 64})
    _, abstract_other = _state(shd.MeshConfig(data=8), other)
    with pytest.raises(JaxllmError, match="does not match this model"):
        Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).restore(abstract_other)
    state_dir = tmp_path / "ckpt" / "1" / "state"
    for root, _, files in os.walk(state_dir):
        for f in files:
            if f != "_METADATA":
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    with pytest.raises(JaxllmError, match="corrupt"):
        Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).restore(abstract)


def test_half_written_checkpoints_are_ignored(tmp_path):
    state, abstract = _state(shd.MeshConfig(data=8))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(async_save=False))
    ckpt.save(1, state)
    ckpt.wait()
    ckpt.close()
    # a save killed midway leaves only a temporary folder, which is never taken for a checkpoint
    shutil.copytree(tmp_path / "ckpt" / "1", tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-123")
    again = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig())
    assert again.latest_step() == 1
    restored = again.restore(abstract)
    assert int(restored.step) == int(state.step)


def test_per_process_data_state_of_an_older_version_says_how_to_resume(tmp_path):
    """A checkpoint whose data item is grain's per-process iterator files (what jaxllm wrote before the
    global data order) is refused in one line naming the format and the process count, not as corrupt."""
    import grain
    import orbax.checkpoint as ocp

    state, abstract = _state(shd.MeshConfig(data=8))
    old_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(old_iter)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(
            12,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(old_iter)),
        )
        manager.wait_until_finished()
    os.rename(
        tmp_path / "ckpt" / "12" / "data" / "process_0-of-1.json",
        tmp_path / "ckpt" / "12" / "data" / "process_0-of-2.json",
    )  # as two processes wrote it
    shutil.copy(
        tmp_path / "ckpt" / "12" / "data" / "process_0-of-2.json",
        tmp_path / "ckpt" / "12" / "data" / "process_1-of-2.json",
    )

    class Iterator:
        def set_state(self, state):
            raise AssertionError("must not be reached")

    with pytest.raises(JaxllmError) as info:
        Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).restore(abstract, Iterator())
    message = str(info.value)
    assert "\n" not in message and "corrupt" not in message
    assert "12 holds per-process data-iterator state (2 process files" in message
    assert "resume it with 2 processes and the jaxllm version that wrote it" in message


class _Data:
    """A stand-in data iterator: its global state names the step it was saved at."""

    def __init__(self, step=0):
        self.step, self.restored = step, None

    def get_state(self):
        return {
            "format": "jaxllm-global-data-order/1",
            "step": self.step,
            "window": 1,
            "streams": 1,
            "batch_size": 1,
            "lanes": {"0": [self.step, -1, 0, 0]},
        }

    def set_state(self, state):
        self.restored = state


def _steps_saved(path, steps, keep=3, async_save=False):
    import jax.numpy as jnp

    ckpt = Checkpointer(str(path), CheckpointConfig(keep=keep, keep_best=0, async_save=async_save))
    for s in steps:
        ckpt.save(s, {"w": jnp.full((4,), float(s))}, _Data(s))
    ckpt.close()
    return {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}


def _files(folder):
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files)


def _break(step_dir, how):
    if how == "truncated array file":
        for path in _files(step_dir / "state"):
            if os.sep + "d" + os.sep in path:
                with open(path, "r+b") as f:
                    f.truncate(max(os.path.getsize(path) // 3, 1))
    elif how == "missing data state":
        for path in _files(step_dir / "data"):
            os.remove(path)
    elif how == "truncated metadata":
        with open(step_dir / "state" / "_METADATA", "r+b") as f:
            f.truncate(20)
    elif how == "missing array files":
        for path in _files(step_dir / "state"):
            if "ocdbt" in path or os.sep + "d" + os.sep in path:
                os.remove(path)


@pytest.mark.parametrize(
    "how", ["truncated array file", "missing data state", "truncated metadata", "missing array files"]
)
def test_an_unreadable_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, how):
    abstract = _steps_saved(tmp_path / "ckpt", [4, 8, 12])
    _break(tmp_path / "ckpt" / "12", how)
    warnings, data = [], _Data()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(), warn=warnings.append)
    restored = ckpt.restore(abstract, data)
    assert float(restored["w"][0]) == 8.0 and data.restored["step"] == 8
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert (
        warnings[0].startswith(f"checkpoint {tmp_path / 'ckpt'}/12 is unreadable (") and "trying step 8" in warnings[0]
    )


def test_when_no_checkpoint_is_good_the_error_says_what_it_found(tmp_path):
    abstract = _steps_saved(tmp_path / "ckpt", [4, 8])
    _break(tmp_path / "ckpt" / "8", "truncated array file")
    _break(tmp_path / "ckpt" / "4", "missing data state")
    warnings = []
    with pytest.raises(JaxllmError) as info:
        Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(), warn=warnings.append).restore(abstract, _Data())
    message = str(info.value)
    assert "\n" not in message and "can be restored" in message and "step 8: " in message and "step 4: " in message
    assert len(warnings) == 1


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("error,fix", [(28, "free disk space"), (13, "writable")])
def test_a_failing_save_is_reported_at_once_and_keeps_earlier_checkpoints(
    tmp_path, monkeypatch, async_save, error, fix
):
    """Disk full or permission denied while writing arrays (in the background with async saves): the
    run hears of it at once, the step is not taken for saved, and the checkpoints before it restore."""
    import time

    import jax.numpy as jnp
    from orbax.checkpoint._src.serialization import serialization

    abstract = _steps_saved(tmp_path / "ckpt", [4, 8], keep=2, async_save=async_save)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(keep=2, keep_best=0, async_save=async_save))

    async def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(serialization, "async_serialize_from_host", fail)
    with pytest.raises(JaxllmError) as info:
        ckpt.save(12, {"w": jnp.full((4,), 12.0)}, _Data(12))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the loop's check after every step
            ckpt.check()
            time.sleep(0.05)
    message = str(info.value)
    assert message.startswith(f"saving {tmp_path / 'ckpt'}/12 failed (") and "\n" not in message
    assert "it is not saved, the earlier checkpoints (steps 4, 8) are intact" in message and fix in message
    ckpt.close()  # a failed checkpointer closes quietly
    monkeypatch.undo()
    again = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig())
    assert again.all_steps() == [4, 8]
    data = _Data()
    assert float(again.restore(abstract, data)["w"][0]) == 8.0 and data.restored["step"] == 8
