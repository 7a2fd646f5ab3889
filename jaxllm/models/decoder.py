"""The one configurable decoder (Llama-2, Falcon, BLOOM are switches), with layer scan and remat switches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm.models.config import ModelConfig
from jaxllm.models.layers import MLP, Attention, constrain, norm

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


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
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))
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
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))
        if cfg.scan_layers:
            return x_BLD, None
        return x_BLD


class Decoder(nn.Module):
    """Token ids -> float32 logits; `segment_ids` (0 = padding) and `positions` describe packed documents."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs_BL, positions_BL=None, segment_ids_BL=None, *, deterministic: bool = True,
                 decode: bool = False):
        """`decode=True` runs against a KV cache (the "cache" collection; see jaxllm.generate)."""
        cfg = self.cfg
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(inputs_BL.shape[1]), inputs_BL.shape)
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones_like(inputs_BL)
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                     ("vocab", "embed")),
                         name="embed_tokens")
        x_BLD = embed(inputs_BL).astype(cfg.jnp_dtype)
        if cfg.embed_norm:
            x_BLD = norm(cfg, "embed_norm")(x_BLD)
        x_BLD = nn.Dropout(cfg.embed_dropout)(x_BLD, deterministic=deterministic)
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BLD, _ = stack(cfg, deterministic, decode, name="layers")(x_BLD, segment_ids_BL, positions_BL)
        else:
            for i in range(cfg.num_layers):
                x_BLD = layer_cls(cfg, deterministic, decode, name=f"layers_{i}")(x_BLD, segment_ids_BL, positions_BL)

        x_BLD = norm(cfg, "norm")(x_BLD)
        if cfg.tie_embeddings:
            logits_BLV = embed.attend(x_BLD)
        else:
            logits_BLV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                                  param_dtype=cfg.jnp_param_dtype,
                                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                           ("embed", "vocab")),
                                  name="lm_head")(x_BLD)
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
