"""Per-chip memory of one decoder layer's forward+backward compiled for a TPU v5p slice (libtpu's
compiler on this host, nothing run), XLA attention against the Pallas flash kernels.

    python benchmarks/flash_memory.py                                   # Llama-2 7B layer, seq 4096
    python benchmarks/flash_memory.py --preset=bloom_7b1 --seq=4096     # ALiBi: our kernel
    python benchmarks/flash_memory.py --topology=v5:2x2x1 --fsdp=4 --tensor=1 --batch_per_chip=1

XLA's path holds float32 [B, N, T, T] logits and probabilities (and, with ALiBi, the bias) per layer;
the flash kernels hold [bq, bkv] tiles in VMEM and a [B, N, T] logsumexp in HBM.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile while other processes hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.models.config import ModelConfig, preset  # noqa: E402
from jaxllm.models.decoder import DecoderLayer  # noqa: E402


def tpu_devices(topology: str) -> list:
    dims = tuple(int(x) for x in topology.split(":")[1].split("x"))
    bounds = tuple(min(d, 2) for d in dims[:2]) + (1,)
    return topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology,
        chip_config_name="megacore",
        chips_per_host_bounds=bounds,
        num_slices=1,
        wrap=tuple(d >= 4 for d in dims),
    ).devices


def _unbox(tree):
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def layer_memory(cfg: ModelConfig, mesh, batch: int, seq: int) -> dict[str, float]:
    """Compiled memory (MiB per chip) of grad(sum(layer(x))) with respect to the layer's params and x."""
    layer = DecoderLayer(dataclasses.replace(cfg, scan_layers=False))
    x = jax.ShapeDtypeStruct((batch, seq, cfg.embed_dim), cfg.jnp_dtype)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    with jax.set_mesh(mesh), shd.axis_rules():
        boxed = jax.eval_shape(
            lambda: layer.init(
                jax.random.key(0),
                jnp.zeros(x.shape, x.dtype),
                jnp.ones(ids.shape, jnp.int32),
                jnp.zeros(ids.shape, jnp.int32),
            )
        )
        params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            _unbox(boxed),
            shd.shardings_for(boxed, mesh),
        )
        batch_sh = shd.batch_sharding(mesh)
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh)
        ids = jax.ShapeDtypeStruct(ids.shape, ids.dtype, sharding=batch_sh)

        def loss(p, x, segments, positions):
            return jnp.sum(layer.apply(p, x, segments, positions).astype(jnp.float32))

        stats = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids, ids).compile().memory_analysis()
    mib = 2**20
    return {
        "temp": stats.temp_size_in_bytes / mib,
        "args": stats.argument_size_in_bytes / mib,
        "out": stats.output_size_in_bytes / mib,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2_7b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--topology", default="v5:2x2x1", help="v5:AxBxC (v5p chips)")
    p.add_argument("--fsdp", type=int, default=2)
    p.add_argument("--tensor", type=int, default=2)
    p.add_argument("--batch_per_chip", type=int, default=1, help="sequences per batch shard (data*fsdp)")
    args = p.parse_args()
    devices = tpu_devices(args.topology)
    mesh = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=args.fsdp, tensor=args.tensor), devices)
    batch = args.batch_per_chip * shd.batch_shards(mesh)
    print(
        f"{args.preset} layer fwd+bwd, seq {args.seq}, global batch {batch}, {len(devices)} x "
        f"{devices[0].device_kind}, mesh {dict(mesh.shape)}; MiB per chip"
    )
    for attention in ("xla", "flash"):
        cfg = ModelConfig(
            **preset(args.preset, max_seq_len=args.seq, attention=attention, dtype="bfloat16", param_dtype="float32")
        )
        m = layer_memory(cfg, mesh, batch, args.seq)
        print(
            f"  attention={attention:5s}  temporaries {m['temp']:9.1f}  arguments {m['args']:8.1f}  "
            f"outputs {m['out']:8.1f}"
        )


if __name__ == "__main__":
    main()
