"""Block-wise weight quantization for a frozen base: NF4 with double-quantized scales (QLoRA), and int8.

A kernel is quantized in its 2-D form [..., fan_in, fan_out] (leading axes: scanned layers), in blocks
of `block_size` consecutive input rows per output column; each block keeps its absmax scale. Any
fan_in works: the input rows are padded with zero rows up to a multiple of the block size (as
bitsandbytes quantizes any tensor), and `dequantize(..., fan_in)` drops them again; the leaves keep
the 2-D [fan_in_padded (/2 for NF4), fan_out] layout, so they shard along the input axis like the
kernel. NF4 packs two 4-bit codes per byte (rows 2i and 2i+1 of a block). Double quantization
(Dettmers et al. 2023, section 3) stores the float32 block scales as int8 offsets from their mean,
with one float32 scale per 256 of them: 0.5 + 1/64 + 4/(64*256) bytes per weight = 4.13 bits.
Dequantization is plain jnp, so it runs inside the jitted matmul path in the compute dtype:
`frozen_quantized_matmul` multiplies by such a frozen kernel without keeping a float copy for the backward
pass; `contract` is the 2-D matmul every linear layer (quantized or not) and LoRA adapter runs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import JaxllmError
from jaxllm.sharding import target_platform

QUANTIZATIONS = ("none", "nf4", "int8")
SCALE_BLOCK = 256  # block scales per second-level scale (double quantization)

# The 16 NormalFloat4 levels as published (QLoRA appendix E; bitsandbytes' NF4 table).
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def leaf_names(kind: str) -> tuple[str, ...]:
    """The param names a quantized kernel is stored under (they replace `kernel`)."""
    if kind == "nf4":
        return ("kernel_nf4", "kernel_scale_q", "kernel_scale_scale", "kernel_scale_mean")
    if kind == "int8":
        return ("kernel_int8", "kernel_scale")
    raise JaxllmError(f"quantization={kind!r}; choose one of {', '.join(QUANTIZATIONS)}")


def check_block_size(block_size: Any, where: str = "lora.quant_block_size") -> None:
    """A block holds an even number of input rows (NF4 packs rows in pairs)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise JaxllmError(f"{where}={block_size!r} must be a positive even number of weights (64 as in QLoRA)")


def padded(fan_in: int, block_size: int) -> int:
    """fan_in rounded up to a whole number of blocks: the stored input rows."""
    return -(-fan_in // block_size) * block_size


def shapes(kind: str, lead: tuple[int, ...], fan_in: int, fan_out: int, block_size: int) -> dict[str, tuple]:
    """Shape and dtype of each stored leaf for a [*lead, fan_in, fan_out] kernel."""
    check_block_size(block_size)
    rows = padded(fan_in, block_size)
    blocks = rows // block_size
    if kind == "int8":
        return {
            "kernel_int8": ((*lead, rows, fan_out), jnp.int8),
            "kernel_scale": ((*lead, blocks, fan_out), jnp.float32),
        }
    num_scales = blocks * fan_out
    return {
        "kernel_nf4": ((*lead, rows // 2, fan_out), jnp.uint8),
        "kernel_scale_q": ((*lead, blocks, fan_out), jnp.int8),
        "kernel_scale_scale": ((*lead, -(-num_scales // SCALE_BLOCK)), jnp.float32),
        "kernel_scale_mean": ((*lead,), jnp.float32),
    }


def _blocks(w, block_size):
    *lead, fan_in, fan_out = w.shape
    return w.reshape(*lead, fan_in // block_size, block_size, fan_out)


def _scale_groups(x, fn_pad=0.0):
    """[..., blocks, fan_out] -> [..., groups, 256] (flattened, zero padded)."""
    *lead, b, f = x.shape
    flat = x.reshape(*lead, b * f)
    pad = -(b * f) % SCALE_BLOCK
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)], constant_values=fn_pad)
    return flat.reshape(*lead, -1, SCALE_BLOCK)


def quantize(w: jax.Array, kind: str, block_size: int = 64) -> dict[str, jax.Array]:
    """Quantizes a float [..., fan_in, fan_out] kernel (zero rows padded up to whole blocks); returns
    the leaves named by `leaf_names`."""
    w = jnp.asarray(w, jnp.float32)
    check_block_size(block_size)
    *lead, fan_in, fan_out = w.shape
    fan_in = padded(fan_in, block_size)
    w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, fan_in - w.shape[-2]), (0, 0)])
    blocks = _blocks(w, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # [..., nblocks, fan_out]
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normed = blocks / safe[..., None, :]
    if kind == "int8":
        codes = jnp.clip(jnp.round(normed * 127.0), -127, 127).astype(jnp.int8)
        return {"kernel_int8": codes.reshape(w.shape), "kernel_scale": absmax}
    if kind != "nf4":
        raise JaxllmError(f"quantization={kind!r}; choose one of {', '.join(QUANTIZATIONS)}")
    levels = jnp.asarray(NF4_LEVELS)
    idx = jnp.argmin(jnp.abs(normed[..., None] - levels), axis=-1).astype(jnp.uint8)  # nearest level
    idx = idx.reshape(*lead, fan_in // 2, 2, fan_out)
    packed = idx[..., 0, :] | (idx[..., 1, :] << 4)
    mean = jnp.mean(absmax, axis=(-2, -1))
    centered = _scale_groups(absmax - mean[..., None, None])
    scale2 = jnp.max(jnp.abs(centered), axis=-1) / 127.0
    q = jnp.round(centered / jnp.where(scale2 > 0, scale2, 1.0)[..., None])
    nblocks = absmax.shape[-2] * fan_out
    scale_q = q.reshape(*lead, -1)[..., :nblocks].reshape(absmax.shape).astype(jnp.int8)
    return {"kernel_nf4": packed, "kernel_scale_q": scale_q, "kernel_scale_scale": scale2, "kernel_scale_mean": mean}


def block_scales(leaves: dict[str, jax.Array]) -> jax.Array:
    """The float32 absmax of each block, [..., blocks, fan_out] (undoing the double quantization)."""
    if "kernel_scale" in leaves:
        return leaves["kernel_scale"]
    scale_q = leaves["kernel_scale_q"]
    groups = _scale_groups(scale_q.astype(jnp.float32)) * leaves["kernel_scale_scale"][..., None]
    *lead, b, f = scale_q.shape
    flat = groups.reshape(*lead, -1)[..., : b * f]
    return flat.reshape(scale_q.shape) + leaves["kernel_scale_mean"][..., None, None]


def dequantize(leaves: dict[str, jax.Array], dtype: Any = jnp.float32, fan_in: int | None = None) -> jax.Array:
    """The [..., fan_in, fan_out] kernel in `dtype` from its quantized leaves: its first `fan_in` input
    rows (the true size; None keeps the padded rows too)."""
    scales = block_scales(leaves)
    if "kernel_int8" in leaves:
        codes = leaves["kernel_int8"]
        values = codes.astype(jnp.float32) / 127.0
    else:
        packed = leaves["kernel_nf4"]
        *lead, half, fan_out = packed.shape
        idx = jnp.stack([packed & 15, packed >> 4], axis=-2).reshape(*lead, 2 * half, fan_out)
        values = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
    block_size = values.shape[-2] // scales.shape[-2]
    w = _blocks(values, block_size) * scales[..., None, :]
    w = w.reshape(values.shape)
    return (w if fan_in is None else w[..., :fan_in, :]).astype(dtype)


def bytes_per_param(kind: str, fan_in: int, fan_out: int, block_size: int = 64) -> float:
    """Stored bytes per weight of one [fan_in, fan_out] kernel."""
    total = sum(
        int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes(kind, (), fan_in, fan_out, block_size).values()
    )
    return total / (fan_in * fan_out)


def contract(x, w, num_in: int):
    """x [..., *in] . w [*in, *out] -> [..., *out].

    On TPU one dot_general: the compiler picks its operands' and result's layouts, where a reshape of a
    tiled [B*L, H*K] array into [B, L, H, K] is a copy (a 7B step spent an eighth of its HBM traffic on
    them). Elsewhere one 2-D matmul [M, prod(in)] @ [prod(in), prod(out)]: the reshapes are free
    (row-major merges), and contracting the leading batch dims of a 3-D operand (the kernel gradient
    x^T dy) made XLA:CPU materialise transposed copies of the activations, half the step at d=384."""
    if target_platform() == "tpu":
        dims = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
        return jax.lax.dot_general(x, w, (dims, ((), ())))
    lead, out = x.shape[: x.ndim - num_in], w.shape[num_in:]
    fan_in = math.prod(w.shape[:num_in])
    y = jnp.dot(x.reshape(-1, fan_in), w.reshape(fan_in, -1))
    return y.reshape(*lead, *out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def frozen_quantized_matmul(x, leaves, kernel_shape, num_in):
    """x @ dequantize(leaves) for a frozen quantized base. The backward pass dequantizes again instead
    of keeping a float copy of every layer's kernel alive, and keeps no activations (no kernel grad)."""
    return contract(x, _dequantized(leaves, x.dtype, kernel_shape, num_in), num_in)


def _dequantized(leaves, dtype, kernel_shape, num_in):
    """The kernel at its true shape (the block padding of its input rows dropped)."""
    return dequantize(leaves, dtype, math.prod(kernel_shape[:num_in])).reshape(kernel_shape)


def _fqm_fwd(x, leaves, kernel_shape, num_in):
    return frozen_quantized_matmul(x, leaves, kernel_shape, num_in), leaves


def _fqm_bwd(kernel_shape, num_in, leaves, dy):
    dtype = dy.dtype  # x's dtype: the output's
    kernel = _dequantized(leaves, dtype, kernel_shape, num_in)
    fan_in = math.prod(kernel_shape[:num_in])
    dy_2d = dy.astype(dtype).reshape(-1, math.prod(kernel_shape[num_in:]))
    dx = jnp.dot(dy_2d, kernel.reshape(fan_in, -1).T).reshape(
        *dy.shape[: dy.ndim - (kernel.ndim - num_in)], *kernel_shape[:num_in]
    )
    zeros = jax.tree.map(
        lambda a: (
            np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a)
        ),
        leaves,
    )
    return dx, zeros


frozen_quantized_matmul.defvjp(_fqm_fwd, _fqm_bwd)
