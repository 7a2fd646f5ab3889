"""ModelConfig: the one description of a decoder, plus the published shapes of named models."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxllm import JaxllmError

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "reference")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of the decoder; `ModelConfig(**cfg.model)`."""

    vocab_size: int = 32000
    num_layers: int = 2
    embed_dim: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (MHA); 1 = multi-query; else grouped-query
    head_dim: int = 0  # 0 = embed_dim // num_heads
    mlp_dim: int = 1024
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    scan_layers: bool = True
    remat: str = "none"  # none | full | save_dots | save_dots_no_batch
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype of matmuls and activations
    attention: str = "auto"  # auto (cuDNN flash on GPU, else XLA) | xla | cudnn | reference
    init_std: float = 0.02

    def __post_init__(self):
        def bad(msg: str):
            raise JaxllmError(f"model config: {msg}")

        for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0 and self.embed_dim % self.num_heads:
            bad(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; set head_dim")
        if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
            bad(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.kv_heads}")
        if self.remat not in REMAT_POLICIES:
            bad(f"remat={self.remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            bad(f"attention={self.attention!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"{name}={getattr(self, name)!r}; choose one of {', '.join(DTYPES)}")
        for name in ("embed_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def jnp_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def num_params(self) -> int:
        """Parameter count from shapes (matches the decoder's params; tested against eval_shape)."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.embed_dim
        return self.vocab_size * self.embed_dim + head + self._layer_params() * self.num_layers + self.embed_dim

    def _layer_params(self) -> int:
        d, k = self.embed_dim, self.head_size
        attn = d * self.num_heads * k * 2 + d * self.kv_heads * k * 2
        return attn + 3 * d * self.mlp_dim + 2 * d

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward+backward FLOPs per token, PaLM's 6 N + 12 L H K T: N counts every parameter but the
        input embedding (a lookup, not a matmul); the output head is a matmul whether tied or not."""
        n = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.embed_dim)
        return 6.0 * n + 12 * self.num_layers * self.num_heads * self.head_size * seq_len


# Published shapes (Touvron et al. 2023; Hugging Face config.json of meta-llama/Llama-2-*-hf).
PRESETS: dict[str, dict[str, Any]] = {
    "llama2_7b": dict(vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=32,
                      mlp_dim=11008, max_seq_len=4096, norm_eps=1e-5),
    "llama2_13b": dict(vocab_size=32000, num_layers=40, embed_dim=5120, num_heads=40, num_kv_heads=40,
                       mlp_dim=13824, max_seq_len=4096, norm_eps=1e-5),
    "llama2_70b": dict(vocab_size=32000, num_layers=80, embed_dim=8192, num_heads=64, num_kv_heads=8,
                       mlp_dim=28672, max_seq_len=4096, norm_eps=1e-5),
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The model sub-dict of a named published model, with overrides (for config files)."""
    if name not in PRESETS:
        raise JaxllmError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    merged = dict(ModelConfig().__dict__)
    merged.update(PRESETS[name])
    merged.update(overrides)
    return merged
