"""Conversions between Hugging Face folders and jaxllm: `jaxllm convert` and a run's `init_from`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder

# Fields that fix the parameters' shapes and meaning; a run may change the others (dropout, remat, ...).
SHAPE_FIELDS = ("vocab_size", "num_layers", "embed_dim", "num_heads", "kv_heads", "head_size", "mlp_dim",
                "tie_embeddings", "norm", "position", "mlp", "parallel_block", "num_block_norms", "use_bias",
                "embed_norm")


def _check_compatible(run_cfg: ModelConfig, source_cfg: ModelConfig, source: str) -> None:
    diffs = [f"{f}: {getattr(source_cfg, f)} there, {getattr(run_cfg, f)} here" for f in SHAPE_FIELDS
             if getattr(source_cfg, f) != getattr(run_cfg, f)]
    if diffs:
        raise JaxllmError(f"init_from {source} does not fit model config ({'; '.join(diffs)}); "
                          "set the model section from the source's config.json")


def hf_to_checkpoint(hf_dir: str, out_dir: str, *, dtype: str = "float32") -> ModelConfig:
    """Writes `out_dir/params` (Orbax) and `out_dir/model.json` from a Hugging Face folder."""
    from jaxllm import hf

    model, params = hf.load_pretrained(hf_dir, dtype=dtype)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "params")):
        raise JaxllmError(f"{out_dir}/params already exists; choose another --output")
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, "params"), params)  # Orbax finalises via an atomic rename
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, "model.json.tmp"), "w") as f:
        json.dump(dataclasses.asdict(model.cfg), f, indent=2)
    os.replace(os.path.join(out_dir, "model.json.tmp"), os.path.join(out_dir, "model.json"))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copy(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    return model.cfg


def workdir_to_hf(workdir: str, out_dir: str, *, dtype: str = "float32") -> None:
    """A Hugging Face folder (config.json, safetensors, the SentencePiece tokenizer) from a training workdir;
    an adapter run's adapters are merged into its (dequantized) base."""
    from jaxllm import hf
    from jaxllm.models import lora
    from jaxllm.train.loop import load_trained

    model, params, tokenizer, _ = load_trained(workdir)
    if model.cfg.lora_rank or model.cfg.quantization != "none":
        cfg, params = lora.merge_adapters(params, model.cfg)
        model = Decoder(cfg)
    hf.save_pretrained(model, params, out_dir, dtype=dtype)
    if getattr(tokenizer, "path", "").endswith(".model"):
        shutil.copy(tokenizer.path, os.path.join(out_dir, "tokenizer.model"))


def source_model_config(source: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder or a `jaxllm convert` output."""
    if os.path.isfile(os.path.join(source, "model.json")):
        with open(os.path.join(source, "model.json")) as f:
            return ModelConfig(**json.load(f))
    if os.path.isfile(os.path.join(source, "config.json")):
        from jaxllm import hf
        from jaxllm.hf.weights import read_config

        return hf.model_config_from_hf(read_config(source))
    raise JaxllmError(f"init_from {source!r} is neither a Hugging Face folder nor a `jaxllm convert` output")


def load_init_params(source: str, run_cfg: ModelConfig, mesh: Mesh, *, quantized: ModelConfig | None = None) -> Any:
    """Params for a fresh run from a Hugging Face folder or a `jaxllm convert` output, placed sharded;
    with `quantized`, a Hugging Face base is quantized kernel by kernel as it loads."""
    if os.path.isfile(os.path.join(source, "model.json")) and os.path.isdir(os.path.join(source, "params")):
        with open(os.path.join(source, "model.json")) as f:
            fields = json.load(f)
        _check_compatible(run_cfg, ModelConfig(**fields), source)
        boxed = jax.eval_shape(lambda: Decoder(run_cfg).init(jax.random.key(0), jax.numpy.zeros((1, 1), "int32"))
                               ["params"])
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                shd.unbox(boxed), shd.shardings_for(boxed, mesh))
        try:
            params = ocp.StandardCheckpointer().restore(os.path.join(source, "params"), abstract)
        except Exception as e:
            raise JaxllmError(f"init_from {source}/params is corrupt or incompatible ({str(e)[:200]})") from e
        if quantized is not None:
            from jaxllm.models import lora

            dummy = jax.numpy.zeros((1, 1), "int32")
            boxed_q = jax.eval_shape(lambda: Decoder(quantized).init(jax.random.key(0), dummy)["params"])
            params = lora.quantize_params(params, quantized, shd.shardings_for(boxed_q, mesh), in_place=True)
        return params
    if os.path.isfile(os.path.join(source, "config.json")):
        from jaxllm import hf
        from jaxllm.hf.weights import TensorFiles, load_params, read_config

        _check_compatible(run_cfg, hf.model_config_from_hf(read_config(source)), source)
        return load_params(TensorFiles(source), run_cfg, mesh, quantized=quantized)
    raise JaxllmError(f"init_from {source!r} is neither a Hugging Face folder nor a `jaxllm convert` output")
