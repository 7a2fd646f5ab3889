"""Activation sharding is real: the lowered step carries the models' constraints, and no compiled
activation holds the global batch on a device (FSDP splits activations, it does not move them)."""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxllm import sharding as shd
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder, abstract_params
from jaxllm.train import step as st
from jaxllm.train.optimizer import OptimConfig, make_optimizer

# MLP width 1024 appears in no other tensor, so [*, 64, 1024] shapes are the MLP's hidden activation.
CFG = ModelConfig(
    vocab_size=256, num_layers=2, embed_dim=128, num_heads=4, mlp_dim=1024, max_seq_len=64, dtype="float32"
)
B, L = 8, 64


def _compiled(mesh_cfg, remat="none"):
    import dataclasses

    model = Decoder(dataclasses.replace(CFG, remat=remat))
    tx, schedule = make_optimizer(OptimConfig(), 10)
    mesh = shd.make_mesh(mesh_cfg, jax.devices()[:4])
    boxed = st.abstract_state(model, tx)
    shardings = st.state_shardings(boxed, mesh)
    state = shd.placed(boxed, shardings)
    batch = {
        k: jax.ShapeDtypeStruct(
            (B, L), jnp.float32 if k == "loss_weights" else jnp.int32, sharding=shd.batch_sharding(mesh)
        )
        for k in ("inputs", "targets", "positions", "segment_ids", "loss_weights")
    }
    lowered = st.jit_train_step(st.make_train_step(model, tx, schedule, st.StepConfig()), shardings, mesh).lower(
        state, batch
    )
    return lowered.as_text(), lowered.compile().as_text()


@pytest.fixture(scope="module")
def fsdp4():
    return _compiled(shd.MeshConfig(data=1, fsdp=4), remat="full")


def test_lowered_step_carries_activation_constraints(fsdp4):
    lowered, _ = fsdp4
    assert lowered.count("sharding_constraint") >= 2 * CFG.num_layers


@pytest.mark.parametrize(
    "mesh_cfg", [shd.MeshConfig(data=1, fsdp=4), shd.MeshConfig(data=4, fsdp=1)], ids=["fsdp4", "data4"]
)
def test_no_activation_holds_the_global_batch(fsdp4, mesh_cfg):
    compiled = fsdp4[1] if mesh_cfg.fsdp == 4 else _compiled(mesh_cfg)[1]
    hidden = set(re.findall(r"f32\[(\d+),64,1024\]", compiled))
    assert hidden == {str(B // 4)}, f"MLP activations with batch dims {hidden}; expected only the per-device {B // 4}"


def test_init_under_the_mesh_places_params_sharded():
    model = Decoder(CFG)
    tx, _ = make_optimizer(OptimConfig(), 10)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4), jax.devices()[:4])
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0))
    kernel = state.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (CFG.num_layers, CFG.embed_dim // 4, CFG.mlp_dim)


def test_generation_under_a_training_mesh_is_constrained_and_the_same():
    """Generation with params sharded over a mesh (a run's final sample) decodes under that mesh: the
    program carries the constraints (a batch of one prompt just is not split) and the tokens are those
    of an unsharded run."""
    from flax import linen as nn

    from jaxllm.models.generation import GenerateConfig, _decode_fn, generate

    model = Decoder(CFG)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4), jax.devices()[:4])
    sharded = jax.device_put(params, shd.shardings_for(abstract_params(model.cfg), mesh))
    gen = GenerateConfig(max_new_tokens=6, temperature=0.0)
    prompts = [[1, 5, 7, 9]]
    assert generate(model, sharded, prompts, gen, eos_id=-1) == generate(model, params, prompts, gen, eos_id=-1)
    decode = _decode_fn(CFG, (1, 4), gen, -1, 0)
    with shd.activate(mesh):
        lowered = decode.lower(sharded, *(jnp.ones((1, 4), jnp.int32),) * 3, jax.random.key(0)).as_text()
    assert lowered.count("sharding_constraint") >= 2 * CFG.num_layers


def test_config_rules_override_the_logical_rules():
    """`mesh.rules` replaces entries of the logical rules for a run: params and activations follow it."""
    from jaxllm import JaxllmError

    with pytest.raises(JaxllmError, match="mesh.rules"):
        shd.MeshConfig(rules=(("embeddings", "fsdp"),))
    with pytest.raises(JaxllmError, match="mesh axes are"):
        shd.MeshConfig(rules=(("embed", "model"),))
    cfg = ModelConfig(vocab_size=64, num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=16)
    boxed = abstract_params(cfg)
    try:
        mesh = shd.make_mesh(
            shd.MeshConfig(data=1, fsdp=4, rules=[["embed", None], ["mlp", "fsdp"]]), jax.devices()[:4]
        )
        spec = shd.shardings_for(boxed, mesh)["layers"]["mlp"]["up_proj"]["kernel"].spec
        assert tuple(spec) == (None, None, "fsdp")  # [layers, embed, mlp]: embed unsharded, mlp over fsdp
        mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4), jax.devices()[:4])
        spec = shd.shardings_for(boxed, mesh)["layers"]["mlp"]["up_proj"]["kernel"].spec
        assert tuple(spec) == (None, "fsdp", "tensor")
    finally:
        shd.set_rules()
