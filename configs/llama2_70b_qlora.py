"""The QLoRA paper's Guanaco recipe at its largest size (Dettmers et al. 2023 trained Guanaco-65B this way),
on Llama-2-70B: NF4 base with double quantization, LoRA r=64 alpha=16 dropout 0.05 on all linear layers,
lr 1e-4 (the paper's rate for 33B/65B) constant, batch 16, 512 tokens, loss on the assistant's replies.

Sized for a Cloud TPU v5p-8 (4 chips): the NF4 base is FSDP-sharded over the chips (about 9 GiB each),
4 sequences per chip. `jaxllm plan --config=configs/llama2_70b_qlora.py \
--config.checkpoint.init_from=models/Llama-2-70b-hf` checks it (it reads only the folder's config.json).

    jaxllm finetune --config=configs/llama2_70b_qlora.py --model=models/Llama-2-70b-hf \
        --data_path=data/guanaco --project_name=runs/llama2-70b-guanaco --merge_adapter
"""

import os

from jaxllm.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "llama2_guanaco_qlora.py"))
    c.optim.update(learning_rate=1e-4)
    c.model.update(remat="full")
    c.mesh.update(data=1, fsdp=-1, tensor=1, slice="v5p-8")
    c.train.update(loss_chunk=128)
    return c
