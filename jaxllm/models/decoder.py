"""The one configurable decoder (Llama-2 layout), with layer scan and remat switches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm.models.config import ModelConfig
from jaxllm.models.layers import Attention, GatedMLP, RMSNorm, constrain

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL):
        cfg = self.cfg
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))
        h_BLD = Attention(cfg, self.deterministic, name="self_attn")(
            RMSNorm(cfg, name="input_layernorm")(x_BLD), segment_ids_BL, positions_BL)
        x_BLD = x_BLD + nn.Dropout(cfg.resid_dropout)(h_BLD, deterministic=self.deterministic)
        h_BLD = GatedMLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x_BLD))
        x_BLD = x_BLD + nn.Dropout(cfg.resid_dropout)(h_BLD, deterministic=self.deterministic)
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))
        if cfg.scan_layers:
            return x_BLD, None
        return x_BLD


class Decoder(nn.Module):
    """Token ids -> float32 logits; `segment_ids` (0 = padding) and `positions` describe packed documents."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs_BL, positions_BL=None, segment_ids_BL=None, *, deterministic: bool = True):
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
        x_BLD = nn.Dropout(cfg.embed_dropout)(x_BLD, deterministic=deterministic)
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BLD, _ = stack(cfg, deterministic, name="layers")(x_BLD, segment_ids_BL, positions_BL)
        else:
            for i in range(cfg.num_layers):
                x_BLD = layer_cls(cfg, deterministic, name=f"layers_{i}")(x_BLD, segment_ids_BL, positions_BL)

        x_BLD = RMSNorm(cfg, name="norm")(x_BLD)
        if cfg.tie_embeddings:
            logits_BLV = embed.attend(x_BLD)
        else:
            logits_BLV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                                  param_dtype=cfg.jnp_param_dtype,
                                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                           ("embed", "vocab")),
                                  name="lm_head")(x_BLD)
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
