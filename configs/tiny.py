"""A small Llama-style model on the embedded Python-docs corpus: the main job, a few minutes on 2 CPU cores.

    jaxllm train --config=configs/tiny.py --workdir=runs/tiny

Starts from configs/common.py (every key, with its meaning) and sets the model's shapes and the run's
sizes; `jaxllm config --config=configs/tiny.py` prints the whole config.
"""

import os

from jaxllm.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "common.py"))
    with c.unlocked():
        c.model.update(
            vocab_size=1024,  # must hold the tokenizer's vocab
            num_layers=4,
            embed_dim=256,
            num_heads=8,
            num_kv_heads=4,  # grouped-query attention (2 query heads per KV head)
            head_dim=0,  # 0 = embed_dim // num_heads
            mlp_dim=704,
            max_seq_len=256,
            rope_theta=10000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
            scan_layers=False,  # on CPU the unrolled layers step faster (no stacked activations); 4 compile fast
            dtype="float32",  # float32 compute is faster than bfloat16 on CPU
        )
    c.data.update(
        source="embedded",  # the Python reference manual + stdlib docstrings (ships with Python)
        vocab_size=1024,
        block_size=128,
        batch_size=16,
    )
    c.optim.update(learning_rate=3e-3, warmup_steps=50)
    c.train.update(steps=900, log_every=100, eval_every=300, eval_batches=16)
    c.generate.update(prompt="The for statement", max_new_tokens=60, temperature=0.7, top_k=40, top_p=0.95)
    return c
