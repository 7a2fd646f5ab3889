"""The one configurable decoder (Llama-2, Falcon, BLOOM are switches), with layer scan and remat switches."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm import JaxllmError
from jaxllm.models.attention.module import Attention
from jaxllm.models.config import REMAT_POLICIES, ModelConfig
from jaxllm.models.layers import MLP, constrain, norm, normal_init, residual_axes


class DecoderLayer(nn.Module):
    """Pre-norm residual block. Sequential: x + attn(norm(x)), then + mlp(norm(x)). Parallel (Falcon):
    x + attn(norm(x)) + mlp(norm(x)) from the same input, with one norm or two (attention's, MLP's).
    "post_attention_layernorm" is always the norm in front of the MLP."""

    cfg: ModelConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL):
        cfg = self.cfg
        x_BLD = constrain(x_BLD, residual_axes(cfg))
        normed_BLD = norm(cfg, "input_layernorm")(x_BLD)
        attention = Attention(cfg, self.deterministic, self.decode, name="self_attn")
        h_BLD = attention(normed_BLD, segment_ids_BL, positions_BL)
        if cfg.parallel_block:
            mlp_in_BLD = normed_BLD if cfg.num_block_norms == 1 else norm(cfg, "post_attention_layernorm")(x_BLD)
            h_BLD = h_BLD + MLP(cfg, self.deterministic, name="mlp")(mlp_in_BLD)
        else:
            x_BLD = x_BLD + nn.Dropout(cfg.resid_dropout)(h_BLD, deterministic=self.deterministic)
            h_BLD = MLP(cfg, self.deterministic, name="mlp")(norm(cfg, "post_attention_layernorm")(x_BLD))
        x_BLD = x_BLD + nn.Dropout(cfg.resid_dropout)(h_BLD, deterministic=self.deterministic)
        x_BLD = constrain(x_BLD, residual_axes(cfg))
        if cfg.scan_layers:
            return x_BLD, None
        return x_BLD


class Decoder(nn.Module):
    """Token ids -> float32 logits [B, L, V] (or, with `num_labels`, scores [B, L, num_labels] at every
    position, as HF *ForSequenceClassification before it picks the last token); `segment_ids` (0 =
    padding) and `positions` describe packed documents."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        inputs_BL,
        positions_BL=None,
        segment_ids_BL=None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        hidden: bool = False,
    ):
        """`decode=True` runs against a KV cache (the "cache" collection; see jaxllm.models.generation).
        `hidden=True` returns the final-norm hidden states [B, L, D] instead of logits (the loss then
        applies `head_DV` chunk by chunk and never holds [B, L, V] logits; a reward step `score_DS`)."""
        cfg = self.cfg
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(inputs_BL.shape[1]), inputs_BL.shape)
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones_like(inputs_BL)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.embed_dim,
            dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype,
            embedding_init=normal_init(cfg, ("vocab", "embed")),
            name="embed_tokens",
        )
        x_BLD = embed(inputs_BL).astype(cfg.jnp_dtype)
        if cfg.embed_norm:
            x_BLD = norm(cfg, "embed_norm")(x_BLD)
        x_BLD = nn.Dropout(cfg.embed_dropout)(x_BLD, deterministic=deterministic)
        x_BLD = constrain(x_BLD, residual_axes(cfg))

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BLD, _ = stack(cfg, deterministic, decode, name="layers")(x_BLD, segment_ids_BL, positions_BL)
        else:
            for i in range(cfg.num_layers):
                x_BLD = layer_cls(cfg, deterministic, decode, name=f"layers_{i}")(x_BLD, segment_ids_BL, positions_BL)

        x_BLD = norm(cfg, "norm")(x_BLD)
        if hidden and not self.is_initializing():
            return constrain(x_BLD, ("batch", "length", "embed"))
        # the head as one 2-D matmul [B*L, D] @ [D, V] (see quant.contract: no transposed activation copies)
        x_MD = x_BLD.reshape(-1, cfg.embed_dim)
        dense = functools.partial(nn.Dense, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        if cfg.num_labels:  # HF's `score`: Linear(D, num_labels, bias=False), initializer_range normal
            scores_MS = dense(cfg.num_labels, kernel_init=normal_init(cfg, ("embed", None)), name="score")(x_MD)
            scores_BLS = scores_MS.reshape(*x_BLD.shape[:2], cfg.num_labels)
            return constrain(scores_BLS.astype(jnp.float32), ("batch", "length", None))
        if cfg.tie_embeddings:
            logits_MV = embed.attend(x_MD)
        else:
            logits_MV = dense(cfg.vocab_size, kernel_init=normal_init(cfg, ("embed", "vocab")), name="lm_head")(x_MD)
        logits_BLV = logits_MV.reshape(*x_BLD.shape[:2], cfg.vocab_size)
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))


def head_DV(params: dict, cfg: ModelConfig) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the tied embedding, transposed, or lm_head).
    The chunked losses scan over it: with `cfg.gather_head` it is gathered whole along D here, once per
    step (its gradient reduce-scattered once), not once per chunk and pass."""
    if cfg.num_labels:
        raise JaxllmError(
            f"model.num_labels={cfg.num_labels}: a score model has no language-model head; "
            "use score_DS (train.objective='reward'), or set model.num_labels=0"
        )
    w = params["embed_tokens"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
    w = w.astype(cfg.jnp_dtype)
    return constrain(w, (None, "vocab")) if cfg.gather_head else w


def over_head_chunks(fn: Callable, carry: Any, x_BLD: jax.Array, head_DV: jax.Array, *xs_BL: jax.Array, chunk: int):
    """Scans `fn(carry, logits_BCV, *xs_BC) -> (carry, out_BC or None)` over `chunk` positions at a time:
    each chunk's logits x @ head are made, used and dropped (and remade in the backward pass), so
    [B, L, V] never exists. Returns (carry, out [B, L] or None)."""
    b, l, _ = x_BLD.shape
    chunk = min(chunk, l)
    if l % chunk:
        raise JaxllmError(f"train.loss_chunk={chunk} does not divide the sequence length {l}; pick a divisor of it")

    @jax.checkpoint
    def one(carry, xs):
        x_BCD, *rest = xs
        return fn(carry, constrain(jnp.einsum("bcd,dv->bcv", x_BCD, head_DV), ("batch", "length", "vocab")), *rest)

    by_chunk = lambda x: x.reshape(b, l // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    carry, out = jax.lax.scan(one, carry, tuple(by_chunk(x) for x in (x_BLD, *xs_BL)))
    return carry, None if out is None else out.swapaxes(0, 1).reshape(b, l)


def score_DS(params: dict, cfg: ModelConfig) -> jax.Array:
    """The sequence-score head [D, num_labels] in the compute dtype (`hidden=True` states @ it = scores)."""
    if not cfg.num_labels:
        raise JaxllmError(
            "model.num_labels=0: this model has no score head; set model.num_labels (1 for a reward model)"
        )
    return params["score"]["kernel"].astype(cfg.jnp_dtype)


def layer_layout(params: dict, num_layers: int, scan: bool) -> dict:
    """`params` in the scanned layout (one `layers` tree with a leading layer axis) or the unrolled one
    (`layers_0` ... `layers_{n-1}`); params already in that layout are returned as they are."""
    if scan and "layers" not in params and "layers_0" in params:
        out = {k: v for k, v in params.items() if not k.startswith("layers_")}
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
        return out
    if not scan and "layers" in params:
        out = {k: v for k, v in params.items() if k != "layers"}
        for i in range(num_layers):
            out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
        return out
    return params


def abstract_params(cfg: ModelConfig) -> dict:
    """Every param's shape and dtype, in logical-axis boxes (`shd.unbox` strips them), allocating nothing."""
    return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
