"""LoRA and quantized bases on the decoder: exact start, trainable subsets, optimizer state, memory,
merge/unmerge, NF4/int8 quantization, target resolution and bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxllm import JaxllmError, tree
from jaxllm import sharding as shd
from jaxllm.models import lora, quant
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder, abstract_params
from jaxllm.train import step as st
from jaxllm.train.optimizer import OptimConfig, make_optimizer

LLAMA = ModelConfig(
    vocab_size=128,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=128,
    dtype="float32",
    max_seq_len=32,
)
FALCON = dataclasses.replace(LLAMA, norm="layer", mlp="gelu", parallel_block=True, tie_embeddings=True)
BLOOM = dataclasses.replace(
    LLAMA,
    num_kv_heads=4,
    norm="layer",
    position="alibi",
    mlp="gelu_tanh",
    use_bias=True,
    embed_norm=True,
    tie_embeddings=True,
    mlp_dim=256,
)
TOKENS = np.random.RandomState(0).randint(0, 128, (2, 16)).astype(np.int32)


@functools.cache
def _params(cfg, seed=0):
    return nn.meta.unbox(jax.jit(Decoder(cfg).init)(jax.random.key(seed), TOKENS)["params"])


def _with_adapters(base_cfg, lcfg, base_params, b_scale=0.0):
    """(lora cfg, trainable, frozen): fresh adapters (B moved by b_scale) on `base_params`."""
    cfg = lora.apply(lcfg, base_cfg)
    keep = lora.trainable_fn(lcfg, cfg)
    adapters, _ = tree.partition(_params(cfg, seed=1), lambda p: p[-1] in lora.ADAPTER_LEAVES)
    if b_scale:
        rng = np.random.RandomState(0)
        adapters = jax.tree_util.tree_map_with_path(
            lambda p, v: v + b_scale * rng.standard_normal(v.shape).astype(np.float32) if p[-1].key == "lora_b" else v,
            adapters,
        )
    saved, frozen = tree.partition(base_params, keep)
    return cfg, tree.union(adapters, saved), frozen


def _logits(cfg, params):
    return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, TOKENS))


@pytest.mark.parametrize(
    "base",
    [LLAMA, FALCON, BLOOM, dataclasses.replace(LLAMA, scan_layers=False)],
    ids=["llama", "falcon", "bloom", "llama_noscan"],
)
def test_fresh_adapters_reproduce_the_base_and_merge_exactly(base):
    params = _params(base)
    lcfg = lora.LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",))
    cfg, trainable, frozen = _with_adapters(base, lcfg, params)
    np.testing.assert_array_equal(_logits(cfg, tree.union(trainable, frozen)), _logits(base, params))
    a_leaves = [v for p, v in jax.tree_util.tree_leaves_with_path(trainable) if p[-1].key.endswith("lora_a")]
    assert a_leaves
    for a in a_leaves:  # PEFT's kaiming-uniform(a=sqrt(5)) on A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / np.sqrt(np.prod(a.shape[1 if base.scan_layers else 0 : -1]))
        assert bound / 2 < float(np.abs(a).max()) <= bound
    cfg, trainable, frozen = _with_adapters(base, lcfg, params, b_scale=0.2)
    tuned = _logits(cfg, tree.union(trainable, frozen))
    assert np.abs(tuned - _logits(base, params)).max() > 0.05  # the adapters do something
    merged_cfg, merged = lora.merge_adapters(tree.union(trainable, frozen), cfg)
    assert merged_cfg.lora_rank == 0 and not any(
        "lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged)
    )
    np.testing.assert_allclose(_logits(merged_cfg, merged), tuned, atol=2e-5)
    back = lora.unmerge_adapters(merged, tree.partition(trainable, lambda p: p[-1] in lora.ADAPTER_LEAVES)[0], cfg)
    for ours, orig in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(ours, orig, atol=1e-6)


def test_targets_in_hugging_face_names():
    pair = lora.LoraConfig(r=2, target_modules=("v_proj", "q_proj"))
    assert lora.resolve_targets(pair, LLAMA) == ("q_proj", "v_proj")  # canonical order
    assert lora.resolve_targets(lora.LoraConfig(r=2, target_modules=("all-linear",)), FALCON) == (
        "qkv",
        "o_proj",
        "up_proj",
        "down_proj",
    )
    assert lora.resolve_targets(lora.LoraConfig(r=2, target_modules=("query_key_value", "dense_4h_to_h")), BLOOM) == (
        "qkv",
        "down_proj",
    )
    regex = lora.LoraConfig(r=2, target_modules=(r".*\.(q_proj|down_proj)",))
    assert lora.resolve_targets(regex, LLAMA) == ("q_proj", "down_proj")
    with pytest.raises(JaxllmError, match="unknown module 'q_proj'.*query_key_value"):
        lora.resolve_targets(lora.LoraConfig(r=2, target_modules=("q_proj",)), FALCON)
    with pytest.raises(JaxllmError, match="lm_head cannot take an adapter.*modules_to_save"):
        lora.resolve_targets(lora.LoraConfig(r=2, target_modules=("lm_head",)), LLAMA)
    with pytest.raises(JaxllmError, match="different modules in different layers"):
        lora.resolve_targets(lora.LoraConfig(r=2, target_modules=(r"model\.layers\.0\..*q_proj",)), LLAMA)
    with pytest.raises(JaxllmError, match="no module 'nonsense'"):
        lora.save_paths(lora.LoraConfig(r=2, modules_to_save=("nonsense",)), LLAMA)
    with pytest.raises(JaxllmError, match="quantization needs adapters"):
        lora.LoraConfig(r=0, quantization="nf4")


def _train_setup(lcfg, mesh, base=LLAMA):
    cfg = lora.apply(lcfg, base)
    model = Decoder(cfg)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1), 10)
    keep = lora.trainable_fn(lcfg, cfg)
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0), keep)
    base_params = _params(base)
    if cfg.quantization != "none":
        base_params = lora.quantize_params(base_params, cfg)
    saved, frozen = tree.partition(base_params, keep)
    frozen_sh = shd.shardings_for(tree.partition(abstract_params(model.cfg), keep)[1], mesh) if keep else None
    params = (
        tree.union(tree.partition(state.params, lambda p: p[-1] in lora.ADAPTER_LEAVES)[0], saved)
        if keep
        else state.params
    )
    state = st.state_from_params(params, tx, shardings)
    step = st.jit_train_step(st.make_train_step(model, tx, schedule, st.StepConfig()), shardings, mesh, frozen_sh)
    return cfg, state, frozen, step


def _batch(mesh):
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, 128, (8, 17)).astype(np.int32)
    batch = dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        positions=np.tile(np.arange(16), (8, 1)),
        segment_ids=np.ones((8, 16), np.int32),
        loss_weights=np.ones((8, 16), np.float32),
    )
    return shd.global_batch(batch, mesh)


def test_only_adapters_are_trained_and_carry_optimizer_state():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4, tensor=1))
    lcfg = lora.LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    cfg, state, frozen, step = _train_setup(lcfg, mesh)
    names = {jax.tree_util.keystr(p).split("'")[-2] for p, _ in jax.tree_util.tree_leaves_with_path(state.params)}
    assert names == {"lora_a", "lora_b"}
    adapter_size = tree.count(state.params)
    assert adapter_size == 2 * 4 * (64 * 2 + (4 * 16) + (2 * 16) + 128 + 64)  # L * r * (in + out) summed
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapter_size  # Adam's mu and nu, for the adapters only
    frozen_before = jax.tree.map(np.asarray, frozen)
    losses = []
    for _ in range(4):
        state, metrics = step(state, _batch(mesh), frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    b_leaves = [v for p, v in jax.tree_util.tree_leaves_with_path(state.params) if p[-1].key == "lora_b"]
    assert all(float(jnp.abs(b).max()) > 0 for b in b_leaves)


def _step_bytes(lcfg, base):
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    _, state, frozen, step = _train_setup(lcfg, mesh, base)
    stats = step.lower(state, _batch(mesh), frozen).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    )


def test_lora_step_needs_far_less_memory_than_full_fine_tuning():
    base = dataclasses.replace(LLAMA, embed_dim=256, mlp_dim=1024, num_heads=4, num_kv_heads=4, num_layers=1)
    full = _step_bytes(lora.LoraConfig(r=0), base)
    adapters = _step_bytes(lora.LoraConfig(r=4, target_modules=("all-linear",)), base)
    qlora = _step_bytes(lora.LoraConfig(r=4, target_modules=("all-linear",), quantization="nf4"), base)
    assert adapters < 0.5 * full, (adapters, full)
    assert qlora < adapters, (qlora, adapters)


def test_nf4_levels_are_the_published_normal_float_quantiles():
    stats = pytest.importorskip("scipy.stats")
    offset = 0.9677083  # bitsandbytes' create_normal_map: 8 positive, 7 negative quantiles and 0
    pos = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(quant.NF4_LEVELS, levels / levels.max(), atol=1e-6)


def test_quantization_sizes_and_round_trip_error():
    assert abs(quant.bytes_per_param("nf4", 4096, 4096) - (0.5 + 1 / 64 + 4 / (64 * 256))) < 1e-6
    assert quant.bytes_per_param("nf4", 4096, 4096) < 0.53
    assert quant.bytes_per_param("int8", 4096, 4096) == pytest.approx(1 + 4 / 64)
    w = np.random.RandomState(0).standard_normal((2, 256, 96)).astype(np.float32) * 0.02
    for kind, bound in (("nf4", 0.12), ("int8", 0.01)):
        leaves = quant.quantize(w, kind)
        back = np.asarray(quant.dequantize(leaves))
        rel = np.sqrt(np.mean((back - w) ** 2)) / w.std()
        assert rel < bound, (kind, rel)
        assert back.shape == w.shape
    nf4 = quant.quantize(w, "nf4")
    codes = np.asarray(nf4["kernel_nf4"])
    assert codes.dtype == np.uint8 and codes.shape == (2, 128, 96)
    scales = np.abs(w.reshape(2, 4, 64, 96)).max(axis=2)  # double-quantized block scales stay within 1%
    np.testing.assert_allclose(np.asarray(quant.block_scales(nf4)), scales, rtol=0.01, atol=1e-5)
    with pytest.raises(JaxllmError, match="quant_block_size=63 must be a positive even number"):
        quant.quantize(np.zeros((96, 8), np.float32), "nf4", 63)


@pytest.mark.parametrize("kind,bound", [("nf4", 0.12), ("int8", 0.01)])
def test_any_input_size_quantizes_in_zero_padded_blocks(kind, bound):
    """A fan_in that is no multiple of the block (or odd) is padded with zero rows to whole blocks; the
    leaves keep the 2-D [rows, fan_out] layout and dequantizing drops the padding again."""
    rng = np.random.RandomState(1)
    for fan_in in (96, 33):
        w = rng.standard_normal((2, fan_in, 40)).astype(np.float32) * 0.02
        leaves = quant.quantize(w, kind)
        codes = leaves["kernel_nf4" if kind == "nf4" else "kernel_int8"]
        rows = quant.padded(fan_in, 64)
        assert rows == {96: 128, 33: 64}[fan_in] and codes.shape == (2, rows // 2 if kind == "nf4" else rows, 40)
        for name, (shape, dtype) in quant.shapes(kind, (2,), fan_in, 40, 64).items():
            assert (leaves[name].shape, leaves[name].dtype) == (shape, dtype), name
        back = np.asarray(quant.dequantize(leaves, fan_in=fan_in))
        assert back.shape == w.shape
        assert np.sqrt(np.mean((back - w) ** 2)) / w.std() < bound
        assert not np.asarray(quant.dequantize(leaves))[:, fan_in:].any()  # the padding rows are exact zeros
        exact = np.asarray(quant.dequantize(quant.quantize(np.pad(w, ((0, 0), (0, rows - fan_in), (0, 0))), kind)))
        np.testing.assert_array_equal(back, exact[:, :fan_in])  # as if the zero rows had been there all along


def test_quantized_base_logits_and_layer_norms():
    params = _params(FALCON)
    lcfg = lora.LoraConfig(r=4, target_modules=("all-linear",), quantization="nf4", quant_block_size=32)
    cfg = lora.apply(lcfg, FALCON)
    quantized = lora.quantize_params(params, cfg)
    norm = quantized["layers"]["input_layernorm"]["scale"]
    assert norm.dtype == jnp.float32 and "kernel" not in quantized["layers"]["mlp"]["up_proj"]
    ours, ref = _logits(cfg, tree.union(_with_adapters(FALCON, lcfg, params)[1], quantized)), _logits(FALCON, params)
    rel_rms = np.sqrt(np.mean((ours - ref) ** 2)) / ref.std()
    assert 0 < rel_rms < 0.2, rel_rms  # NF4 keeps ~9% RMS error per Gaussian weight; it shows in the logits
    int8_cfg = dataclasses.replace(cfg, quantization="int8")
    int8_params = tree.union(_with_adapters(FALCON, lcfg, params)[1], lora.quantize_params(params, int8_cfg))
    int8 = _logits(int8_cfg, int8_params)
    assert 0 < np.sqrt(np.mean((int8 - ref) ** 2)) / ref.std() < min(0.02, rel_rms)
    dequantized = lora.dequantize_params(quantized, cfg)
    np.testing.assert_allclose(
        _logits(FALCON, dequantized),
        _logits(cfg, tree.union(_with_adapters(FALCON, lcfg, params)[1], quantized)),
        atol=1e-5,
    )
    odd_blocks = dataclasses.replace(cfg, quant_block_size=48)  # 64 and 128 inputs: padded to 96 and 144
    quantized = lora.quantize_params(params, odd_blocks)
    assert quantized["layers"]["mlp"]["down_proj"]["kernel_nf4"].shape == (2, 144 // 2, 64)  # [layers, rows, out]
    padded = _logits(odd_blocks, tree.union(_with_adapters(FALCON, lcfg, params)[1], quantized))
    assert 0 < np.sqrt(np.mean((padded - ref) ** 2)) / ref.std() < 0.2
    np.testing.assert_allclose(_logits(FALCON, lora.dequantize_params(quantized, odd_blocks)), padded, atol=1e-5)
    with pytest.raises(JaxllmError, match="quant_block_size=0 must be a positive even number"):
        lora.LoraConfig(r=4, quantization="nf4", quant_block_size=0)
