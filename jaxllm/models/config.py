"""ModelConfig: the one description of a decoder, plus the published shapes of named models."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import JaxllmError
from jaxllm.config import check_number
from jaxllm.models.families import ADAPTER_TARGETS

_cp = jax.checkpoint_policies
_QKV = ("query_proj", "key_proj", "value_proj")
# What the backward pass keeps of a layer's forward (the rest is recomputed), by MaxText's names for the
# same trade-offs. Names are the tags `constrain(..., name)` puts on activations in layers.py and
# attention/module.py; the "_offloaded" policies keep their activations in host memory (pinned_host)
# between the passes.
REMAT_POLICIES = {
    "none": None,  # no remat: the decoder does not wrap its layers, and keeps every activation
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": _cp.checkpoint_dots,
    "save_dots_no_batch": _cp.checkpoint_dots_with_no_batch_dims,
    "minimal": _cp.checkpoint_dots_with_no_batch_dims,  # every projection output (MaxText's "minimal")
    "save_qkv_proj": _cp.save_only_these_names(*_QKV),
    "save_out_proj": _cp.save_only_these_names("out_proj"),
    "save_dot_except_mlp": _cp.save_only_these_names(*_QKV, "out_proj"),
    "save_dot_except_mlpwi": _cp.save_only_these_names(*_QKV, "out_proj", "mlpwo"),
    "save_dot_with_context_except_mlp": _cp.save_only_these_names(*_QKV, "context", "out_proj"),
    "qkv_proj_offloaded": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(_QKV),
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "minimal_offloaded": _cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host"),
    # save_dot_except_mlpwi with the queries (the largest of its tensors) in host memory: no recompute
    "save_dot_except_mlpwi_q_offloaded": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=["key_proj", "value_proj", "out_proj", "mlpwo"],
        names_which_can_be_offloaded=["query_proj"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "flash", "reference")
NORMS = ("rms", "layer")
POSITIONS = ("rope", "alibi")
MLPS = ("swiglu", "gelu", "gelu_tanh")
QUANTIZATIONS = ("none", "nf4", "int8")
# Fields that fix the parameters' shapes and meaning; a run may change the others (dropout, remat, ...).
SHAPE_FIELDS = (
    "vocab_size",
    "num_layers",
    "embed_dim",
    "num_heads",
    "kv_heads",
    "head_size",
    "mlp_dim",
    "tie_embeddings",
    "norm",
    "position",
    "mlp",
    "parallel_block",
    "num_block_norms",
    "use_bias",
    "embed_norm",
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(value: Any, what: str = "dtype") -> str:
    """The DTYPES name of `value`: a name ('bfloat16') or a numpy/jnp dtype (jnp.bfloat16, np.float32)."""
    try:
        name = np.dtype(value).name
    except (TypeError, ValueError):
        name = None
    if name not in DTYPES:
        raise JaxllmError(f"{what}={value!r}; choose one of {', '.join(DTYPES)} (or jnp.float32, jnp.bfloat16, ...)")
    return name


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
    tie_embeddings: bool = False  # lm_head is the token embedding (kept, unused, with num_labels > 0)
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    scan_layers: bool = True  # nn.scan over layers: one layer compiled, L times faster compiles
    remat: str = "none"  # none | full | minimal | save_dot_except_mlpwi | ... (REMAT_POLICIES)
    param_dtype: str = "float32"  # float32 | bfloat16 | float16 (a numpy/jnp dtype is taken by its name)
    dtype: str = "bfloat16"  # compute dtype of matmuls and activations: bfloat16 on TPU/GPU; float32 is faster on CPU
    sequence_parallel: bool = True  # split the residual stream's length over the tensor mesh axis between
    #                                 blocks (Megatron sequence parallelism); no effect without tensor parallelism
    gather_head: bool = True  # chunked losses gather the output head whole once per step, not once per chunk and
    #                           pass (HBM for the head and its gradient in the compute dtype); False saves those
    attention: str = "auto"  # auto (cuDNN on GPU, Pallas flash on TPU, else XLA) | xla | cudnn | flash | reference
    init_std: float = 0.02  # standard deviation of the normal initial embeddings and kernels
    num_labels: int = 0  # > 0: a sequence-score head `score` [D, num_labels] in place of lm_head (Hugging Face
    #                      *ForSequenceClassification; reward models); 0 = a language model
    # Family switches (defaults = Llama). Falcon: norm=layer, mlp=gelu, parallel_block (7B: one shared
    # norm; 40B/180B: two). BLOOM: norm=layer, position=alibi, mlp=gelu_tanh, use_bias, embed_norm.
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    position: str = "rope"  # rope | alibi (linear bias on attention logits; rope_theta unused)
    mlp: str = "swiglu"  # swiglu (gate/up/down) | gelu (exact, Falcon) | gelu_tanh (BLOOM) (up/down)
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) with one residual (Falcon)
    num_block_norms: int = 2  # norms per layer; 1 = attn and MLP share one (parallel_block only)
    use_bias: bool = False  # biases on every projection (BLOOM; Falcon's `bias`)
    embed_norm: bool = False  # a norm right after the token embedding (BLOOM)
    # Adapters and a quantized frozen base (set from a run's `lora` section; see jaxllm.models.lora).
    lora_rank: int = 0  # r of the LoRA adapters; 0 = none
    lora_alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with lora_rslora)
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: tuple[str, ...] = ()  # projections with adapters: q_proj k_proj v_proj o_proj gate_proj
    #                                     up_proj down_proj, or qkv (one A shared by q, k, v: query_key_value)
    lora_rslora: bool = False
    quantization: str = "none"  # the attention/MLP kernels stored as none | nf4 | int8 (lm_head stays float)
    quant_block_size: int = 64  # weights per quantization block (along each kernel's input)

    def __post_init__(self):
        def bad(msg: str):
            raise JaxllmError(f"model config: {msg}")

        for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim", "max_seq_len"):
            check_number(f"model.{name}", getattr(self, name), low=1, integer=True)
        for name in ("num_kv_heads", "head_dim", "lora_rank", "quant_block_size", "num_labels"):
            check_number(f"model.{name}", getattr(self, name), low=0, integer=True)
        if self.head_dim == 0 and self.embed_dim % self.num_heads:
            bad(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; set head_dim")
        if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
            bad(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.kv_heads}")
        if self.remat not in REMAT_POLICIES:
            bad(f"remat={self.remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            bad(f"attention={self.attention!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
        for name in ("param_dtype", "dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"model config: {name}"))
        for name, choices in (("norm", NORMS), ("position", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                bad(f"{name}={getattr(self, name)!r}; choose one of {', '.join(choices)}")
        if self.num_block_norms not in (1, 2) or (self.num_block_norms == 1 and not self.parallel_block):
            bad(f"num_block_norms={self.num_block_norms}; use 2, or 1 with parallel_block=True")
        if self.position == "rope" and self.head_size % 2:
            bad(f"rotary positions need an even head size, got {self.head_size}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        unknown = [t for t in self.lora_targets if t not in ADAPTER_TARGETS]
        if unknown:
            bad(f"lora_targets {unknown} unknown; choose from {', '.join(ADAPTER_TARGETS)}")
        if "qkv" in self.lora_targets and {"q_proj", "k_proj", "v_proj"} & set(self.lora_targets):
            bad("lora_targets: qkv (the fused query_key_value) already covers q_proj, k_proj and v_proj")
        if self.lora_rank < 0 or (self.lora_targets and self.lora_rank == 0):
            bad(f"lora_rank={self.lora_rank}; give a positive rank for lora_targets {list(self.lora_targets)}")
        if self.quantization not in QUANTIZATIONS:
            bad(f"quantization={self.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        for name in ("embed_dropout", "attn_dropout", "resid_dropout", "lora_dropout"):
            check_number(f"model.{name}", getattr(self, name), low=0, high=1, high_open=True)
        for name in ("rope_theta", "norm_eps", "lora_alpha"):
            check_number(f"model.{name}", getattr(self, name), low=0, low_open=True)
        check_number("model.init_std", self.init_std, low=0)

    @property
    def lora_scaling(self) -> float:
        if not self.lora_rank:
            return 0.0
        return self.lora_alpha / (self.lora_rank**0.5 if self.lora_rslora else self.lora_rank)

    @property
    def jnp_norm_dtype(self) -> Any:
        """Norm params stay float32 on a quantized base (QLoRA keeps layer norms in full precision)."""
        return jnp.float32 if self.quantization != "none" else self.jnp_param_dtype

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
        v, d = self.vocab_size, self.embed_dim
        head = d * self.num_labels if self.num_labels else (0 if self.tie_embeddings else v * d)
        embed_norm = self._norm_params() if self.embed_norm else 0
        return v * d + embed_norm + head + self._layer_params() * self.num_layers + self._norm_params()

    def _norm_params(self) -> int:
        return self.embed_dim * (2 if self.norm == "layer" else 1)

    def _layer_params(self) -> int:
        d, k, f = self.embed_dim, self.head_size, self.mlp_dim
        attn = d * self.num_heads * k * 2 + d * self.kv_heads * k * 2
        mlp = (3 if self.mlp == "swiglu" else 2) * d * f
        biases = 0
        if self.use_bias:  # q, k, v, o; up (and gate), down
            biases = self.num_heads * k + 2 * self.kv_heads * k + d + (f if self.mlp != "swiglu" else 2 * f) + d
        return attn + mlp + biases + self.num_block_norms * self._norm_params()

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward+backward FLOPs per token, PaLM's 6 N + 12 L H K T: N counts every parameter but the
        input embedding (a lookup, not a matmul); the output head (lm_head or score) is a matmul, a tied
        one included."""
        tied_head = self.tie_embeddings and not self.num_labels
        n = self.num_params() - (0 if tied_head else self.vocab_size * self.embed_dim)
        return 6.0 * n + 12 * self.num_layers * self.num_heads * self.head_size * seq_len


_LLAMA2 = dict(vocab_size=32000, max_seq_len=4096, norm_eps=1e-5)
_FALCON = dict(
    vocab_size=65024,
    max_seq_len=2048,
    norm="layer",
    mlp="gelu",
    parallel_block=True,
    tie_embeddings=True,
    norm_eps=1e-5,
)
_BLOOM = dict(
    norm="layer", position="alibi", mlp="gelu_tanh", use_bias=True, embed_norm=True, tie_embeddings=True, norm_eps=1e-5
)

# Published shapes (Touvron et al. 2023; Hugging Face config.json of meta-llama/Llama-2-*-hf).
PRESETS: dict[str, dict[str, Any]] = {
    "llama2_7b": dict(num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=32, mlp_dim=11008, **_LLAMA2),
    "llama2_13b": dict(num_layers=40, embed_dim=5120, num_heads=40, num_kv_heads=40, mlp_dim=13824, **_LLAMA2),
    "llama2_70b": dict(num_layers=80, embed_dim=8192, num_heads=64, num_kv_heads=8, mlp_dim=28672, **_LLAMA2),
    # tiiuae/falcon-{7b,40b,180B} config.json: LayerNorm, exact GELU, parallel attn+MLP, tied head.
    "falcon_7b": dict(
        num_layers=32, embed_dim=4544, num_heads=71, num_kv_heads=1, mlp_dim=18176, **_FALCON, num_block_norms=1
    ),
    "falcon_40b": dict(
        num_layers=60, embed_dim=8192, num_heads=128, num_kv_heads=8, mlp_dim=32768, **_FALCON, num_block_norms=2
    ),
    "falcon_180b": dict(
        num_layers=80, embed_dim=14848, num_heads=232, num_kv_heads=8, mlp_dim=59392, **_FALCON, num_block_norms=2
    ),
    # bigscience/bloom-{560m,7b1}, bigscience/bloom config.json: ALiBi, biases, embedding LayerNorm.
    "bloom_560m": dict(
        vocab_size=250880, num_layers=24, embed_dim=1024, num_heads=16, mlp_dim=4096, max_seq_len=2048, **_BLOOM
    ),
    "bloom_7b1": dict(
        vocab_size=250880, num_layers=30, embed_dim=4096, num_heads=32, mlp_dim=16384, max_seq_len=2048, **_BLOOM
    ),
    "bloom_176b": dict(
        vocab_size=250880, num_layers=70, embed_dim=14336, num_heads=112, mlp_dim=57344, max_seq_len=2048, **_BLOOM
    ),
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The model sub-dict of a named published model, with overrides (for config files)."""
    if name not in PRESETS:
        raise JaxllmError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    merged = dict(ModelConfig().__dict__)
    merged.update(PRESETS[name])
    merged.update(overrides)
    return merged
