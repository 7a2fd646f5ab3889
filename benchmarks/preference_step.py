"""Step time of DPO (reference forward in the step, and precomputed), ORPO and a reward model against SFT,
on the same model, the same [batch, seq] rows and the same mesh, through `program.build` as a run builds
its step.

    python benchmarks/preference_step.py --embed_dim=512 --num_layers=8 --batch=8 --seq=512 --lora_r=16

Rows hold packed preference pairs (prompt + answer sequences, segments 2j+1 / 2j+2) for the preference
objectives and the same tokens as SFT rows for SFT, so every step reads the same number of tokens. With
LoRA (fresh adapters) DPO's reference is the frozen base with the adapters off: one forward more than
SFT's forward + backward; precomputed, none. Prints one JSON line per objective, then the ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import ml_collections
import numpy as np

from jaxllm import sharding as shd
from jaxllm.config import load_config
from jaxllm.train import step as st
from jaxllm.train.program import build
from jaxllm.train.run import from_config


def pair_rows(vocab: int, batch: int, seq: int, pair_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of whole pairs: each sequence pair_len // 2 tokens (prompt 3/4, answer 1/4), the last slot padding."""
    rs = np.random.RandomState(seed)
    half = pair_len // 2
    inputs = rs.randint(3, vocab, (batch, seq)).astype(np.int32)
    segments = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    weights = np.zeros((batch, seq), np.float32)
    for j in range((seq - 1) // pair_len):
        for k in range(2):
            start = j * pair_len + k * half
            segments[:, start : start + half] = 2 * j + k + 1
            positions[:, start : start + half] = np.arange(half)
            weights[:, start + 3 * half // 4 - 1 : start + half - 1] = 1.0
    targets = np.roll(inputs, -1, axis=1)
    return dict(inputs=inputs, targets=targets, segment_ids=segments, positions=positions, loss_weights=weights)


def measure(
    cfg: ml_collections.ConfigDict, objective: str, batch: dict, steps: int, repeats: int, precompute: bool = False
) -> dict:
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.train.objective = objective
    cfg.data.format = "preference" if objective != "lm" else "sft_text"
    cfg.data.source = "embedded_preference" if objective != "lm" else "embedded_sft"  # (the rows are made here)
    cfg.preference.precompute_ref_logps = precompute
    run = from_config(cfg)
    mesh = shd.make_mesh(run.mesh)
    program = build(run, mesh)
    init = lambda tree, sh: jax.jit(
        lambda: jax.tree.map(  # noqa: E731
            lambda s: (0.02 * jax.random.normal(jax.random.key(0), s.shape)).astype(s.dtype), shd.unbox(tree)
        ),
        out_shardings=sh,
    )()
    params = init(program.boxed.params, program.shardings.params)
    state = st.state_from_params(params, program.tx, program.shardings)
    frozen = init(program.frozen_boxed, program.frozen_shardings) if program.frozen_boxed else {}
    ref = init(program.ref_boxed, program.ref_shardings) if program.ref_boxed else {}
    local = dict(batch)
    if precompute:
        local["ref_logps"] = np.where(batch["positions"] == 0, -5.0, 0.0).astype(np.float32)
    if objective == "lm":
        local["segment_ids"] = np.maximum(batch["segment_ids"], 1)  # the same tokens, as SFT examples
    gb = shd.global_batch({k: local[k] for k in program.batch_fields}, mesh)
    t = time.perf_counter()
    compiled = program.compile_train_step()
    compile_s = time.perf_counter() - t
    for _ in range(2):
        state, m = program.train_step(state, gb, frozen, ref)
    jax.block_until_ready(m)
    dt = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            state, m = program.train_step(state, gb, frozen, ref)
        jax.block_until_ready(m)
        dt = min(dt, (time.perf_counter() - t) / steps)
    mem = compiled.memory_analysis()
    name = objective + ("_precomputed" if precompute else "")
    return dict(
        objective=name,
        step_time_s=round(dt, 4),
        compile_s=round(compile_s, 1),
        loss=float(m["loss"]),
        reference=program.reference.kind if program.reference else None,
        temp_gib=round(mem.temp_size_in_bytes / 2**30, 3) if mem else None,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--embed_dim", type=int, default=512)
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--num_heads", type=int, default=8)
    p.add_argument("--num_kv_heads", type=int, default=8)
    p.add_argument("--mlp_dim", type=int, default=1536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--pair_len", type=int, default=0, help="tokens per pair (two sequences); 0 = seq // 2")
    p.add_argument("--lora_r", type=int, default=16, help="0 = full fine-tuning (reference: a copy of the start)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    overrides = [
        f"model.vocab_size={a.vocab_size}",
        f"model.embed_dim={a.embed_dim}",
        f"model.num_layers={a.num_layers}",
        f"model.num_heads={a.num_heads}",
        f"model.num_kv_heads={a.num_kv_heads}",
        f"model.mlp_dim={a.mlp_dim}",
        f"model.max_seq_len={a.seq}",
        f"model.dtype={a.dtype}",
        f"data.block_size={a.seq}",
        f"data.batch_size={a.batch}",
        f"lora.r={a.lora_r}",
        "mesh.data=-1",
        "checkpoint.init_from=",
    ]
    cfg = load_config("configs/tiny.py", overrides)  # random weights: the step's time does not depend on them
    batch = pair_rows(a.vocab_size, a.batch, a.seq, a.pair_len or a.seq // 2)
    results = {}
    for objective, pre in (("lm", False), ("dpo", False), ("dpo", True), ("orpo", False), ("reward", False)):
        r = measure(cfg, objective, batch, a.steps, a.repeats, precompute=pre)
        results[r["objective"]] = r
        print(
            json.dumps(
                {
                    **r,
                    "params": from_config(cfg).model.num_params(),
                    "devices": jax.device_count(),
                    "device": jax.devices()[0].device_kind,
                }
            )
        )
    sft = results["lm"]["step_time_s"]
    print(json.dumps({"ratios_to_sft": {k: round(v["step_time_s"] / sft, 3) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
