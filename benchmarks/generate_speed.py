"""Decode speed of the KV-cache generation loop (after compilation), for a model config file.

python benchmarks/generate_speed.py [--config=configs/tiny.py] [--batch=1] [--new_tokens=128]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxllm.config import build, load_config
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.models.generation import GenerateConfig, generate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    args = p.parse_args()
    cfg = build(ModelConfig, load_config(args.config).model, "model")
    model = Decoder(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    gen = GenerateConfig(max_new_tokens=args.new_tokens, temperature=0.8, top_k=50, top_p=0.9)
    t = time.perf_counter()
    generate(model, params, prompts, gen, eos_id=-1)  # compiles once
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    generate(model, params, prompts, gen, eos_id=-1)
    dt = time.perf_counter() - t
    print(
        json.dumps(
            dict(
                device=jax.devices()[0].device_kind,
                params=cfg.num_params(),
                batch=args.batch,
                new_tokens=args.new_tokens,
                first_call_s=round(first_s, 2),
                decode_s=round(dt, 3),
                tokens_per_s=round(args.batch * args.new_tokens / dt, 1),
            )
        )
    )


if __name__ == "__main__":
    main()
