"""Which Hugging Face tensors hold which jaxllm params, and how each is reshaped.

A `Group` ties one or more HF tensors to one or more jaxllm leaves (a fused query_key_value feeds q, k
and v), with both conversions. Layer groups name tensors with "{i}" for the layer index and leaves
relative to the layer. HF linear weights are [out, in]; jaxllm kernels are [in, ...out].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxllm.hf.config import falcon_layout
from jaxllm.models.config import ModelConfig
from jaxllm.models.families import family

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


def _norm(cfg: ModelConfig, hf: str, path: Path) -> list[Group]:
    d = cfg.embed_dim
    groups = [_plain(f"{hf}.weight", (*path, "scale"), (d,), (d,))]
    if cfg.norm == "layer":
        groups.append(_plain(f"{hf}.bias", (*path, "bias"), (d,), (d,)))
    return groups


def _biased(cfg: ModelConfig, hf: str, path: Path, out_shape, kernel: Group) -> list[Group]:
    if not cfg.use_bias:
        return [kernel]
    return [kernel, _plain(f"{hf}.bias", (*path, "bias"), (int(np.prod(out_shape)),), out_shape)]


def layer_groups(cfg: ModelConfig) -> list[Group]:
    """Groups of one decoder layer ("{i}" in HF names; leaf paths relative to the layer)."""
    n, h, k, d, f = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.embed_dim, cfg.mlp_dim
    kind = family(cfg)
    attn, mlp = ("self_attn",), ("mlp",)
    groups: list[Group] = []
    if kind == "llama":
        pre = "model.layers.{i}"
        for proj, heads in (("q_proj", n), ("k_proj", h), ("v_proj", h)):
            name, path = f"{pre}.self_attn.{proj}", (*attn, proj)
            kernel = _linear(f"{name}.weight", (*path, "kernel"), (d,), (heads, k))
            groups += _biased(cfg, name, path, (heads, k), kernel)
        o_name, o_path = f"{pre}.self_attn.o_proj", (*attn, "o_proj")
        groups += _biased(cfg, o_name, o_path, (d,), _linear(f"{o_name}.weight", (*o_path, "kernel"), (n, k), (d,)))
        for proj, fan_in, fan_out in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
            name, path = f"{pre}.mlp.{proj}", (*mlp, proj)
            groups += _biased(
                cfg, name, path, (fan_out,), _linear(f"{name}.weight", (*path, "kernel"), (fan_in,), (fan_out,))
            )
        return (
            groups
            + _norm(cfg, f"{pre}.input_layernorm", ("input_layernorm",))
            + _norm(cfg, f"{pre}.post_attention_layernorm", ("post_attention_layernorm",))
        )

    pre = "transformer.h.{i}"
    qkv = tuple((*attn, p) for p in ("q_proj", "k_proj", "v_proj"))
    groups.append(
        _fused_qkv(
            f"{pre}.self_attention.query_key_value.weight", tuple((*p, "kernel") for p in qkv), cfg, is_bias=False
        )
    )
    if cfg.use_bias:
        groups.append(
            _fused_qkv(
                f"{pre}.self_attention.query_key_value.bias", tuple((*p, "bias") for p in qkv), cfg, is_bias=True
            )
        )
    name = f"{pre}.self_attention.dense"
    groups += _biased(
        cfg, name, (*attn, "o_proj"), (d,), _linear(f"{name}.weight", (*attn, "o_proj", "kernel"), (n, k), (d,))
    )
    for hf, proj, fan_in, fan_out in (("dense_h_to_4h", "up_proj", d, f), ("dense_4h_to_h", "down_proj", f, d)):
        name, path = f"{pre}.mlp.{hf}", (*mlp, proj)
        kernel = _linear(f"{name}.weight", (*path, "kernel"), (fan_in,), (fan_out,))
        groups += _biased(cfg, name, path, (fan_out,), kernel)
    norm_names = ["input_layernorm", "post_attention_layernorm"]
    if kind == "falcon" and cfg.parallel_block:
        layout = falcon_layout(cfg)
        norm_names = ["ln_attn", "ln_mlp"] if layout["num_ln_in_parallel_attn"] == 2 else ["input_layernorm"]
    for hf, ours in zip(norm_names, ("input_layernorm", "post_attention_layernorm")):
        groups += _norm(cfg, f"{pre}.{hf}", (ours,))
    return groups


def global_groups(cfg: ModelConfig) -> list[Group]:
    """Groups outside the layers: embedding (and its norm), final norm, untied output head or the score
    head (`score.weight` [num_labels, D] beside the base model, as *ForSequenceClassification keeps it)."""
    v, d = cfg.vocab_size, cfg.embed_dim
    llama = family(cfg) == "llama"
    embed = "model.embed_tokens.weight" if llama else "transformer.word_embeddings.weight"
    groups = [_plain(embed, ("embed_tokens", "embedding"), (v, d), (v, d))]
    if cfg.embed_norm:
        groups += _norm(cfg, "transformer.word_embeddings_layernorm", ("embed_norm",))
    groups += _norm(cfg, "model.norm" if llama else "transformer.ln_f", ("norm",))
    if cfg.num_labels:
        groups.append(_linear(SCORE, ("score", "kernel"), (d,), (cfg.num_labels,)))
    elif not cfg.tie_embeddings:
        groups.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (v,)))
    return groups
