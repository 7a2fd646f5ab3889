"""Decoder: published parameter counts, packed-document isolation, attention paths, scan/remat switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxllm import JaxllmError
from jaxllm.models.attention.fused import causal_blockwise_attention
from jaxllm.models.attention.reference import alibi_bias, attention_mask, reference_attention
from jaxllm.models.config import PRESETS, ModelConfig, preset
from jaxllm.models.decoder import Decoder

TINY = dict(
    vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64, dtype="float32"
)


def _params(cfg, seq=16):
    return nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"])


@pytest.mark.parametrize(
    "name,published", [("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320), ("llama2_70b", 68_976_648_192)]
)
def test_published_parameter_counts(name, published):
    cfg = ModelConfig(**preset(name))
    shapes = jax.eval_shape(lambda: _params(cfg, 8))  # shapes only, nothing allocated
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == published
    assert cfg.num_params() == published


def test_presets_are_llama2_shapes():
    assert PRESETS["llama2_70b"]["num_kv_heads"] == 8  # GQA only in 70B
    with pytest.raises(JaxllmError, match="unknown model preset"):
        preset("llama2_8b")


def test_params_carry_logical_axes():
    cfg = ModelConfig(**TINY)
    boxed = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]

    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["layers"]["self_attn"]["k_proj"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(specs["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    for leaf in jax.tree.leaves(specs, is_leaf=lambda x: x is None or hasattr(x, "index")):
        assert leaf is not None and len(tuple(leaf)) > 0


def _packed_example(rng):
    a = rng.randint(1, 128, 10)
    b = rng.randint(1, 128, 6)
    inputs = np.concatenate([a, b]).astype(np.int32)[None]
    segments = np.array([[1] * 10 + [2] * 6], np.int32)
    positions = np.array([list(range(10)) + list(range(6))], np.int32)
    return a, b, inputs, segments, positions


@pytest.mark.parametrize("attention", ["auto", "xla", "reference"])
def test_packed_documents_do_not_attend_across(attention):
    cfg = ModelConfig(**TINY, attention=attention)
    model, params = Decoder(cfg), _params(cfg)
    a, b, inputs, segments, positions = _packed_example(np.random.RandomState(0))
    packed = model.apply({"params": params}, inputs, positions, segments)
    alone_a = model.apply({"params": params}, a[None].astype(np.int32))
    alone_b = model.apply({"params": params}, b[None].astype(np.int32))
    np.testing.assert_allclose(packed[0, :10], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 10:], alone_b[0], atol=1e-5)


def test_fused_and_reference_attention_agree_on_packed_batch():
    rng = np.random.RandomState(1)
    inputs = rng.randint(0, 128, (3, 24)).astype(np.int32)
    segments = np.sort(rng.randint(1, 4, (3, 24)), axis=1).astype(np.int32)
    segments[:, -3:] = 0  # padding
    positions = np.zeros_like(segments)
    for r in range(3):
        for s in np.unique(segments[r]):
            idx = np.where(segments[r] == s)[0]
            positions[r, idx] = np.arange(len(idx))
    outs = []
    for attention in ("auto", "reference"):
        cfg = ModelConfig(**TINY, attention=attention)
        outs.append(Decoder(cfg).apply({"params": _params(cfg)}, inputs, positions, segments))
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)


def test_scan_and_remat_do_not_change_the_function():
    x = np.random.RandomState(2).randint(0, 128, (2, 16)).astype(np.int32)
    base_cfg = ModelConfig(**TINY, scan_layers=False)
    base_params = _params(base_cfg)
    ref = Decoder(base_cfg).apply({"params": base_params}, x)
    stacked = {k: v for k, v in base_params.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[base_params[f"layers_{i}"] for i in range(2)])
    for remat in ("none", "full", "save_dots"):
        cfg = ModelConfig(**TINY, scan_layers=True, remat=remat)
        out = Decoder(cfg).apply({"params": stacked}, x)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        grads = jax.grad(lambda p: Decoder(cfg).apply({"params": p}, x).sum())(stacked)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bf16_compute_float32_params():
    cfg = ModelConfig(**{**TINY, "dtype": "bfloat16"})
    params = _params(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = Decoder(cfg).apply({"params": params}, jnp.ones((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32
    ref = Decoder(ModelConfig(**TINY)).apply({"params": params}, jnp.ones((1, 8), jnp.int32))
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.05


def test_dropout_is_keyed_and_off_when_deterministic():
    cfg = ModelConfig(**TINY, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    model, params, x = Decoder(cfg), _params(cfg), jnp.ones((1, 8), jnp.int32)
    det = model.apply({"params": params}, x)
    d1 = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    d1b = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    d2 = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(d1, d1b)
    assert float(jnp.max(jnp.abs(d1 - d2))) > 1e-4 and float(jnp.max(jnp.abs(d1 - det))) > 1e-4
    np.testing.assert_array_equal(det, model.apply({"params": params}, x))


def test_mqa_gqa_and_tied_embeddings_shapes():
    for kv in (1, 2, 4):
        cfg = ModelConfig(**{**TINY, "num_kv_heads": kv, "tie_embeddings": True})
        params = _params(cfg)
        assert "lm_head" not in params
        assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 32, kv, 8)
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(num_heads=3), "not divisible"),
        (dict(num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(remat="some"), "remat"),
        (dict(dtype="fp8"), "dtype"),
        (dict(attention="splash"), "attention"),
    ],
)
def test_bad_model_config(bad, match):
    with pytest.raises(JaxllmError, match=match):
        ModelConfig(**{**TINY, **bad})


def test_train_flops_per_token_counts_every_matmul():
    cfg = ModelConfig(**preset("llama2_7b"))
    # PaLM's 6N + 12 L H K T, N = all params but the input embedding (a lookup, no matmul)
    want = 6 * (6_738_415_616 - 32000 * 4096) + 12 * 32 * 32 * 128 * 4096
    assert cfg.train_flops_per_token(4096) == want
    tied = ModelConfig(**{**TINY, "tie_embeddings": True})
    untied = ModelConfig(**TINY)
    assert tied.train_flops_per_token(16) == untied.train_flops_per_token(16)  # the head matmul runs either way


# --- Falcon and BLOOM switches on the same decoder ---------------------------------------------------

FALCON_TINY = dict(
    TINY, norm="layer", mlp="gelu", parallel_block=True, num_block_norms=1, num_kv_heads=1, tie_embeddings=True
)
FALCON40_TINY = dict(FALCON_TINY, num_kv_heads=2, num_block_norms=2, use_bias=True)
BLOOM_TINY = dict(
    TINY,
    num_heads=6,
    num_kv_heads=0,
    embed_dim=48,
    norm="layer",
    position="alibi",
    mlp="gelu_tanh",
    use_bias=True,
    embed_norm=True,
    tie_embeddings=True,
)


@pytest.mark.parametrize(
    "name,published",
    [
        # Hugging Face parameter counts of tiiuae/falcon-{7b,40b,180B} and bigscience/bloom-{560m,7b1}, bloom
        # (tied heads counted once); tests/test_hf.py rebuilds each with transformers on the meta device.
        ("falcon_7b", 6_921_720_704),
        ("falcon_40b", 41_303_293_952),
        ("falcon_180b", 178_557_088_768),
        ("bloom_560m", 559_214_592),
        ("bloom_7b1", 7_069_016_064),
        ("bloom_176b", 176_247_271_424),
    ],
)
def test_falcon_bloom_published_parameter_counts(name, published):
    cfg = ModelConfig(**preset(name))
    shapes = jax.eval_shape(lambda: _params(cfg, 8))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == published
    assert cfg.num_params() == published
    untied = ModelConfig(**preset(name, tie_embeddings=False))
    assert cfg.train_flops_per_token(2048) == untied.train_flops_per_token(2048)


def test_alibi_slopes_match_the_papers_formula():
    from jaxllm.models.attention.reference import alibi_slopes

    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-7)
    # 12 heads: the 8 slopes of 8 heads, then the odd ones of 16 heads: 2^-0.5, 2^-1.5, ...
    want = np.concatenate([2.0 ** -np.arange(1, 9), 2.0 ** -np.arange(0.5, 4, 1.0)])
    np.testing.assert_allclose(alibi_slopes(12), want, rtol=1e-6)


def test_family_params_and_logical_axes():
    specs = {}
    for name, fields in (("falcon", FALCON_TINY), ("falcon40", FALCON40_TINY), ("bloom", BLOOM_TINY)):
        cfg = ModelConfig(**fields)
        boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed))) == cfg.num_params()
        specs[name] = nn.get_partition_spec(boxed)
    falcon, falcon40, bloom = specs["falcon"]["layers"], specs["falcon40"]["layers"], specs["bloom"]
    assert set(falcon) == {"self_attn", "mlp", "input_layernorm"}  # one shared norm, no biases, no gate
    assert set(falcon["mlp"]) == {"up_proj", "down_proj"} and "bias" not in falcon["self_attn"]["q_proj"]
    assert set(falcon40) == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    assert tuple(falcon40["self_attn"]["k_proj"]["bias"]) == ("layers", "kv_heads", "head_dim")
    assert tuple(bloom["layers"]["self_attn"]["q_proj"]["bias"]) == ("layers", "heads", "head_dim")
    assert tuple(bloom["layers"]["self_attn"]["o_proj"]["bias"]) == ("layers", "embed")
    assert tuple(bloom["layers"]["mlp"]["up_proj"]["bias"]) == ("layers", "mlp")
    assert tuple(bloom["layers"]["mlp"]["down_proj"]["bias"]) == ("layers", "embed")
    assert tuple(bloom["embed_norm"]["bias"]) == ("norm",) and tuple(bloom["norm"]["scale"]) == ("norm",)
    assert "lm_head" not in bloom


def _random_params(cfg, seed=3):
    """Every leaf N(0, 0.3), norms and biases included (so a mix-up shows), with no init compile."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda: _params(cfg, 8))
    return jax.tree.map(lambda x: rng.normal(0.0, 0.3, x.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("fields", [FALCON_TINY, FALCON40_TINY, BLOOM_TINY], ids=["falcon", "falcon40", "bloom"])
def test_families_packed_documents_do_not_attend_across(fields):
    """ALiBi and rotary positions restart per document; both attention paths keep documents apart."""
    a, b, packed, segments, positions = _packed_example(np.random.RandomState(0))
    # row 0: a and b packed; row 1: a alone; row 2: b alone (each right-padded, padding = segment 0)
    inputs = np.stack([packed[0], np.pad(a, (0, 6)), np.pad(b, (0, 10))]).astype(np.int32)
    segs = np.stack([segments[0], [1] * 10 + [0] * 6, [1] * 6 + [0] * 10]).astype(np.int32)
    pos = np.stack([positions[0], np.arange(16), np.arange(16)]).astype(np.int32)
    outs, params = {}, _random_params(ModelConfig(**fields))
    for attention in ("xla", "reference"):
        cfg = ModelConfig(**fields, attention=attention)
        out = jax.jit(Decoder(cfg).apply)({"params": params}, inputs, pos, segs)
        np.testing.assert_allclose(out[0, :10], out[1, :10], atol=1e-5)
        np.testing.assert_allclose(out[0, 10:], out[2, :6], atol=1e-5)
        outs[attention] = out
    np.testing.assert_allclose(outs["xla"], outs["reference"], atol=2e-5)


def test_alibi_depends_on_relative_positions_only():
    cfg = ModelConfig(**BLOOM_TINY)
    params, x = _random_params(cfg), np.random.RandomState(4).randint(0, 128, (1, 12)).astype(np.int32)
    apply, pos = jax.jit(Decoder(cfg).apply), np.arange(12)[None]
    np.testing.assert_allclose(apply({"params": params}, x, pos), apply({"params": params}, x, pos + 7), atol=1e-5)
    shuffled = np.concatenate([pos[:, :6], pos[:, 6:] + 3], axis=1)  # a gap changes it
    assert float(jnp.max(jnp.abs(apply({"params": params}, x, pos) - apply({"params": params}, x, shuffled)))) > 1e-3


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(norm="batch"), "norm="),
        (dict(position="learned"), "position="),
        (dict(mlp="relu"), "mlp="),
        (dict(num_block_norms=1), "num_block_norms"),
        (dict(num_block_norms=3, parallel_block=True), "num_block_norms"),
    ],
)
def test_bad_family_switches(bad, match):
    with pytest.raises(JaxllmError, match=match):
        ModelConfig(**{**TINY, **bad})


@pytest.mark.parametrize("heads,kv_heads,alibi", [(4, 4, False), (4, 2, False), (4, 1, True)])
def test_blockwise_attention_matches_the_reference_in_value_and_gradient(heads, kv_heads, alibi):
    """Blocks of 8 query rows over 21 packed tokens (last block short): the same outputs and gradients
    as the whole-matrix float32 reference, with grouped kv heads and with an ALiBi bias."""
    rs = np.random.RandomState(3)
    b, t, k = 2, 21, 8
    q = jnp.asarray(rs.randn(b, t, heads, k), jnp.float32)
    kk, v = (jnp.asarray(rs.randn(b, t, kv_heads, k), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.sort(rs.randint(1, 4, (b, t)), axis=1).astype(np.int32))
    positions = jnp.asarray(np.tile(np.arange(t), (b, 1)).astype(np.int32))
    mask = attention_mask(segments, segments)
    bias = alibi_bias(positions, positions, heads) if alibi else None
    cot = jnp.asarray(rs.randn(b, t, heads, k), jnp.float32)

    def grads(fn):
        out, vjp = jax.vjp(lambda q, kk, v: fn(q, kk, v, mask, bias), q, kk, v)
        return out, vjp(cot)

    blockwise = lambda *a: causal_blockwise_attention(*a, chunk=8)  # noqa: E731
    (out, g), (ref, g_ref) = grads(blockwise), grads(reference_attention)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, atol=2e-5)
