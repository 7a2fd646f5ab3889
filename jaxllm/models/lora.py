"""LoRA parameter subsets: the `lora` config section, target resolution in Hugging Face module names,
trainable/frozen splits, a quantized frozen base, and merging adapters into the base and back out.

Params stay one nested dict (the decoder's); adapters are the `lora_a` / `lora_b` leaves of targeted
projections (`qkv_lora_a` for an A shared by q, k and v, which is what PEFT's adapter on a fused
Falcon/BLOOM `query_key_value` computes). Training differentiates only the trainable subset, so the
frozen base has neither gradients nor optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.models import quant
from jaxllm.models.config import ModelConfig

ADAPTER_LEAVES = ("lora_a", "lora_b", "qkv_lora_a")
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`LoraConfig(**cfg.lora)`: r = 0 trains every parameter (full fine-tuning)."""

    r: int = 0  # adapter rank; 0 = no adapters, train every parameter
    alpha: float = 16.0  # update scale alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: tuple[str, ...] = ("all-linear",)  # the family's HF module names (q_proj, ...,
    #   query_key_value, dense, dense_h_to_4h, dense_4h_to_h), "all-linear", or one regex full-matched
    #   against module paths like "model.layers.0.self_attn.q_proj" (PEFT's string form)
    modules_to_save: tuple[str, ...] = ()  # HF modules trained in full and saved with the adapter (lm_head)
    rslora: bool = False  # scale alpha / sqrt(r) (rank-stabilised LoRA)
    quantization: str = "none"  # frozen base kernels: none | nf4 (QLoRA, double-quantized scales) | int8
    quant_block_size: int = 64
    init_adapter: str = ""  # a PEFT adapter folder to start from (continue training)

    def __post_init__(self):
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.r < 0:
            raise JaxllmError(f"lora.r={self.r} must be >= 0 (0 = full fine-tuning)")
        if self.quantization not in quant.QUANTIZATIONS:
            raise JaxllmError(f"lora.quantization={self.quantization!r}; choose one of "
                              f"{', '.join(quant.QUANTIZATIONS)}")
        if self.quantization != "none" and self.r == 0:
            raise JaxllmError("lora.quantization needs adapters: a quantized base is frozen; set lora.r > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise JaxllmError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        quant.check_block_size(self.quant_block_size)


def hf_modules(cfg: ModelConfig) -> dict[str, str]:
    """Our projection name -> the HF module path (with "{i}" for the layer) of the model's family."""
    from jaxllm.hf.config import family

    if family(cfg) == "llama":
        pre = "model.layers.{i}"
        return {**{p: f"{pre}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{p: f"{pre}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}}
    pre = "transformer.h.{i}"
    return {"qkv": f"{pre}.self_attention.query_key_value", "o_proj": f"{pre}.self_attention.dense",
            "up_proj": f"{pre}.mlp.dense_h_to_4h", "down_proj": f"{pre}.mlp.dense_4h_to_h"}


def resolve_targets(lcfg: LoraConfig, cfg: ModelConfig) -> tuple[str, ...]:
    """`lora.target_modules` as our projection names; an unknown name is an error listing the valid ones."""
    modules = hf_modules(cfg)
    by_short = {path.rsplit(".", 1)[1]: ours for ours, path in modules.items()}
    targets = lcfg.target_modules
    if targets == ("all-linear",):
        return tuple(modules)
    if len(targets) == 1 and re.search(r"[\\^$*+?()\[\]|]", targets[0]):
        pattern = re.compile(targets[0])
        per_layer = [tuple(o for o, p in modules.items() if pattern.fullmatch(p.format(i=i)))
                     for i in range(cfg.num_layers)]
        if len(set(per_layer)) > 1:
            raise JaxllmError(f"lora.target_modules regex {targets[0]!r} picks different modules in different "
                              "layers; jaxllm puts the same adapters in every layer")
        if not per_layer[0]:
            raise JaxllmError(f"lora.target_modules regex {targets[0]!r} matches no module (e.g. "
                              f"{modules[next(iter(modules))].format(i=0)})")
        return per_layer[0]
    out = []
    for name in targets:
        if name in ("lm_head", "embed_tokens", "word_embeddings"):
            raise JaxllmError(f"lora.target_modules: {name} cannot take an adapter here; list it in "
                              "lora.modules_to_save to train it in full")
        if name not in by_short:
            raise JaxllmError(f"lora.target_modules: unknown module {name!r} for this model; choose from "
                              f"{', '.join(by_short)}, all-linear, or a regex")
        out.append(by_short[name])
    return tuple(o for o in modules if o in out)  # canonical order, whatever order they were listed in


def apply(lcfg: LoraConfig, cfg: ModelConfig) -> ModelConfig:
    """The model config with adapters (and a quantized base) switched on."""
    if not lcfg.r:
        return cfg
    return dataclasses.replace(cfg, lora_rank=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                               lora_targets=resolve_targets(lcfg, cfg), lora_rslora=lcfg.rslora,
                               quantization=lcfg.quantization, quant_block_size=lcfg.quant_block_size)


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The plain model config without adapters or quantization."""
    return dataclasses.replace(cfg, lora_rank=0, lora_targets=(), lora_dropout=0.0, quantization="none")


def save_paths(lcfg: LoraConfig, cfg: ModelConfig) -> list[Path]:
    """Param paths of `modules_to_save` (relative to the layer for layer modules, marked by a leading "{i}")."""
    from jaxllm.hf.layout import global_groups, layer_groups

    paths: list[Path] = []
    for module in lcfg.modules_to_save:
        found = False
        for groups, layered in ((global_groups(cfg), False), (layer_groups(cfg), True)):
            for group in groups:
                if any(re.search(rf"(^|\.){re.escape(module)}\.(weight|bias)$", n) for n in group.hf_names):
                    paths += [(("{i}",) if layered else ()) + p for p in group.paths]
                    found = True
        if not found:
            raise JaxllmError(f"lora.modules_to_save: no module {module!r} in this model (e.g. lm_head, "
                              "embed_tokens, input_layernorm)")
        if cfg.quantization != "none" and module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj", "query_key_value", "dense",
                                                     "dense_h_to_4h", "dense_4h_to_h"):
            raise JaxllmError(f"lora.modules_to_save: {module} is quantized and cannot be trained in full")
    return paths


def trainable_fn(lcfg: LoraConfig, cfg: ModelConfig) -> Callable[[Path], bool] | None:
    """Predicate on param paths: what a run trains (None = everything, full fine-tuning)."""
    if not lcfg.r:
        return None
    saved = save_paths(lcfg, cfg)

    def trainable(path: Path) -> bool:
        if path[-1] in ADAPTER_LEAVES:
            return True
        rel = ("{i}", *path[1:]) if path[0] == "layers" or path[0].startswith("layers_") else path
        return rel in saved

    return trainable


def split(params: dict, keep: Callable[[Path], bool] | None) -> tuple[dict, dict]:
    """(leaves where keep(path), the rest), both nested dicts; keep=None puts everything first."""
    if keep is None:
        return params, {}

    def walk(node, path):
        yes, no = {}, {}
        for key, value in node.items():
            if isinstance(value, dict):
                a, b = walk(value, (*path, key))
                if a:
                    yes[key] = a
                if b:
                    no[key] = b
            elif keep((*path, key)):
                yes[key] = value
            else:
                no[key] = value
        return yes, no

    return walk(params, ())


def merge(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def _projections(params: dict):
    """(path, module dict, our projection name) of every attention/MLP projection."""
    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                if key in QUANTIZED_MODULES and ("kernel" in value or any(k.startswith("kernel_") for k in value)):
                    yield (*path, key), value, key
                else:
                    yield from walk(value, (*path, key))
    yield from walk(params, ())


def _lead(path: Path) -> int:
    return 1 if path[0] == "layers" else 0


def _num_in(name: str) -> int:
    return 2 if name == "o_proj" else 1


def _fan_in(path: Path, kernel_shape: tuple[int, ...]) -> int:
    """Input size of the projection kernel at module `path` (its input axes flattened)."""
    lead = _lead(path)
    return math.prod(kernel_shape[lead:lead + _num_in(path[-1])])


def quantize_params(params: dict, cfg: ModelConfig, shardings: dict | None = None, *,
                    in_place: bool = False) -> dict:
    """Float params -> the quantized base of `cfg` (kernels of attention/MLP projections replaced by
    their quantized leaves, one kernel at a time; norms in float32). `shardings`: of the quantized tree.
    `in_place` consumes `params`, so each float kernel is freed as soon as it is quantized."""
    out = params if in_place else jax.tree.map(lambda x: x, params)
    for path, module, _ in list(_projections(out)):
        if "kernel" in module:  # (those quantized while loading are done)
            module.update(quantize_kernel(path, module.pop("kernel"), cfg, shardings))
    return _norms_to_f32(out)


def is_quantized_kernel(path: Path, cfg: ModelConfig) -> bool:
    """Whether the param at `path` is a projection kernel that `cfg` stores quantized."""
    return cfg.quantization != "none" and len(path) >= 2 and path[-1] == "kernel" and path[-2] in QUANTIZED_MODULES


def quantize_kernel(path: Path, kernel: jax.Array, cfg: ModelConfig, shardings: dict | None = None) -> dict:
    """The quantized leaves of the projection kernel at `path` (a module path, or the kernel's own),
    placed with `shardings` (of the whole quantized tree) when given."""
    path = path[:-1] if path[-1] == "kernel" else path
    lead, fan_in = _lead(path), _fan_in(path, kernel.shape)
    target = None
    if shardings is not None:
        node = _get(shardings, path)
        target = {k: node[k] for k in quant.leaf_names(cfg.quantization)}

    def q(k):
        return quant.quantize(k.reshape(*k.shape[:lead], fan_in, -1), cfg.quantization, cfg.quant_block_size)

    return jax.jit(q, out_shardings=target)(kernel)


def _norms_to_f32(params: dict) -> dict:
    def cast(path, x):
        names = [getattr(k, "key", "") for k in path]
        is_norm = any(n.endswith("norm") for n in names) and names[-1] in ("scale", "bias")
        return x.astype(jnp.float32) if is_norm else x
    return jax.tree_util.tree_map_with_path(cast, params)


def dequantize_params(params: dict, cfg: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """Quantized projection leaves -> float `kernel`s of the base shapes (block padding dropped)."""
    if cfg.quantization == "none":
        return params
    out = jax.tree.map(lambda x: x, params)
    shapes = _kernel_shapes(base_config(cfg))
    for path, module, _ in list(_projections(out)):
        leaves = {k: module.pop(k) for k in quant.leaf_names(cfg.quantization)}
        shape = _get(shapes, (*path, "kernel")).shape
        module["kernel"] = quant.dequantize(leaves, dtype, _fan_in(path, shape)).reshape(shape)
    return out


def _kernel_shapes(cfg: ModelConfig) -> dict:
    from jaxllm.models.decoder import Decoder

    return shd.unbox(jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
                                        )["params"])


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def lora_delta(attn_or_module: dict, name: str, cfg: ModelConfig, parent: dict | None = None) -> jax.Array | None:
    """scale * A @ B as a kernel-shaped float32 update for one projection (None without an adapter)."""
    module = attn_or_module
    if "lora_b" not in module:
        return None
    b = module["lora_b"].astype(jnp.float32)
    a = module["lora_a"] if "lora_a" in module else parent["qkv_lora_a"]
    a = a.astype(jnp.float32)
    lead = a.ndim - _num_in(name) - 1  # a scanned model's leading layer axis
    if lead:
        delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                           b.reshape(b.shape[0], b.shape[1], -1))
    else:
        delta = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
    return (delta * cfg.lora_scaling).reshape(*a.shape[:-1], *b.shape[lead + 1:])


def merge_adapters(params: dict, cfg: ModelConfig, sign: float = 1.0) -> tuple[ModelConfig, dict]:
    """(base config, params with W + sign * scale * A @ B and no adapter leaves); a quantized base is
    dequantized first. `sign=-1` on merged params and the same adapters unmerges them."""
    params = dequantize_params(params, cfg)
    out = jax.tree.map(lambda x: x, params)
    for path, module, name in list(_projections(out)):
        parent = _get(out, path[:-1])
        delta = lora_delta(module, name, cfg, parent)
        if delta is not None:
            module["kernel"] = (module["kernel"].astype(jnp.float32) + sign * delta).astype(module["kernel"].dtype)
        module.pop("lora_a", None)
        module.pop("lora_b", None)
    for path, module, _ in list(_projections(out)):
        _get(out, path[:-1]).pop("qkv_lora_a", None)
    return base_config(cfg), out


def unmerge_adapters(merged: dict, adapters: dict, cfg: ModelConfig) -> dict:
    """The base params back from merged ones and the adapters that were merged in."""
    _, base = merge_adapters(merge(merged, adapters), dataclasses.replace(cfg, quantization="none"), sign=-1.0)
    return base


def count(tree: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def nbytes(tree: dict) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
