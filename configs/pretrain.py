"""Pretraining with the published shapes of a named model, on a Cloud TPU pod slice or multi-GPU hosts.

    jaxllm train --config=configs/pretrain.py:llama2_7b --workdir=/mnt/gcs/runs/llama2-7b \
        --config.data.paths="['/mnt/gcs/data/*.array_record']" --config.data.tokenizer=/path/tokenizer.model

The name after the colon picks the shapes (Llama-2 7B/13B/70B, Falcon 7B/40B/180B, BLOOM 560m/7b1/176B),
the published peak learning rate, and the Cloud TPU slice the run is sized for with a mesh and remat
policy that fit it at a global batch of 1024 sequences of the published context length:

    model        slice      sequences per chip   mesh                 remat
    llama2_7b    v5p-512    4 x 4096             fsdp=256             minimal (layers unrolled)
    llama2_13b   v5p-512    4 x 4096             fsdp=256             minimal
    llama2_70b   v5p-512    4 x 4096             fsdp=256             save_dot_except_mlpwi
    falcon_7b    v5p-512    4 x 2048             data=4 fsdp=64       save_dot_except_mlpwi
    falcon_40b   v5p-512    4 x 2048             fsdp=256             save_dot_except_mlpwi
    falcon_180b  v5p-1024   2 x 2048             fsdp=512             save_dot_except_mlpwi
    bloom_560m   v5e-64     16 x 2048            fsdp=64              full
    bloom_7b1    v5p-512    4 x 2048             fsdp=256             save_dot_except_mlpwi
    bloom_176b   v5p-1024   2 x 2048             fsdp=512             save_dot_except_mlpwi

`jaxllm plan --config=configs/pretrain.py:NAME` compiles the step for that slice (no TPU needed) and
prints the memory per chip; `benchmarks/RESULTS.md` has the table. On other hardware change `mesh.*`
(and `model.remat`, `optim.grad_accum_steps`); `jaxllm plan --topology=... --search` finds a setting.
"""

import os

from jaxllm.config import load_config
from jaxllm.models.config import preset

# name -> (slice, mesh, remat policy, peak learning rate). FSDP over the whole slice (Falcon-7B's width,
# 64 x 71, splits at most 64 ways: data parallel across the rest).
MODELS = {
    "llama2_7b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "minimal", 3e-4),
    "llama2_13b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "minimal", 3e-4),
    "llama2_70b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 1.5e-4),
    "falcon_7b": ("v5p-512", dict(data=-1, fsdp=64, tensor=1), "save_dot_except_mlpwi", 6e-4),
    "falcon_40b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 1.5e-4),
    "falcon_180b": ("v5p-1024", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 1.25e-4),
    "bloom_560m": ("v5e-64", dict(data=1, fsdp=-1, tensor=1), "full", 3e-4),
    "bloom_7b1": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 1.2e-4),
    "bloom_176b": ("v5p-1024", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 6e-5),
}


# Layers unrolled (one program per layer, which XLA schedules and lays out each on its own): Llama-2-7B
# with remat=minimal then needs 43.6 GiB per chip against 45.0 scanned (benchmarks/RESULTS.md). The
# others scan: less memory (13B: 69.5 GiB scanned, 72.6 unrolled) and faster compiles.
UNROLLED = ("llama2_7b",)
# The output head kept sharded in the chunked loss (model.gather_head=False): heads of 1.8-6.7 GiB in bf16
# (BLOOM's 250k vocabulary, Falcon-180B), and Llama-2-70B, whose step then fits within MaxText's memory.
HEAD_SHARDED = ("llama2_70b", "falcon_180b", "bloom_7b1", "bloom_176b")


def get_config(name: str = "llama2_7b"):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use configs/pretrain.py:NAME with NAME one of {', '.join(MODELS)}")
    slice_name, mesh, remat, lr = MODELS[name]
    c = load_config(os.path.join(os.path.dirname(__file__), "common.py"))  # every key, with its meaning
    with c.unlocked():  # the published shapes; bf16 compute, float32 master weights
        c.model.update(
            preset(
                name,
                scan_layers=name not in UNROLLED,
                gather_head=name not in HEAD_SHARDED,
                remat=remat,
                dtype="bfloat16",
                param_dtype="float32",
                attention="auto",
                sequence_parallel=True,
            )
        )
    c.data.update(
        source="array_record",
        paths=(),  # file globs of the corpus
        tokenizer="",  # the model's tokenizer.model; "" trains one on the corpus
        vocab_size=c.model.vocab_size,  # of a tokenizer trained on the corpus
        block_size=c.model.max_seq_len,  # the published context length
        batch_size=1024,  # sequences per step (Llama-2: 1024 x 4096 = 4M tokens, as in the paper)
        val_fraction=0.001,
        num_workers=8,
    )
    c.optim.update(learning_rate=lr, warmup_steps=2000, eps=1e-5)  # the published peak rate
    c.train.update(
        steps=500_000,
        log_every=10,
        eval_every=1000,
        eval_batches=16,
        loss_chunk=512 if c.model.vocab_size < 100_000 else 256,
    )  # float32 logits [B, chunk, V]
    c.mesh.update(mesh, slice=slice_name)  # one axis -1 takes the remaining devices
    c.checkpoint.update(every=1000, keep=3)
    c.generate.update(prompt="The meaning of life is", max_new_tokens=64, temperature=0.7, top_k=50, top_p=0.9)
    return c
