"""The autotrain flag layer of `jaxllm finetune`: supervised fine-tuning (LoRA / QLoRA / full) of a Hugging
Face model folder.

Takes the flags of the one-line `autotrain llm --train ...` command (autotrain's spellings and aliases;
a flag that does not apply here is accepted with a one-line note saying why), maps them onto the
ml-collections config of `configs/finetune.py` (or `--config`), runs the one training loop, and exports
(`jaxllm.convert.export`) to `--save_dir`: `adapter/` in PEFT's format (or, for full fine-tuning, a Hugging
Face model folder) and, with `--merge_adapter`, `merged/`, the base with the adapter merged in.
`--push_to_hub` then uploads that export with a model card (`jaxllm.push`).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxllm import JaxllmError, atomic, convert, push
from jaxllm.config import apply_override, build, load_config
from jaxllm.data import splits
from jaxllm.data.config import DataConfig
from jaxllm.data.pipeline import split_documents, tokenize_fn, tokenizer_for
from jaxllm.distributed import DistributedConfig, initialize
from jaxllm.hf import hub, peft
from jaxllm.sharding import MeshConfig
from jaxllm.train import trackers
from jaxllm.train.loop import train
from jaxllm.train.run import check_complete, check_workdir
from jaxllm.train.start import resolve, source_model_config

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "finetune.py")


def _flags(group: Any) -> Callable[..., None]:
    """`group.add_argument` that takes each --a_b flag also as --a-b (autotrain takes both), listed right after it."""

    def add(*names: str, **kwargs: Any) -> None:
        group.add_argument(*(s for n in names for s in dict.fromkeys((n, n.replace("_", "-")))), **kwargs)

    return add


def add_arguments(p: argparse.ArgumentParser) -> None:
    """autotrain's `llm` flags (its spellings: underscores, dashes, aliases), grouped as its --help groups them."""
    a = _flags(p.add_argument_group("Basic"))
    a("--llm", action="store_true", help="accepted for copy-paste (`autotrain train --llm`): this command is that")
    a("--train", action="store_true", help="accepted for copy-paste: training is what this does")
    a(
        "--model",
        default="",
        help="Hugging Face model to fine-tune: a Hub id (org/name[@revision]; fetched into the "
        "Hugging Face cache) or a local folder (config.json + weights + tokenizer)",
    )
    a("--revision", default=None, help="branch, tag or commit of a --model Hub id (default: main)")
    a(
        "--tokenizer",
        default=None,
        help="the tokenizer, if not --model's: a Hub id, a model folder or a SentencePiece .model file",
    )
    a(
        "--adapter",
        default=None,
        help="a PEFT LoRA adapter (folder or Hub id) to continue training, e.g. an SFT "
        "adapter before --trainer dpo (lora.init_adapter; r and targets from it)",
    )
    a(
        "--project_name",
        "--project",
        default="",
        help="run folder: checkpoints, logs (default: --save_dir); also the default --save_dir",
    )
    a(
        "--data_path",
        default="",
        help="a data set: Hugging Face Hub id (org/name[@revision]; its data "
        "files fetched into the Hugging Face cache) or local folder; or a JSONL / JSON / Parquet / CSV / Arrow file or "
        "glob; or 'embedded' for the bundled Python-docs chat set",
    )
    a(
        "--train_split",
        default=None,
        help="the data set's split to train on, or config:split (default train); splits are found as the datasets "
        "library finds them (e.g. a file named *eval* is the test split)",
    )
    a(
        "--valid_split",
        default=None,
        help="the data set's split to evaluate on, or config:split (e.g. test); default: hold out data.val_fraction of "
        "the training rows",
    )
    a("--config", default="", help="base experiment config (default configs/finetune.py); --config.a.b=v sets any key")
    a = _flags(p.add_argument_group("Data Processing"))
    a(
        "--text_column",
        default=None,
        help="the column holding each conversation (Guanaco '### Human: ...'; chat messages with --chat_template)",
    )
    a("--add_eos_token", action="store_true", help="end every example with EOS (data.add_eos)")
    a(
        "--model_max_length",
        "--max-len",
        "--max-length",
        type=int,
        default=None,
        help="truncate examples to this many tokens",
    )
    a("--block_size", type=int, default=None, help="packed row length (-1 = model_max_length)")
    a(
        "--padding",
        choices=("left", "right"),
        default=None,
        help="accepted; rows are packed, so padding side does not apply (note printed)",
    )
    a(
        "--chat_template",
        default=None,
        choices=("none", "chatml", "llama2", "guanaco", "zephyr", "tokenizer"),
        help="render a column of chat messages with this template (data.format=messages)",
    )
    a("--prompt_text_column", default=None, help="dpo/orpo/reward: the prompt column (data.prompt_field)")
    a(
        "--rejected_text_column",
        default=None,
        help="dpo/orpo/reward: the rejected answer column (data.rejected_field); --text_column is the chosen one",
    )
    a(
        "--max_prompt_length",
        type=int,
        default=None,
        help="dpo/orpo/reward: a prompt keeps its last this many tokens (data.max_prompt_length)",
    )
    a(
        "--max_completion_length",
        type=int,
        default=None,
        help="dpo/orpo/reward: an answer keeps its first this many tokens (data.max_completion_length)",
    )
    a = _flags(p.add_argument_group("Training Configuration"))
    a(
        "--trainer",
        default="sft",
        choices=("sft", "default", "clm", "generic", "dpo", "orpo", "reward"),
        help="sft: chat/instruction data; default/clm/generic: plain causal LM on the text column; dpo, orpo, reward: "
        "preference pairs (--prompt_text_column, --text_column = chosen, --rejected_text_column)",
    )
    a(
        "--use_apex",
        action="store_true",
        help="mixed precision: bf16 compute on TPU/GPU (as --mixed_precision=bf16); float32 on CPU (note printed)",
    )
    a("--mixed_precision", "--mp", default=None, choices=("bf16", "fp16", "no", "none"))
    a("--fp16", action="store_true", help="same as --mixed_precision=fp16")
    a(
        "--use_flash_attention_2",
        "--use-fa2",
        dest="flash_attention",
        action="store_true",
        help="model.attention=auto: cuDNN flash attention on GPU, XLA elsewhere",
    )
    a(
        "--disable_gradient_checkpointing",
        "--disable-gc",
        dest="no_remat",
        action="store_true",
        help="model.remat=none (keep activations: faster, more memory)",
    )
    a("--logging_steps", type=int, default=None, help="steps between metric lines (-1 = config)")
    a(
        "--eval_strategy",
        "--evaluation_strategy",
        default=None,
        choices=("epoch", "steps", "no"),
        help="evaluate every epoch, every --logging_steps, or at the end",
    )
    a(
        "--save_strategy",
        default=None,
        choices=("epoch", "steps", "no"),
        help="checkpoint every epoch (epoch), every checkpoint.every steps (steps), or at evaluations and the end",
    )
    a("--save_total_limit", type=int, default=None, help="checkpoints kept (checkpoint.keep)")
    a("--auto_find_batch_size", action="store_true", help="accepted (note printed)")
    a(
        "--log",
        default=None,
        help="experiment tracker: none, tensorboard, wandb or mlflow (train.trackers); metrics.jsonl is always written",
    )
    a("--distributed_backend", default=None, help="accepted: jaxllm shards over its mesh")
    a("--backend", default=None, help="accepted: jaxllm runs on this machine's (or pod's) devices")
    a("--unsloth", action="store_true", help="accepted (note printed)")
    hyperparameters = p.add_argument_group("Training Hyperparameters")
    a = _flags(hyperparameters)
    a("--learning_rate", "--lr", type=float, default=None)
    a("--num_train_epochs", "--epochs", dest="epochs", type=float, default=None)
    a(
        "--train_batch_size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=None,
        help="sequences per device (per data/fsdp mesh shard, as autotrain's per-device batch); the "
        "global batch is this x those devices x --gradient_accumulation",
    )
    a("--max_steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--warmup_ratio", type=float, default=None)
    hyperparameters.add_argument(  # autotrain's order: both underscore spellings first
        "--gradient_accumulation",
        "--gradient_accumulation_steps",
        "--gradient-accumulation",
        "--gradient-accumulation-steps",
        dest="grad_accum_steps",
        type=int,
        default=None,
    )
    a("--optimizer", default=None, help="adamw_torch and the other AdamW variants: AdamW (optim section)")
    a(
        "--scheduler",
        default=None,
        choices=("linear", "cosine", "constant", "constant_with_warmup", "rsqrt", "inverse_sqrt"),
    )
    a("--weight_decay", type=float, default=None)
    a("--max_grad_norm", type=float, default=None)
    a("--seed", type=int, default=None)
    a(
        "--dpo_beta",
        "--orpo_lambda",
        type=float,
        default=None,
        help="dpo: the KL weight beta (default 0.1); orpo: the odds-ratio weight lambda (preference.beta)",
    )
    a(
        "--model_ref",
        default=None,
        help="dpo: the reference model (Hub id, folder or workdir); default: the model as training starts",
    )
    a(
        "--precompute_ref_log_probs",
        dest="precompute_ref",
        action="store_true",
        help="dpo: compute the reference log-probs once before training and keep them with the data "
        "(no reference weights in memory while training)",
    )
    a = _flags(p.add_argument_group("PEFT/LoRA"))
    a(
        "--use_peft",
        "--peft",
        dest="peft",
        action="store_true",
        help="train LoRA adapters (the default here; --lora_r 0 trains the whole model)",
    )
    a("--use_int4", dest="int4", action="store_true", help="QLoRA: NF4 base (--quantization int4)")
    a("--use_int8", dest="int8", action="store_true", help="int8 base (--quantization int8)")
    a("--quantization", default=None, choices=("int4", "nf4", "int8", "none"))
    a("--lora_r", type=int, default=None, help="adapter rank (default 16); 0 = full fine-tuning")
    a("--lora_alpha", type=float, default=None)
    a("--lora_dropout", type=float, default=None)
    a("--target_modules", default=None, help="comma-separated module names, all-linear, or a regex")
    a("--merge_adapter", action="store_true", help="also write merged/: the base with the adapter merged in")
    a = _flags(p.add_argument_group("Output"))
    a("--save_dir", default="", help="where adapter/ (and merged/) are written; default --project_name")
    a = _flags(p.add_argument_group("Hub Integration"))
    a(
        "--push_to_hub",
        action="store_true",
        help="after the export, upload it (merged/, else adapter/, else model/) with a model card to a private Hub "
        "model repository; a failed upload keeps the outputs, prints the `jaxllm push` command that retries it "
        "and exits with status 1",
    )
    a("--repo_id", default=None, help="with --push_to_hub: the repository, ORG/NAME")
    a("--username", default=None, help="with --push_to_hub and no --repo_id: push to USERNAME/<project name>")
    a(
        "--token",
        default=None,
        help="with --push_to_hub: a Hub token with write access (default: HF_TOKEN, else "
        "the stored login); never printed or written",
    )


def _data_source(path: str, split: str | None = None, valid_split: str | None = None) -> dict[str, Any]:
    """data.source/paths (and valid_paths) for --data_path: 'embedded', a local file or glob (read whole), or a
    data set, a local folder or a Hub id (org/name[@rev]), whose --train_split (default train) and --valid_split
    files `jaxllm.data.splits` picks as the `datasets` library does (`config:split` names a README config or a
    sub-folder)."""
    if path in ("embedded", "embedded_sft"):
        return dict(source="embedded_sft", paths=())
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded) or hub.is_hub_id(path):
        if hub.is_hub_id(path):
            hub.files(path)  # the repository is there (its errors name the id, not a split)
        out: dict[str, Any] = {}
        kinds = set()
        for key, flag, value in (
            ("paths", "--train_split", split or "train"),
            ("valid_paths", "--valid_split", valid_split),
        ):
            if value:
                config, _, name = value.rpartition(":")
                try:
                    source, out[key] = splits.split_files(path, name, config)
                except JaxllmError as e:
                    raise JaxllmError(f"{flag} {value}: {e}") from None
                kinds.add(source)
        kinds = {"json"} if kinds == {"json", "jsonl"} else kinds
        if len(kinds) > 1:
            raise JaxllmError(
                f"--train_split {split or 'train'} and --valid_split {valid_split} hold files of two "
                f"formats ({', '.join(sorted(kinds))}); pick splits of one format"
            )
        return {"source": kinds.pop(), **out}
    files = sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else []
    if os.path.isfile(expanded):
        files = [expanded]
    if not files:
        raise JaxllmError(
            f"--data_path {path!r} is neither a local file, glob or folder nor a Hugging Face Hub data "
            "set id (org/name, optionally @revision)"
        )
    return dict(source=splits.source_of(files, f"--data_path {path!r}"), paths=tuple(files))


def note(message: str) -> None:
    """A one-line remark about a flag that does not apply here, on stderr (the result goes to stdout)."""
    print(f"jaxllm: note: {message}", file=sys.stderr)


ADAMW = ("adamw", "adamw_torch", "adamw_hf", "adamw_torch_fused", "adamw_apex_fused", "adamw_torch_xla")
ADAMW_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_4bit")
NOTES = {  # flag -> why it does not apply here
    "padding": "rows are packed whole examples with the padding at their end; the padding side does not apply",
    "auto_find_batch_size": "XLA compiles one fixed batch shape; set --train_batch_size (and "
    "--gradient_accumulation) to what fits",
    "distributed_backend": "jaxllm shards over its device mesh (the mesh section), not DDP or DeepSpeed",
    "backend": "jaxllm runs on the devices of this machine (or of every host that runs the command)",
    "unsloth": "Unsloth's kernels are for PyTorch on GPUs; jaxllm compiles its own with XLA",
}


def _devices(cfg: ml_collections.ConfigDict) -> tuple[str, int]:
    """(the JAX platform, devices a batch is split over: data x fsdp); flags_to_config has joined the
    distributed runtime already (which must come before any backend use; the loop's own call is then a no-op)."""
    data, fsdp, _ = build(MeshConfig, cfg.mesh, "mesh").shape(jax.device_count())
    return jax.default_backend(), data * fsdp


PREFERENCE_TRAINERS = ("dpo", "orpo", "reward")
# flags set one config key each, as given
DIRECT = {
    "prompt_text_column": "data.prompt_field",
    "rejected_text_column": "data.rejected_field",
    "max_prompt_length": "data.max_prompt_length",
    "max_completion_length": "data.max_completion_length",
    "dpo_beta": "preference.beta",
    "model_ref": "preference.model_ref",
    "text_column": "data.text_field",
    "learning_rate": "optim.learning_rate",
    "max_grad_norm": "optim.grad_clip",
    "weight_decay": "optim.weight_decay",
    "save_total_limit": "checkpoint.keep",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "grad_accum_steps": "optim.grad_accum_steps",
    "seed": "seed",
}
SCHEDULES = {"constant_with_warmup": "constant", "inverse_sqrt": "rsqrt"}


def flags_to_config(args: argparse.Namespace, overrides: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(the run's config, workdir) from the autotrain flags on top of the base config file; flags that do
    not apply here are accepted with a one-line note. The workdir is --project_name, else --save_dir
    ('' when neither names one): two jobs never share one by default."""
    cfg = load_config(args.config or DEFAULT_CONFIG, [o for o in overrides if o.startswith("distributed.")])
    check_complete(cfg, (args.config or DEFAULT_CONFIG).partition(":")[0])
    _refuse_and_note(args)
    # the distributed runtime joined before any Hub fetch: process 0 picks the commit every process then reads
    initialize(build(DistributedConfig, cfg.distributed, "distributed"))
    sets = {key: getattr(args, flag) for flag, key in DIRECT.items() if getattr(args, flag) is not None}
    sets.update(_model_and_data(args, cfg))
    sets.update(_optimization(args, cfg))
    sets.update(_adapters(args, cfg))
    for item in [f"{k}={v!r}" if isinstance(v, (tuple, list)) else f"{k}={v}" for k, v in sets.items()] + overrides:
        apply_override(cfg, item)
    workdir = args.project_name or args.save_dir
    if workdir:
        check_workdir(workdir, cfg)  # before the devices or the data are touched
    if args.batch_size or args.use_apex or args.flash_attention:
        _device_dependent(args, cfg, overrides)
    _schedule(args, cfg)
    return cfg, workdir


def _refuse_and_note(args: argparse.Namespace) -> None:
    """Errors for what cannot run here; notes for flags accepted but without effect."""
    hub_flags = [f"--{f}" for f in ("repo_id", "username", "token") if getattr(args, f)]
    if hub_flags and not args.push_to_hub:  # names only: a token is never printed
        note(f"{', '.join(hub_flags)} apply with --push_to_hub; nothing is uploaded without it")
    preference = args.trainer in PREFERENCE_TRAINERS
    for flag in (
        "prompt_text_column",
        "rejected_text_column",
        "max_prompt_length",
        "max_completion_length",
        "dpo_beta",
        "model_ref",
        "precompute_ref",
    ):
        if getattr(args, flag) and not preference:
            raise JaxllmError(f"--{flag} applies to --trainer dpo, orpo or reward, not {args.trainer}")
    if (args.model_ref or args.precompute_ref) and args.trainer != "dpo":
        raise JaxllmError(
            f"--{'model_ref' if args.model_ref else 'precompute_ref_log_probs'} applies to --trainer dpo: "
            f"{args.trainer} has no reference model"
        )
    if args.chat_template in ("zephyr", "tokenizer"):
        raise JaxllmError(
            f"--chat_template {args.chat_template} is not available (jaxllm does not run a tokenizer's "
            "Jinja template); use chatml, llama2 or guanaco"
        )
    if args.optimizer and args.optimizer not in ADAMW and args.optimizer not in ADAMW_8BIT:
        raise JaxllmError(f"--optimizer {args.optimizer} is not available; jaxllm trains with AdamW (adamw_torch)")
    for flag, why in NOTES.items():
        if value := getattr(args, flag):
            note(f"--{flag} {'' if value is True else value + ' '}is accepted but does not apply: {why}")
    if args.log is not None and args.log != "none" and args.log not in trackers.KNOWN:
        raise JaxllmError(f"--log {args.log} is not a tracker; use none, {', '.join(trackers.KNOWN)}")
    if args.optimizer in ADAMW_8BIT:
        note(
            f"--optimizer {args.optimizer} is accepted as AdamW: 8-bit and paged states are bitsandbytes' GPU memory "
            "savers; jaxllm keeps float32 AdamW states, sharded like the params"
        )


def _model_and_data(args: argparse.Namespace, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The base model, the data source and format, and the row length."""
    sets: dict[str, Any] = {}
    max_len = 0
    if args.model:
        model = args.model
        if hub.is_hub_id(model):  # the id (pinned to --revision) is what the run records; the cache holds the files
            repo_id, revision = hub.split_id(model, args.revision)
            model = f"{repo_id}@{revision}" if revision else repo_id
            folder = hub.local(model, what="model")
        else:
            if args.revision:
                raise JaxllmError(f"--revision {args.revision} applies to a Hub id; --model {args.model!r} is local")
            folder = os.path.expanduser(model)
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise JaxllmError(
                    f"--model {args.model!r} is neither a Hugging Face model folder (no config.json) "
                    "nor a Hugging Face Hub id (org/name)"
                )
        max_len = source_model_config(folder).max_seq_len
        sets.update({"checkpoint.init_from": model, "checkpoint.model_from_init": True, "data.tokenizer": model})
    if args.tokenizer:
        sets["data.tokenizer"] = args.tokenizer
    if args.adapter:
        sets.update(_adapter_settings(args.adapter))
    if args.data_path:
        sets.update(
            {f"data.{k}": v for k, v in _data_source(args.data_path, args.train_split, args.valid_split).items()}
        )
        if not (os.path.isdir(os.path.expanduser(args.data_path)) or hub.is_hub_id(args.data_path)):
            for flag, why in (
                ("train_split", "read whole"),
                ("valid_split", "validation holds out data.val_fraction of its rows"),
            ):
                if getattr(args, flag):
                    note(
                        f"--{flag} {getattr(args, flag)} is accepted but does not apply: --data_path is one file, "
                        f"glob or the embedded set (not a data set with splits), {why}"
                    )
    if args.trainer in ("default", "clm", "generic"):
        sets["data.format"] = "text"
    if args.trainer in PREFERENCE_TRAINERS:  # autotrain: --text_column holds the chosen answers
        sets.update({"train.objective": args.trainer, "data.format": "preference"})
        if sets.get("data.source") == "embedded_sft":  # the bundled chat set's answers as preference pairs
            sets["data.source"] = "embedded_preference"
        if args.text_column:
            sets["data.chosen_field"] = args.text_column
        if args.precompute_ref:
            sets["preference.precompute_ref_logps"] = True
        if args.chat_template not in (None, "none"):  # conversational pairs rendered with it
            sets["data.chat_template"] = args.chat_template
    elif args.chat_template not in (None, "none"):  # autotrain reads the messages from --text_column
        sets.update(
            {
                "data.format": "messages",
                "data.chat_template": args.chat_template,
                "data.messages_field": args.text_column or "text",
            }
        )
    if args.add_eos_token:
        sets["data.add_eos"] = True
    length = args.block_size if args.block_size not in (None, -1) else args.model_max_length
    if args.block_size and args.model_max_length and args.block_size > 0:
        length = min(args.block_size, args.model_max_length)
    if length and max_len and length > max_len:
        note(
            f"rows of {length} tokens would pass the model's {max_len} positions (max_position_embeddings); "
            f"using {max_len}"
        )
        length = max_len
    if length:
        sets["data.block_size"] = length
    if args.no_remat:
        sets["model.remat"] = "none"
    precision = "fp16" if args.fp16 else args.mixed_precision
    if precision:
        sets["model.dtype"] = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    if args.seed is not None:
        sets["data.seed"] = args.seed
    return sets


def _adapter_settings(adapter: str) -> dict[str, Any]:
    """lora.init_adapter and the rank, scale and targets the adapter was trained with (PEFT's own file)."""
    lcfg = peft.read_adapter_config(hub.local(adapter, what="adapter"))
    return {
        "lora.init_adapter": adapter,
        "lora.r": lcfg.r,
        "lora.alpha": lcfg.alpha,
        "lora.target_modules": tuple(lcfg.target_modules),
        "lora.rslora": lcfg.rslora,
        "lora.modules_to_save": tuple(lcfg.modules_to_save),
    }


def _optimization(args: argparse.Namespace, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    if args.grad_accum_steps and not args.batch_size:  # the config's micro-batch, accumulated
        sets["data.batch_size"] = cfg.data.batch_size // cfg.optim.grad_accum_steps * args.grad_accum_steps
    if args.scheduler:
        sets["optim.schedule"] = SCHEDULES.get(args.scheduler, args.scheduler)
    if args.logging_steps and args.logging_steps > 0:
        sets["train.log_every"] = args.logging_steps
    if args.log is not None:  # the one tracker named (as autotrain's report_to); metrics.jsonl is always written
        sets["train.trackers"] = () if args.log == "none" else (args.log,)
    return sets


def _adapters(args: argparse.Namespace, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    if args.peft and args.lora_r is None and cfg.lora.r == 0:
        sets["lora.r"] = 16
    quantization = (
        "nf4" if args.int4 else "int8" if args.int8 else {"int4": "nf4"}.get(args.quantization, args.quantization)
    )
    if not args.peft and args.lora_r is None and quantization in (None, "none") and cfg.lora.r:
        note(
            f"no --use_peft: jaxllm finetune trains LoRA adapters (r={cfg.lora.r}) by default and writes a PEFT "
            "adapter; --lora_r 0 fine-tunes every weight instead"
        )
    if quantization:
        sets["lora.quantization"] = quantization
    if args.target_modules:
        sets["lora.target_modules"] = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return sets


def _device_dependent(args: argparse.Namespace, cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Flags whose meaning depends on the devices: per-device batch size, mixed precision, flash attention."""
    platform, shards = _devices(cfg)
    if args.batch_size:
        apply_override(cfg, f"data.batch_size={args.batch_size * shards * cfg.optim.grad_accum_steps}")
    if args.use_apex and platform == "cpu":
        note("--use_apex (mixed precision) does not apply on CPU: compute stays float32, which CPUs run fastest")
    elif args.use_apex and not (args.fp16 or args.mixed_precision):
        apply_override(cfg, "model.dtype=bfloat16")
    if args.flash_attention:
        apply_override(cfg, "model.attention=auto")
        if platform != "gpu":
            note(f"--use_flash_attention_2: flash attention is cuDNN's on GPU; on {platform} XLA's attention runs")
    for item in overrides:  # --config.a.b=v still has the last word
        apply_override(cfg, item)


def _schedule(args: argparse.Namespace, cfg: ml_collections.ConfigDict) -> None:
    """Steps, evaluations, checkpoints and warmup from epochs and strategies (after the batch is known)."""
    if args.max_steps or args.epochs:
        apply_override(cfg, f"train.steps={args.max_steps or epochs_to_steps(cfg, args.epochs)}")
    per_epoch = epochs_to_steps(cfg, 1.0) if "epoch" in (args.eval_strategy, args.save_strategy) else 0
    if args.eval_strategy == "epoch":
        apply_override(cfg, f"train.eval_every={per_epoch}")
    elif args.eval_strategy == "steps" and args.logging_steps and args.logging_steps > 0:
        apply_override(cfg, f"train.eval_every={args.logging_steps}")  # as transformers' eval_steps default
    elif args.eval_strategy == "no":
        apply_override(cfg, "train.eval_every=0")
        apply_override(cfg, "train.eval_at_start=False")
        note("--eval_strategy no: the validation loss is still reported once, at the end")
    if args.save_strategy == "epoch":
        apply_override(cfg, f"checkpoint.every={per_epoch}")
    elif args.save_strategy == "no":
        apply_override(cfg, "checkpoint.every=0")
    if args.warmup_ratio is not None:
        apply_override(cfg, f"optim.warmup_steps={int(round(args.warmup_ratio * cfg.train.steps))}")


def epochs_to_steps(cfg: ml_collections.ConfigDict, epochs: float, sample: int = 512) -> int:
    """Optimizer steps for `epochs` passes over the training examples. Packed rows per epoch are
    estimated from the token lengths of up to `sample` evenly spaced examples (tokenizing everything
    would cost a pass over the data); unpacked, it is one row per example."""
    data = build(DataConfig, resolve(cfg).data, "data")
    train_docs, _ = split_documents(data)
    n = len(train_docs)
    rows = n
    if data.packing or data.format == "text":
        tokenize = tokenize_fn(data, tokenizer_for(data))
        picks = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(int))
        lengths = [min(len(next(iter(tokenize(train_docs[int(i)]).values()))), data.block_size + 1) for i in picks]
        rows = math.ceil(n * float(np.mean(lengths)) / (data.block_size + 1))
    return max(1, math.ceil(epochs * rows / data.batch_size))


def finetune(args: argparse.Namespace, overrides: list[str], command: list[str] | None = None) -> dict[str, Any]:
    """Trains (or resumes), exports and, with --push_to_hub, uploads; returns the final metrics, the written
    folders and `pushed` (or `push_error`: the one-line failure, the outputs kept). `command` is the command
    line the model card shows (default sys.argv; the token is removed)."""
    if not (args.project_name or args.save_dir):
        raise JaxllmError("name the run's folder: --project_name DIR (checkpoints, logs, output) or --save_dir DIR")
    with atomic.no_leftovers(args.project_name, args.save_dir):  # a refused run leaves no folder it made
        cfg, workdir = flags_to_config(args, overrides)
        save_dir = args.save_dir or workdir
        atomic.check_writable(save_dir, "--save_dir")  # before training, not after it
        repo_id = None
        if args.push_to_hub:  # before training: where to and with what token
            repo_id = push.resolve_repo_id(args.repo_id, args.username, args.project_name or save_dir)
            push.check_token(args.token)
        result = train(cfg, workdir)
        if result.get("preempted"):
            return result
        result["written"] = convert.export(workdir, save_dir, merge=args.merge_adapter)
        trackers.log_artifacts(
            workdir, cfg.train.trackers, result["written"], mlflow_tracking_uri=cfg.train.mlflow_tracking_uri
        )
        if jax.process_index() == 0:
            push.record_export(workdir, result["written"], command or sys.argv, args.token)
            if repo_id:
                try:
                    result["pushed"] = push.push(workdir, repo_id, token=args.token)
                except push.UploadError as e:
                    result["push_error"] = str(e)
        return result
