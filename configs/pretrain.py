"""Pretraining with the published shapes of a named model, on a Cloud TPU pod slice or multi-GPU hosts.

    jaxllm train --config=configs/pretrain.py:llama2_7b --workdir=/mnt/gcs/runs/llama2-7b \
        --config.data.paths="['/mnt/gcs/data/*.array_record']" --config.data.tokenizer=/path/tokenizer.model

The name after the colon picks the shapes (Llama-2 7B/13B/70B, Falcon 7B/40B/180B, BLOOM 560m/7b1/176B),
the published peak learning rate, and the Cloud TPU slice the run is sized for with a mesh and remat
policy that fit it at a global batch of 1024 sequences of the published context length:

    model        slice      sequences per chip   mesh                 remat
    llama2_7b    v5p-512    4 x 4096             fsdp=256             save_dot_except_mlpwi
    llama2_13b   v5p-512    4 x 4096             fsdp=256             save_dot_except_mlpwi
    llama2_70b   v5p-512    4 x 4096             fsdp=256             save_dot_except_mlpwi_q_offloaded
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

import ml_collections

from jaxllm.models.config import preset

# name -> (slice, mesh, remat policy, peak learning rate). FSDP over the whole slice (Falcon-7B's width,
# 64 x 71, splits at most 64 ways: data parallel across the rest).
MODELS = {
    "llama2_7b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 3e-4),
    "llama2_13b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 3e-4),
    "llama2_70b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi_q_offloaded", 1.5e-4),
    "falcon_7b": ("v5p-512", dict(data=-1, fsdp=64, tensor=1), "save_dot_except_mlpwi", 6e-4),
    "falcon_40b": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 1.5e-4),
    "falcon_180b": ("v5p-1024", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 1.25e-4),
    "bloom_560m": ("v5e-64", dict(data=1, fsdp=-1, tensor=1), "full", 3e-4),
    "bloom_7b1": ("v5p-512", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 1.2e-4),
    "bloom_176b": ("v5p-1024", dict(data=1, fsdp=-1, tensor=1), "save_dot_except_mlpwi", 6e-5),
}


def get_config(name: str = "llama2_7b") -> ml_collections.ConfigDict:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use configs/pretrain.py:NAME with NAME one of {', '.join(MODELS)}")
    slice_name, mesh, remat, lr = MODELS[name]
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout
    c.model = preset(name, scan_layers=True, remat=remat, dtype="bfloat16", param_dtype="float32",
                     attention="auto",  # Pallas flash attention on TPU, cuDNN on GPU
                     sequence_parallel=True)  # published shapes; bf16 compute, float32 master weights
    c.data = dict(
        source="array_record",  # embedded | text | jsonl | array_record | tfds
        paths=(),  # file globs of the corpus
        text_field="text",  # field of a JSON record holding the document
        text_split="file",  # text source: file | paragraph
        tfds_name="",
        tfds_split="train",
        tfds_data_dir="",
        tokenizer="",  # the model's tokenizer.model; "" trains one on the corpus
        vocab_size=c.model["vocab_size"],  # of a tokenizer trained on the corpus
        block_size=c.model["max_seq_len"],  # the published context length
        batch_size=1024,  # sequences per step (Llama-2: 1024 x 4096 = 4M tokens, as in the paper)
        val_fraction=0.001,
        seed=0,
        shuffle=True,
        shuffle_window=2048,  # packed sequences shuffled together; 0 = off
        add_bos=True,
        add_eos=True,
        num_workers=8,  # Grain worker processes per host
        # Several sources by weight, each a few data keys: {"web": dict(source="array_record",
        # paths=("web/*.array_record",), weight=3.0), "code": dict(..., weight=((0, 0.0), (10_000, 1.0)))}
        mixture=None,
        curriculum_field="",  # record field giving a document's stage: "bucket" in `jaxllm prep` shards
        curriculum_schedule=(),  # stage weights over steps, linear between: ((0, (1, 0)), (5000, (0.5, 0.5)))
    )
    c.optim = dict(learning_rate=lr,  # the published peak rate
                   schedule="cosine", warmup_steps=2000, decay_steps=0, end_lr_ratio=0.1, b1=0.9, b2=0.95,
                   eps=1e-5, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1,
                   host_offload=False)  # optimizer state in host memory between steps
    c.train = dict(steps=500_000, log_every=10, eval_every=1000, eval_batches=16, eval_at_start=False,
                   early_stop_patience=0, early_stop_min_delta=0.0, z_loss=0.0, progress=True,
                   loss_chunk=512 if c.model["vocab_size"] < 100_000 else 256)  # positions per cross-entropy
    #                chunk: float32 logits [B, chunk, V] at a time, never [B, L, V]
    c.mesh = dict(mesh, slice=slice_name)  # one axis -1 takes the remaining devices
    c.checkpoint = dict(every=1000, keep=3, keep_best=1, async_save=True, resume=True,
                        init_from="")  # init_from: a Hugging Face folder or `jaxllm convert` output
    c.generate = dict(prompt="The meaning of life is", max_new_tokens=64, temperature=0.7, top_k=50, top_p=0.9,
                      seed=0)
    c.distributed = dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1,
                         local_device_ids=(), cpu_collectives="gloo", initialization_timeout=300,
                         heartbeat_timeout=100,  # s without a heartbeat before a process counts as lost (others stop)
                         shutdown_timeout=60)  # s a finishing process waits for the others at exit
    c.prune = dict(sparsity=0.0,  # magnitude pruning: fraction of the linear layers' weights zeroed; 0 = off
                   scope="global",  # global (one threshold) | layer (each matrix on its own)
                   start_step=0, end_step=0,  # gradual (cubic schedule) from start to end; end <= start = one-shot
                   every=100,  # steps between mask updates while pruning gradually
                   targets="kernel")  # regex over param paths (kernel = the linear layers' matrices)
    return c
