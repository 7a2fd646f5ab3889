"""`jaxllm convert`: a Hugging Face folder into a jaxllm checkpoint (Orbax params + model.json) or into a
safetensors Hugging Face folder (from .bin weights), and a training workdir into a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from jaxllm import JaxllmError, atomic, hf
from jaxllm.hf.weights import TensorFiles, read_config, save_tensors
from jaxllm.load import load_trained
from jaxllm.models import lora
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train.checkpoint import checkpoint_dir


def hf_to_checkpoint(hf_dir: str, out_dir: str, *, dtype: Any = "float32") -> ModelConfig:
    """Writes `out_dir/params` (Orbax) and `out_dir/model.json` from a Hugging Face folder."""
    out_dir = checkpoint_dir(out_dir)  # Orbax: a local path or gs://
    if atomic.as_path(os.path.join(out_dir, "params")).exists():
        raise JaxllmError(f"{out_dir}/params already exists; choose another --output")
    model, params = hf.load_pretrained(hf_dir, dtype=dtype)
    atomic.as_path(out_dir).mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
        os.path.join(out_dir, "params"), params
    )  # Orbax finalises atomically (a rename, or a commit marker on gs://)
    checkpointer.wait_until_finished()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            atomic.copy(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    # model.json last: `jaxllm.train.start.kind` recognises the output by it
    atomic.write(os.path.join(out_dir, "model.json"), json.dumps(dataclasses.asdict(model.cfg), indent=2))
    return model.cfg


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def hf_to_safetensors(hf_dir: str, out_dir: str, *, max_shard_size: int | str = "5GB") -> int:
    """A Hugging Face folder with safetensors from one with `pytorch_model*.bin` weights (read without
    running their pickles): every tensor under its own name and dtype, one at a time into shards (at
    most one shard in memory), config.json and the tokenizer files copied. Rotary `inv_freq` buffers,
    which transformers recomputes, are left out. Returns the number of tensors written."""
    hf_dir = os.path.expanduser(hf_dir)
    config = read_config(hf_dir)
    files = TensorFiles(hf_dir)
    names = [n for n in files.names() if not n.endswith(".inv_freq")]
    tensors = ((name, files.read(name, None)) for name in names)
    copies = tuple(os.path.join(hf_dir, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f)))
    save_tensors(tensors, out_dir, config, max_shard_size=max_shard_size, files=copies)
    return len(names)


def workdir_to_hf(workdir: str, out_dir: str, *, dtype: Any = "float32") -> None:
    """A Hugging Face folder (config.json, safetensors, the SentencePiece tokenizer) from a training workdir;
    an adapter run's adapters are merged into its (dequantized) base."""
    model, params, tokenizer, _ = load_trained(workdir)
    if model.cfg.lora_rank or model.cfg.quantization != "none":
        cfg, params = lora.merge_adapters(params, model.cfg)
        model = Decoder(cfg)
    hf.save_pretrained(model, params, out_dir, dtype=dtype)
    if getattr(tokenizer, "path", "").endswith(".model"):
        atomic.copy(tokenizer.path, os.path.join(out_dir, "tokenizer.model"))
