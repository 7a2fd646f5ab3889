"""Decoder building blocks: norms, rotary positions, linear layers (LoRA adapters, a quantized frozen base)
and MLPs. Attention lives in `jaxllm.models.attention`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jaxllm import sharding as shd
from jaxllm.models import quant
from jaxllm.models.config import ModelConfig
from jaxllm.models.lora import lora_a_param, lora_down


def normal_init(cfg: ModelConfig, axes: tuple[str, ...]):
    """normal(init_std), the initializer of the embedding and every float kernel, on logical `axes`."""
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def residual_axes(cfg: ModelConfig) -> tuple[str, ...]:
    """Logical axes of the residual stream: with `sequence_parallel` its length is split over the
    tensor axis between blocks (gathered for attention and the MLP, reduce-scattered after them)."""
    return ("batch", "act_length" if cfg.sequence_parallel else "length", "embed")


def constrain(x, axes: tuple[str, ...], name: str | None = None):
    """Pins `x` to its logical axes; `name` tags it for the remat policies that save or offload
    activations by name (see `jaxllm.models.config.REMAT_POLICIES`)."""
    x = shd.constrain(x, axes)
    return checkpoint_name(x, name) if name else x


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the compute dtype (as Llama and the QLoRA recipe do)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x_BLD.shape[-1],),
            self.cfg.jnp_norm_dtype,
        )
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
    # q and k in the backward pass instead of float32 ones). Written per half, x1 cos - x2 sin and
    # x2 cos + x1 sin: the same products and sums as x cos + rotate_half(x) sin, without materialising
    # rotate_half (one elementwise pass that fuses with what reads it)
    cos_BL1K = jnp.cos(angles_BLK2)[:, :, None, :].astype(x_BLHK.dtype)
    sin_BL1K = jnp.sin(angles_BLK2)[:, :, None, :].astype(x_BLHK.dtype)
    x1, x2 = jnp.split(x_BLHK, 2, axis=-1)
    return jnp.concatenate([x1 * cos_BL1K - x2 * sin_BL1K, x2 * cos_BL1K + x1 * sin_BL1K], axis=-1)


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
            kernel = self.param("kernel", normal_init(cfg, self.axes), (*in_shape, *features), cfg.jnp_param_dtype)
            # pinned to its sharding in the compute dtype: the FSDP all-gather moves bf16, and (the
            # constraint's transpose) the gradient is reduce-scattered in bf16, never all-reduced whole
            kernel = constrain(kernel.astype(cfg.jnp_dtype), self.axes)
        else:
            fan_in, fan_out = math.prod(in_shape), math.prod(features)
            leaves = {}
            for name, (shape, dtype) in quant.shapes(kind, (), fan_in, fan_out, cfg.quant_block_size).items():
                axes = {
                    2: ((in_axes[0] if name in ("kernel_nf4", "kernel_int8") else None), out_axes[0]),
                    1: (None,),
                    0: (),
                }[len(shape)]
                init = nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)
                leaves[name] = self.param(name, init, shape, dtype)
        x = x.astype(cfg.jnp_dtype)
        if kind == "none":
            y = quant.contract(x, kernel, num_in)
        else:
            y = quant.frozen_quantized_matmul(x, leaves, (*in_shape, *features), num_in)
        if self.lora:
            if lora_xa is None:
                lora_xa = lora_down(cfg, lora_a_param(self, "lora_a", in_shape, in_axes), x, self.deterministic, num_in)
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora_rank", *out_axes))
            b = self.param("lora_b", init, (cfg.lora_rank, *features), jnp.float32)
            y = y + quant.contract(lora_xa, b.astype(cfg.jnp_dtype), 1) * jnp.asarray(cfg.lora_scaling, cfg.jnp_dtype)
        if cfg.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, out_axes), features, cfg.jnp_param_dtype
            )
            y = y + bias.astype(cfg.jnp_dtype)
        return y


MLP_AXES = ("batch", "length", "mlp")


class MLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)) (Llama), or down(gelu(up(x))) (Falcon exact, BLOOM tanh)."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.cfg

        def dense(name, features, axes):
            return Linear(
                cfg, (features,), axes, lora=name in cfg.lora_targets, deterministic=self.deterministic, name=name
            )

        if cfg.mlp == "swiglu":
            gate_BLF = constrain(dense("gate_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD), MLP_AXES, "mlpwi_0")
            up_BLF = constrain(dense("up_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD), MLP_AXES, "mlpwi_1")
            h_BLF = nn.silu(gate_BLF) * up_BLF
        else:  # exact erf GELU (Falcon) or BLOOM's tanh approximation (0.79788456 = sqrt(2 / pi))
            up_BLF = constrain(dense("up_proj", cfg.mlp_dim, ("embed", "mlp"))(x_BLD), MLP_AXES, "mlpwi")
            h_BLF = nn.gelu(up_BLF, approximate=cfg.mlp == "gelu_tanh")
        h_BLF = constrain(h_BLF, MLP_AXES)
        return constrain(dense("down_proj", cfg.embed_dim, ("mlp", "embed"))(h_BLF), residual_axes(cfg), "mlpwo")
