"""`jaxllm convert`: a Hugging Face folder into a jaxllm checkpoint (Orbax params + model.json), and a
training workdir into a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from jaxllm import JaxllmError, atomic, hf
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
    checkpointer.save(os.path.join(out_dir, "params"), params)  # Orbax finalises atomically (a rename, or a commit marker on gs://)
    checkpointer.wait_until_finished()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            atomic.copy(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    # model.json last: `load.kind` recognises the output by it
    atomic.write(os.path.join(out_dir, "model.json"), json.dumps(dataclasses.asdict(model.cfg), indent=2))
    return model.cfg


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
