"""Sampling: greedy, temperature, top-k and top-p (Hugging Face semantics)."""

from __future__ import annotations

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxllm import JaxllmError


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
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 0:
            raise JaxllmError("generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_new_tokens >= 0")


def filter_logits(logits_BV: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then top-p, as transformers' logits warpers do; removed tokens get -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)  # ascending, like transformers' TopPLogitsWarper
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        remove_BV = cum_BV <= 1.0 - top_p
        remove_BV = remove_BV.at[:, -1].set(False)  # always keep the most likely token
        threshold_B1 = jnp.max(jnp.where(remove_BV, sorted_BV, -jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where((logits_BV <= threshold_B1) & jnp.any(remove_BV, -1, keepdims=True), -jnp.inf,
                              logits_BV)
    return logits_BV


def sample_token(logits_BV, rng, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def generate_ids(model: nn.Module, params, prompt_ids: list[int], cfg: GenerateConfig, *, eos_id: int,
                 max_len: int) -> list[int]:
    """Continues one prompt; a fixed-shape jitted loop over a buffer (no recompilation per token)."""
    total = min(len(prompt_ids) + cfg.max_new_tokens, max_len)
    if len(prompt_ids) >= total:
        raise JaxllmError(f"prompt has {len(prompt_ids)} tokens; the model's context is {max_len}")
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids

    @jax.jit
    def run(params, buf, rng):
        def body(carry):
            buf, cur, done, rng = carry
            rng, sub = jax.random.split(rng)
            logits = model.apply({"params": params}, buf)[:, cur - 1]
            tok = sample_token(logits, sub, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
            buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, cur))
            return buf, cur + 1, done | (tok[0] == eos_id), rng

        def cond(carry):
            _, cur, done, _ = carry
            return (cur < total) & ~done

        init = (buf, jnp.int32(len(prompt_ids)), jnp.bool_(False), rng)
        buf, cur, _, _ = jax.lax.while_loop(cond, body, init)
        return buf, cur

    out, end = run(params, jnp.asarray(buf), jax.random.key(cfg.seed))
    ids = np.asarray(jax.device_get(out))[0, len(prompt_ids): int(end)].tolist()
    return [t for t in ids if t != eos_id]


def wrap(text: str, width: int = 75) -> str:
    return "\n".join(textwrap.fill(p, width) if p.strip() else "" for p in text.split("\n"))
