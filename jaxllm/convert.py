"""`jaxllm convert`: a Hugging Face folder into a jaxllm checkpoint (Orbax params + model.json) or into a
safetensors Hugging Face folder (from .bin weights), a training workdir into a Hugging Face folder, and a
fine-tuning run into its export (a PEFT adapter, a merged or a whole model: `export`)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from jaxllm import JaxllmError, atomic, hf, tree
from jaxllm.hf import hub
from jaxllm.hf.weights import TensorFiles, read_config, save_tensors
from jaxllm.load import load_trained
from jaxllm.models import lora
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train.checkpoint import checkpoint_dir
from jaxllm.train.start import load_run

# the Hub fetch's tokenizer files, plus a BPE tokenizer's parts and the generation defaults
TOKENIZER_FILES = hub.TOKENIZER_FILES + ("vocab.json", "merges.txt", "generation_config.json")


def tokenizer_files(folder: str) -> tuple[str, ...]:
    """The paths of the TOKENIZER_FILES that a local folder holds (none for a Hub id or '')."""
    if not folder or not os.path.isdir(folder):
        return ()
    return tuple(os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f)))


def copy_tokenizer(source: str, dest: str) -> None:
    for path in tokenizer_files(source):
        atomic.copy(path, os.path.join(dest, os.path.basename(path)))


def hf_to_checkpoint(hf_dir: str, out_dir: str, *, dtype: Any = "float32") -> ModelConfig:
    """Writes `out_dir/params` (Orbax) and `out_dir/model.json` from a Hugging Face folder."""
    out_dir = checkpoint_dir(out_dir)  # Orbax: a local path or gs://
    if atomic.as_path(os.path.join(out_dir, "params")).exists():
        raise JaxllmError(f"{out_dir}/params already exists; choose another --output")
    model, params = hf.load_pretrained(hf_dir, dtype=dtype)
    atomic.as_path(out_dir).mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    # Orbax finalises atomically (a rename, or a commit marker on gs://)
    checkpointer.save(os.path.join(out_dir, "params"), params)
    checkpointer.wait_until_finished()
    copy_tokenizer(hf_dir, out_dir)
    # model.json last: `jaxllm.train.start.kind` recognises the output by it
    atomic.write(os.path.join(out_dir, "model.json"), json.dumps(dataclasses.asdict(model.cfg), indent=2))
    return model.cfg


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
    save_tensors(tensors, out_dir, config, max_shard_size=max_shard_size, files=tokenizer_files(hf_dir))
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


def export(workdir: str, save_dir: str, *, merge: bool = False, dtype: Any = "float32") -> dict[str, str]:
    """Writes the run's result: `adapter/` (PEFT) or, for full fine-tuning, `model/`; `merged/` if asked."""
    run, trainable, frozen = load_run(workdir, with_frozen=merge)
    written: dict[str, str] = {}
    source = run.checkpoint.init_from
    extra = _special_ids(source)

    def save_model(kind: str, cfg: ModelConfig, params: Any) -> None:  # a Hugging Face model folder
        path = os.path.join(save_dir, kind)
        hf.save_pretrained(Decoder(cfg), params, path, dtype=dtype, overwrite=True, config_updates=extra)
        copy_tokenizer(source, path)
        written[kind] = path

    if not run.lora.r:
        save_model("model", run.model, tree.union(trainable, frozen))
        return written
    path = os.path.join(save_dir, "adapter")
    hf.save_adapter(trainable, run.model, run.lora, path, base_model=_base_model_name(workdir, source))
    copy_tokenizer(source, path)
    written["adapter"] = path
    if merge:
        save_model("merged", *lora.merge_adapters(tree.union(trainable, frozen), run.model))
    return written


def _base_model_name(workdir: str, source: str) -> str:
    """The adapter's base_model_name_or_path: the Hub id the run started from (as PEFT writes it), else
    the absolute path of the local folder."""
    try:
        recorded = json.loads(atomic.as_path(os.path.join(workdir, "config.json")).read_text())["checkpoint"][
            "init_from"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = ""
    if isinstance(recorded, str) and hub.is_hub_id(recorded):
        return hub.split_id(recorded)[0]
    return os.path.abspath(source) if source else ""


def _special_ids(source: str) -> dict[str, Any]:
    try:
        with open(os.path.join(source, "config.json")) as f:
            c = json.load(f)
    except (OSError, TypeError, json.JSONDecodeError):
        return {}
    return {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c}
