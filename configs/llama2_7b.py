"""Llama-2 7B pretraining shapes on a TPU pod or multi-GPU hosts (FSDP within, data parallel across).

    jaxllm train --config=configs/llama2_7b.py --workdir=gs://BUCKET/llama2-7b \
        --config.data.source=array_record --config.data.paths="['gs://BUCKET/data/*.array_record']" \
        --config.data.tokenizer=/path/tokenizer.model
"""

import ml_collections

from jaxllm.models.config import preset

MODEL = "llama2_7b"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout
    c.model = preset(MODEL, scan_layers=True, remat="save_dots_no_batch", dtype="bfloat16",
                     param_dtype="float32", attention="auto")  # published shapes + run switches
    c.data = dict(
        source="array_record",  # embedded | text | jsonl | array_record | tfds
        paths=(),  # file globs of the tokenizable corpus
        text_field="text",
        text_split="file",
        tfds_name="",
        tfds_split="train",
        tfds_data_dir="",
        tokenizer="",  # the Llama-2 tokenizer.model; "" trains one on the corpus
        vocab_size=32000,
        block_size=4096,
        batch_size=1024,  # sequences per step: 4M tokens as in the Llama-2 paper
        val_fraction=0.001,
        seed=0,
        shuffle=True,
        add_bos=True,
        add_eos=True,
        num_workers=8,
    )
    c.optim = dict(learning_rate=3e-4, schedule="cosine", warmup_steps=2000, decay_steps=0, end_lr_ratio=0.1,
                   b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip=1.0,
                   grad_accum_steps=1)  # the Llama-2 paper's AdamW settings
    c.train = dict(steps=500_000, log_every=10, eval_every=1000, eval_batches=16, early_stop_patience=0,
                   early_stop_min_delta=0.0, z_loss=0.0, progress=True)
    c.mesh = dict(data=-1, fsdp=8, tensor=1)  # FSDP over 8 chips of a host/slice, data parallel across
    c.checkpoint = dict(every=1000, keep=3, keep_best=1, async_save=True, resume=True)
    c.generate = dict(prompt="The meaning of life is", max_new_tokens=64, temperature=0.7, top_k=50, top_p=0.9,
                      seed=0)
    c.distributed = dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1,
                         local_device_ids=(), cpu_collectives="gloo", initialization_timeout=300)
    return c
