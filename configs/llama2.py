"""Llama-2 pretraining with the published 7B / 13B / 70B shapes, on a TPU pod or multi-GPU hosts.

    jaxllm train --config=configs/llama2.py:7b --workdir=/mnt/gcs/runs/llama2-7b \
        --config.data.paths="['/mnt/gcs/data/*.array_record']" --config.data.tokenizer=/path/tokenizer.model

The size after the colon picks the shapes (Touvron et al. 2023) and a mesh that fits them.
"""

import ml_collections

from jaxllm.models.config import preset

# size -> (mesh, remat policy): FSDP within a slice for 7B/13B; 70B adds 8-way tensor parallelism.
SIZES = {
    "7b": (dict(data=-1, fsdp=8, tensor=1), "save_dots_no_batch"),
    "13b": (dict(data=-1, fsdp=16, tensor=1), "save_dots_no_batch"),
    "70b": (dict(data=1, fsdp=-1, tensor=8), "full"),
}


def get_config(size: str = "7b") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"unknown Llama-2 size {size!r}; use configs/llama2.py:7b, :13b or :70b")
    mesh, remat = SIZES[size]
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout
    c.model = preset(f"llama2_{size}", scan_layers=True, remat=remat, dtype="bfloat16", param_dtype="float32",
                     attention="auto")  # published shapes; bf16 compute, float32 master weights
    c.data = dict(
        source="array_record",  # embedded | text | jsonl | array_record | tfds
        paths=(),  # file globs of the corpus
        text_field="text",  # field of a JSON record holding the document
        text_split="file",  # text source: file | paragraph
        tfds_name="",
        tfds_split="train",
        tfds_data_dir="",
        tokenizer="",  # the Llama-2 tokenizer.model; "" trains one on the corpus
        vocab_size=32000,  # of a tokenizer trained on the corpus
        block_size=4096,  # the Llama-2 context length
        batch_size=1024,  # sequences per step: 4M tokens, as in the paper
        val_fraction=0.001,
        seed=0,
        shuffle=True,
        shuffle_window=2048,  # packed sequences shuffled together; 0 = off
        add_bos=True,
        add_eos=True,
        num_workers=8,  # Grain worker processes per host
    )
    c.optim = dict(learning_rate=3e-4 if size != "70b" else 1.5e-4,  # the paper's peak rates
                   schedule="cosine", warmup_steps=2000, decay_steps=0, end_lr_ratio=0.1, b1=0.9, b2=0.95,
                   eps=1e-5, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1)
    c.train = dict(steps=500_000, log_every=10, eval_every=1000, eval_batches=16, early_stop_patience=0,
                   early_stop_min_delta=0.0, z_loss=0.0, progress=True)
    c.mesh = mesh  # one axis -1 takes the remaining devices
    c.checkpoint = dict(every=1000, keep=3, keep_best=1, async_save=True, resume=True,
                        init_from="")  # init_from: a Hugging Face folder or `jaxllm convert` output
    c.generate = dict(prompt="The meaning of life is", max_new_tokens=64, temperature=0.7, top_k=50, top_p=0.9,
                      seed=0)
    c.distributed = dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1,
                         local_device_ids=(), cpu_collectives="gloo", initialization_timeout=300)
    return c
