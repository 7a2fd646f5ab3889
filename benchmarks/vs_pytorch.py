"""jaxllm against transformers + torch on this machine's CPU, side by side in one process.

    python benchmarks/vs_pytorch.py [--only=train,lora,decode1,decode8] [--repeats=3]

One random Llama (transformers builds it, jaxllm loads the same weights through `jaxllm.hf`), float32,
default shape vocab 8192, d 384, 6 layers, 6 heads, MLP 1024, untied head; jaxllm with configs/tiny.py's
CPU switches (`attention=xla`, unrolled layers, no remat). Four comparisons:
  train    full AdamW step (clip 1.0), batch 8 x 256: jaxllm's jitted train step vs torch eager
  lora     LoRA r 16 on all seven linear layers: jaxllm's adapter step vs PEFT on the same model
  decode1  greedy decoding, batch 1, 32-token prompt, 128 new tokens: `jaxllm.models.generation.generate`
           (temperature 0) vs `model.generate(do_sample=False)` with its KV cache
  decode8  the same at batch 8
The two sides alternate within each repeat (order swapped every repeat); the best repeat of each side
is kept, and the ratio jaxllm / torch printed (torch: the best of its thread counts, --torch_threads).
Prints one JSON line per figure and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="train,lora,decode1,decode8")
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--embed_dim", type=int, default=384)
    p.add_argument("--num_layers", type=int, default=6)
    p.add_argument("--num_heads", type=int, default=6)
    p.add_argument("--num_kv_heads", type=int, default=0)
    p.add_argument("--mlp_dim", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="train steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch_threads", default="default,1", help="torch thread counts to time; the best counts")
    # jaxllm model switches (ModelConfig fields), to compare settings
    p.add_argument("--attention", default="xla")
    p.add_argument("--remat", default="none")
    p.add_argument(
        "--scan_layers",
        type=int,
        default=0,
        help="1 = nn.scan over layers (pods' setting); 0 = unrolled, what configs/tiny.py runs on CPU",
    )
    p.add_argument("--loss_chunk", type=int, default=0)
    p.add_argument("--grad_accum_steps", type=int, default=1, help="jaxllm's optim.grad_accum_steps (same update)")
    return p.parse_args()


def hf_model(args, folder: str):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.embed_dim,
        intermediate_size=args.mlp_dim,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads or args.num_heads,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(cfg).float()
    model.save_pretrained(folder)
    model.generation_config.eos_token_id = None  # decode all new tokens (jaxllm: eos_id=-1)
    model.generation_config.pad_token_id = 0
    return model


def jax_model(args, folder: str):
    from jaxllm import hf

    return hf.load_pretrained(
        folder, dtype="float32", attention=args.attention, remat=args.remat, scan_layers=bool(args.scan_layers)
    )


def torch_step(model, params, x, y):
    import torch

    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def jax_step(args, model, params, batch, lcfg=None):
    """A jitted jaxllm train step on one device (full, or adapters with the loaded weights frozen)."""
    import jax

    from jaxllm import sharding as shd
    from jaxllm.models import lora
    from jaxllm.models.decoder import Decoder, abstract_params
    from jaxllm.train import step as st
    from jaxllm.train.optimizer import OptimConfig, make_optimizer
    from jaxllm.tree import partition

    tx, schedule = make_optimizer(OptimConfig(learning_rate=3e-4, warmup_steps=0, schedule="constant"), 1000)
    mesh = shd.make_mesh(shd.MeshConfig(data=-1))
    step_cfg = st.StepConfig(loss_chunk=args.loss_chunk, grad_accum_steps=args.grad_accum_steps)
    if lcfg is None:
        shardings = st.state_shardings(st.abstract_state(model, tx), mesh)
        state, frozen, frozen_sh = st.state_from_params(params, tx, shardings), {}, None
    else:
        model = Decoder(lora.apply(lcfg, model.cfg))
        trainable = lora.trainable_fn(lcfg, model.cfg)
        state, shardings = st.init_state(model, tx, mesh, jax.random.key(0), trainable)
        frozen_sh = shd.shardings_for(partition(abstract_params(model.cfg), trainable)[1], mesh)
        frozen = jax.device_put(params, frozen_sh)
    fn = st.jit_train_step(st.make_train_step(model, tx, schedule, step_cfg), shardings, mesh, frozen_sh)
    gb = shd.global_batch(batch, mesh)
    holder = [state]

    def step():
        holder[0], metrics = fn(holder[0], gb, frozen)
        return float(metrics["loss"])

    return step


def torch_sides(args, fn) -> dict:
    """torch at each thread count of --torch_threads ("default" = torch's own choice): on a shared machine
    its OpenMP workers can fall far behind with more threads than free cores, so the best one counts."""
    import torch

    default = torch.get_num_threads()
    sides = {}
    for t in args.torch_threads.split(","):
        n = default if t == "default" else int(t)

        def run(n=n):
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(default)

        sides["torch" if t == "default" else f"torch_{n}t"] = run
    return sides


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def compare(name: str, sides: dict, tokens: int, n: int, repeats: int) -> dict:
    """Best seconds per call of each side over `repeats`, the sides alternating."""
    for fn in sides.values():  # warm up (compile, allocator)
        fn()
        fn()
    best = {k: float("inf") for k in sides}
    order = list(sides)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            time.sleep(0.2)  # let the other side's worker threads go idle
            s = timed(sides[k], n)
            best[k] = min(best[k], s)
            print(json.dumps(dict(what=name, side=k, repeat=r, tokens_per_s=round(tokens / s, 1))), flush=True)
    out = dict(what=name, **{f"{k}_tokens_per_s": round(tokens / v, 1) for k, v in best.items()})
    torch_best = min(v for k, v in best.items() if k.startswith("torch"))
    out["torch_best_tokens_per_s"] = round(tokens / torch_best, 1)
    out["ratio"] = round(torch_best / best["jaxllm"], 3)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    args = parse()
    import jax
    import torch

    from jaxllm.models.generation import GenerateConfig, generate
    from jaxllm.models.lora import LoraConfig

    only = args.only.split(",")
    folder = tempfile.mkdtemp(prefix="vs_pytorch_")
    hf = hf_model(args, folder)
    model, params = jax_model(args, folder)
    print(
        json.dumps(
            dict(
                torch=torch.__version__,
                torch_threads=torch.get_num_threads(),
                jax=jax.__version__,
                device=jax.devices()[0].device_kind,
                cpus=os.cpu_count(),
                load=os.getloadavg()[0],
                params=model.cfg.num_params(),
                jaxllm_cfg={k: getattr(model.cfg, k) for k in ("attention", "remat", "scan_layers", "dtype")},
                loss_chunk=args.loss_chunk,
                grad_accum_steps=args.grad_accum_steps,
            )
        )
    )
    rs = np.random.RandomState(0)
    b, length = args.batch, args.seq
    inputs = rs.randint(0, args.vocab_size, (b, length)).astype(np.int32)
    targets = rs.randint(0, args.vocab_size, (b, length)).astype(np.int32)
    batch = dict(
        inputs=inputs,
        targets=targets,
        segment_ids=np.ones((b, length), np.int32),
        positions=np.tile(np.arange(length, dtype=np.int32), (b, 1)),
        loss_weights=np.ones((b, length), np.float32),
    )
    x, y = torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(targets.astype(np.int64))
    results = []

    if "train" in only:
        tm = hf_model(args, tempfile.mkdtemp(prefix="vs_pytorch_train_")).train()  # same seed: same weights
        sides = dict(
            jaxllm=jax_step(args, model, params, batch),
            **torch_sides(args, torch_step(tm, list(tm.parameters()), x, y)),
        )
        print(json.dumps(dict(what="train", first_loss={k: round(f(), 4) for k, f in sides.items()})))
        results.append(compare("train", sides, b * length, args.steps, args.repeats))
        del sides, tm

    if "lora" in only:
        import peft

        targets_hf = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        base = hf_model(args, tempfile.mkdtemp(prefix="vs_pytorch_lora_"))  # same seed: same weights
        pm = peft.get_peft_model(
            base, peft.LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.0, target_modules=targets_hf)
        ).train()
        lcfg = LoraConfig(r=args.lora_r, alpha=16.0, target_modules=tuple(targets_hf))
        trainable = [p for p in pm.parameters() if p.requires_grad]
        sides = dict(
            jaxllm=jax_step(args, model, params, batch, lcfg), **torch_sides(args, torch_step(pm, trainable, x, y))
        )
        print(json.dumps(dict(what="lora", first_loss={k: round(f(), 4) for k, f in sides.items()})))
        results.append(compare("lora", sides, b * length, args.steps, args.repeats))
        del sides, pm, base

    hf.eval()
    for what, db in (("decode1", 1), ("decode8", 8)):
        if what not in only:
            continue
        prompts = rs.randint(3, args.vocab_size, (db, args.prompt_len))
        gen = GenerateConfig(max_new_tokens=args.new_tokens, temperature=0.0)
        ids = torch.from_numpy(prompts.astype(np.int64))
        out = {}

        def jx():
            out["jaxllm"] = generate(model, params, prompts.tolist(), gen, eos_id=-1)

        def th():
            with torch.inference_mode():
                o = hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                )
            out["torch"] = o[:, args.prompt_len :].tolist()

        results.append(compare(what, dict(jaxllm=jx, **torch_sides(args, th)), db * args.new_tokens, 1, args.repeats))
        same = np.mean(np.asarray(out["jaxllm"]) == np.asarray(out["torch"]))
        print(json.dumps(dict(what=what, greedy_tokens_equal=round(float(same), 3))))

    print("\n| comparison | jaxllm tokens/s | torch tokens/s | jaxllm / torch |\n| --- | --- | --- | --- |")
    for r in results:
        jx, th = r["jaxllm_tokens_per_s"], r["torch_best_tokens_per_s"]
        print(f"| {r['what']} | {jx:,.0f} | {th:,.0f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
