"""The families in a decoder config's terms: which Hugging Face architecture computes the same function as
a config, the names of the decoder's projections (ours, their parent module, the family's module paths)
and their shapes, and which params each of the family's modules holds.
Below both the model code and the Hugging Face interop, which read these facts from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxllm import JaxllmError

if TYPE_CHECKING:
    from jaxllm.models.config import ModelConfig

FAMILIES = ("llama", "falcon", "bloom")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS  # the decoder's linear layers (quantizable kernels)
# Adapter targets: the projections, and `qkv` for one adapter on a fused query_key_value (one A for q, k, v).
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv", "o_proj", "gate_proj", "up_proj", "down_proj")
Params = tuple[tuple[str, ...], ...]  # param paths


def parent(projection: str) -> str:
    """The module that holds a projection in a layer's params: self_attn or mlp."""
    return "mlp" if projection in MLP_PROJECTIONS else "self_attn"


def family(cfg: ModelConfig) -> str:
    """The Hugging Face family whose architecture computes the same function as `cfg`."""
    llama = cfg.norm == "rms" and cfg.position == "rope" and cfg.mlp == "swiglu" and not cfg.parallel_block
    falcon = (
        cfg.norm == "layer"
        and cfg.position == "rope"
        and cfg.mlp == "gelu"
        and (cfg.parallel_block or cfg.kv_heads in (1, cfg.num_heads))
    )
    bloom = (
        cfg.norm == "layer"
        and cfg.position == "alibi"
        and cfg.mlp == "gelu_tanh"
        and cfg.use_bias
        and not cfg.parallel_block
        and cfg.kv_heads == cfg.num_heads
        and cfg.mlp_dim == 4 * cfg.embed_dim
    )
    standard_heads = cfg.head_size * cfg.num_heads == cfg.embed_dim
    if llama and not cfg.embed_norm:
        return "llama"
    if falcon and not cfg.embed_norm and standard_heads:
        return "falcon"
    if bloom and cfg.embed_norm and standard_heads:
        return "bloom"
    raise JaxllmError(
        f"model config (norm={cfg.norm}, position={cfg.position}, mlp={cfg.mlp}, "
        f"parallel_block={cfg.parallel_block}, embed_norm={cfg.embed_norm}, use_bias={cfg.use_bias}, "
        f"heads={cfg.num_heads}/{cfg.kv_heads}x{cfg.head_size}) matches no Hugging Face "
        "Llama/Falcon/BLOOM architecture; it cannot be exported"
    )


def hf_modules(cfg: ModelConfig) -> dict[str, str]:
    """Our projection name -> the family's module path (with "{i}" for the layer), in canonical order."""
    if family(cfg) == "llama":
        pre = "model.layers.{i}"
        return {p: f"{pre}.{parent(p)}.{p}" for p in PROJECTIONS}
    pre = "transformer.h.{i}"
    return {
        "qkv": f"{pre}.self_attention.query_key_value",
        "o_proj": f"{pre}.self_attention.dense",
        "up_proj": f"{pre}.mlp.dense_h_to_4h",
        "down_proj": f"{pre}.mlp.dense_4h_to_h",
    }


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Our projection name -> its kernel's (input shape, output shape): kernel [*in, *out]."""
    n, h, k, d, f = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.embed_dim, cfg.mlp_dim
    return {
        "q_proj": ((d,), (n, k)),
        "k_proj": ((d,), (h, k)),
        "v_proj": ((d,), (h, k)),
        "o_proj": ((n, k), (d,)),
        "gate_proj": ((d,), (f,)),
        "up_proj": ((d,), (f,)),
        "down_proj": ((f,), (d,)),
    }


def hf_module_params(cfg: ModelConfig) -> tuple[dict[str, Params], dict[str, Params]]:
    """The family's modules -> the params they hold (outside the layers, in a layer: "{i}" in module paths,
    params relative to the layer), in HF's order. `jaxllm.hf.layout` builds its tensor groups (shapes and
    conversions) from them."""

    def norm(name):
        return ((name, "scale"), (name, "bias")) if cfg.norm == "layer" else ((name, "scale"),)

    def linear(*path):
        return ((*path, "kernel"), (*path, "bias")) if cfg.use_bias else ((*path, "kernel"),)

    llama = family(cfg) == "llama"
    outer = {"model.embed_tokens" if llama else "transformer.word_embeddings": (("embed_tokens", "embedding"),)}
    if cfg.embed_norm:
        outer["transformer.word_embeddings_layernorm"] = norm("embed_norm")
    outer["model.norm" if llama else "transformer.ln_f"] = norm("norm")
    if cfg.num_labels:
        outer["score"] = (("score", "kernel"),)
    elif not cfg.tie_embeddings:
        outer["lm_head"] = (("lm_head", "kernel"),)
    layer = {}
    for ours, module in hf_modules(cfg).items():
        if ours == "qkv":  # one fused query_key_value: the q, k, v kernels, then their biases
            qkv = [(parent(p), p) for p in ("q_proj", "k_proj", "v_proj")]
            layer[module] = tuple((*p, "kernel") for p in qkv) + (
                tuple((*p, "bias") for p in qkv) if cfg.use_bias else ()
            )
        else:
            layer[module] = linear(parent(ours), ours)
    pre = "model.layers.{i}" if llama else "transformer.h.{i}"
    norms = ["input_layernorm", "post_attention_layernorm"]
    if family(cfg) == "falcon" and cfg.parallel_block:  # new_decoder_architecture with two norms, or one
        norms = ["ln_attn", "ln_mlp"] if cfg.num_block_norms == 2 else ["input_layernorm"]
    for hf, ours in zip(norms, ("input_layernorm", "post_attention_layernorm")):
        layer[f"{pre}.{hf}"] = norm(ours)
    return outer, layer
