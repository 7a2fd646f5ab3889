"""The attention mask, ALiBi positions and the plain-XLA reference attention: the float32 path every fused
one (`fused`, `flash`) is tested against, and the only one with attention dropout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e9


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes 2^(-8i/n) (Press et al.); for a non-power-of-2 count n, the slopes of the
    closest power of 2 below it, then every other slope of the next power of 2 (as BLOOM builds them)."""

    def powers(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest) + powers(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, np.float32)


def alibi_bias(q_positions_BT, kv_positions_BS, num_heads: int):
    """slope * (k_pos - q_pos), float32 [B, N, T, S]: positions restart per packed document, so the bias
    is the same whatever a document's offset in the row (softmax ignores BLOOM's per-row constant)."""
    slopes_N = jnp.asarray(alibi_slopes(num_heads))
    dist_BTS = (kv_positions_BS[:, None, :] - q_positions_BT[:, :, None]).astype(jnp.float32)
    return slopes_N[None, :, None, None] * dist_BTS[:, None]


def attention_mask(q_segment_BT, kv_segment_BS, q_positions_BT=None, kv_positions_BS=None):
    """Causal and same-document mask [B, 1, T, S]; packed documents never see each other."""
    t, s = q_segment_BT.shape[1], kv_segment_BS.shape[1]
    if q_positions_BT is None:
        causal_TS = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
        causal_BTS = jnp.broadcast_to(causal_TS, (q_segment_BT.shape[0], t, s))
    else:
        causal_BTS = q_positions_BT[:, :, None] >= kv_positions_BS[:, None, :]
    same_BTS = q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
    return (causal_BTS & same_BTS)[:, None]


def reference_attention(q_BTNK, k_BSHK, v_BSHK, mask_B1TS, bias_BNTS=None, *, dropout_rate=0.0, dropout_rng=None):
    """Plain-XLA attention in float32 (the reference the fused paths are tested against; has dropout).
    Query head n reads kv head n // (N / H), as Llama's repeat_kv and Falcon's grouped layout do."""
    b, t, n, kd = q_BTNK.shape
    h = k_BSHK.shape[2]
    q_BTHGK = q_BTNK.reshape(b, t, h, n // h, kd).astype(jnp.float32)
    logits_BHGTS = jnp.einsum("bthgk,bshk->bhgts", q_BTHGK, k_BSHK.astype(jnp.float32)) / jnp.sqrt(kd)
    if bias_BNTS is not None:
        logits_BHGTS = logits_BHGTS + bias_BNTS.reshape(b, h, n // h, t, -1).astype(jnp.float32)
    logits_BHGTS = jnp.where(mask_B1TS[:, :, None], logits_BHGTS, NEG_INF)
    probs_BHGTS = jax.nn.softmax(logits_BHGTS, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BHGTS.shape)
        probs_BHGTS = jnp.where(keep, probs_BHGTS / (1.0 - dropout_rate), 0.0)
    out_BTHGK = jnp.einsum("bhgts,bshk->bthgk", probs_BHGTS, v_BSHK.astype(jnp.float32))
    return out_BTHGK.reshape(b, t, n, kd).astype(q_BTNK.dtype)
