"""Which Hugging Face tensors hold which jaxllm params, and how each is reshaped.

A `Group` ties one or more HF tensors to one or more jaxllm leaves (a fused query_key_value feeds q, k
and v), with both conversions. Layer groups name tensors with "{i}" for the layer index and leaves
relative to the layer. HF linear weights are [out, in]; jaxllm kernels are [in, ...out].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxllm.models import families
from jaxllm.models.config import ModelConfig

Path = tuple[str, ...]
SCORE = "score.weight"  # a score model's head (HF *ForSequenceClassification)


@dataclasses.dataclass(frozen=True)
class Group:
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    paths: tuple[Path, ...]
    to_jax: Callable[..., tuple[np.ndarray, ...]]
    to_hf: Callable[..., tuple[np.ndarray, ...]]


def _plain(name: str, path: Path, hf_shape, jax_shape) -> Group:
    """Same values, maybe reshaped (embeddings, norms, biases)."""
    return Group(
        (name,), (tuple(hf_shape),), (path,), lambda w: (w.reshape(jax_shape),), lambda x: (x.reshape(hf_shape),)
    )


def _linear(name: str, path: Path, in_shape, out_shape) -> Group:
    """HF weight [prod(out), prod(in)] <-> jaxllm kernel [*in, *out]."""
    fan_in, fan_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return Group(
        (name,),
        ((fan_out, fan_in),),
        (path,),
        lambda w: (w.T.reshape(*in_shape, *out_shape),),
        lambda x: (x.reshape(fan_in, fan_out).T,),
    )


def split_fused(w, cfg: ModelConfig):
    """Falcon/BLOOM `query_key_value` rows [(N + 2H) * K, ...] -> q [N, K, ...], k [H, K, ...], v [H, K, ...].

    Per kv head h come its G = N/H query heads, then k, then v. One layout covers all of them:
    Falcon-40B/180B's grouped one; Falcon-7B's multi-query [q..., k, v] is the H = 1 case, and BLOOM's
    (and Falcon MHA's) head-interleaved [head][q, k, v] the G = 1 case.
    """
    n, h, k = cfg.num_heads, cfg.kv_heads, cfg.head_size
    g, rest = n // h, w.shape[1:]
    w = w.reshape(h, g + 2, k, *rest)
    return w[:, :g].reshape(n, k, *rest), w[:, g], w[:, g + 1]


def join_fused(q, kk, v, cfg: ModelConfig):
    """The inverse of `split_fused`."""
    n, h, k = cfg.num_heads, cfg.kv_heads, cfg.head_size
    rest = q.shape[2:]
    fused = np.concatenate([q.reshape(h, n // h, k, *rest), kk[:, None], v[:, None]], axis=1)
    return fused.reshape((n + 2 * h) * k, *rest)


def _fused_qkv(name: str, paths: tuple[Path, Path, Path], cfg: ModelConfig, is_bias: bool) -> Group:
    """Falcon/BLOOM `query_key_value` weight (or bias) <-> q, k, v kernels [D, heads, K] (or biases)."""
    n, h, k, d = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.embed_dim
    hf_shape = ((n + 2 * h) * k, *(() if is_bias else (d,)))

    def to_jax(w):
        parts = split_fused(w, cfg)
        return parts if is_bias else tuple(np.moveaxis(x, -1, 0) for x in parts)  # [D, heads, K]

    def to_hf(q, kk, v):
        if not is_bias:
            q, kk, v = (np.moveaxis(x, 0, -1) for x in (q, kk, v))
        return (join_fused(q, kk, v, cfg),)

    return Group((name,), (hf_shape,), paths, to_jax, to_hf)


def _groups(cfg: ModelConfig, modules: dict[str, families.Params]) -> list[Group]:
    """The groups of the family's modules (`families.hf_module_params`), in their order: a kernel is a
    linear layer of its projection's (or head's) shapes, a fused query_key_value one group for its three
    kernels and one for their biases; embeddings, norms and biases keep their values."""
    d, v = cfg.embed_dim, cfg.vocab_size
    shapes = {**families.projection_shapes(cfg), "lm_head": ((d,), (v,)), "score": ((d,), (cfg.num_labels,))}
    groups: list[Group] = []
    for module, paths in modules.items():
        if module.endswith("query_key_value"):
            for leaf, hf in (("kernel", "weight"), ("bias", "bias")):
                fused = tuple(p for p in paths if p[-1] == leaf)
                if fused:
                    groups.append(_fused_qkv(f"{module}.{hf}", fused, cfg, is_bias=leaf == "bias"))
            continue
        for path in paths:
            name = f"{module}.{'bias' if path[-1] == 'bias' else 'weight'}"
            if path[-1] == "kernel":
                groups.append(_linear(name, path, *shapes[path[-2]]))
            elif path[-2] in shapes:  # a projection's bias
                out = shapes[path[-2]][1]
                groups.append(_plain(name, path, (int(np.prod(out)),), out))
            else:  # the embedding [V, D]; a norm's scale or bias [D]
                shape = (v, d) if path[-1] == "embedding" else (d,)
                groups.append(_plain(name, path, shape, shape))
    return groups


def layer_groups(cfg: ModelConfig) -> list[Group]:
    """Groups of one decoder layer ("{i}" in HF names; leaf paths relative to the layer)."""
    return _groups(cfg, families.hf_module_params(cfg)[1])


def global_groups(cfg: ModelConfig) -> list[Group]:
    """Groups outside the layers: embedding (and its norm), final norm, untied output head or the score
    head (`score.weight` [num_labels, D] beside the base model, as *ForSequenceClassification keeps it)."""
    return _groups(cfg, families.hf_module_params(cfg)[0])
