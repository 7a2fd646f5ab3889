"""Supervised fine-tuning of a Hugging Face model folder: LoRA by default (QLoRA with --use_int4).

    jaxllm finetune --model=PATH/TO/HF_MODEL --data_path=data.jsonl --text_column=text --use_peft \
        --use_int4 --lr=2e-4 --batch_size=4 --epochs=1 --block_size=512 --save_dir=out --merge_adapter

The `jaxllm finetune` flags (autotrain's) set the keys below; `--config.a.b=v` sets any of them. The
model's shapes come from the folder's config.json (checkpoint.model_from_init), its tokenizer from
the folder too; the model section only holds run switches.
"""

import os

from jaxllm.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "common.py"))  # every key, with its meaning
    c.model.update(dtype="float32")  # faster on CPU; bfloat16 on TPU/GPU (configs/falcon_qlora.py)
    c.lora.update(r=16, alpha=32.0, dropout=0.05)  # r=0: full fine-tuning
    c.data.update(
        source="embedded_sft",  # embedded_sft (bundled Python-docs Q&A) | jsonl | parquet | tfds | ...
        format="sft_text",
        tokenizer="",  # set to the model folder by --model
        vocab_size=2048,
        block_size=256,  # --block_size / --model_max_length: examples truncated to this, rows this long
        batch_size=8,  # global batch (--train_batch_size per device x data/fsdp devices x accumulation)
        shuffle_window=0,
    )
    c.optim.update(
        learning_rate=2e-4,
        schedule="linear",
        warmup_steps=10,  # --warmup_ratio sets this from the step count
        end_lr_ratio=0.0,
        b2=0.999,
        weight_decay=0.0,
    )
    c.train.update(steps=100, log_every=10, eval_every=50, eval_batches=8, eval_at_start=True)
    c.checkpoint.update(
        init_from="",  # the base model folder (--model)
        model_from_init=True,
    )
    c.generate.update(
        prompt="### Human: What does the for statement do?### Assistant:",
        max_new_tokens=60,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
    )
    return c
