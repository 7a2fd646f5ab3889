"""How the train step's cost grows on this machine: tokens/s against sequence length and against model size.

    python benchmarks/scaling.py                      # both sweeps, figures + benchmarks/results/scaling.png
    python benchmarks/scaling.py --seqs=128,512 --sizes=1m,10m --steps=2

Sequence sweep: one Llama shape (vocab 8192, d 384, 6 layers, 6 heads, MLP 1024: 16.9M params), the same
tokens per step at every length (`--tokens`, batch = tokens / length), lengths 128 to 2048.
Size sweep: Llama shapes from ~1M to ~100M params (vocab 8192, untied head, MLP 8/3 d), batch 8 x 256.
Each point: the jitted AdamW train step (float32, `attention=auto`, unrolled layers, no remat, as
configs/tiny.py runs on CPU), compiled, 2 warm-up steps, then the best of `--repeats` timings of
`--steps` steps. Prints one JSON line per point (tokens/s, achieved TFLOP/s from the model's FLOPs
per token, attention included) and draws both curves into one PNG (needs matplotlib: the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
from train_step import measure  # benchmarks/train_step.py (beside this script): the same step, batch and timing

from jaxllm.models.config import ModelConfig

# name -> (embed_dim, num_layers, num_heads); mlp_dim = 8/3 d rounded up to 128
SIZES = {"1m": (64, 2, 2), "3m": (128, 4, 2), "10m": (256, 6, 4), "30m": (512, 8, 8), "100m": (768, 12, 12)}


def model_cfg(d: int, layers: int, heads: int, seq: int, mlp: int = 0) -> ModelConfig:
    return ModelConfig(
        vocab_size=8192,
        embed_dim=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        mlp_dim=mlp or -(-8 * d // 3 // 128) * 128,
        max_seq_len=max(seq, 256),
        tie_embeddings=False,
        dtype="float32",
        param_dtype="float32",
        scan_layers=False,
        remat="none",
        attention="auto",
    )


def point(cfg: ModelConfig, batch: int, seq: int, steps: int, repeats: int) -> dict:
    r = measure(cfg, batch, seq, steps, repeats=repeats)  # one device: TFLOP/s per device is the total
    return dict(
        params=r["params"],
        batch=batch,
        seq=seq,
        step_s=r["step_time_s"],
        tokens_per_s=round(r["tokens_per_s"], 1),
        compile_s=r["compile_s"],
        tflops=r["tflops_per_device"],
    )


def plot(seq_points: list[dict], size_points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, points, key, label in (
        (axes[0], seq_points, "seq", "sequence length (tokens per step fixed)"),
        (axes[1], size_points, "params", "parameters (batch 8 x 256)"),
    ):
        if not points:
            ax.set_visible(False)
            continue
        x = [p[key] for p in points]
        ax.plot(x, [p["tokens_per_s"] for p in points], "o-", label="tokens/s")
        ax.set_xscale("log", base=2 if key == "seq" else 10)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("train tokens/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.08, y=0.15)
        twin = ax.twinx()
        twin.plot(x, [p["tflops"] * 1e3 for p in points], "s--", color="tab:orange", label="GFLOP/s")
        twin.set_ylabel("achieved GFLOP/s (model FLOPs)", color="tab:orange")
        twin.set_ylim(bottom=0)
        for p in points:
            ax.annotate(
                f"{p['tokens_per_s']:,.0f}",
                (p[key], p["tokens_per_s"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
    fig.suptitle(f"jaxllm train step, float32, {jax.devices()[0].device_kind}, {os.cpu_count()} cores")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="128,256,512,1024,2048")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step in the sequence sweep")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "results", "scaling.png"))
    args = p.parse_args()
    print(
        json.dumps(
            dict(device=jax.devices()[0].device_kind, cpus=os.cpu_count(), load=os.getloadavg()[0], jax=jax.__version__)
        ),
        flush=True,
    )
    seq_points, size_points = [], []
    for seq in [int(s) for s in args.seqs.split(",") if s]:
        if args.tokens % seq:
            raise SystemExit(f"--tokens={args.tokens} is not a multiple of sequence length {seq}; pick one that is")
        seq_points.append(point(model_cfg(384, 6, 6, seq, mlp=1024), args.tokens // seq, seq, args.steps, args.repeats))
        print(json.dumps(dict(sweep="seq", **seq_points[-1])), flush=True)
    for name in [s for s in args.sizes.split(",") if s]:
        if name not in SIZES:
            raise SystemExit(f"--sizes: unknown size {name!r}; choose from {', '.join(SIZES)}")
        size_points.append(point(model_cfg(*SIZES[name], 256), 8, 256, args.steps, args.repeats))
        print(json.dumps(dict(sweep="size", size=name, **size_points[-1])), flush=True)
    if args.plot:
        plot(seq_points, size_points, args.plot)
        print(json.dumps(dict(plot=args.plot)))


if __name__ == "__main__":
    main()
