"""Decoder building blocks: norms, rotary and ALiBi positions, attention, MLPs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jaxllm import sharding as shd
from jaxllm.models import flash, quant
from jaxllm.models.config import ModelConfig

NEG_INF = -1e9


def _init(cfg: ModelConfig, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def residual_axes(cfg: ModelConfig) -> tuple[str, ...]:
    """Logical axes of the residual stream: with `sequence_parallel` its length is split over the
    tensor axis between blocks (gathered for attention and the MLP, reduce-scattered after them)."""
    return ("batch", "act_length" if cfg.sequence_parallel else "length", "embed")


def constrain(x, axes: tuple[str, ...], name: str | None = None):
    """Pins `x` to its logical axes; `name` tags it for the remat policies that save or offload
    activations by name (see `jaxllm.models.decoder.REMAT_POLICIES`)."""
    x = shd.constrain(x, axes)
    return checkpoint_name(x, name) if name else x


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the compute dtype (as Llama and the QLoRA recipe do)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x_BLD.shape[-1],), self.cfg.jnp_norm_dtype)
        x32_BLD = x_BLD.astype(jnp.float32)
        normed = x32_BLD * jax.lax.rsqrt(jnp.mean(x32_BLD**2, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (normed * scale_D.astype(jnp.float32)).astype(self.cfg.jnp_dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (Falcon, BLOOM), in float32 whatever the compute dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        d, dtype = x_BLD.shape[-1], self.cfg.jnp_norm_dtype
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), dtype)
        bias_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), dtype)
        x32_BLD = x_BLD.astype(jnp.float32)
        centered = x32_BLD - jnp.mean(x32_BLD, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(jnp.mean(centered**2, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (normed * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(self.cfg.jnp_dtype)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
    return (LayerNorm if cfg.norm == "layer" else RMSNorm)(cfg, name=name)


def rotary(x_BLHK, positions_BL, theta: float):
    """Rotary embedding, half-split ("rotate_half") convention of the Hugging Face Llama."""
    k = x_BLHK.shape[-1]
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    angles_BLK2 = positions_BL.astype(jnp.float32)[..., None] * inv_freq_K2
    # cos/sin in float32, then applied in the activations' dtype, as Hugging Face does (bf16 copies of
    # q and k in the backward pass instead of float32 ones)
    cos_BL1K = jnp.cos(jnp.concatenate([angles_BLK2] * 2, -1))[:, :, None, :].astype(x_BLHK.dtype)
    sin_BL1K = jnp.sin(jnp.concatenate([angles_BLK2] * 2, -1))[:, :, None, :].astype(x_BLHK.dtype)
    x1, x2 = jnp.split(x_BLHK, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BLHK * cos_BL1K + rotated * sin_BL1K


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


def reference_attention(q_BTNK, k_BSHK, v_BSHK, mask_B1TS, bias_BNTS=None, *, dropout_rate=0.0,
                        dropout_rng=None):
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


def fused_attention(q_BTNK, k_BTHK, v_BTHK, mask_B1TT, implementation: str, bias_BNTT=None):
    """Causal self-attention (key slot s <= query slot t; the mask adds document boundaries and padding):
    cuDNN flash attention on GPU ("auto" in half precision, or "cudnn"), else XLA in causal blocks
    (`causal_blockwise_attention`).

    cuDNN takes the causal part natively and the document boundaries (plus any ALiBi bias) as one
    additive bias; handing JAX a boolean mask instead makes it fall back to XLA, which materialises
    [B, N, T, S] logits. cuDNN wants the bias in the compute dtype; XLA adds it to float32 logits.
    """
    if implementation == "auto":  # cuDNN's fused kernels take half precision only
        half = q_BTNK.dtype in (jnp.bfloat16, jnp.float16)
        implementation = "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    if implementation == "cudnn":
        bias = jnp.where(mask_B1TT, 0.0 if bias_BNTT is None else bias_BNTT, NEG_INF).astype(q_BTNK.dtype)
        return jax.nn.dot_product_attention(q_BTNK, k_BTHK, v_BTHK, bias=bias, is_causal=True,
                                            implementation="cudnn")
    return causal_blockwise_attention(q_BTNK, k_BTHK, v_BTHK, mask_B1TT, bias_BNTT)


QUERY_CHUNK = 128  # query rows per block of `causal_blockwise_attention`


def grouped_attention(q_XRK, k_XKS, v_XSK, mask_XRS, bias_XRS=None):
    """softmax(q k / sqrt(K)) v as two plain batched matmuls, keys already laid out [..., K, S] and values
    [..., S, K] (no transposed copy of either on the way); X is any batch shape ([B, H] or [B*H]), R the
    query rows (the G query heads of a kv head stacked with the query slots), mask and bias broadcast
    against [*X, R, S]. The numerics of `jax.nn.dot_product_attention(implementation="xla")`: float32
    logits and softmax, probabilities in the values' dtype."""
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_XRK.dtype == jnp.bfloat16 else None
    logits_XRS = jnp.matmul(q_XRK, k_XKS, precision=precision, preferred_element_type=jnp.float32)
    logits_XRS = logits_XRS * jnp.asarray(1.0 / math.sqrt(q_XRK.shape[-1]), jnp.float32)
    if bias_XRS is not None:
        logits_XRS = logits_XRS + bias_XRS
    probs_XRS = jax.nn.softmax(jnp.where(mask_XRS, logits_XRS, NEG_INF), axis=-1).astype(v_XSK.dtype)
    return jnp.matmul(probs_XRS, v_XSK)


def grouped_queries(q_BTNK, num_kv_heads: int):
    """[B, T, N, K] -> [B, H, G, T, K]: query head n = h * G + g reads kv head h."""
    b, t, n, kd = q_BTNK.shape
    return jnp.transpose(q_BTNK.reshape(b, t, num_kv_heads, n // num_kv_heads, kd), (0, 2, 3, 1, 4))


def ungrouped(out_BHGTK):
    """[B, H, G, T, K] -> [B, T, N, K]."""
    b, h, g, t, kd = out_BHGTK.shape
    return jnp.transpose(out_BHGTK, (0, 3, 1, 2, 4)).reshape(b, t, h * g, kd)


def causal_blockwise_attention(q_BTNK, k_BTHK, v_BTHK, mask_B1TT, bias_BNTT=None, chunk: int = QUERY_CHUNK):
    """XLA attention over causal self-attention (key slot s <= query slot t), `chunk` query rows at a time:
    block i's queries only read the keys up to its last row, so the masked upper triangle is never
    computed, and each block's logits stay small (`grouped_attention` per block). Against
    `jax.nn.dot_product_attention(implementation="xla")` on XLA:CPU, forward + backward takes a third
    of the time (batch 8, 256 tokens, 6 heads of 64: 10 ms against 30)."""
    t = q_BTNK.shape[1]
    q_BHGTK = grouped_queries(q_BTNK, k_BTHK.shape[2])
    k_BHKT = jnp.transpose(k_BTHK, (0, 2, 3, 1))
    v_BHTK = jnp.transpose(v_BTHK, (0, 2, 1, 3))
    b, h, g, _, kd = q_BHGTK.shape
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        rows = g * (end - start)
        mask_B1RS = jnp.broadcast_to(mask_B1TT[:, :, None, start:end, :end], (b, 1, g, end - start, end))
        bias_BHRS = None if bias_BNTT is None else bias_BNTT[:, :, start:end, :end].reshape(b, h, rows, end)
        out_BHRK = grouped_attention(q_BHGTK[:, :, :, start:end].reshape(b, h, rows, kd), k_BHKT[..., :end],
                                     v_BHTK[:, :, :end], mask_B1RS.reshape(b, 1, rows, end), bias_BHRS)
        outs.append(out_BHRK.reshape(b, h, g, end - start, kd))
    return ungrouped(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3))


def _lora_a_init(fan_in: int):
    """PEFT's default: kaiming_uniform(a=sqrt(5)) on A [r, fan_in], i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_a_param(module: nn.Module, name: str, in_shape: tuple[int, ...], in_axes: tuple[str, ...]):
    """A LoRA down-projection [*in, r], always float32 (the trainable adapter's optimizer needs it)."""
    init = nn.with_logical_partitioning(_lora_a_init(math.prod(in_shape)), (*in_axes, "lora_rank"))
    return module.param(name, init, (*in_shape, module.cfg.lora_rank), jnp.float32)


def lora_down(cfg: ModelConfig, a, x, deterministic: bool, num_in: int):
    """dropout(x) @ A in the compute dtype: [..., *in] -> [..., r]."""
    x = nn.Dropout(cfg.lora_dropout)(x, deterministic=deterministic) if cfg.lora_dropout else x
    return _contract(x, a.astype(cfg.jnp_dtype), num_in)


def _contract(x, w, num_in: int):
    """x [..., *in] . w [*in, *out] -> [..., *out], as one 2-D matmul [M, prod(in)] @ [prod(in), prod(out)].

    The reshapes are free (row-major merges), and the 2-D form keeps every gradient a plain matmul:
    contracting the leading batch dims of a 3-D operand (the kernel gradient x^T dy) made XLA:CPU
    materialise transposed copies of the activations, half the train step's time at d=384."""
    lead, out = x.shape[:x.ndim - num_in], w.shape[num_in:]
    fan_in = math.prod(w.shape[:num_in])
    y = jnp.dot(x.reshape(-1, fan_in), w.reshape(fan_in, -1))
    return y.reshape(*lead, *out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def frozen_quantized_matmul(x, leaves, kernel_shape, num_in):
    """x @ dequantize(leaves) for a frozen quantized base. The backward pass dequantizes again instead
    of keeping a float copy of every layer's kernel alive, and keeps no activations (no kernel grad)."""
    return _contract(x, _dequantized(leaves, x.dtype, kernel_shape, num_in), num_in)


def _dequantized(leaves, dtype, kernel_shape, num_in):
    """The kernel at its true shape (the block padding of its input rows dropped)."""
    return quant.dequantize(leaves, dtype, math.prod(kernel_shape[:num_in])).reshape(kernel_shape)


def _fqm_fwd(x, leaves, kernel_shape, num_in):
    return frozen_quantized_matmul(x, leaves, kernel_shape, num_in), leaves


def _fqm_bwd(kernel_shape, num_in, leaves, dy):
    dtype = dy.dtype  # x's dtype: the output's
    kernel = _dequantized(leaves, dtype, kernel_shape, num_in)
    fan_in = math.prod(kernel_shape[:num_in])
    dy_2d = dy.astype(dtype).reshape(-1, math.prod(kernel_shape[num_in:]))
    dx = jnp.dot(dy_2d, kernel.reshape(fan_in, -1).T).reshape(*dy.shape[:dy.ndim - (kernel.ndim - num_in)],
                                                                 *kernel_shape[:num_in])
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating)
                         else jnp.zeros_like(a), leaves)
    return dx, zeros


frozen_quantized_matmul.defvjp(_fqm_fwd, _fqm_bwd)


class Linear(nn.Module):
    """x @ kernel (+ bias) with kernel [*in, *out] (the layout of flax's Dense/DenseGeneral). With
    `cfg.quantization` the kernel is a frozen NF4/int8 base, dequantized on the fly to the compute
    dtype; with `lora` a LoRA update (alpha/r) * dropout(x) @ A @ B is added (B starts at zero, so
    the base model is reproduced exactly). `lora_xa` passes a precomputed x @ A (an A shared by
    several outputs, as in a fused query_key_value)."""

    cfg: ModelConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical axes of the kernel, inputs first
    num_in: int = 1
    lora: bool = False
    quantize: bool = True  # whether cfg.quantization applies to this layer
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, lora_xa=None):
        cfg, num_in = self.cfg, self.num_in
        in_shape, features = tuple(x.shape[-num_in:]), tuple(self.features)
        in_axes, out_axes = self.axes[:num_in], self.axes[num_in:]
        kind = cfg.quantization if self.quantize else "none"
        if kind == "none":
            kernel = self.param("kernel", _init(cfg, self.axes), (*in_shape, *features), cfg.jnp_param_dtype)
            # pinned to its sharding in the compute dtype: the FSDP all-gather moves bf16, and (the
            # constraint's transpose) the gradient is reduce-scattered in bf16, never all-reduced whole
            kernel = constrain(kernel.astype(cfg.jnp_dtype), self.axes)
        else:
            fan_in, fan_out = math.prod(in_shape), math.prod(features)
            leaves = {}
            for name, (shape, dtype) in quant.shapes(kind, (), fan_in, fan_out, cfg.quant_block_size).items():
                axes = {2: ((in_axes[0] if name in ("kernel_nf4", "kernel_int8") else None), out_axes[0]),
                        1: (None,), 0: ()}[len(shape)]
                init = nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)
                leaves[name] = self.param(name, init, shape, dtype)
        x = x.astype(cfg.jnp_dtype)
        if kind == "none":
            y = _contract(x, kernel, num_in)
        else:
            y = frozen_quantized_matmul(x, leaves, (*in_shape, *features), num_in)
        if self.lora:
            if lora_xa is None:
                lora_xa = lora_down(cfg, lora_a_param(self, "lora_a", in_shape, in_axes), x, self.deterministic,
                                    num_in)
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora_rank", *out_axes))
            b = self.param("lora_b", init, (cfg.lora_rank, *features), jnp.float32)
            y = y + _contract(lora_xa, b.astype(cfg.jnp_dtype), 1) * jnp.asarray(cfg.lora_scaling, cfg.jnp_dtype)
        if cfg.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, out_axes), features,
                              cfg.jnp_param_dtype)
            y = y + bias.astype(cfg.jnp_dtype)
        return y


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
            return Linear(cfg, (heads, k), ("embed", head_axis, "head_dim"), lora=lora,
                          deterministic=self.deterministic, name=name)(x_BLD, xa_BLR)

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
            out_BLNK = reference_attention(q_BLNK, k_BLHK, v_BLHK, mask_B1LL, bias_BNLL,
                                           dropout_rate=cfg.attn_dropout if use_dropout else 0.0, dropout_rng=rng)
        else:
            out_BLNK = fused_attention(q_BLNK, k_BLHK, v_BLHK, mask_B1LL, cfg.attention, bias_BNLL)
        return self._out(out_BLNK)

    def _out(self, out_BLNK):
        out_BLNK = constrain(out_BLNK, ("batch", "length", "heads", "head_dim"), "context")
        cfg = self.cfg
        out_BLD = Linear(cfg, (cfg.embed_dim,), ("heads", "head_dim", "embed"), num_in=2,
                         lora="o_proj" in cfg.lora_targets, deterministic=self.deterministic, name="o_proj")(out_BLNK)
        return constrain(out_BLD, residual_axes(cfg), "out_proj")

    def _cache_vars(self, k_BSHK, segment_ids_BS):
        """The cache, laid out for `grouped_attention` with batch and kv heads merged (X = B*H): keys
        [X, K, S], values [X, S, K]. The attention's matmuls read the very buffers the step updated: with
        a [B, H, ...] layout and batch 1, XLA duplicated each update to drop the unit dimension, copying
        every layer's cache several times per token."""
        zeros = lambda shape, dtype: lambda: jnp.zeros(shape, dtype)  # noqa: E731
        b, s, h, kd = k_BSHK.shape
        return (self.variable("cache", "cached_key", zeros((b * h, kd, s), k_BSHK.dtype)),
                self.variable("cache", "cached_value", zeros((b * h, s, kd), k_BSHK.dtype)),
                self.variable("cache", "cached_segment", zeros((b, s), jnp.int32)),
                self.variable("cache", "cached_position", zeros((b, s), jnp.int32)),
                self.variable("cache", "index", zeros((), jnp.int32)))

    def _attend_cached(self, q_BTNK, k_BTHK, v_BTHK, segment_ids_BT, positions_BT):
        """Writes this step's T keys/values at the cache index, then attends over the whole buffer:
        slots not yet written are masked by causality (slot order), padding by segment 0."""
        ck, cv, cseg, cpos, index = self._cache_vars(k_BTHK, segment_ids_BT)
        i, (b, t, h, kd) = index.value, k_BTHK.shape
        g = q_BTNK.shape[2] // h
        ck.value = jax.lax.dynamic_update_slice(
            ck.value, jnp.transpose(k_BTHK, (0, 2, 3, 1)).reshape(b * h, kd, t).astype(ck.value.dtype), (0, 0, i))
        cv.value = jax.lax.dynamic_update_slice(
            cv.value, jnp.transpose(v_BTHK, (0, 2, 1, 3)).reshape(b * h, t, kd).astype(cv.value.dtype), (0, i, 0))
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


MLP_AXES = ("batch", "length", "mlp")


class MLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)) (Llama), or down(gelu(up(x))) (Falcon exact, BLOOM tanh)."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.cfg

        def dense(name, features, axes):
            return Linear(cfg, (features,), axes, lora=name in cfg.lora_targets, deterministic=self.deterministic,
                          name=name)

        if cfg.mlp == "swiglu":
            gate_BLF = constrain(dense("gate_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD), MLP_AXES, "mlpwi_0")
            up_BLF = constrain(dense("up_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD), MLP_AXES, "mlpwi_1")
            h_BLF = nn.silu(gate_BLF) * up_BLF
        else:  # exact erf GELU (Falcon) or BLOOM's tanh approximation (0.79788456 = sqrt(2 / pi))
            up_BLF = constrain(dense("up_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD), MLP_AXES, "mlpwi")
            h_BLF = nn.gelu(up_BLF, approximate=cfg.mlp == "gelu_tanh")
        h_BLF = constrain(h_BLF, MLP_AXES)
        return constrain(dense("down_proj", cfg.embed_dim, ("mlp", "embed"))(h_BLF), residual_axes(cfg), "mlpwo")
