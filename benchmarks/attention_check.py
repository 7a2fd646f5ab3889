"""Attention paths agree on packed (segment-id) inputs, and how fast each is, on this accelerator.

    python benchmarks/attention_check.py [--seq=2048] [--batch=4]

Compares the model's XLA path (`causal_blockwise_attention`), cuDNN through `jax.nn.dot_product_attention`
(GPU only) and the float32 reference, on bf16 inputs with 3 packed documents and padding.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention.fused import fused_attention
from jaxllm.models.attention.reference import attention_mask, reference_attention


def _packed(batch: int, seq: int, rng: np.random.RandomState):
    seg = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq - 8), 2, replace=False))
        seg[r, : cuts[0]], seg[r, cuts[0] : cuts[1]], seg[r, cuts[1] : seq - 8] = 1, 2, 3  # last 8: padding (0)
    return seg


def _time(fn, *args, n=20):
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=128)
    args = p.parse_args()
    rng = np.random.RandomState(0)
    b, t, n, h, k = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q = jnp.asarray(rng.randn(b, t, n, k), jnp.bfloat16)
    kk = jnp.asarray(rng.randn(b, t, h, k), jnp.bfloat16)
    v = jnp.asarray(rng.randn(b, t, h, k), jnp.bfloat16)
    seg = jnp.asarray(_packed(b, t, rng))
    valid = np.asarray(seg) != 0  # padding rows are don't-care
    mask = attention_mask(seg, seg)
    ref_ms, ref = _time(jax.jit(lambda q, k, v, m: reference_attention(q, k, v, m)), q, kk, v, mask)
    results = {"device": jax.devices()[0].device_kind, "shape": [b, t, n, h, k], "reference_ms": round(ref_ms, 3)}
    impls = ["xla"] + (["cudnn"] if jax.devices()[0].platform == "gpu" else [])
    for impl in impls:
        try:
            ms, out = _time(jax.jit(lambda q, k, v, m, impl=impl: fused_attention(q, k, v, m, impl)), q, kk, v, mask)
            diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))[valid]
            results[impl] = {"ms": round(ms, 3), "max_abs_diff_vs_reference": float(diff.max())}
        except Exception as e:  # report, keep going: the point is to see what this chip supports
            results[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
