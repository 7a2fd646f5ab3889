"""Throughput and memory of the jitted train step on the local accelerator(s).

    python benchmarks/train_step.py --embed_dim=2048 --num_layers=16 --batch=8 --seq=2048 --dtype=bfloat16

Prints step time, tokens/s, TFLOP/s per device and MFU (from the model's FLOPs and the chip's
published bf16 peak), and the compiled step's memory analysis. Needs only jax/flax/optax.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxllm import sharding as shd
from jaxllm.models.config import ModelConfig, preset
from jaxllm.models.decoder import Decoder
from jaxllm.train import step as st
from jaxllm.train.metrics import peak_tflops, step_metrics
from jaxllm.train.optimizer import OptimConfig, make_optimizer


def random_batch(vocab_size: int, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, one document per row, as the train step takes them (inputs drawn before targets)."""
    rs = np.random.RandomState(seed)
    return dict(
        inputs=rs.randint(0, vocab_size, (batch, length)).astype(np.int32),
        targets=rs.randint(0, vocab_size, (batch, length)).astype(np.int32),
        segment_ids=np.ones((batch, length), np.int32),
        positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        loss_weights=np.ones((batch, length), np.float32),
    )


def measure(
    model_cfg: ModelConfig,
    batch: int,
    seq: int,
    steps: int,
    *,
    repeats: int = 1,
    grad_accum_steps: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
) -> dict:
    """The jitted AdamW train step on a random batch: compile time and memory, then 2 warm-up steps, then the
    best of `repeats` timings of `steps` steps, with tokens/s, TFLOP/s per device and MFU."""
    model = Decoder(model_cfg)
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=10), 1000)
    mesh = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=fsdp, tensor=tensor))
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0))
    fn = st.jit_train_step(
        st.make_train_step(model, tx, schedule, st.StepConfig(grad_accum_steps=grad_accum_steps)), shardings, mesh
    )
    gb = shd.global_batch(random_batch(model_cfg.vocab_size, batch, seq), mesh)
    t = time.perf_counter()
    compiled = fn.lower(state, gb).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    for _ in range(2):
        state, m = fn(state, gb)
    jax.block_until_ready(m)
    dt = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            state, m = fn(state, gb)
        jax.block_until_ready(m)
        dt = min(dt, (time.perf_counter() - t) / steps)
    out = dict(
        params=model_cfg.num_params(),
        batch=batch,
        seq=seq,
        compile_s=round(compile_s, 1),
        step_time_s=round(dt, 4),
        loss=float(m["loss"]),
        **{
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in step_metrics(
                step_time_s=dt,
                tokens=batch * seq,
                flops_per_token=model_cfg.train_flops_per_token(seq),
                num_devices=jax.device_count(),
                peak=peak_tflops(jax.devices()[0]),
            ).items()
        },
    )
    if mem is not None:
        out.update(
            temp_gib=round(mem.temp_size_in_bytes / 2**30, 3), argument_gib=round(mem.argument_size_in_bytes / 2**30, 3)
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--embed_dim", type=int, default=1024)
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--num_heads", type=int, default=16)
    p.add_argument("--num_kv_heads", type=int, default=0)
    p.add_argument("--mlp_dim", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default="auto")
    p.add_argument("--grad_accum_steps", type=int, default=1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--tensor", type=int, default=1)
    args = p.parse_args()

    if args.preset:
        model_cfg = ModelConfig(
            **preset(
                args.preset,
                dtype=args.dtype,
                remat=args.remat,
                attention=args.attention,
                max_seq_len=max(args.seq, 4096),
            )
        )
    else:
        model_cfg = ModelConfig(
            vocab_size=args.vocab_size,
            num_layers=args.num_layers,
            embed_dim=args.embed_dim,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            mlp_dim=args.mlp_dim or int(8 * args.embed_dim / 3 / 256 + 1) * 256,
            max_seq_len=args.seq,
            dtype=args.dtype,
            remat=args.remat,
            attention=args.attention,
        )
    out = dict(
        device=jax.devices()[0].device_kind,
        num_devices=jax.device_count(),
        **measure(
            model_cfg,
            args.batch,
            args.seq,
            args.steps,
            grad_accum_steps=args.grad_accum_steps,
            fsdp=args.fsdp,
            tensor=args.tensor,
        ),
        dtype=args.dtype,
        remat=args.remat,
        attention=args.attention,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
