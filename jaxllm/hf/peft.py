"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors` (an
`adapter_model.bin` is read too) with keys `base_model.model.<module>.lora_A.weight` ([r, in]) and
`lora_B.weight` ([out, r]), torch layout, so `peft.PeftModel.from_pretrained(base, folder)` loads them
with no missing keys; and back.

A PEFT adapter on a fused Falcon/BLOOM `query_key_value` is one A and one B over the fused rows;
jaxllm keeps that A (`qkv_lora_a`) and splits B's rows into q, k and v with the base weight's layout.
Only the file format lives here: what a LoRA run trains and saves is `jaxllm.models.lora`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxllm import JaxllmError, atomic, tree
from jaxllm import sharding as shd
from jaxllm.hf.files import open_tensor_file, read_json_object
from jaxllm.hf.layout import global_groups, join_fused, layer_groups, split_fused
from jaxllm.models import families, lora
from jaxllm.models.config import ModelConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"  # read without running its pickle
PREFIX = "base_model.model."
SEQ_CLS = "SEQ_CLS"  # PEFT's task_type of a *ForSequenceClassification base (its head: `score`)
_SEQ_CLS_HEADS = ("classifier", "score")  # the heads PEFT adds to modules_to_save for SEQ_CLS


def _layer(params: dict, cfg: ModelConfig, i: int) -> dict:
    """Layer i's param dict (a slice of a scanned model's stacked leaves)."""
    if cfg.scan_layers:
        return jax.tree.map(lambda x: x[i], params["layers"])
    return params[f"layers_{i}"]


def _np(x) -> np.ndarray:
    return np.asarray(shd.to_host(x), np.float32)


def adapter_tensors(params: dict, cfg: ModelConfig, lcfg: lora.LoraConfig) -> dict[str, np.ndarray]:
    """PEFT state dict (name -> float32 array) of the trainable params of an adapter run."""
    out: dict[str, np.ndarray] = {}
    modules = families.hf_modules(cfg)
    for i in range(cfg.num_layers):
        layer = _layer(params, cfg, i)
        attn = layer.get("self_attn", {})
        for ours in cfg.lora_targets:
            name = PREFIX + modules[ours].format(i=i)
            if ours == "qkv":
                a = _np(attn["qkv_lora_a"])
                bq, bk, bv = (np.moveaxis(_np(attn[p]["lora_b"]), 0, -1) for p in ("q_proj", "k_proj", "v_proj"))
                b = join_fused(bq, bk, bv, cfg)
            else:
                module = layer[families.parent(ours)][ours]
                a, b = _np(module["lora_a"]), _np(module["lora_b"])
                b = b.reshape(b.shape[0], -1).T
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b)
    for group, layered in _saved_groups(cfg, lcfg):
        for i in range(cfg.num_layers) if layered else [None]:
            node = _layer(params, cfg, i) if layered else params
            leaves = [_np(tree.get(node, p)) for p in group.paths]
            for hf_name, array in zip(group.hf_names, group.to_hf(*leaves)):
                out[PREFIX + hf_name.format(i=i)] = np.ascontiguousarray(array, np.float32)
    return out


def _saved_groups(cfg: ModelConfig, lcfg: lora.LoraConfig, score: bool = True):
    """(layout group, whether it is per layer) of each group holding a `modules_to_save` param."""
    saved = lora.save_paths(lcfg, cfg, score)
    for layered, groups in ((False, global_groups(cfg)), (True, layer_groups(cfg))):
        yield from ((g, layered) for g in groups if any((("{i}",) + p if layered else p) in saved for p in g.paths))


def adapter_config(cfg: ModelConfig, lcfg: lora.LoraConfig, base_model: str = "") -> dict[str, Any]:
    """The adapter_config.json PEFT reads: target modules by their Hugging Face names; a score model's
    adapter is task_type SEQ_CLS (PeftModelForSequenceClassification) with `score` saved in full."""
    modules = families.hf_modules(cfg)
    return {
        "peft_type": "LORA",
        "task_type": SEQ_CLS if cfg.num_labels else "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "use_rslora": cfg.lora_rslora,
        "target_modules": sorted(modules[t].rsplit(".", 1)[1] for t in cfg.lora_targets),
        "modules_to_save": list(lora.saved_modules(lcfg, cfg)) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def save_adapter(params: dict, cfg: ModelConfig, lcfg: lora.LoraConfig, path: str, *, base_model: str = "") -> None:
    """Writes a PEFT adapter folder atomically (`atomic.folder`: renamed into place, or uploaded with
    adapter_config.json last)."""
    tensors = adapter_tensors(params, cfg, lcfg)
    if jax.process_index() != 0:
        return
    with atomic.folder(path, last=[CONFIG]) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(adapter_config(cfg, lcfg, base_model), f, indent=2, sort_keys=True)


def _adapter_json(path: str) -> dict[str, Any]:
    file = os.path.join(path, CONFIG)
    try:
        c = read_json_object(file)
    except OSError:
        raise JaxllmError(
            f"{file} not found; point at a PEFT adapter folder (adapter_config.json + {WEIGHTS})"
        ) from None
    _check_types(c, file)
    return c


def read_adapter_config(path: str) -> lora.LoraConfig:
    """The adapter's LoraConfig; a SEQ_CLS adapter's heads (`score`, PEFT's `classifier`) are left out of
    modules_to_save: a score model saves its head anyway."""
    file = os.path.join(path, CONFIG)
    c = _adapter_json(path)
    if c.get("peft_type", "LORA") != "LORA":
        raise JaxllmError(f"{file}: peft_type {c.get('peft_type')!r}; jaxllm reads LoRA adapters only")
    for key in ("use_dora", "layers_to_transform"):
        if c.get(key):
            raise JaxllmError(f"{file}: {key} is set; jaxllm reads plain LoRA adapters on every layer")
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        raise JaxllmError(f"{file}: rank_pattern/alpha_pattern are not supported (one r and alpha for all modules)")
    saved = c.get("modules_to_save") or ()
    saved = (saved,) if isinstance(saved, str) else tuple(saved)
    if c.get("task_type") == SEQ_CLS:
        saved = tuple(m for m in saved if m not in _SEQ_CLS_HEADS)
    return lora.LoraConfig(
        r=int(c["r"]),
        alpha=float(c.get("lora_alpha", 8)),
        dropout=float(c.get("lora_dropout") or 0),
        target_modules=c.get("target_modules") or (),
        modules_to_save=saved,
        rslora=bool(c.get("use_rslora")),
    )


def _check_types(c: dict[str, Any], file: str) -> None:
    """The keys jaxllm reads, with the types PEFT writes: a hand-edited or foreign file fails here, by name."""
    r = c.get("r")
    if type(r) is not int or r <= 0:
        raise JaxllmError(f'{file}: "r" is {r!r}; a LoRA adapter config needs the rank r, a positive integer')
    for key in ("lora_alpha", "lora_dropout"):
        if c.get(key) is not None and (type(c[key]) not in (int, float)):
            raise JaxllmError(f'{file}: "{key}" is {c[key]!r}, not a number')
    for key in ("target_modules", "modules_to_save"):
        value = c.get(key)
        if (
            value is not None
            and not isinstance(value, str)
            and not (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise JaxllmError(f'{file}: "{key}" is {value!r:.80}, not a module name or a list of them')


def load_adapter(path: str, cfg: ModelConfig) -> tuple[dict, lora.LoraConfig]:
    """(trainable params in jaxllm's layout, the adapter's LoraConfig) for base model `cfg` (host
    arrays). An adapter made for another base (names or shapes) is a one-line error naming the tensor."""
    path = os.path.expanduser(path)
    lcfg, seq_cls = read_adapter_config(path), _adapter_json(path).get("task_type") == SEQ_CLS
    if seq_cls and not cfg.num_labels:
        raise JaxllmError(
            f"{os.path.join(path, CONFIG)}: a sequence-classification (SEQ_CLS) adapter; load it onto a "
            "score model (model.num_labels > 0, a *ForSequenceClassification base)"
        )
    base = lora.base_config(cfg)
    lcfg = dataclasses.replace(lcfg, target_modules=_layer_targets(lcfg.target_modules, base, path))
    cfg = lora.apply(lcfg, base)
    file = next((os.path.join(path, f) for f in (WEIGHTS, WEIGHTS_BIN) if os.path.isfile(os.path.join(path, f))), "")
    if not file:
        raise JaxllmError(
            f"{os.path.join(path, WEIGHTS)} not found (nor {WEIGHTS_BIN}); the adapter folder is incomplete"
        )
    tensors = open_tensor_file(file)
    stored = {name.replace(".default.", "."): name for name in tensors.keys()}
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in stored:
            raise JaxllmError(f"{file}: tensor {name!r} is missing; the adapter does not match this base model")
        if tuple(tensors.shape(stored[name])) != tuple(shape):
            raise JaxllmError(
                f"{file}: tensor {name!r} has shape {tuple(tensors.shape(stored[name]))} but this base "
                f"model needs {tuple(shape)}; the adapter was made for another base model"
            )
        used.add(name)
        return tensors.read(stored[name]).astype(np.float32)

    params = {f"layers_{i}": _read_layer(read, cfg, i) for i in range(cfg.num_layers)}
    # a causal-LM adapter continued by a score model has no `score`: the run's fresh head stays
    params = tree.union(params, _read_saved(read, cfg, lcfg, score=seq_cls))
    if cfg.scan_layers:
        layers = [params.pop(f"layers_{i}") for i in range(cfg.num_layers)]
        params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    extra = sorted(set(stored) - used)
    if extra:
        raise JaxllmError(
            f"{file}: tensor {extra[0]!r} matches no module of this base model "
            f"({len(extra)} unmatched); the adapter was made for another base model"
        )
    return params, lcfg


def _layer_targets(targets: tuple[str, ...], cfg: ModelConfig, path: str) -> tuple[str, ...]:
    """Target module paths (PEFT's "all-linear" is saved as every layer's full paths, e.g.
    model.layers.0.self_attn.q_proj) as the short names they come to when every layer has the same
    ones; other targets as they are. PEFT matches a listed name to a module path equal to it or ending in
    "." + it."""
    if lora.is_regex(targets) or not any("." in t for t in targets):
        return targets
    per_layer = lora.modules_per_layer(cfg, lambda path: any(path == t or path.endswith("." + t) for t in targets))
    if len(set(per_layer)) > 1 or not per_layer[0]:
        raise JaxllmError(
            f"{os.path.join(path, CONFIG)}: target_modules {sorted(targets)[:3]}... "
            f"{'match no module' if not per_layer[0] else 'differ between layers'}; jaxllm reads "
            "adapters with the same modules in every layer"
        )
    modules = families.hf_modules(cfg)
    return tuple(modules[ours].rsplit(".", 1)[1] for ours in per_layer[0])


def _read_layer(read, cfg: ModelConfig, i: int) -> dict:
    n, h, k, d, r = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.embed_dim, cfg.lora_rank
    modules = families.hf_modules(cfg)
    shapes = families.projection_shapes(cfg)
    layer: dict = {"self_attn": {}, "mlp": {}}
    for ours in cfg.lora_targets:
        name = PREFIX + modules[ours].format(i=i)
        if ours == "qkv":
            a = read(f"{name}.lora_A.weight", (r, d))
            b = read(f"{name}.lora_B.weight", ((n + 2 * h) * k, r))
            layer["self_attn"]["qkv_lora_a"] = np.ascontiguousarray(a.T)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_fused(b, cfg)):
                layer["self_attn"][proj] = {"lora_b": np.ascontiguousarray(np.moveaxis(part, -1, 0))}
            continue
        in_shape, out_shape = shapes[ours]
        a = read(f"{name}.lora_A.weight", (r, int(np.prod(in_shape))))
        b = read(f"{name}.lora_B.weight", (int(np.prod(out_shape)), r))
        parent = families.parent(ours)
        layer[parent][ours] = {
            "lora_a": np.ascontiguousarray(a.T.reshape(*in_shape, r)),
            "lora_b": np.ascontiguousarray(b.T.reshape(r, *out_shape)),
        }
    return {key: value for key, value in layer.items() if value}


def _read_saved(read, cfg: ModelConfig, lcfg: lora.LoraConfig, score: bool = True) -> dict:
    """The `modules_to_save` params stored in full (PEFT writes them under their plain names), in the
    unrolled layout (`layers_{i}`)."""
    out: dict = {}
    for group, layered in _saved_groups(cfg, lcfg, score):
        for i in range(cfg.num_layers) if layered else [None]:
            arrays = [read(PREFIX + n.format(i=i), s) for n, s in zip(group.hf_names, group.hf_shapes)]
            for path, array in zip(group.paths, group.to_jax(*arrays)):
                tree.put(out, (f"layers_{i}", *path) if layered else path, array)
    return out
