"""Figures for LoRA / QLoRA: bytes per base parameter, quantization error, quantized-vs-float logits, and
the memory of a compiled train step (full fine-tuning vs LoRA vs QLoRA) from XLA's memory analysis.

    python benchmarks/lora_memory.py                      # Llama-2 7B shapes, compiled only (nothing allocated)
    python benchmarks/lora_memory.py --preset=llama2_13b --seq_len=1024

The step memory is what the compiler plans for one device (arguments + temporaries + outputs - donated
aliases): weights, gradients, optimizer state and activations together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxllm import sharding as shd
from jaxllm import tree
from jaxllm.models import lora, quant
from jaxllm.models.config import ModelConfig, preset
from jaxllm.models.decoder import Decoder, abstract_params
from jaxllm.train import step as st
from jaxllm.train.optimizer import OptimConfig, make_optimizer


def step_memory(base: ModelConfig, lcfg: lora.LoraConfig, batch: int, seq_len: int) -> dict[str, float]:
    cfg = lora.apply(lcfg, base)
    model = Decoder(cfg)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=0), 100)
    keep = lora.trainable_fn(lcfg, cfg)
    boxed = st.abstract_state(model, tx, keep)
    shardings = st.state_shardings(boxed, mesh)
    state = shd.placed(boxed, shardings)
    frozen, frozen_sh = {}, None
    if keep is not None:
        boxed_frozen = tree.partition(abstract_params(model.cfg), keep)[1]
        frozen_sh = shd.shardings_for(boxed_frozen, mesh)
        frozen = shd.placed(boxed_frozen, frozen_sh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    data = dict(
        inputs=tokens,
        targets=tokens,
        positions=tokens,
        segment_ids=tokens,
        loss_weights=jax.ShapeDtypeStruct((batch, seq_len), jnp.float32),
    )
    fn = st.jit_train_step(st.make_train_step(model, tx, schedule, st.StepConfig()), shardings, mesh, frozen_sh)
    stats = fn.lower(state, data, frozen).compile().memory_analysis()
    total = (
        stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    )
    params = jax.tree.leaves(nn.meta.unbox(boxed.params))
    opt = [x for x in jax.tree.leaves(nn.meta.unbox(boxed.opt_state)) if x.ndim]
    return {
        "step_GiB": total / 2**30,
        "frozen_GiB": tree.nbytes(frozen) / 2**30 if frozen else 0.0,
        "trainable_params": sum(x.size for x in params),
        "optimizer_state_params": sum(x.size for x in opt),
    }


def quantization_error(size: int = 4096) -> dict[str, float]:
    w = np.random.RandomState(0).standard_normal((size, size)).astype(np.float32) * 0.02
    out = {}
    for kind in ("nf4", "int8"):
        back = np.asarray(quant.dequantize(quant.quantize(w, kind)))
        out[f"{kind}_rel_rms_error"] = float(np.sqrt(np.mean((back - w) ** 2)) / w.std())
        out[f"{kind}_bytes_per_param"] = quant.bytes_per_param(kind, size, size)
    return out


def logit_difference(base: ModelConfig, params=None, tokens=None) -> dict[str, float]:
    """Quantized vs float logits of the same model (random init unless `params` are given)."""
    if tokens is None:
        tokens = np.random.RandomState(0).randint(0, base.vocab_size, (2, 64)).astype(np.int32)
    if params is None:
        params = nn.meta.unbox(Decoder(base).init(jax.random.key(0), tokens)["params"])
    ref = np.asarray(jax.jit(Decoder(base).apply)({"params": params}, tokens))
    out = {}
    for kind in ("nf4", "int8"):
        cfg = dataclasses.replace(base, quantization=kind)
        logits = np.asarray(jax.jit(Decoder(cfg).apply)({"params": lora.quantize_params(params, cfg)}, tokens))
        out[f"{kind}_logit_rel_rms"] = float(np.sqrt(np.mean((logits - ref) ** 2)) / ref.std())
        out[f"{kind}_logit_max_abs"] = float(np.abs(logits - ref).max())
        out[f"{kind}_top1_agreement"] = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama2_7b")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=64)
    p.add_argument(
        "--workdir",
        default="runs/tiny",
        help="a trained jaxllm workdir for the logit comparison (the main job's output); skipped if missing",
    )
    args = p.parse_args()
    base = ModelConfig(**preset(args.preset, dtype="bfloat16", param_dtype="bfloat16", remat="full"))
    print(json.dumps({"quantization": quantization_error()}, indent=1))
    small = ModelConfig(vocab_size=4096, num_layers=4, embed_dim=512, num_heads=8, mlp_dim=1408, dtype="float32")
    print(
        json.dumps({f"logits_vs_float_random_init_{small.num_params() // 10**6}M": logit_difference(small)}, indent=1)
    )
    import os

    if os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        from jaxllm.data.pipeline import make_eval_iterator, tokenizer_for
        from jaxllm.train.start import load_run

        run, params, _ = load_run(args.workdir)
        batch = next(make_eval_iterator(run.data, tokenizer_for(run.data)))
        print(
            json.dumps(
                {f"logits_vs_float_trained_{args.workdir}": logit_difference(run.model, params, batch["inputs"][:4])},
                indent=1,
            )
        )
    runs = {
        "full": lora.LoraConfig(r=0),
        "lora": lora.LoraConfig(r=args.r, alpha=16.0, target_modules=("all-linear",)),
        "qlora_nf4": lora.LoraConfig(r=args.r, alpha=16.0, target_modules=("all-linear",), quantization="nf4"),
    }
    for name, lcfg in runs.items():
        result = step_memory(base, lcfg, args.batch, args.seq_len)
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "run": name,
                    "seq_len": args.seq_len,
                    "batch": args.batch,
                    **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
