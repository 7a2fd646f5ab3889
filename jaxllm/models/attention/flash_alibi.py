"""A Pallas TPU flash-attention kernel (forward and backward) with the ALiBi bias computed in-kernel.

Splash attention (our kernel for rotary models) takes no additive bias, and handing a kernel a
[B, N, T, S] bias would bring back the memory flash attention saves. Here each [bq, bkv] tile adds
slope_n * (k - q) from its block offsets and iotas, so nothing larger than a tile is ever built.
Within a packed document positions are contiguous, so for every pair the mask lets through
(same document, k <= q) the index distance k - q is the position distance ALiBi is defined on.

Layout: q [B, N, T, K], k/v [B, H, S, K] (query head n reads kv head n // (N / H)), segment ids
[B, 1, T] (0 = padding; tokens attend within their segment, causally), slopes [N] float32.
Three kernels, as FlashAttention-2: forward (saves the row logsumexp), dq (over kv blocks) and
dk/dv (over the query heads sharing a kv head and over query blocks), computed with k in rows so
that no tile needs a transpose. Blocks wholly above the diagonal are skipped, and their index maps
repeat the previous block so the pipeline fetches nothing for them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked tile must not give NaN
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
RESIDUAL_NAME = "flash_attention_residual"  # checkpoint name of out and logsumexp (for remat policies)


def _tile(x, width: int):
    """[rows, 128] lane-replicated -> [rows, width] (width a multiple of 128, or the first `width` lanes)."""
    if width <= LANES:
        return x[:, :width]
    return jnp.tile(x, (1, width // LANES))


def _logits(s, slope, q_start, k_start, q_seg, k_seg, *, k_in_rows: bool):
    """Scaled logits + ALiBi, with cross-document and future pairs masked.

    q_seg/k_seg are [rows, 1] / [1, cols] in whichever orientation the tile has."""
    rows_iota = lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols_iota = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    if k_in_rows:
        k_idx, q_idx = k_start + rows_iota, q_start + cols_iota
    else:
        q_idx, k_idx = q_start + rows_iota, k_start + cols_iota
    s = s + slope * (k_idx - q_idx).astype(jnp.float32)
    keep = (q_idx >= k_idx) & (q_seg == k_seg)
    return jnp.where(keep, s, MASK_VALUE)


def _fwd_kernel(
    slopes_ref,
    q_seg_ref,
    k_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    scale: float,
    bq: int,
    bkv: int,
    num_kv_blocks: int,
):
    n, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    head_dim = acc_scr.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(j * bkv < (i + 1) * bq)  # the tile holds some k <= q
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32) * scale
        q_seg = q_seg_ref[0][:, None]
        s = _logits(s, slopes_ref[n], i * bq, j * bkv, q_seg, k_seg_ref[...], k_in_rows=False)
        m_prev, l_prev = m_scr[...], l_scr[...]
        m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])  # [bq, 128]
        p = jnp.exp(s - _tile(m_next, bkv))
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_prev + lax.broadcast_in_dim(p.sum(axis=-1), l_prev.shape, (0,))
        m_scr[...] = m_next
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        acc_scr[...] = _tile(alpha, head_dim) * acc_scr[...] + pv

    @pl.when(j == num_kv_blocks - 1)
    def _end():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / _tile(l, head_dim)).astype(o_ref.dtype)
        lse_ref[...] = (m_scr[...] + jnp.log(l))[:, 0][None, :]


def _dq_kernel(
    slopes_ref,
    q_seg_ref,
    k_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    di_ref,
    dq_ref,
    dq_scr,
    *,
    scale: float,
    bq: int,
    bkv: int,
    num_kv_blocks: int,
):
    n, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    @pl.when(j * bkv < (i + 1) * bq)
    def _step():
        k, v = k_ref[...], v_ref[...]
        s = lax.dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32) * scale
        s = _logits(s, slopes_ref[n], i * bq, j * bkv, q_seg_ref[0][:, None], k_seg_ref[...], k_in_rows=False)
        p = jnp.exp(s - lse_ref[0][:, None])
        dp = lax.dot_general(do_ref[...], v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[0][:, None])
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

    @pl.when(j == num_kv_blocks - 1)
    def _end():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    slopes_ref,
    q_seg_ref,
    k_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    di_ref,
    dk_ref,
    dv_ref,
    dk_scr,
    dv_scr,
    *,
    scale: float,
    bq: int,
    bkv: int,
    group: int,
    num_q_blocks: int,
):
    h, j, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when((i + 1) * bq > j * bkv)  # the tile holds some q >= k
    def _step():
        q, do = q_ref[...], do_ref[...]
        s_t = lax.dot_general(k_ref[...], q, NT, preferred_element_type=jnp.float32) * scale  # [bkv, bq]
        s_t = _logits(
            s_t, slopes_ref[h * group + g], i * bq, j * bkv, q_seg_ref[...], k_seg_ref[0][:, None], k_in_rows=True
        )
        p_t = jnp.exp(s_t - lse_ref[...])
        dv_scr[...] += lax.dot_general(p_t.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v_ref[...], do, NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - di_ref[...])
        dk_scr[...] += lax.dot_general(ds_t.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)

    @pl.when((g == group - 1) & (i == num_q_blocks - 1))
    def _end():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _smem():
    return pl.BlockSpec(memory_space=pltpu.MemorySpace.SMEM)


def _params(*semantics: str) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, k, v, seg, slopes, bq: int, bkv: int, interpret: bool):
    b, n, t, kd = q.shape
    h, s = k.shape[1], k.shape[2]
    group, nq, nk = n // h, t // bq, s // bkv

    kernel = functools.partial(_fwd_kernel, scale=kd**-0.5, bq=bq, bkv=bkv, num_kv_blocks=nk)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, n, nq, nk),
        in_specs=_query_major_specs(bq, bkv, kd, group),
        out_specs=[
            pl.BlockSpec((None, None, bq, kd), lambda b_, n_, i, j: (b_, n_, i, 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b_, n_, i, j: (b_, n_, 0, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32)],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, kd), jnp.float32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="alibi_flash_fwd",
    )(slopes, seg, seg, q, k, v)
    return out, lse


def _query_major_specs(bq: int, bkv: int, kd: int, group: int) -> list:
    """Blocks of (slopes, q segments, kv segments, q, k, v) for a grid (batch, head, q block i, kv block j)."""

    def kv_block(i, j):  # blocks past the diagonal re-name the last needed one: no DMA for them (lax.div:
        # jnp's floor division lowers through sign, which Mosaic ties to the local chip)
        return jnp.minimum(j, lax.div((i + 1) * bq - 1, bkv))

    return [
        _smem(),
        pl.BlockSpec((None, 1, bq), lambda b_, n_, i, j: (b_, 0, i)),
        pl.BlockSpec((None, 1, bkv), lambda b_, n_, i, j: (b_, 0, kv_block(i, j))),
        pl.BlockSpec((None, None, bq, kd), lambda b_, n_, i, j: (b_, n_, i, 0)),
        pl.BlockSpec((None, None, bkv, kd), lambda b_, n_, i, j: (b_, lax.div(n_, group), kv_block(i, j), 0)),
        pl.BlockSpec((None, None, bkv, kd), lambda b_, n_, i, j: (b_, lax.div(n_, group), kv_block(i, j), 0)),
    ]


def _backward(q, k, v, seg, slopes, out, lse, do, bq: int, bkv: int, interpret: bool):
    b, n, t, kd = q.shape
    h, s = k.shape[1], k.shape[2]
    group, nq, nk = n // h, t // bq, s // bkv
    scale = kd**-0.5
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, N, 1, T]

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bkv=bkv, num_kv_blocks=nk),
        grid=(b, n, nq, nk),
        in_specs=[
            *_query_major_specs(bq, bkv, kd, group),
            pl.BlockSpec((None, None, bq, kd), lambda b_, n_, i, j: (b_, n_, i, 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b_, n_, i, j: (b_, n_, 0, i)),
            pl.BlockSpec((None, None, 1, bq), lambda b_, n_, i, j: (b_, n_, 0, i)),
        ],
        out_specs=pl.BlockSpec((None, None, bq, kd), lambda b_, n_, i, j: (b_, n_, i, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, kd), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="alibi_flash_dq",
    )(slopes, seg, seg, q, k, v, do, lse, di)

    def q_block(j, i):  # query blocks wholly before this kv block re-name the first needed one
        return jnp.maximum(i, lax.div(j * bkv, bq))

    def q_head(h_, g):
        return h_ * group + g

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bkv=bkv, group=group, num_q_blocks=nq),
        grid=(b, h, nk, group, nq),
        in_specs=[
            _smem(),
            pl.BlockSpec((None, 1, bq), lambda b_, h_, j, g, i: (b_, 0, q_block(j, i))),
            pl.BlockSpec((None, 1, bkv), lambda b_, h_, j, g, i: (b_, 0, j)),
            pl.BlockSpec((None, None, bq, kd), lambda b_, h_, j, g, i: (b_, q_head(h_, g), q_block(j, i), 0)),
            pl.BlockSpec((None, None, bkv, kd), lambda b_, h_, j, g, i: (b_, h_, j, 0)),
            pl.BlockSpec((None, None, bkv, kd), lambda b_, h_, j, g, i: (b_, h_, j, 0)),
            pl.BlockSpec((None, None, bq, kd), lambda b_, h_, j, g, i: (b_, q_head(h_, g), q_block(j, i), 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b_, h_, j, g, i: (b_, q_head(h_, g), 0, q_block(j, i))),
            pl.BlockSpec((None, None, 1, bq), lambda b_, h_, j, g, i: (b_, q_head(h_, g), 0, q_block(j, i))),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bkv, kd), lambda b_, h_, j, g, i: (b_, h_, j, 0)),
            pl.BlockSpec((None, None, bkv, kd), lambda b_, h_, j, g, i: (b_, h_, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bkv, kd), jnp.float32), pltpu.VMEM((bkv, kd), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=interpret,
        name="alibi_flash_dkv",
    )(slopes, seg, seg, q, k, v, do, lse, di)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def alibi_flash_attention(
    q_BNTK, k_BHSK, v_BHSK, segment_ids_B1T, slopes_N, block_q: int, block_kv: int, interpret: bool
):
    """Causal, segment-masked attention with ALiBi slopes; see the module docstring for the layout."""
    return _forward(q_BNTK, k_BHSK, v_BHSK, segment_ids_B1T, slopes_N, block_q, block_kv, interpret)[0]


def _vjp_fwd(q, k, v, seg, slopes, bq, bkv, interpret):
    out, lse = _forward(q, k, v, seg, slopes, bq, bkv, interpret)
    out, lse = checkpoint_name(out, RESIDUAL_NAME), checkpoint_name(lse, RESIDUAL_NAME)
    return out, (q, k, v, seg, slopes, out, lse)


def _vjp_bwd(bq, bkv, interpret, residuals, do):
    q, k, v, seg, slopes, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, seg, slopes, out, lse, do, bq, bkv, interpret)
    return dq, dk, dv, None, jnp.zeros_like(slopes)


alibi_flash_attention.defvjp(_vjp_fwd, _vjp_bwd)
