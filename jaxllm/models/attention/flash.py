"""Flash attention on TPU (Pallas): Splash attention for rotary models, our ALiBi kernel for BLOOM.

Same contract as `reference_attention`: q [B, T, N, K], k/v [B, S, H, K] (query head n reads kv
head n // (N / H)), causal, packed documents kept apart by segment ids (0 = padding). Neither path
builds [B, N, T, S] logits: memory is linear in the sequence. Under a mesh the kernels run per
device in `shard_map` over the batch and head axes the logical rules in force give (`batch`,
`heads`); kv heads that do not divide the head axis are repeated until they do.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxllm import JaxllmError
from jaxllm.models.attention.flash_alibi import alibi_flash_attention
from jaxllm.sharding import target_platform

MIN_BLOCK = 128  # the TPU lane width: both block sizes and the sequence must be multiples of it
BLOCK_SIZES = (512, 256, 128)  # the largest that divides the sequence is used


def use_flash(implementation: str, seq_len: int) -> bool:
    """Whether self-attention over `seq_len` tokens takes this kernel: "flash" always ("auto": on TPU)
    once the sequence fills a 128-token block; shorter sequences gain nothing and stay on XLA."""
    if implementation not in ("auto", "flash") or seq_len < MIN_BLOCK:
        return False
    platform = target_platform()
    if implementation == "auto":
        return platform == "tpu" and seq_len % MIN_BLOCK == 0
    if seq_len % MIN_BLOCK:
        raise JaxllmError(
            f"attention='flash' needs a sequence length that is a multiple of {MIN_BLOCK}, got "
            f"{seq_len}; pad the sequence or use attention='auto' (XLA for such lengths)"
        )
    if platform not in ("tpu", "cpu"):
        raise JaxllmError(
            f"attention='flash' is a TPU kernel (interpreted on CPU for tests), not for {platform}; "
            "use attention='auto'"
        )
    return True


def flash_attention(
    q_BTNK,
    k_BSHK,
    v_BSHK,
    segment_ids_BT,
    *,
    alibi_slopes_N: np.ndarray | None = None,
    block_size: int | None = None,
    interpret: bool | None = None,
):
    """Causal self-attention over packed documents, with ALiBi when `alibi_slopes_N` is given.

    `block_size` (default: the largest of 512, 256, 128 dividing T) tiles queries and keys;
    `interpret` (default: off TPU) runs the Pallas kernels in the interpreter."""
    b, t, n, kd = q_BTNK.shape
    h = k_BSHK.shape[2]
    if k_BSHK.shape[1] != t or segment_ids_BT.shape != (b, t):
        raise JaxllmError(
            f"flash attention is self-attention: q {q_BTNK.shape}, k {k_BSHK.shape} and segment ids "
            f"{segment_ids_BT.shape} must share batch and length"
        )
    if n % h:
        raise JaxllmError(f"flash attention: {n} query heads are not a multiple of {h} kv heads")
    if block_size is None:
        block_size = next((bs for bs in BLOCK_SIZES if t % bs == 0), 0)
    if not block_size or block_size % MIN_BLOCK or t % block_size:
        raise JaxllmError(
            f"flash attention: sequence length {t} and block size {block_size or 'none'} must be "
            f"multiples of {MIN_BLOCK}, the block dividing the sequence"
        )
    if interpret is None:
        interpret = target_platform() != "tpu"
    slopes_N = None if alibi_slopes_N is None else jnp.asarray(alibi_slopes_N, jnp.float32)
    local = functools.partial(_local_attention, block=block_size, interpret=interpret)
    # The kernels tile the head-major layout [B, N, T, K]. Transposed (and q scaled) out here, before
    # shard_map, these fuse into the producers (rotary, the projections) instead of each being a copy
    # of q, k and v per layer and pass.
    if slopes_N is None:  # Splash does not scale the logits: q is scaled first, in float32
        q_BTNK = (q_BTNK.astype(jnp.float32) * kd**-0.5).astype(q_BTNK.dtype)
    q_BNTK, k_BHSK, v_BHSK = (x.transpose(0, 2, 1, 3) for x in (q_BTNK, k_BSHK, v_BSHK))
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BNTK, k_BHSK, v_BHSK, segment_ids_BT, slopes_N).transpose(0, 2, 1, 3)
    batch_axes, head_axes = _mesh_axes(mesh, b, n)
    head_shards = math.prod(mesh.shape[a] for a in head_axes)
    if h % head_shards:  # e.g. 8 kv heads on tensor=16: repeat each until the count divides
        repeat = math.lcm(h, head_shards) // h
        k_BHSK, v_BHSK = jnp.repeat(k_BHSK, repeat, axis=1), jnp.repeat(v_BHSK, repeat, axis=1)
    batch, heads = batch_axes or None, head_axes or None
    qkv_spec = P(batch, heads, None, None)
    args, in_specs = (q_BNTK, k_BHSK, v_BHSK, segment_ids_BT), (qkv_spec, qkv_spec, qkv_spec, P(batch, None))
    if slopes_N is not None:
        args, in_specs = (*args, slopes_N), (*in_specs, P(heads))
    out_BNTK = jax.shard_map(local, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(*args)
    return out_BNTK.transpose(0, 2, 1, 3)


def _mesh_axes(mesh, batch: int, heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The mesh axes the logical rules in force give `batch` and `heads`, dropped where they do not
    divide the dimension (those devices then compute the same heads or rows redundantly)."""
    spec = nn.logical_to_mesh_axes(("batch", "heads")) or P(None, None)

    def fit(axes, dim):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        group = tuple(a for a in group if a in mesh.shape)
        return group if dim % math.prod(mesh.shape[a] for a in group) == 0 else ()

    return fit(spec[0], batch), fit(spec[1], heads)


def _local_attention(q_BNTK, k_BHSK, v_BHSK, segment_ids_BT, slopes_N=None, *, block: int, interpret: bool):
    """One device's attention over its rows and heads, in the head-major layout the kernels tile."""
    if slopes_N is None:
        return _splash(q_BNTK, k_BHSK, v_BHSK, segment_ids_BT, block, interpret)
    return alibi_flash_attention(q_BNTK, k_BHSK, v_BHSK, segment_ids_BT[:, None, :], slopes_N, block, block, interpret)


def _splash(q_BNTK, k_BHSK, v_BHSK, segment_ids_BT, block: int, interpret: bool):
    """Splash attention (causal mask, segment ids, grouped kv heads natively), vmapped over the batch;
    q comes scaled."""
    n, t = q_BNTK.shape[1:3]
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * n)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s)))(q_BNTK, k_BHSK, v_BHSK, segment_ids_BT)
