"""The QLoRA paper's Guanaco recipe (Dettmers et al. 2023, appendix B) on Llama-2 7B/13B: NF4 base with
double quantization, LoRA r=64 alpha=16 on all linear layers (dropout 0.05), lr 2e-4 constant with 3%
warmup, Adam beta2 0.999, max grad norm 0.3, batch 16, 1875 steps, loss on the assistant's replies only.

    jaxllm finetune --config=configs/llama2_guanaco_qlora.py --model=models/Llama-2-7b-hf \
        --data_path=data/guanaco --project_name=runs/llama2-7b-guanaco --merge_adapter
"""

import os

from jaxllm.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "finetune.py"))  # the keys and defaults
    c.model.update(dtype="bfloat16", param_dtype="bfloat16", remat="full")
    c.lora.update(r=64, alpha=16.0, dropout=0.05, quantization="nf4", target_modules=("all-linear",))
    c.data.update(
        source="parquet", format="sft_text", text_field="text", loss_on="assistant", block_size=512, batch_size=16
    )
    c.optim.update(
        learning_rate=2e-4,
        schedule="constant",
        warmup_steps=56,
        b2=0.999,
        grad_clip=0.3,
        grad_accum_steps=1,
        weight_decay=0.0,
    )
    c.train.update(steps=1875, eval_every=200)
    c.checkpoint.update(every=200)
    return c
