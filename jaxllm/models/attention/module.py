"""The `Attention` module: q/k/v/o projections (with LoRA), rotary or ALiBi positions, the decode KV cache,
and which path computes it: Pallas flash on TPU, the float32 reference (or with dropout), else
`fused_attention` (cuDNN on GPU, XLA in causal blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm.models.attention import flash
from jaxllm.models.attention.fused import fused_attention, grouped_attention, grouped_queries, ungrouped
from jaxllm.models.attention.reference import alibi_bias, alibi_slopes, attention_mask, reference_attention
from jaxllm.models.config import ModelConfig
from jaxllm.models.layers import Linear, constrain, residual_axes, rotary
from jaxllm.models.lora import lora_a_param, lora_down


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention with rotary or ALiBi positions."""

    cfg: ModelConfig
    deterministic: bool = True
    decode: bool = False  # append this call's keys/values to the "cache" collection and attend to it

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL):
        cfg = self.cfg
        n, h, k = cfg.num_heads, cfg.kv_heads, cfg.head_size

        fused = "qkv" in cfg.lora_targets  # one LoRA A shared by q, k, v (Falcon/BLOOM query_key_value)
        xa_BLR = None
        if fused:
            a = lora_a_param(self, "qkv_lora_a", (cfg.embed_dim,), ("embed",))
            xa_BLR = lora_down(cfg, a, x_BLD.astype(cfg.jnp_dtype), self.deterministic, 1)

        def proj(name, heads, head_axis):
            lora = fused or name in cfg.lora_targets
            return Linear(
                cfg,
                (heads, k),
                ("embed", head_axis, "head_dim"),
                lora=lora,
                deterministic=self.deterministic,
                name=name,
            )(x_BLD, xa_BLR)

        q_BLNK = constrain(proj("q_proj", n, "heads"), ("batch", "length", "heads", "head_dim"), "query_proj")
        k_BLHK = constrain(proj("k_proj", h, "kv_heads"), ("batch", "length", "kv_heads", "head_dim"), "key_proj")
        v_BLHK = constrain(proj("v_proj", h, "kv_heads"), ("batch", "length", "kv_heads", "head_dim"), "value_proj")
        if cfg.position == "rope":
            q_BLNK = rotary(q_BLNK, positions_BL, cfg.rope_theta)
            k_BLHK = rotary(k_BLHK, positions_BL, cfg.rope_theta)
        if self.decode and self.has_variable("cache", "cached_key"):
            return self._attend_cached(q_BLNK, k_BLHK, v_BLHK, segment_ids_BL, positions_BL)
        if self.decode:  # the init call: make zeroed cache buffers as long as this (maximal) input
            self._cache_vars(k_BLHK, segment_ids_BL)
        use_dropout = cfg.attn_dropout > 0.0 and not self.deterministic
        if not (self.decode or use_dropout) and flash.use_flash(cfg.attention, q_BLNK.shape[1]):
            slopes_N = alibi_slopes(n) if cfg.position == "alibi" else None
            return self._out(flash.flash_attention(q_BLNK, k_BLHK, v_BLHK, segment_ids_BL, alibi_slopes_N=slopes_N))
        bias_BNLL = None
        if cfg.position == "alibi":
            bias_BNLL = constrain(alibi_bias(positions_BL, positions_BL, n), ("batch", "heads", "length", None))
        mask_B1LL = attention_mask(segment_ids_BL, segment_ids_BL)
        if cfg.attention == "reference" or use_dropout:
            rng = self.make_rng("dropout") if use_dropout else None
            out_BLNK = reference_attention(
                q_BLNK,
                k_BLHK,
                v_BLHK,
                mask_B1LL,
                bias_BNLL,
                dropout_rate=cfg.attn_dropout if use_dropout else 0.0,
                dropout_rng=rng,
            )
        else:
            out_BLNK = fused_attention(q_BLNK, k_BLHK, v_BLHK, mask_B1LL, cfg.attention, bias_BNLL)
        return self._out(out_BLNK)

    def _out(self, out_BLNK):
        out_BLNK = constrain(out_BLNK, ("batch", "length", "heads", "head_dim"), "context")
        cfg = self.cfg
        out_BLD = Linear(
            cfg,
            (cfg.embed_dim,),
            ("heads", "head_dim", "embed"),
            num_in=2,
            lora="o_proj" in cfg.lora_targets,
            deterministic=self.deterministic,
            name="o_proj",
        )(out_BLNK)
        return constrain(out_BLD, residual_axes(cfg), "out_proj")

    def _cache_vars(self, k_BSHK, segment_ids_BS):
        """The cache, laid out for `grouped_attention` with batch and kv heads merged (X = B*H): keys
        [X, K, S], values [X, S, K]. The attention's matmuls read the very buffers the step updated: with
        a [B, H, ...] layout and batch 1, XLA duplicated each update to drop the unit dimension, copying
        every layer's cache several times per token."""
        zeros = lambda shape, dtype: lambda: jnp.zeros(shape, dtype)  # noqa: E731
        b, s, h, kd = k_BSHK.shape
        return (
            self.variable("cache", "cached_key", zeros((b * h, kd, s), k_BSHK.dtype)),
            self.variable("cache", "cached_value", zeros((b * h, s, kd), k_BSHK.dtype)),
            self.variable("cache", "cached_segment", zeros((b, s), jnp.int32)),
            self.variable("cache", "cached_position", zeros((b, s), jnp.int32)),
            self.variable("cache", "index", zeros((), jnp.int32)),
        )

    def _attend_cached(self, q_BTNK, k_BTHK, v_BTHK, segment_ids_BT, positions_BT):
        """Writes this step's T keys/values at the cache index, then attends over the whole buffer:
        slots not yet written are masked by causality (slot order), padding by segment 0."""
        ck, cv, cseg, cpos, index = self._cache_vars(k_BTHK, segment_ids_BT)
        i, (b, t, h, kd) = index.value, k_BTHK.shape
        g = q_BTNK.shape[2] // h
        ck.value = jax.lax.dynamic_update_slice(
            ck.value, jnp.transpose(k_BTHK, (0, 2, 3, 1)).reshape(b * h, kd, t).astype(ck.value.dtype), (0, 0, i)
        )
        cv.value = jax.lax.dynamic_update_slice(
            cv.value, jnp.transpose(v_BTHK, (0, 2, 1, 3)).reshape(b * h, t, kd).astype(cv.value.dtype), (0, i, 0)
        )
        cseg.value = jax.lax.dynamic_update_slice(cseg.value, segment_ids_BT.astype(jnp.int32), (0, i))
        cpos.value = jax.lax.dynamic_update_slice(cpos.value, positions_BT.astype(jnp.int32), (0, i))
        index.value = i + t
        s = ck.value.shape[-1]
        causal_TS = (i + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
        mask_B1TS = (causal_TS[None] & (segment_ids_BT[:, :, None] == cseg.value[:, None, :]))[:, None]
        bias_BNTS = alibi_bias(positions_BT, cpos.value, self.cfg.num_heads) if self.cfg.position == "alibi" else None
        if self.cfg.attention == "reference":
            k_BSHK = jnp.transpose(ck.value.reshape(b, h, kd, s), (0, 3, 1, 2))
            v_BSHK = jnp.transpose(cv.value.reshape(b, h, s, kd), (0, 2, 1, 3))
            return self._out(reference_attention(q_BTNK, k_BSHK, v_BSHK, mask_B1TS, bias_BNTS))
        q_XRK = grouped_queries(q_BTNK, h).reshape(b * h, g * t, kd)
        mask_XRS = jnp.broadcast_to(mask_B1TS[:, :, None], (b, h, g, t, s)).reshape(b * h, g * t, s)
        bias_XRS = None if bias_BNTS is None else bias_BNTS.reshape(b * h, g * t, s)
        out_XRK = grouped_attention(q_XRK, ck.value, cv.value, mask_XRS, bias_XRS)
        return self._out(ungrouped(out_XRK.reshape(b, h, g, t, kd)))
