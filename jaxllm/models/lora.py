"""LoRA in one home: the `lora` config section, target resolution in Hugging Face module names, the
adapters' down-projection A in the decoder's layers, what a run trains and saves (adapters and
`modules_to_save` as param paths), a quantized frozen base, and merging adapters into the base and back out.

Params stay one nested dict (the decoder's); adapters are the `lora_a` / `lora_b` leaves of targeted
projections (`qkv_lora_a` for an A shared by q, k and v, which is what PEFT's adapter on a fused
Falcon/BLOOM `query_key_value` computes). Training differentiates only the trainable subset, so the
frozen base has neither gradients nor optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm import JaxllmError, tree
from jaxllm.config import check_number
from jaxllm.models import families, quant
from jaxllm.models.config import ModelConfig

ADAPTER_LEAVES = ("lora_a", "lora_b", "qkv_lora_a")
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
        check_number("lora.r", self.r, low=0, integer=True)  # 0 = full fine-tuning
        check_number("lora.alpha", self.alpha, low=0, low_open=True)
        if self.quantization not in quant.QUANTIZATIONS:
            raise JaxllmError(
                f"lora.quantization={self.quantization!r}; choose one of {', '.join(quant.QUANTIZATIONS)}"
            )
        if self.quantization != "none" and self.r == 0:
            raise JaxllmError("lora.quantization needs adapters: a quantized base is frozen; set lora.r > 0")
        check_number("lora.dropout", self.dropout, low=0, high=1, high_open=True)
        quant.check_block_size(self.quant_block_size)


def resolve_targets(lcfg: LoraConfig, cfg: ModelConfig) -> tuple[str, ...]:
    """`lora.target_modules` as our projection names; an unknown name is an error listing the valid ones."""
    modules = families.hf_modules(cfg)
    by_short = {path.rsplit(".", 1)[1]: ours for ours, path in modules.items()}
    targets = lcfg.target_modules
    if targets == ("all-linear",):
        return tuple(modules)
    if is_regex(targets):
        per_layer = modules_per_layer(cfg, re.compile(targets[0]).fullmatch)
        if len(set(per_layer)) > 1:
            raise JaxllmError(
                f"lora.target_modules regex {targets[0]!r} picks different modules in different "
                "layers; jaxllm puts the same adapters in every layer"
            )
        if not per_layer[0]:
            raise JaxllmError(
                f"lora.target_modules regex {targets[0]!r} matches no module (e.g. "
                f"{modules[next(iter(modules))].format(i=0)})"
            )
        return per_layer[0]
    out = []
    for name in targets:
        if name in ("lm_head", "embed_tokens", "word_embeddings"):
            raise JaxllmError(
                f"lora.target_modules: {name} cannot take an adapter here; list it in "
                "lora.modules_to_save to train it in full"
            )
        if name not in by_short:
            raise JaxllmError(
                f"lora.target_modules: unknown module {name!r} for this model; choose from "
                f"{', '.join(by_short)}, all-linear, or a regex"
            )
        out.append(by_short[name])
    return tuple(o for o in modules if o in out)  # canonical order, whatever order they were listed in


def is_regex(targets: tuple[str, ...]) -> bool:
    """Whether `target_modules` is one regex (PEFT's string form) rather than module names."""
    return len(targets) == 1 and re.search(r"[\\^$*+?()\[\]|]", targets[0]) is not None


def modules_per_layer(cfg: ModelConfig, matches: Callable[[str], Any]) -> list[tuple[str, ...]]:
    """Per layer, our projections (in canonical order) whose module path in that layer `matches`."""
    modules = families.hf_modules(cfg)
    return [tuple(o for o, p in modules.items() if matches(p.format(i=i))) for i in range(cfg.num_layers)]


def apply(lcfg: LoraConfig, cfg: ModelConfig) -> ModelConfig:
    """The model config with adapters (and a quantized base) switched on."""
    if not lcfg.r:
        return cfg
    return dataclasses.replace(
        cfg,
        lora_rank=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        lora_targets=resolve_targets(lcfg, cfg),
        lora_rslora=lcfg.rslora,
        quantization=lcfg.quantization,
        quant_block_size=lcfg.quant_block_size,
    )


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The plain model config without adapters or quantization."""
    return dataclasses.replace(cfg, lora_rank=0, lora_targets=(), lora_dropout=0.0, quantization="none")


def _lora_a_init(fan_in: int):
    """PEFT's default: kaiming_uniform(a=sqrt(5)) on A [r, fan_in], i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_a_param(module: nn.Module, name: str, in_shape: tuple[int, ...], in_axes: tuple[str, ...]):
    """A LoRA down-projection [*in, r], always float32 (the trainable adapter's optimizer needs it)."""
    init = nn.with_logical_partitioning(_lora_a_init(math.prod(in_shape)), (*in_axes, "lora_rank"))
    return module.param(name, init, (*in_shape, module.cfg.lora_rank), jnp.float32)


def lora_down(cfg: ModelConfig, a, x, deterministic: bool, num_in: int):
    """dropout(x) @ A in the compute dtype: [..., *in] -> [..., r]."""
    x = nn.Dropout(cfg.lora_dropout)(x, deterministic=deterministic) if cfg.lora_dropout else x
    return quant.contract(x, a.astype(cfg.jnp_dtype), num_in)


def saved_modules(lcfg: LoraConfig, cfg: ModelConfig, score: bool = True) -> tuple[str, ...]:
    """The modules an adapter run trains in full and saves: `lora.modules_to_save`, and a score model's
    new `score` head (PEFT's task_type SEQ_CLS adds it the same way; `score=False`: not it)."""
    extra = ("score",) if score and cfg.num_labels and "score" not in lcfg.modules_to_save else ()
    return (*lcfg.modules_to_save, *extra)


def save_paths(lcfg: LoraConfig, cfg: ModelConfig, score: bool = True) -> list[tuple[str, ...]]:
    """Param paths of the saved modules (relative to the layer for layer modules, marked by a leading "{i}")."""
    paths: list[tuple[str, ...]] = []
    outer, layer = families.hf_module_params(cfg)
    for module in saved_modules(lcfg, cfg, score):
        found = False
        for params, layered in ((outer, False), (layer, True)):
            for hf_module, held in params.items():  # `module` names it, or a dotted tail of its path
                if re.search(rf"(^|\.){re.escape(module)}$", hf_module):
                    paths += [(("{i}",) if layered else ()) + p for p in held]
                    found = True
        if not found:
            raise JaxllmError(
                f"lora.modules_to_save: no module {module!r} in this model (e.g. lm_head, "
                "embed_tokens, input_layernorm)"
            )
        quantized = {*families.PROJECTIONS, *(p.rsplit(".", 1)[1] for p in families.hf_modules(cfg).values())}
        if cfg.quantization != "none" and module in quantized:
            raise JaxllmError(f"lora.modules_to_save: {module} is quantized and cannot be trained in full")
    return paths


def trainable_fn(lcfg: LoraConfig, cfg: ModelConfig) -> Callable[[tuple[str, ...]], bool] | None:
    """Predicate on param paths: what a run trains (None = everything, full fine-tuning)."""
    if not lcfg.r:
        return None
    saved = save_paths(lcfg, cfg)

    def trainable(path: tuple[str, ...]) -> bool:
        if path[-1] in ADAPTER_LEAVES:
            return True
        rel = ("{i}", *path[1:]) if path[0] == "layers" or path[0].startswith("layers_") else path
        return rel in saved

    return trainable


def _projections(node: dict, path: Path = ()):
    """(path, module dict, our projection name) of every attention/MLP projection under `node` (at `path`)."""
    for key, value in node.items():
        if isinstance(value, dict):
            if key in families.PROJECTIONS and ("kernel" in value or any(k.startswith("kernel_") for k in value)):
                yield (*path, key), value, key
            else:
                yield from _projections(value, (*path, key))


def _lead(path: Path) -> int:
    return 1 if path[0] == "layers" else 0


def _num_in(name: str) -> int:
    return 2 if name == "o_proj" else 1


def _fan_in(path: Path, kernel_shape: tuple[int, ...]) -> int:
    """Input size of the projection kernel at module `path` (its input axes flattened)."""
    lead = _lead(path)
    return math.prod(kernel_shape[lead : lead + _num_in(path[-1])])


def quantize_params(params: dict, cfg: ModelConfig, shardings: dict | None = None, *, in_place: bool = False) -> dict:
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
    return cfg.quantization != "none" and len(path) >= 2 and path[-1] == "kernel" and path[-2] in families.PROJECTIONS


def quantize_kernel(path: Path, kernel: jax.Array, cfg: ModelConfig, shardings: dict | None = None) -> dict:
    """The quantized leaves of the projection kernel at `path` (a module path, or the kernel's own),
    placed with `shardings` (of the whole quantized tree) when given."""
    path = path[:-1] if path[-1] == "kernel" else path
    lead, fan_in = _lead(path), _fan_in(path, kernel.shape)
    target = None
    if shardings is not None:
        node = tree.get(shardings, path)
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
    shapes = families.projection_shapes(cfg)
    for path, module, name in list(_projections(out)):
        leaves = {k: module.pop(k) for k in quant.leaf_names(cfg.quantization)}
        in_shape, out_shape = shapes[name]
        shape = (*(cfg.num_layers,) * _lead(path), *in_shape, *out_shape)
        module["kernel"] = quant.dequantize(leaves, dtype, _fan_in(path, shape)).reshape(shape)
    return out


def lora_delta(module: dict, name: str, cfg: ModelConfig, parent: dict | None = None) -> jax.Array | None:
    """scale * A @ B as a kernel-shaped float32 update for one projection (None without an adapter)."""
    if "lora_b" not in module:
        return None
    b = module["lora_b"].astype(jnp.float32)
    a = module["lora_a"] if "lora_a" in module else parent["qkv_lora_a"]
    a = a.astype(jnp.float32)
    lead = a.ndim - _num_in(name) - 1  # a scanned model's leading layer axis
    if lead:
        delta = jnp.einsum(
            "lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1)
        )
    else:
        delta = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
    return (delta * cfg.lora_scaling).reshape(*a.shape[:-1], *b.shape[lead + 1 :])


def merge_adapters(params: dict, cfg: ModelConfig, sign: float = 1.0) -> tuple[ModelConfig, dict]:
    """(base config, params with W + sign * scale * A @ B and no adapter leaves); a quantized base is
    dequantized first. `sign=-1` on merged params and the same adapters unmerges them."""
    params = dequantize_params(params, cfg)
    out = jax.tree.map(lambda x: x, params)
    for path, module, name in list(_projections(out)):
        delta = lora_delta(module, name, cfg, tree.get(out, path[:-1]))
        if delta is not None:
            module["kernel"] = (module["kernel"].astype(jnp.float32) + sign * delta).astype(module["kernel"].dtype)
        module.pop("lora_a", None)
        module.pop("lora_b", None)
    for path, module, _ in list(_projections(out)):
        tree.get(out, path[:-1]).pop("qkv_lora_a", None)
    return base_config(cfg), out


def unmerge_adapters(merged: dict, adapters: dict, cfg: ModelConfig) -> dict:
    """The base params back from merged ones and the adapters that were merged in."""
    _, base = merge_adapters(tree.union(merged, adapters), dataclasses.replace(cfg, quantization="none"), sign=-1.0)
    return base
