"""The jitted step: identical results on every mesh, declared shardings, accumulation, non-finite skip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train import step as st
from jaxllm.train.optimizer import (
    OptimConfig,
    decay_mask,
    make_optimizer,
    make_schedule,
)

CFG = ModelConfig(
    vocab_size=128,
    num_layers=2,
    embed_dim=32,
    num_heads=8,
    num_kv_heads=8,
    head_dim=4,
    mlp_dim=64,
    max_seq_len=64,
    dtype="float32",
)
L = 16


def _batch(b, seed=0):
    rs = np.random.RandomState(seed)
    weights = np.ones((b, L), np.float32)
    weights[:, -3:] = 0.0
    return dict(
        inputs=rs.randint(0, 128, (b, L)).astype(np.int32),
        targets=rs.randint(0, 128, (b, L)).astype(np.int32),
        segment_ids=np.ones((b, L), np.int32),
        positions=np.tile(np.arange(L, dtype=np.int32), (b, 1)),
        loss_weights=weights,
    )


def _run(mesh_cfg, batches, micro=1, devices=None, steps=2):
    model = Decoder(CFG)
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=1, learning_rate=1e-2), 10)
    mesh = shd.make_mesh(mesh_cfg, devices)
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0))
    fn = st.jit_train_step(
        st.make_train_step(model, tx, schedule, st.StepConfig(grad_accum_steps=micro)), shardings, mesh
    )
    losses = []
    for i in range(steps):
        state, m = fn(state, shd.global_batch(batches[i % len(batches)], mesh))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), state, shardings


@pytest.fixture(scope="module")
def reference():
    return _run(shd.MeshConfig(), [_batch(16)], devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        shd.MeshConfig(data=8),
        shd.MeshConfig(data=1, fsdp=8),
        shd.MeshConfig(data=1, tensor=8),
        shd.MeshConfig(data=2, fsdp=2, tensor=2),
    ],
    ids=["data8", "fsdp8", "tensor8", "2x2x2"],
)
def test_same_loss_and_params_on_every_mesh(reference, mesh_cfg):
    ref_losses, ref_params, _, _ = reference
    losses, params, state, shardings = _run(mesh_cfg, [_batch(16)])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    # every param lives exactly where the logical rules put it
    mesh = shd.make_mesh(mesh_cfg)
    expected = {
        "q_proj": ("layers", "embed", "heads", "head_dim"),
        "o_proj": ("layers", "heads", "head_dim", "embed"),
        "gate_proj": ("layers", "embed", "mlp"),
        "down_proj": ("layers", "mlp", "embed"),
        "embed_tokens": ("vocab", "embed"),
        "lm_head": ("embed", "vocab"),
    }
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    seen = set()
    for path, leaf in flat:
        names = [str(getattr(k, "key", k)) for k in path]
        for module, logical in expected.items():
            if module in names:
                want = shd.logical_to_spec(logical)
                assert leaf.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), leaf.ndim), names
                seen.add(module)
    assert seen == set(expected)
    # optimizer moments follow their params
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["gate_proj"]["kernel"]
    assert mu.sharding.is_equivalent_to(state.params["layers"]["mlp"]["gate_proj"]["kernel"].sharding, 3)


def test_accumulation_equals_one_big_batch():
    big = _batch(16, seed=3)
    one_losses, one_params, _, _ = _run(shd.MeshConfig(data=2, fsdp=2, tensor=2), [big], micro=1)
    acc_losses, acc_params, _, _ = _run(shd.MeshConfig(data=2, fsdp=2, tensor=2), [big], micro=4)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(one_params)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_non_finite_loss_skips_update_and_counts():
    model = Decoder(CFG)
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=0), 10)
    mesh = shd.make_mesh(shd.MeshConfig(data=8))
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0))
    fn = st.jit_train_step(st.make_train_step(model, tx, schedule, st.StepConfig()), shardings, mesh)
    before = jax.device_get(state.params)
    bad = _batch(8)
    bad["loss_weights"] = bad["loss_weights"] * np.inf
    state, m = fn(state, shd.global_batch(bad, mesh))
    assert int(m["skipped"]) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    state, m = fn(state, shd.global_batch(_batch(8), mesh))
    assert int(m["skipped"]) == 1 and np.isfinite(float(m["loss"]))
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before))
    )


def test_masked_tokens_contribute_nothing():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    targets = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    w = jnp.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], jnp.float32)
    ce, _ = st.cross_entropy(logits, targets, w)
    garbage = logits.at[:, 2:].set(1e4).at[1, 1:].set(-1e4)
    ce2, _ = st.cross_entropy(garbage, targets, w)
    lp = jax.nn.log_softmax(logits)
    want = -(lp[0, 0, 1] + lp[0, 1, 2] + lp[1, 0, 6])
    np.testing.assert_allclose([ce, ce2], [want, want], rtol=1e-5)
    _, z = st.cross_entropy(logits, targets, w, z_loss=1e-4)
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(z, 1e-4 * float(jnp.sum(lse**2 * w)), rtol=1e-5)


def test_schedules_and_decay_mask():
    for name in ("cosine", "linear", "constant", "rsqrt"):
        s = make_schedule(OptimConfig(schedule=name, learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1), 100)
        assert float(s(0)) == pytest.approx(0.0, abs=1e-6)
        assert float(s(10)) == pytest.approx(1.0, rel=1e-5)
        assert float(s(100)) <= 1.0
    cos = make_schedule(OptimConfig(schedule="cosine", learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1), 100)
    assert float(cos(100)) == pytest.approx(0.1, rel=1e-4)
    rs = make_schedule(OptimConfig(schedule="rsqrt", learning_rate=1.0, warmup_steps=10), 100)
    assert float(rs(40)) == pytest.approx(0.5, rel=1e-4)
    params = {
        "layers": {"input_layernorm": {"scale": 0}, "mlp": {"up_proj": {"kernel": 0}}},
        "norm": {"scale": 0},
        "embed_tokens": {"embedding": 0},
    }
    mask = decay_mask(params)
    assert mask["layers"]["mlp"]["up_proj"]["kernel"] and mask["embed_tokens"]["embedding"]
    assert not mask["layers"]["input_layernorm"]["scale"] and not mask["norm"]["scale"]


def test_mesh_and_batch_errors():
    with pytest.raises(JaxllmError, match="does not divide"):
        shd.MeshConfig(data=-1, tensor=3).shape(8)
    with pytest.raises(JaxllmError, match="has 4 devices but 8"):
        shd.MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(JaxllmError, match="at most one axis"):
        shd.MeshConfig(data=-1, fsdp=-1).shape(8)
    mesh = shd.make_mesh(shd.MeshConfig(data=4, fsdp=2))
    with pytest.raises(JaxllmError, match="multiple of 8"):
        shd.check_batch(12, mesh)
    with pytest.raises(JaxllmError, match="multiple of 32"):
        shd.check_batch(16, mesh, grad_accum_steps=4)
    assert shd.MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 2)


def test_indivisible_dims_are_replicated_not_crashing():
    cfg = ModelConfig(
        vocab_size=100,
        num_layers=1,
        embed_dim=24,
        num_heads=3,
        num_kv_heads=1,
        mlp_dim=40,
        max_seq_len=32,
        dtype="float32",
    )
    tx, _ = make_optimizer(OptimConfig(), 10)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=4))
    state, _ = st.init_state(Decoder(cfg), tx, mesh, jax.random.key(0))
    k = state.params["layers"]["self_attn"]["k_proj"]["kernel"]  # 1 kv head cannot split 4 ways
    assert k.sharding.spec[2] is None and k.sharding.spec[1] == "fsdp"


@pytest.mark.parametrize("tie", [False, True], ids=["lm_head", "tied"])
def test_chunked_cross_entropy_equals_the_plain_one(tie):
    """Values and gradients of the chunked loss (logits made chunk by chunk, never whole) match the plain
    loss, z-loss and masked tokens included; a chunk that does not divide the length is an error."""
    import dataclasses

    from flax import linen as nn

    cfg = dataclasses.replace(CFG, vocab_size=300, tie_embeddings=tie)
    model = Decoder(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"])
    batch = _batch(4, seed=3)
    batch["targets"] = np.random.RandomState(4).randint(0, 300, (4, L)).astype(np.int32)
    loss = lambda p, chunk: st.token_loss(model, p, batch, z_loss=1e-3, loss_chunk=chunk)  # noqa: E731
    plain, plain_grads = loss(params, 0), jax.grad(lambda p: sum(loss(p, 0)[:2]))(params)
    for chunk in (4, L):
        chunked = loss(params, chunk)
        np.testing.assert_allclose(chunked, plain, rtol=1e-6)
        grads = jax.grad(lambda p: sum(loss(p, chunk)[:2]))(params)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(JaxllmError, match="does not divide"):
        loss(params, 5)


def test_host_offloaded_optimizer_state_trains_the_same():
    """optim.host_offload: the optimizer state lives in pinned host memory between steps, comes to the
    device for the update, and the run is the same as with it on the device."""
    model = Decoder(CFG)
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=1, learning_rate=1e-2), 10)
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    boxed = st.abstract_state(model, tx)
    results = []
    for offload in (False, True):
        shardings = st.state_shardings(boxed, mesh, offload_opt_state=offload)
        state, _ = st.init_state(model, tx, mesh, jax.random.key(0), shardings=shardings)
        fn = st.jit_train_step(
            st.make_train_step(model, tx, schedule, st.StepConfig(host_offload=offload)), shardings, mesh
        )
        for _ in range(2):
            state, m = fn(state, shd.global_batch(_batch(8), mesh))
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state) if x.ndim}
        assert kinds == ({"pinned_host"} if offload else {"device"})
        results.append((float(m["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
