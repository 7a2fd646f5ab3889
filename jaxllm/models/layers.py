"""Decoder building blocks: norms, rotary embeddings, attention, gated MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm.models.config import ModelConfig

NEG_INF = -1e9


def _init(cfg: ModelConfig, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def constrain(x, axes: tuple[str, ...]):
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the compute dtype (as Llama and the QLoRA recipe do)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x_BLD.shape[-1],), self.cfg.jnp_param_dtype)
        x32_BLD = x_BLD.astype(jnp.float32)
        normed = x32_BLD * jax.lax.rsqrt(jnp.mean(x32_BLD**2, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (normed * scale_D.astype(jnp.float32)).astype(self.cfg.jnp_dtype)


def rotary(x_BLHK, positions_BL, theta: float):
    """Rotary embedding, half-split ("rotate_half") convention of the Hugging Face Llama."""
    k = x_BLHK.shape[-1]
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    angles_BLK2 = positions_BL.astype(jnp.float32)[..., None] * inv_freq_K2
    cos_BL1K = jnp.cos(jnp.concatenate([angles_BLK2] * 2, -1))[:, :, None, :]
    sin_BL1K = jnp.sin(jnp.concatenate([angles_BLK2] * 2, -1))[:, :, None, :]
    x32 = x_BLHK.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos_BL1K + rotated * sin_BL1K).astype(x_BLHK.dtype)


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


def reference_attention(q_BTNK, k_BSHK, v_BSHK, mask_B1TS, *, dropout_rate=0.0, dropout_rng=None):
    """Plain-XLA attention in float32 (the reference the fused paths are tested against; has dropout)."""
    b, t, n, kd = q_BTNK.shape
    h = k_BSHK.shape[2]
    q_BTHGK = q_BTNK.reshape(b, t, h, n // h, kd).astype(jnp.float32)
    logits_BHGTS = jnp.einsum("bthgk,bshk->bhgts", q_BTHGK, k_BSHK.astype(jnp.float32)) / jnp.sqrt(kd)
    logits_BHGTS = jnp.where(mask_B1TS[:, :, None], logits_BHGTS, NEG_INF)
    probs_BHGTS = jax.nn.softmax(logits_BHGTS, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BHGTS.shape)
        probs_BHGTS = jnp.where(keep, probs_BHGTS / (1.0 - dropout_rate), 0.0)
    out_BTHGK = jnp.einsum("bhgts,bshk->bthgk", probs_BHGTS, v_BSHK.astype(jnp.float32))
    return out_BTHGK.reshape(b, t, n, kd).astype(q_BTNK.dtype)


def fused_attention(q_BTNK, k_BSHK, v_BSHK, mask_B1TS, implementation: str):
    """`jax.nn.dot_product_attention`, cuDNN flash attention on GPU ("auto"/"cudnn") or XLA.

    cuDNN takes the causal part natively and the document boundaries as an additive bias; handing
    JAX a boolean mask instead makes it fall back to XLA, which materialises [B, N, T, S] logits.
    """
    if implementation == "auto":  # cuDNN's fused kernels take half precision only
        half = q_BTNK.dtype in (jnp.bfloat16, jnp.float16)
        implementation = "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    if implementation == "cudnn":
        bias = jnp.where(mask_B1TS, 0.0, NEG_INF).astype(q_BTNK.dtype)
        return jax.nn.dot_product_attention(q_BTNK, k_BSHK, v_BSHK, bias=bias, is_causal=True,
                                            implementation="cudnn")
    return jax.nn.dot_product_attention(q_BTNK, k_BSHK, v_BSHK, mask=mask_B1TS, implementation="xla")


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention with rotary positions."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL):
        cfg = self.cfg
        n, h, k = cfg.num_heads, cfg.kv_heads, cfg.head_size

        def proj(name, heads, head_axis):
            return nn.DenseGeneral((heads, k), use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                                   kernel_init=_init(cfg, ("embed", head_axis, "head_dim")), name=name)

        q_BLNK = constrain(proj("q_proj", n, "heads")(x_BLD), ("batch", "length", "heads", "head_dim"))
        k_BLHK = constrain(proj("k_proj", h, "kv_heads")(x_BLD), ("batch", "length", "kv_heads", "head_dim"))
        v_BLHK = constrain(proj("v_proj", h, "kv_heads")(x_BLD), ("batch", "length", "kv_heads", "head_dim"))
        q_BLNK = rotary(q_BLNK, positions_BL, cfg.rope_theta)
        k_BLHK = rotary(k_BLHK, positions_BL, cfg.rope_theta)
        mask_B1LL = attention_mask(segment_ids_BL, segment_ids_BL)
        use_dropout = cfg.attn_dropout > 0.0 and not self.deterministic
        if cfg.attention == "reference" or use_dropout:
            rng = self.make_rng("dropout") if use_dropout else None
            out_BLNK = reference_attention(q_BLNK, k_BLHK, v_BLHK, mask_B1LL,
                                           dropout_rate=cfg.attn_dropout if use_dropout else 0.0, dropout_rng=rng)
        else:
            out_BLNK = fused_attention(q_BLNK, k_BLHK, v_BLHK, mask_B1LL, cfg.attention)
        out_BLNK = constrain(out_BLNK, ("batch", "length", "heads", "head_dim"))
        return nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), use_bias=False, dtype=cfg.jnp_dtype,
                               param_dtype=cfg.jnp_param_dtype, kernel_init=_init(cfg, ("heads", "head_dim", "embed")),
                               name="o_proj")(out_BLNK)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.cfg

        def dense(name, features, axes):
            return nn.Dense(features, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                            kernel_init=_init(cfg, axes), name=name)

        gate_BLF = dense("gate_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD)
        up_BLF = dense("up_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD)
        h_BLF = constrain(nn.silu(gate_BLF) * up_BLF, ("batch", "length", "mlp"))
        return dense("down_proj", cfg.embed_dim, ("mlp", "embed"))(h_BLF)
