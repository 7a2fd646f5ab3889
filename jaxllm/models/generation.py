"""Sampling with a KV cache: greedy, temperature, top-k and top-p (Hugging Face semantics).

Prompts are left-padded into one batch, the prompt is run once (prefill) to fill each layer's cache,
then a jitted fixed-shape loop adds one token per step; nothing recompiles per token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import textwrap
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.config import check_number
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder, layer_layout


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """`GenerateConfig(**cfg.generate)`."""

    prompt: str = ""  # text to continue
    max_new_tokens: int = 64  # 0 disables the sample at the end of training
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: smallest set with probability >= top_p; 1 = off
    seed: int = 0

    def __post_init__(self):
        check_number("generate.max_new_tokens", self.max_new_tokens, low=0, integer=True)
        check_number("generate.temperature", self.temperature, low=0)
        check_number("generate.top_k", self.top_k, low=0, integer=True)
        check_number("generate.top_p", self.top_p, low=0, high=1, low_open=True)
        check_number("generate.seed", self.seed, integer=True)


def filter_logits(logits_BV: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then top-p, as transformers' logits warpers do; removed tokens get -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)  # ascending, like transformers' TopPLogitsWarper
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        remove_BV = (cum_BV <= 1.0 - top_p).at[:, -1].set(False)  # always keep the most likely token
        threshold_B1 = jnp.max(jnp.where(remove_BV, sorted_BV, -jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV <= threshold_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_token(logits_BV, rng, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, width: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions) [B, P]: pads on the left carry segment 0; positions start at 0
    on each prompt's first real token, as transformers derives them from the attention mask. P is the
    longest prompt, or `width` if that is longer."""
    width = max(width, *(len(p) for p in prompts))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        if len(p):
            tokens[row, width - len(p) :] = p
            segments[row, width - len(p) :] = 1
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    return tokens, segments, positions


def generate(
    model: nn.Module,
    params,
    prompts: Sequence[Sequence[int]],
    cfg: GenerateConfig,
    *,
    eos_id: int,
    pad_id: int = 0,
    width: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (without the prompt; cut after EOS, which is not returned). Prompts
    are left-padded to `width` tokens when it is longer than the longest: calls with one width share
    one compiled program."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JaxllmError("generate: every prompt needs at least one token (add a BOS token to empty prompts)")
    tokens, segments, positions = left_pad(prompts, pad_id, width)
    total = tokens.shape[1] + cfg.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise JaxllmError(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
            f"model's context of {model.cfg.max_seq_len}; shorten one of them"
        )
    if cfg.max_new_tokens == 0:
        return [[] for _ in prompts]
    decode = _decode_fn(dataclasses.replace(model.cfg, remat="none"), tokens.shape, cfg, eos_id, pad_id)
    mesh = shd.mesh_of(params)  # params sharded over a mesh (a training run's): decode under it, constrained
    with shd.activate(mesh) if mesh is not None else contextlib.nullcontext():
        out = decode(
            params, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions), jax.random.key(cfg.seed)
        )
    return [row[: row.index(eos_id)] if eos_id in row else row for row in np.asarray(jax.device_get(out)).tolist()]


@functools.lru_cache(maxsize=16)
def _decode_fn(model_cfg: ModelConfig, shape: tuple[int, int], cfg: GenerateConfig, eos_id: int, pad_id: int):
    """The jitted prefill + decode loop for one (model, batch shape, sampling) combination, kept so a
    second call with the same shapes reuses the compiled program."""
    # remat is off for inference, and the layers are unrolled: a scanned stack dynamic-slices (copies) every
    # layer's weights on every token, which doubled the memory traffic of a decode step
    model = Decoder(dataclasses.replace(model_cfg, scan_layers=False))
    b, p = shape
    total = p + cfg.max_new_tokens
    warp = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)

    @jax.jit
    def run(params, tokens_BP, segments_BP, positions_BP, rng):
        params = layer_layout(params, model_cfg.num_layers, scan=False)
        cache = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(
                lambda: model.init(jax.random.key(0), jnp.zeros((b, total), jnp.int32), decode=True)["cache"]
            ),
        )
        logits_BPV, mutated = model.apply(
            {"params": params, "cache": cache}, tokens_BP, positions_BP, segments_BP, decode=True, mutable=["cache"]
        )
        rng, sub = jax.random.split(rng)
        first_B = sample_token(logits_BPV[:, -1], sub, **warp)
        out_BN = jnp.full((b, cfg.max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)

        def body(i, carry):
            out_BN, cache, pos_B, done_B, rng = carry
            tok_B = out_BN[:, i - 1]
            logits_B1V, mutated = model.apply(
                {"params": params, "cache": cache},
                tok_B[:, None],
                pos_B[:, None],
                jnp.ones((b, 1), jnp.int32),
                decode=True,
                mutable=["cache"],
            )
            rng, sub = jax.random.split(rng)
            nxt_B = sample_token(logits_B1V[:, 0], sub, **warp)
            done_B = done_B | (tok_B == eos_id)
            out_BN = out_BN.at[:, i].set(jnp.where(done_B, pad_id, nxt_B))
            return out_BN, mutated["cache"], pos_B + 1, done_B, rng

        init = (out_BN, mutated["cache"], positions_BP[:, -1] + 1, jnp.zeros((b,), bool), rng)
        return jax.lax.fori_loop(1, cfg.max_new_tokens, body, init)[0]

    return run


def continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text `new_ids` add after the prompt. SentencePiece drops the leading space of a decoded text,
    so decoding `new_ids` alone glues the first word onto the prompt ("statement" + "in"); decoding
    prompt and continuation together keeps it."""
    head = tokenizer.decode(list(prompt_ids))
    whole = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(new_ids)


def generate_text(
    model: nn.Module,
    params,
    tokenizer,
    prompts: Sequence[str],
    cfg: GenerateConfig,
    *,
    add_bos: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """Continuations of `prompts`, batched `batch_size` at a time with left padding."""
    check_number("batch_size", batch_size, low=1, integer=True)
    encoded = []
    for text in prompts:
        ids = tokenizer.encode(text)
        if add_bos and tokenizer.bos_id >= 0 and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id] + ids
        encoded.append(ids)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    out: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        chunk += [chunk[-1]] * (batch_size - len(chunk)) if len(encoded) > batch_size else []  # one shape
        ids = generate(model, params, chunk, cfg, eos_id=tokenizer.eos_id, pad_id=pad_id)
        out.extend(continuation(tokenizer, prompt, row) for prompt, row in zip(chunk, ids[: len(encoded) - start]))
    return out


def wrap(text: str, width: int = 75) -> str:
    return "\n".join(textwrap.fill(p, width) if p.strip() else "" for p in text.split("\n"))
