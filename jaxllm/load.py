"""What a user points at, as objects: a Hugging Face folder or Hub id (with a PEFT adapter), or a
training workdir, into model, params, tokenizer and whether prompts start with BOS. (What a run itself
needs to start, from its config, is `jaxllm.train.start`.)

    model, params, tokenizer, add_bos = load_model("path/to/hf_model_or_workdir")
    model, params, tokenizer, add_bos = load_model("bigscience/bloom-560m")
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import JaxllmError, hf, tree
from jaxllm.data.pipeline import tokenizer_for
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer_from_folder
from jaxllm.hf import hub
from jaxllm.hf.files import read_json_object
from jaxllm.models import lora
from jaxllm.models.decoder import Decoder
from jaxllm.train.start import kind, load_run


def load_trained(workdir: str) -> tuple[Decoder, Any, Tokenizer, bool]:
    """(model, params, tokenizer, add_bos) from the latest checkpoint of a training workdir."""
    run, params, frozen = load_run(workdir)
    return Decoder(run.model), tree.union(params, frozen), tokenizer_for(run.data), run.data.add_bos


def load_model(
    source: str, *, dtype: Any = "float32", adapter: str = "", revision: str | None = None
) -> tuple[Decoder, Any, Tokenizer, bool]:
    """(model, params, tokenizer, add_bos) from a Hugging Face folder or Hub id (at `revision`, plus a
    PEFT LoRA `adapter` folder or Hub id) or a jaxllm training workdir."""
    source = hub.local(source, what="model", revision=revision)
    adapter = hub.local(adapter, what="adapter") if adapter else adapter
    what = kind(source)
    if what == "workdir":
        if adapter:
            raise JaxllmError("--adapter applies to a Hugging Face model folder; a workdir brings its own adapter")
        return load_trained(source)
    if what != "hf":
        raise JaxllmError(f"{source!r} is a {what}; point at a Hugging Face model folder or a jaxllm workdir")
    model, params = hf.load_pretrained(source, dtype=dtype)
    if adapter:
        adapter_params, lcfg = hf.load_adapter(adapter, model.cfg)
        model = Decoder(lora.apply(lcfg, model.cfg))
        params = tree.union(params, jax.tree.map(jnp.asarray, adapter_params))
    tokenizer = load_tokenizer_from_folder(source, vocab_size=model.cfg.vocab_size)
    return model, params, tokenizer, _adds_bos(source, tokenizer)


def _adds_bos(folder: str, tokenizer: Tokenizer) -> bool:
    """Whether prompts start with BOS: tokenizer_config.json's add_bos_token, else the SentencePiece
    (Llama) convention of a `tokenizer.model` with a BOS id; byte-level BPE (Falcon, BLOOM) adds none."""
    try:
        flag = read_json_object(os.path.join(folder, "tokenizer_config.json")).get("add_bos_token")
        if flag is not None:
            return bool(flag) and tokenizer.bos_id >= 0
    except OSError:
        pass
    return tokenizer.bos_id >= 0 and str(getattr(tokenizer, "path", "")).endswith(".model")
