"""TPU flash attention: Splash (rotary) and our ALiBi kernel against the reference in Pallas interpret
mode, on a CPU mesh through the decoder, and compiled for a TPU slice through libtpu."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

from jaxllm import JaxllmError, sharding
from jaxllm.models.attention import flash
from jaxllm.models.attention.reference import alibi_bias, alibi_slopes, attention_mask, reference_attention
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder

T = 384  # three 128-token blocks: blocks below, on and above the diagonal


def _packed(batch: int, t: int):
    """Segment ids and positions: documents crossing block edges, one row ending in padding (0)."""
    segments = np.ones((batch, t), np.int32)
    segments[0, 100:250], segments[0, 250:300], segments[0, 300:] = 2, 3, 0
    segments[1, 200:] = 2
    positions = np.zeros_like(segments)
    for row in range(batch):
        for i in range(1, t):
            positions[row, i] = positions[row, i - 1] + 1 if segments[row, i] == segments[row, i - 1] else 0
    return jnp.asarray(segments), jnp.asarray(positions)


@pytest.mark.parametrize(
    "kv_heads,alibi,dtype",
    [
        (2, False, "float32"),
        (1, False, "float32"),
        (2, False, "bfloat16"),
        (4, True, "float32"),
        (2, True, "float32"),
        (4, True, "bfloat16"),
    ],
    ids=["gqa", "mqa", "gqa-bf16", "alibi", "alibi-gqa", "alibi-bf16"],
)
def test_kernels_match_reference(kv_heads, alibi, dtype):
    b, n, k = 2, 4, 64
    segments, positions = _packed(b, T)
    rng = np.random.RandomState(0)
    q, kk, v = (jnp.asarray(rng.randn(b, T, heads, k), dtype) for heads in (n, kv_heads, kv_heads))
    cotangent = jnp.asarray(rng.randn(b, T, n, k), jnp.float32)
    bias = alibi_bias(positions, positions, n) if alibi else None
    slopes = alibi_slopes(n) if alibi else None

    def ref(q, kk, v):
        return reference_attention(q, kk, v, attention_mask(segments, segments), bias)

    def fused(q, kk, v):
        return flash.flash_attention(q, kk, v, segments, alibi_slopes_N=slopes, block_size=128, interpret=True)

    def outputs(f):
        loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.jit(lambda *a: (f(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, kk, v)

    (out, grads), (want, want_grads) = outputs(fused), outputs(ref)
    tol = 2e-5 if dtype == "float32" else 1e-2
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        got, exp = np.asarray(got, np.float32), np.asarray(exp, np.float32)
        scale = max(1.0, float(np.abs(exp).max()))
        assert np.abs(got - exp).max() <= tol * scale, name
    assert float(jnp.abs(grads[1]).max()) > 0.1  # the kv gradient is not vacuous


def _tiny(position: str, attention: str, **kw):
    fields = dict(
        vocab_size=128,
        num_layers=1,
        embed_dim=64,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        max_seq_len=256,
        dtype="float32",
        attention=attention,
    )
    if position == "alibi":
        fields.update(position="alibi", norm="layer", mlp="gelu_tanh", use_bias=True, embed_norm=True, num_kv_heads=4)
    return ModelConfig(**{**fields, **kw})


def _loss_and_grads(cfg, params, inputs, segments, positions):
    def loss(p):
        logits = Decoder(cfg).apply({"params": p}, inputs, positions, segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (segments > 0))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("position,kv_heads", [("rope", 2), ("alibi", 4)])
def test_decoder_on_a_mesh_matches_xla(position, kv_heads):
    """8 CPU devices, batch over data=2, heads over tensor=4: rotary's 2 kv heads are repeated to 4."""
    segments, positions = _packed(2, 128)
    inputs = jnp.asarray(np.random.RandomState(1).randint(1, 128, (2, 128)), jnp.int32)
    cfg = _tiny(position, "flash", num_kv_heads=kv_heads)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), inputs)["params"])
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=4))
    results = {}
    with jax.set_mesh(mesh), sharding.axis_rules():
        for attention in ("flash", "xla"):
            run = functools.partial(_loss_and_grads, _tiny(position, attention, num_kv_heads=kv_heads))
            results[attention] = jax.jit(run)(params, inputs, segments, positions)
        jaxpr = str(jax.make_jaxpr(functools.partial(_loss_and_grads, cfg))(params, inputs, segments, positions))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    (loss, grads), (want_loss, want_grads) = results["flash"], results["xla"]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, exp, atol=2e-5 * max(1.0, float(jnp.abs(exp).max())))


@functools.cache
def tpu_devices():
    """Four v5p chips from libtpu's topology description: a TPU compiler without a TPU. libtpu is a
    test dependency; its absence fails these tests rather than skipping them."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock file
    from jax.experimental import topologies

    return tuple(
        topologies.get_topology_desc(
            platform="tpu",
            topology_name="v5:2x2x1",
            chip_config_name="megacore",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
            wrap=(False, False, False),
        ).devices
    )


def test_auto_takes_flash_when_the_mesh_is_tpu():
    assert not flash.use_flash("auto", 256)  # this CPU, no mesh
    assert flash.use_flash("flash", 256)  # interpreted here
    assert not flash.use_flash("flash", 64) and not flash.use_flash("xla", 256)
    with pytest.raises(JaxllmError, match="multiple of 128"):
        flash.use_flash("flash", 200)
    with jax.set_mesh(Mesh(np.asarray(tpu_devices()).reshape(1, 2, 2), sharding.MESH_AXES)):
        assert flash.target_platform() == "tpu"
        assert flash.use_flash("auto", 256) and not flash.use_flash("auto", 200)


def _unbox(tree):
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def _compiled_step_text(cfg, seq: int) -> str:
    """HLO of a decoder forward+backward compiled for 4 v5p chips (fsdp=2, tensor=2)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2), tpu_devices())
    abstract = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"])
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _unbox(abstract),
        sharding.shardings_for(abstract, mesh),
    )
    batch = jax.ShapeDtypeStruct((4, seq), jnp.int32, sharding=sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh), sharding.axis_rules():
        compiled = jax.jit(functools.partial(_loss_and_grads, cfg)).lower(params, batch, batch, batch).compile()
    return compiled.as_text()


@pytest.mark.parametrize("position,kernel", [("rope", "splash_mha_fwd"), ("alibi", "alibi_flash_fwd")])
def test_tpu_compile_runs_the_pallas_kernel(position, kernel):
    """ "auto" under a TPU mesh compiles to Mosaic custom calls; XLA's path holds [.., T, T] logits."""
    seq = 256
    square = re.compile(rf"\[[0-9,]*{seq},{seq}\]")
    text = _compiled_step_text(_tiny(position, "auto", dtype="bfloat16"), seq)
    assert "tpu_custom_call" in text and kernel in text
    assert not square.search(text)
    assert square.search(_compiled_step_text(_tiny(position, "xla", dtype="bfloat16"), seq))
