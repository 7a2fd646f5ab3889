"""`jaxllm finetune`: supervised fine-tuning (LoRA / QLoRA / full) of a Hugging Face model folder.

Takes the flags of the one-line `autotrain llm --train ...` command, maps them onto the ml-collections
config of `configs/finetune.py` (or `--config`), runs the one training loop, and exports to
`--save_dir`: `adapter/` in PEFT's format (or, for full fine-tuning, a Hugging Face model folder) and,
with `--merge_adapter`, `merged/`, the base with the adapter merged in.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
from typing import Any

import ml_collections

from jaxllm import JaxllmError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "finetune.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The autotrain-style flags (aliases as autotrain spells them)."""
    a = p.add_argument
    a("--config", default="", help="base experiment config (default configs/finetune.py)")
    a("--train", action="store_true", help="accepted for autotrain compatibility (training is what this does)")
    a("--model", default="", help="Hugging Face model folder to fine-tune (config.json + safetensors + tokenizer)")
    a("--data_path", default="", help="JSONL / Parquet file, glob or folder (a Hugging Face dataset download), "
                                     "or 'embedded' for the bundled Python-docs chat set")
    a("--text_column", default=None, help="the column holding each conversation (Guanaco '### Human: ...')")
    a("--project_name", default="", help="run folder (checkpoints, logs) and default --save_dir")
    a("--learning_rate", "--lr", dest="learning_rate", type=float, default=None)
    a("--train_batch_size", "--batch_size", dest="batch_size", type=int, default=None,
      help="sequences per micro-batch (the global batch is this times --gradient_accumulation)")
    a("--num_train_epochs", "--epochs", dest="epochs", type=float, default=None)
    a("--max_steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--trainer", default="sft", choices=("sft", "default", "clm"),
      help="sft: chat/instruction data; default/clm: plain causal LM on the text column")
    a("--model_max_length", type=int, default=None, help="truncate examples to this many tokens")
    a("--block_size", type=int, default=None, help="packed row length (-1 = model_max_length)")
    a("--use_peft", "--peft", dest="peft", action="store_true", help="train LoRA adapters, not the whole model")
    a("--use_int4", dest="int4", action="store_true", help="QLoRA: NF4 base (same as --quantization int4)")
    a("--quantization", default=None, choices=("int4", "nf4", "int8", "none"))
    a("--lora_r", type=int, default=None)
    a("--lora_alpha", type=float, default=None)
    a("--lora_dropout", type=float, default=None)
    a("--target_modules", default=None, help="comma-separated module names, all-linear, or a regex")
    a("--mixed_precision", default=None, choices=("bf16", "fp16", "no", "none"))
    a("--gradient_accumulation", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=None)
    a("--max_grad_norm", type=float, default=None)
    a("--warmup_ratio", type=float, default=None)
    a("--scheduler", default=None, choices=("linear", "cosine", "constant", "rsqrt"))
    a("--weight_decay", type=float, default=None)
    a("--seed", type=int, default=None)
    a("--save_dir", default="", help="where adapter/ (and merged/) are written; default --project_name")
    a("--merge_adapter", action="store_true", help="also write merged/: the base with the adapter merged in")
    a("--push_to_hub", action="store_true", help=argparse.SUPPRESS)


def _data_source(path: str) -> dict[str, Any]:
    """data.source/paths for a local file, glob or dataset folder."""
    if path in ("embedded", "embedded_sft"):
        return dict(source="embedded_sft", paths=())
    expanded = os.path.expanduser(path)
    files = sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else []
    if os.path.isdir(expanded):
        for ext in ("parquet", "jsonl", "json"):
            files = sorted(glob.glob(os.path.join(expanded, "**", f"*train*.{ext}"), recursive=True)) or sorted(
                glob.glob(os.path.join(expanded, "**", f"*.{ext}"), recursive=True))
            if files:
                break
    elif os.path.isfile(expanded):
        files = [expanded]
    if not files:
        raise JaxllmError(f"--data_path {path!r} is not a local file, glob or folder with .parquet/.jsonl files; "
                          "jaxllm does not download: fetch it first (huggingface-cli download --repo-type dataset "
                          f"{path} --local-dir DIR) and pass DIR")
    kinds = {os.path.splitext(f)[1] for f in files}
    if len(kinds) > 1:
        raise JaxllmError(f"--data_path {path!r} mixes {sorted(kinds)} files; point at one kind")
    source = "parquet" if ".parquet" in kinds else "jsonl"
    return dict(source=source, paths=tuple(files))


def flags_to_config(args: argparse.Namespace, overrides: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(the run's config, workdir) from the autotrain flags on top of the base config file."""
    from jaxllm.config import apply_override, load_config

    cfg = load_config(args.config or DEFAULT_CONFIG)
    sets: list[str] = []

    def put(key: str, value: Any) -> None:
        sets.append(f"{key}={value!r}" if isinstance(value, (tuple, list)) else f"{key}={value}")

    if args.push_to_hub:
        raise JaxllmError("--push_to_hub is not supported (no network access assumed); upload --save_dir with "
                          "`huggingface-cli upload`")
    if args.model:
        if not os.path.isfile(os.path.join(os.path.expanduser(args.model), "config.json")):
            raise JaxllmError(f"--model {args.model!r} is not a Hugging Face model folder (no config.json); "
                              "download it first (huggingface-cli download MODEL --local-dir DIR)")
        put("checkpoint.init_from", args.model)
        put("checkpoint.model_from_init", True)
        put("data.tokenizer", args.model)
    if args.data_path:
        for key, value in _data_source(args.data_path).items():
            put(f"data.{key}", value)
    if args.text_column is not None:
        put("data.text_field", args.text_column)
    if args.trainer in ("default", "clm"):
        put("data.format", "text")
    length = args.block_size if args.block_size not in (None, -1) else args.model_max_length
    if args.block_size and args.model_max_length and args.block_size > 0:
        length = min(args.block_size, args.model_max_length)
    if length:
        put("data.block_size", length)
    accum = args.grad_accum or cfg.optim.grad_accum_steps
    if args.grad_accum:
        put("optim.grad_accum_steps", args.grad_accum)
    if args.batch_size or args.grad_accum:
        put("data.batch_size", (args.batch_size or cfg.data.batch_size // cfg.optim.grad_accum_steps) * accum)
    for flag, key in (("learning_rate", "optim.learning_rate"), ("max_grad_norm", "optim.grad_clip"),
                      ("scheduler", "optim.schedule"), ("weight_decay", "optim.weight_decay"),
                      ("lora_r", "lora.r"), ("lora_alpha", "lora.alpha"), ("lora_dropout", "lora.dropout")):
        if getattr(args, flag) is not None:
            put(key, getattr(args, flag))
    if args.peft and args.lora_r is None and cfg.lora.r == 0:
        put("lora.r", 16)
    if not args.peft and args.lora_r is None and args.config == "" and not (args.int4 or args.quantization):
        put("lora.r", 0)  # full fine-tuning, as autotrain does without --use_peft
    quantization = "nf4" if args.int4 else {"int4": "nf4", None: None}.get(args.quantization, args.quantization)
    if quantization:
        put("lora.quantization", quantization)
    if args.target_modules:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        put("lora.target_modules", targets)
    if args.mixed_precision:
        put("model.dtype", {"bf16": "bfloat16", "fp16": "float16"}.get(args.mixed_precision, "float32"))
    if args.seed is not None:
        put("seed", args.seed)
        put("data.seed", args.seed)
    for item in sets + list(overrides):
        apply_override(cfg, item)
    if args.max_steps or args.epochs:
        steps = args.max_steps or epochs_to_steps(cfg, args.epochs)
        apply_override(cfg, f"train.steps={steps}")
    if args.warmup_ratio is not None:
        apply_override(cfg, f"optim.warmup_steps={int(round(args.warmup_ratio * cfg.train.steps))}")
    workdir = args.project_name or os.path.join("runs", "finetune")
    return cfg, workdir


def epochs_to_steps(cfg: ml_collections.ConfigDict, epochs: float, sample: int = 512) -> int:
    """Optimizer steps for `epochs` passes over the training examples. Packed rows per epoch are
    estimated from the token lengths of up to `sample` evenly spaced examples (tokenizing everything
    would cost a pass over the data); unpacked, it is one row per example."""
    import numpy as np

    from jaxllm.config import build
    from jaxllm.data.pipeline import DataConfig, _tokenize_fn, split_documents
    from jaxllm.data.tokenizer import load_tokenizer

    data = build(DataConfig, cfg.data, "data")
    train_docs, _ = split_documents(data)
    n = len(train_docs)
    rows = n
    if data.packing or data.format == "text":
        tokenize = _tokenize_fn(data, load_tokenizer(data))
        picks = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(int))
        lengths = [min(len(next(iter(tokenize(train_docs[int(i)]).values()))), data.block_size + 1) for i in picks]
        rows = math.ceil(n * float(np.mean(lengths)) / (data.block_size + 1))
    return max(1, math.ceil(epochs * rows / data.batch_size))


def export(workdir: str, save_dir: str, *, merge: bool = False, dtype: str = "float32") -> dict[str, str]:
    """Writes the run's result: `adapter/` (PEFT) or, for full fine-tuning, `model/`; `merged/` if asked."""
    from jaxllm import hf
    from jaxllm.models import lora
    from jaxllm.models.decoder import Decoder
    from jaxllm.train.loop import load_run

    run, trainable, frozen = load_run(workdir)
    written: dict[str, str] = {}
    source = run.checkpoint.init_from
    extra = {k: v for k, v in _special_ids(source).items()}
    if run.lora.r:
        path = os.path.join(save_dir, "adapter")
        hf.save_adapter(trainable, run.model, run.lora, path, base_model=os.path.abspath(source) if source else "")
        _copy_tokenizer(source, path)
        written["adapter"] = path
        if merge:
            base_cfg, merged = lora.merge_adapters(lora.merge(trainable, frozen), run.model)
            path = os.path.join(save_dir, "merged")
            hf.save_pretrained(Decoder(base_cfg), merged, path, dtype=dtype, overwrite=True, config_updates=extra)
            _copy_tokenizer(source, path)
            written["merged"] = path
    else:
        path = os.path.join(save_dir, "model")
        hf.save_pretrained(Decoder(run.model), lora.merge(trainable, frozen), path, dtype=dtype, overwrite=True,
                           config_updates=extra)
        _copy_tokenizer(source, path)
        written["model"] = path
    return written


def _special_ids(source: str) -> dict[str, Any]:
    try:
        with open(os.path.join(source, "config.json")) as f:
            c = json.load(f)
    except (OSError, TypeError, json.JSONDecodeError):
        return {}
    return {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c}


def _copy_tokenizer(source: str, dest: str) -> None:
    if not source or not os.path.isdir(source):
        return
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(dest, name))


def finetune(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Trains (or resumes) and exports; returns the final metrics and the written folders."""
    from jaxllm.train.loop import train

    cfg, workdir = flags_to_config(args, overrides)
    result = train(cfg, workdir)
    if result.get("preempted"):
        return result
    save_dir = args.save_dir or workdir
    result["written"] = export(workdir, save_dir, merge=args.merge_adapter)
    return result
