"""QLoRA chat fine-tuning of Falcon-180B on openassistant-guanaco (the Hugging Face Falcon-180B QLoRA
recipe; it runs unchanged on any Falcon size, since the model's shapes come from the --model folder):
NF4 base, LoRA r=64 alpha=16 dropout 0.1 on every linear layer, lr 2e-4 constant, warmup ratio 0.03,
max grad norm 0.3, batch 4 x accumulation 4, 500 steps, 512 tokens.

Sized for a Cloud TPU v5p-8 (4 chips, one sequence each per micro-batch): the NF4 base is FSDP-sharded
over the chips (about 24 GiB each). `jaxllm plan --config=configs/falcon_qlora.py \
--config.checkpoint.init_from=models/falcon-180B` checks it (it reads only the folder's config.json).
With fewer or more chips change `mesh.*` and keep `data.batch_size` a multiple of 4 x the chips.

    huggingface-cli download tiiuae/falcon-180B --local-dir models/falcon-180B
    huggingface-cli download --repo-type dataset timdettmers/openassistant-guanaco --local-dir data/guanaco
    jaxllm finetune --config=configs/falcon_qlora.py --model=models/falcon-180B --data_path=data/guanaco \
        --project_name=runs/falcon-180b-guanaco --merge_adapter
"""

import os

from jaxllm.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "finetune.py"))  # the keys and defaults
    c.model.update(dtype="bfloat16", param_dtype="bfloat16", remat="full")
    c.lora.update(
        r=64,
        alpha=16.0,
        dropout=0.1,
        quantization="nf4",
        target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    )
    c.data.update(source="parquet", format="sft_text", text_field="text", block_size=512, batch_size=16)
    c.optim.update(
        learning_rate=2e-4, schedule="constant", warmup_steps=15, grad_clip=0.3, grad_accum_steps=4, weight_decay=0.0
    )
    c.train.update(steps=500, eval_every=100)
    c.checkpoint.update(every=100)
    c.mesh.update(data=1, fsdp=-1, tensor=1, slice="v5p-8")
    c.train.update(loss_chunk=128)  # float32 logits of 128 positions at a time (65,024-token vocabulary)
    return c
