"""Magnitude pruning of the main job's model: validation loss before, right after one-shot pruning, and
after fine-tuning with the masks kept (one-shot and gradual), with the sparsity reached.

    jaxllm train --config=configs/tiny.py --workdir=runs/tiny      # the model to prune (if not there yet)
    python benchmarks/prune_tiny.py --workdir=runs/tiny --sparsity=0.5 --steps=100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

from jaxllm import sharding as shd
from jaxllm.config import load_config
from jaxllm.convert import workdir_to_hf
from jaxllm.data.pipeline import make_eval_iterator, tokenizer_for
from jaxllm.models.decoder import Decoder
from jaxllm.train import step as st
from jaxllm.train.loop import evaluate, train
from jaxllm.train.prune import PruneConfig, prune_now, sparsity
from jaxllm.train.start import load_run


def val_loss(run, params, batches: int) -> float:
    mesh = shd.make_mesh(shd.MeshConfig(data=-1))
    model = Decoder(run.model)
    params = jax.device_put(params, shd.replicated(mesh))
    fn = st.make_eval_step(model, mesh, jax.tree.map(lambda _: shd.replicated(mesh), params))
    tokenizer = tokenizer_for(run.data)
    return evaluate(fn, params, lambda: make_eval_iterator(run.data, tokenizer), mesh, batches)["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/tiny")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps with the masks kept")
    p.add_argument("--eval_batches", type=int, default=16)
    args = p.parse_args()
    run, params, _ = load_run(args.workdir)
    cfg = PruneConfig(sparsity=args.sparsity)
    before = val_loss(run, params, args.eval_batches)
    pruned, _ = prune_now(params, cfg)
    after = val_loss(run, pruned, args.eval_batches)
    print(
        json.dumps(
            {"val_loss_before": before, "val_loss_one_shot": after, "sparsity_one_shot": float(sparsity(pruned, cfg))}
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        workdir_to_hf(args.workdir, hf_dir)
        for name, schedule in (
            ("one_shot", dict(start_step=0, end_step=0)),
            ("gradual", dict(start_step=0, end_step=args.steps // 2, every=5)),
        ):
            overrides = [
                f"train.steps={args.steps}",
                "train.eval_every=0",
                f"train.eval_batches={args.eval_batches}",
                "train.progress=False",
                "generate.max_new_tokens=0",
                "optim.warmup_steps=0",
                "optim.learning_rate=1e-3",
                f"checkpoint.init_from={hf_dir}",
                f"prune.sparsity={args.sparsity}",
                *[f"prune.{k}={v}" for k, v in schedule.items()],
            ]
            result = train(load_config("configs/tiny.py", overrides), os.path.join(tmp, name))
            _, tuned, _ = load_run(os.path.join(tmp, name))
            print(
                json.dumps(
                    {
                        "schedule": name,
                        "steps": args.steps,
                        "val_loss_after_finetune": result["val_loss"],
                        "sparsity": float(sparsity(tuned, cfg)),
                    }
                )
            )


if __name__ == "__main__":
    main()
