"""Supervised fine-tuning of a Hugging Face model folder: LoRA by default (QLoRA with --use_int4).

    jaxllm finetune --model=PATH/TO/HF_MODEL --data_path=data.jsonl --text_column=text --use_peft \
        --use_int4 --lr=2e-4 --batch_size=4 --epochs=1 --block_size=512 --save_dir=out --merge_adapter

The `jaxllm finetune` flags (autotrain's) set the keys below; `--config.a.b=v` sets any of them. The
model's shapes come from the folder's config.json (checkpoint.model_from_init), its tokenizer from
the folder too; the model section only holds run switches.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # adapter init, dropout
    c.model = dict(
        dtype="float32",  # compute dtype (bfloat16 with --mixed_precision=bf16; float32 is faster on CPU)
        param_dtype="float32",  # of the loaded base (bfloat16 halves a non-quantized base's memory)
        scan_layers=True,
        remat="none",  # none | full | minimal | save_dot_except_mlpwi | ... (full for long sequences on big models)
        sequence_parallel=True,  # split the residual stream's length over the tensor axis (with tensor > 1)
        attention="auto",
        embed_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
    )
    c.lora = dict(
        r=16,  # 0 = full fine-tuning
        alpha=32.0,
        dropout=0.05,
        target_modules=("all-linear",),  # HF module names, all-linear, or one regex
        modules_to_save=(),  # HF modules trained in full and saved with the adapter (e.g. lm_head)
        rslora=False,
        quantization="none",  # none | nf4 (QLoRA) | int8: the frozen base's kernels
        quant_block_size=64,
        init_adapter="",  # a PEFT adapter folder to continue from
    )
    c.data = dict(
        source="embedded_sft",  # embedded_sft (bundled Python-docs Q&A) | jsonl | parquet | tfds | array_record
        paths=(),
        format="sft_text",  # sft_text (a Guanaco "### Human: ...### Assistant: ..." column) | messages
        #                     | prompt_completion | text (plain language modelling)
        text_field="text",
        prompt_field="prompt",
        completion_field="completion",
        messages_field="messages",
        chat_template="guanaco",  # messages: guanaco | chatml | llama2
        loss_on="auto",  # all | assistant | auto (assistant for prompt_completion, else all)
        packing=True,  # several whole examples per row
        text_split="file",
        tfds_name="",
        tfds_split="train",
        tfds_data_dir="",
        tokenizer="",  # set to the model folder by --model
        vocab_size=2048,
        block_size=256,  # --block_size / --model_max_length: examples truncated to this, rows this long
        batch_size=8,  # global batch (--train_batch_size per device x data/fsdp devices x --gradient_accumulation)
        val_fraction=0.05,
        seed=0,
        shuffle=True,
        shuffle_window=0,
        add_bos=True,
        add_eos=True,
        num_workers=0,
    )
    c.optim = dict(
        learning_rate=2e-4,
        schedule="linear",  # linear | cosine | constant | rsqrt (after warmup)
        warmup_steps=10,  # --warmup_ratio sets this from the step count
        decay_steps=0,
        end_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,  # --max_grad_norm
        grad_accum_steps=1,  # --gradient_accumulation
        host_offload=False,  # optimizer state in host memory between steps
    )
    c.train = dict(steps=100, log_every=10, eval_every=50, eval_batches=8, eval_at_start=True, early_stop_patience=0,
                   early_stop_min_delta=0.0, z_loss=0.0, progress=True,
                   loss_chunk=0)  # positions per cross-entropy chunk; 0 = whole sequence
    c.mesh = dict(data=-1, fsdp=1, tensor=1, slice="")  # slice: the Cloud TPU slice a recipe is sized for
    c.checkpoint = dict(every=100, keep=2, keep_best=1, async_save=True, resume=True,
                        init_from="",  # the base model folder (--model)
                        model_from_init=True)
    c.generate = dict(prompt="### Human: What does the for statement do?### Assistant:", max_new_tokens=60,
                      temperature=0.7, top_k=50, top_p=0.9, seed=0)
    c.distributed = dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1,
                         local_device_ids=(), cpu_collectives="gloo", initialization_timeout=300,
                         heartbeat_timeout=100,  # s without a heartbeat before a process counts as lost (others stop)
                         shutdown_timeout=60)  # s a finishing process waits for the others at exit
    c.prune = dict(sparsity=0.0, scope="global", start_step=0, end_step=0, every=100, targets="kernel")
    return c
