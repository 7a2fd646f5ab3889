"""Orbax checkpoints: restore onto another mesh, retention (last K + best), clear errors when corrupt."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train import step as st
from jaxllm.train.checkpoint import CheckpointConfig, Checkpointer, abstract_with_shardings
from jaxllm.train.optimizer import OptimConfig, make_optimizer

CFG = ModelConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=8, mlp_dim=64, max_seq_len=32,
                  dtype="float32")


def _state(mesh_cfg, model_cfg=CFG):
    model = Decoder(model_cfg)
    tx, _ = make_optimizer(OptimConfig(), 10)
    mesh = shd.make_mesh(mesh_cfg)
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0), 8)
    boxed = st.abstract_state(model, tx, 8)
    return state, abstract_with_shardings(nn.meta.unbox(boxed), shardings)


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
        manager.save(12, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=grain.checkpoint.CheckpointSave(old_iter)))
        manager.wait_until_finished()
    os.rename(tmp_path / "ckpt" / "12" / "data" / "process_0-of-1.json",
              tmp_path / "ckpt" / "12" / "data" / "process_0-of-2.json")  # as two processes wrote it
    shutil.copy(tmp_path / "ckpt" / "12" / "data" / "process_0-of-2.json",
                tmp_path / "ckpt" / "12" / "data" / "process_1-of-2.json")

    class Iterator:
        def set_state(self, state):
            raise AssertionError("must not be reached")

    with pytest.raises(JaxllmError) as info:
        Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).restore(abstract, Iterator())
    message = str(info.value)
    assert "\n" not in message and "corrupt" not in message
    assert "12 holds per-process data-iterator state (2 process files" in message
    assert "resume it with 2 processes and the jaxllm version that wrote it" in message
