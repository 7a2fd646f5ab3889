"""Generation: the KV-cache decode loop equals full recomputation; top-k / top-p follow transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxllm import JaxllmError
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.models.generation import GenerateConfig, filter_logits, generate, left_pad

BASE = dict(
    vocab_size=97,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    max_seq_len=48,
    dtype="float32",
    init_std=0.3,
)
FAMILIES = {
    "llama_scan": dict(),
    "llama_tied_loop": dict(tie_embeddings=True, scan_layers=False, num_kv_heads=1, remat="full"),
    "falcon_parallel": dict(norm="layer", mlp="gelu", parallel_block=True, num_block_norms=1, num_kv_heads=1),
    "bloom_alibi": dict(
        norm="layer",
        position="alibi",
        mlp="gelu_tanh",
        use_bias=True,
        embed_norm=True,
        tie_embeddings=True,
        num_kv_heads=0,
    ),
}
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3], [60, 61, 62, 63]]


def _greedy_without_cache(model, params, prompt, n):
    """Recomputes the whole sequence for every token (a fixed-size buffer: causal, so the zeros to the
    right of the current position change nothing, and one compilation serves every step)."""
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    for cur in range(len(prompt), len(prompt) + n):
        buf[0, cur] = int(jnp.argmax(forward(params, buf)[0, cur - 1]))
    return buf[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_greedy_equals_full_recomputation(family):
    cfg = ModelConfig(**{**BASE, **FAMILIES[family]})
    model = Decoder(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    got = generate(model, params, PROMPTS, GenerateConfig(max_new_tokens=12, temperature=0.0), eos_id=-1)
    for prompt, row in zip(PROMPTS, got):  # left padding of the shorter prompts changes nothing
        assert row == _greedy_without_cache(model, params, prompt, 12), family


def test_eos_stops_a_row_and_sampling_is_seeded():
    cfg = ModelConfig(**BASE)
    model = Decoder(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    greedy = generate(model, params, PROMPTS[:1], GenerateConfig(max_new_tokens=10, temperature=0.0), eos_id=-1)[0]
    eos = greedy[3]
    cut = generate(model, params, PROMPTS[:1], GenerateConfig(max_new_tokens=10, temperature=0.0), eos_id=eos)[0]
    assert cut == greedy[: greedy.index(eos)]
    gen = GenerateConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    a = generate(model, params, PROMPTS, gen, eos_id=-1)
    assert a == generate(model, params, PROMPTS, gen, eos_id=-1)
    assert a != generate(model, params, PROMPTS, GenerateConfig(**{**gen.__dict__, "seed": 4}), eos_id=-1)
    with pytest.raises(JaxllmError, match="exceeds the model's context"):
        generate(model, params, PROMPTS, GenerateConfig(max_new_tokens=45), eos_id=-1)


def _hf_warp(logits, temperature, top_k, top_p):
    """transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper, in numpy."""
    x = logits / temperature
    if top_k:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(x, axis=-1)  # ascending
        sorted_x = np.take_along_axis(x, order, -1)
        probs = np.exp(sorted_x - sorted_x.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        remove_sorted = np.cumsum(probs, -1) <= 1 - top_p
        remove_sorted[:, -1] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, -1)
        x = np.where(remove, -np.inf, x)
    return x


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 50, 1.0), (0.8, 10, 0.5), (1.3, 5, 0.95)])
def test_filters_match_transformers_semantics(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 200).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    want = _hf_warp(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-5)


def test_left_pad_positions_follow_the_attention_mask():
    tokens, segments, positions = left_pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--batch_size=0"], "--batch_size=0 is out of range: use an integer >= 1"),
        (["--batch_size=-1"], "--batch_size=-1 is out of range"),
        (["--max_new_tokens=0"], "--max_new_tokens=0 is out of range: use an integer >= 1"),
        (["--max_new_tokens=-1"], "--max_new_tokens=-1 is out of range"),
        (["--width=-1"], "--width=-1 is out of range: use an integer >= 0"),
        (["--top_p=0"], r"generate.top_p=0.0 is out of range: use a finite number > 0 and <= 1"),
        (["--top_p=2"], "generate.top_p=2.0 is out of range"),
        (["--temperature=-1"], "generate.temperature=-1.0 is out of range"),
        (["--temperature=nan"], "generate.temperature=nan is out of range"),
        (["--top_k=-1"], "generate.top_k=-1 is out of range"),
    ],
)
def test_generate_flags_out_of_range_fail_before_loading(flags, match):
    from jaxllm import cli

    with pytest.raises(JaxllmError, match=match):  # the model path does not exist: the flags fail first
        cli.run(["generate", "--model=/nonexistent/model", "--prompt=hi", *flags])


def test_prompt_file_must_be_utf8_text(tmp_path):
    from jaxllm.cli import read_prompt_file

    good = tmp_path / "good.txt"
    good.write_bytes("first prompt\r\n\n  \nsecond \u00e9\n".encode())
    assert read_prompt_file(str(good)) == ["first prompt", "second \u00e9"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\n\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(JaxllmError, match=r"bad.txt' line 2 is not UTF-8 text"):
        read_prompt_file(str(bad))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a\x00b\n")
    with pytest.raises(JaxllmError, match=r"nul.txt' line 1 holds a NUL byte"):
        read_prompt_file(str(nul))
    with pytest.raises(JaxllmError, match="cannot read --prompt_file"):
        read_prompt_file(str(tmp_path))


def test_generate_text_refuses_a_batch_size_below_one():
    from jaxllm.models.generation import generate_text

    with pytest.raises(JaxllmError, match="batch_size=0 is out of range"):
        generate_text(None, None, None, ["x"], GenerateConfig(), batch_size=0)
