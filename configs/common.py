"""Every section and key a run config may set, with its default and meaning; the configs in this folder
start from it and change what they need:

    c = load_config(os.path.join(os.path.dirname(__file__), "common.py"))
    c.model.update(num_layers=4, embed_dim=192)

`jaxllm config --config=configs/NAME.py` prints a config whole, after its changes and any overrides.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout

    # Run switches of the model; the shapes (vocab_size, num_layers, embed_dim, num_heads, num_kv_heads,
    # head_dim, mlp_dim, max_seq_len, rope_theta, norm_eps, tie_embeddings, ...) come from each config, or
    # from init_from's config.json with checkpoint.model_from_init.
    c.model = dict(
        embed_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
        scan_layers=True,  # nn.scan over layers: one layer compiled, L times faster compiles
        remat="none",  # none | full | minimal | save_dot_except_mlpwi | ... (jaxllm.models.decoder.REMAT_POLICIES)
        sequence_parallel=True,  # split the residual stream's length over the tensor axis (with tensor > 1)
        param_dtype="float32",
        dtype="float32",  # bfloat16 on TPU/GPU; float32 is faster on CPU
        attention="auto",  # auto (cuDNN on GPU, Pallas flash on TPU, XLA on CPU) | xla | cudnn | flash | reference
        init_std=0.02,
    )
    c.data = dict(
        source="embedded",  # the Python reference manual + stdlib docstrings (ships with Python); embedded_sft
        #                     (Q/A chats about Python) | embedded_preference (those, with another's answer rejected)
        # file globs of a file source (text | jsonl | json | parquet | csv | arrow | array_record); or a data set:
        # a Hugging Face Hub id (org/name[@revision]) or a local folder, then :SPLIT or :CONFIG:SPLIT (default
        # train), whose split's files (found by the `datasets` library's rules) replace it and set data.source
        paths=(),
        valid_paths=(),  # validation files, or a data set split (default :validation), instead of val_fraction
        text_field="text",  # field of a JSON / Parquet / TFDS record holding the document
        format="text",  # text (language modelling) | sft_text (a Guanaco "### Human: ...### Assistant: ..." column)
        #                 | messages | prompt_completion | preference (prompt, chosen, rejected: dpo/orpo/reward)
        prompt_field="prompt",  # prompt_completion, preference: the prompt column (preference: absent = the
        #                         leading part chosen and rejected share, as TRL)
        completion_field="completion",  # prompt_completion: the completion column
        messages_field="messages",  # messages: the column of [{"role": ..., "content": ...}]
        chat_template="guanaco",  # messages, and preference rows of messages: guanaco | chatml | llama2
        loss_on="auto",  # all | assistant | auto (assistant for prompt_completion, else all)
        packing=True,  # SFT, preference: several whole examples (pairs) per row
        chosen_field="chosen",  # preference: the preferred answer's column (text, or messages ending in it)
        rejected_field="rejected",  # preference: the dispreferred answer's column
        max_prompt_length=0,  # preference: a prompt keeps its last this many tokens; 0 = no limit
        max_completion_length=0,  # preference: each answer keeps its first this many tokens; 0 = no limit
        text_split="file",  # text source: file (one document per file) | paragraph
        tfds_name="",
        tfds_split="train",
        tfds_data_dir="",
        tokenizer="",  # "" trains a SentencePiece model on the corpus once and caches it
        vocab_size=1024,  # of the SentencePiece model trained on the corpus
        block_size=128,
        batch_size=16,  # global batch in sequences
        val_fraction=0.05,
        seed=0,
        shuffle=True,
        shuffle_window=2048,  # packed sequences shuffled together; 0 = off
        add_bos=True,
        add_eos=True,
        num_workers=0,  # Grain multiprocess prefetch workers
        # Several sources by weight, each a few data keys: {"web": dict(source="array_record",
        # paths=("web/*.array_record",), weight=3.0), "code": dict(..., weight=((0, 0.0), (10_000, 1.0)))}
        mixture=None,
        curriculum_field="",  # record field giving a document's stage: "bucket" in `jaxllm prep` shards
        curriculum_schedule=(),  # stage weights over steps, linear between: ((0, (1, 0)), (5000, (0.5, 0.5)))
    )
    c.optim = dict(
        learning_rate=3e-3,
        schedule="cosine",  # cosine | linear | constant | rsqrt
        warmup_steps=30,
        decay_steps=0,  # 0 = train.steps
        end_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        grad_accum_steps=1,
        host_offload=False,  # optimizer state in host memory between steps (TPU/GPU, big models on few chips)
    )
    c.train = dict(
        steps=300,
        objective="lm",  # lm (next-token loss: pretraining, SFT) | dpo | orpo | reward (with data.format=preference)
        log_every=25,
        eval_every=100,
        eval_batches=16,
        eval_at_start=False,  # also evaluate before the first step
        # lm-evaluation-harness tasks scored at every validation pass, e.g. ("arc_easy", "hellaswag") (needs
        # jaxllm[eval]); scores go to metrics.jsonl and the trackers as split "tasks"; () = none
        eval_tasks=(),
        eval_tasks_limit=0,  # documents per task; 0 = all
        eval_tasks_fewshot=-1,  # few-shot examples; -1 = each task's default
        eval_tasks_include_path="",  # a folder of task YAML files (the harness's --include_path)
        early_stop_patience=0,
        early_stop_min_delta=0.0,
        z_loss=0.0,
        loss_chunk=0,  # positions per cross-entropy chunk (no [B, L, V] float32 logits); 0 = whole sequence
        progress=True,
        # experiment trackers fed every metrics.jsonl record (always written), on process 0: tensorboard (event
        # files in WORKDIR/tensorboard) | wandb (WANDB_PROJECT, else the workdir's name) | mlflow
        # (MLFLOW_EXPERIMENT_NAME, else the workdir's name); e.g. ("tensorboard", "wandb"); () = metrics.jsonl only
        trackers=("tensorboard",),
        mlflow_tracking_uri="",  # "" = MLFLOW_TRACKING_URI, else MLflow's default store
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1,  # -1 takes the remaining devices
                  slice="",  # the Cloud TPU slice a config is sized for: `jaxllm plan`'s default topology
                  rules=())  # ((logical axis, mesh axes | None), ...) replacing entries of sharding.LOGICAL_RULES
    c.checkpoint = dict(every=100, keep=2, keep_best=1, async_save=True, resume=True,
                        init_from="",  # a Hugging Face folder or `jaxllm convert` output to start from
                        model_from_init=False,  # the model's shapes from init_from's config.json
                        preemption_deadline_s=120.0)  # after SIGTERM: s to write the checkpoint in (0 = no limit)
    c.generate = dict(prompt="The for statement", max_new_tokens=60, temperature=0.8, top_k=40, top_p=0.95,
                      seed=0)
    c.distributed = dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1,
                         local_device_ids=(), cpu_collectives="gloo", initialization_timeout=300,
                         heartbeat_timeout=100,  # s without a heartbeat before a process counts as lost (others stop)
                         shutdown_timeout=60)  # s a finishing process waits for the others at exit
    c.lora = dict(
        r=0,  # adapter rank; 0 = no adapters, every parameter trains
        alpha=16.0,  # update scale alpha / r
        dropout=0.0,  # on the adapters' input
        target_modules=("all-linear",),  # HF module names (q_proj, ..., query_key_value, dense_h_to_4h, ...),
        #                                  all-linear, or one regex over module paths
        modules_to_save=(),  # HF modules trained in full and saved with the adapter (e.g. lm_head)
        rslora=False,  # scale alpha / sqrt(r)
        quantization="none",  # none | nf4 (QLoRA) | int8: the frozen base's kernels
        quant_block_size=64,
        init_adapter="",  # a PEFT adapter folder to continue from
    )
    c.preference = dict(  # train.objective = dpo | orpo | reward (jaxllm.train.preference)
        loss_type="sigmoid",  # dpo: sigmoid (DPO) | ipo (IPO)
        beta=0.1,  # dpo: KL weight beta; orpo: odds-ratio weight lambda
        model_ref="",  # dpo reference model (HF folder or Hub id, convert output, workdir); "" = the policy at the start
        precompute_ref_logps=False,  # dpo: reference log-probs computed once before training, kept with the data
    )
    c.prune = dict(sparsity=0.0,  # magnitude pruning: fraction of the linear layers' weights zeroed; 0 = off
                   scope="global",  # global (one threshold) | layer (each matrix on its own)
                   start_step=0, end_step=0,  # gradual (cubic schedule) from start to end; end <= start = one-shot
                   every=100,  # steps between mask updates while pruning gradually
                   targets="kernel")  # regex over param paths (kernel = the linear layers' matrices)
    return c
