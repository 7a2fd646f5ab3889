"""Hugging Face config.json <-> ModelConfig for the Llama, Falcon and BLOOM families."""

from __future__ import annotations

from typing import Any

from jaxllm import JaxllmError
from jaxllm.models.config import ModelConfig
from jaxllm.models.families import FAMILIES, family

# Falcon's first releases (tiiuae/falcon-7b, -40b before their move into transformers).
_FALCON_LEGACY_TYPES = {"RefinedWebModel": False, "RefinedWeb": True}  # -> new_decoder_architecture
_FALCON_LEGACY_KEYS = {
    "n_embed": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_head_kv": "num_kv_heads",
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "falcon": "FalconForCausalLM", "bloom": "BloomForCausalLM"}
# The transformers class of a score model (num_labels > 0) per family: a `score` Linear(D, num_labels, no bias)
# on the base model (weights under the causal LM's prefix: model.* for Llama, transformer.* for Falcon/BLOOM)
# read at the rightmost token that is not pad_token_id. A family missing here has no such class.
SCORE_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "falcon": "FalconForSequenceClassification",
    "bloom": "BloomForSequenceClassification",
}


def _bad(msg: str):
    raise JaxllmError(f"config.json: {msg}")


def model_type(config_json: dict[str, Any]) -> str:
    """The family of a config.json: llama | falcon | bloom (Falcon's RefinedWeb names included)."""
    kind = config_json.get("model_type")
    if kind in _FALCON_LEGACY_TYPES:
        return "falcon"
    if kind not in FAMILIES:
        _bad(f"model_type {kind!r} is not supported; jaxllm imports {', '.join(FAMILIES)}")
    return kind


def _rope_theta(c: dict[str, Any], default: float = 10000.0) -> float:
    """rope_theta from transformers 5's `rope_parameters` or the older top-level keys; only plain RoPE."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        _bad(f"rope type {rope_type!r} is not supported (only plain RoPE); remove rope scaling or use another model")
    return float(params.get("rope_theta", c.get("rope_theta", default)))


def model_config_from_hf(config_json: dict[str, Any], **overrides: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face `config.json` (as a dict); `overrides` set jaxllm-only fields
    (dtype, scan_layers, attention, ...)."""
    kind = model_type(config_json)
    fields = {"llama": _llama, "falcon": _falcon, "bloom": _bloom}[kind](dict(config_json))
    fields["num_labels"] = hf_num_labels(config_json)
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except JaxllmError as e:
        raise JaxllmError(f"config.json ({kind}): {e}") from None


def hf_num_labels(config_json: dict[str, Any]) -> int:
    """Outputs of the `score` head of a *ForSequenceClassification config.json (its id2label, else its
    num_labels, else transformers' default 2); 0 for any other architecture (a causal LM)."""
    architectures = config_json.get("architectures") or []
    if not (
        isinstance(architectures, list)
        and architectures
        and str(architectures[0]).endswith("ForSequenceClassification")
    ):
        return 0
    labels = config_json.get("id2label")
    n = len(labels) if isinstance(labels, dict) and labels else config_json.get("num_labels", 2)
    if type(n) is not int or n < 1:
        _bad(f"num_labels {n!r} of a {architectures[0]} is not a positive integer")
    return n


def score_pad_token_id(pad_id: int | None, eos_id: int | list[int] | None, bos_id: int | None) -> int:
    """pad_token_id for an exported score model. transformers scores each row at its rightmost token that
    is not pad_token_id, jaxllm each sequence at its last token (its EOS when data.add_eos): so the pad
    must never be a sequence's last token, EOS above all. The tokenizer's pad if it is not EOS, else BOS
    (never last: a sequence has an answer after it), else 0 (1 if 0 is EOS), which is right for sequences
    that end in EOS."""
    eos = set(eos_id if isinstance(eos_id, list) else [] if eos_id is None else [eos_id])
    for candidate in (pad_id, bos_id):
        if isinstance(candidate, int) and candidate >= 0 and candidate not in eos:
            return candidate
    return 1 if 0 in eos else 0


def _llama(c: dict[str, Any]) -> dict[str, Any]:
    if c.get("hidden_act", "silu") != "silu":
        _bad(f"llama hidden_act {c['hidden_act']!r} is not supported (only silu)")
    if bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
        _bad("llama attention_bias and mlp_bias differ; jaxllm's use_bias covers both")
    heads, d = c["num_attention_heads"], c["hidden_size"]
    head_dim = c.get("head_dim") or d // heads
    return dict(
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        embed_dim=d,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim * heads == d else head_dim,
        mlp_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 4096),
        rope_theta=_rope_theta(c),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        use_bias=bool(c.get("attention_bias", False)),
    )


def _falcon(c: dict[str, Any]) -> dict[str, Any]:
    for old, new in _FALCON_LEGACY_KEYS.items():
        if old in c and new not in c:
            c[new] = c[old]
    new_arch = bool(c.get("new_decoder_architecture", _FALCON_LEGACY_TYPES.get(c.get("model_type"), False)))
    if c.get("alibi", False):
        _bad("falcon with alibi=true (Falcon-RW) is not supported: it scales ALiBi by 1/sqrt(head_dim)")
    if c.get("activation", "gelu") != "gelu":
        _bad(f"falcon activation {c['activation']!r} is not supported (only gelu)")
    heads, d = c["num_attention_heads"], c["hidden_size"]
    parallel = new_arch or bool(c.get("parallel_attn", True))
    if new_arch:
        kv = c.get("num_kv_heads") or heads
    else:
        kv = 1 if c.get("multi_query", True) else heads
    norms = 2
    if parallel:
        norms = (c.get("num_ln_in_parallel_attn") or 2) if new_arch else 1
        if not new_arch and (c.get("num_ln_in_parallel_attn") or 1) != 1:
            _bad("falcon num_ln_in_parallel_attn=2 needs new_decoder_architecture=true")
    return dict(
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        embed_dim=d,
        num_heads=heads,
        num_kv_heads=kv,
        mlp_dim=c.get("ffn_hidden_size") or 4 * d,
        max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(c),
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        norm="layer",
        mlp="gelu",
        parallel_block=parallel,
        num_block_norms=norms,
        use_bias=bool(c.get("bias", False)),
    )


def _bloom(c: dict[str, Any]) -> dict[str, Any]:
    if c.get("apply_residual_connection_post_layernorm", False):
        _bad("bloom apply_residual_connection_post_layernorm=true is not supported")
    d = c.get("hidden_size") or c["n_embed"]
    return dict(
        vocab_size=c["vocab_size"],
        num_layers=c.get("n_layer") or c["num_hidden_layers"],
        embed_dim=d,
        num_heads=c.get("n_head") or c["num_attention_heads"],
        mlp_dim=4 * d,
        max_seq_len=c.get("seq_length") or c.get("max_position_embeddings") or 2048,
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        norm="layer",
        position="alibi",
        mlp="gelu_tanh",
        use_bias=True,
        embed_norm=True,
    )


def falcon_layout(cfg: ModelConfig) -> dict[str, Any]:
    """Falcon's own switches for a jaxllm config: which fused-QKV layout and norm names it uses."""
    h, n = cfg.kv_heads, cfg.num_heads
    new_arch = cfg.parallel_block and (cfg.num_block_norms == 2 or h not in (1, n))
    return dict(
        new_decoder_architecture=new_arch,
        multi_query=h == 1 and not new_arch,
        parallel_attn=cfg.parallel_block,
        num_kv_heads=h if new_arch else (1 if h == 1 else n),
        num_ln_in_parallel_attn=cfg.num_block_norms if new_arch else None,
    )


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The config.json transformers needs to rebuild `cfg` (plus architectures and dtype); a score model
    (num_labels > 0) is the family's *ForSequenceClassification (its pad_token_id is the caller's to add:
    `score_pad_token_id`)."""
    kind = family(cfg)
    out: dict[str, Any] = dict(
        model_type=kind,
        architectures=[_ARCHITECTURES[kind]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=dtype,
        dtype=dtype,
        use_cache=True,
    )
    if cfg.num_labels:
        if kind not in SCORE_ARCHITECTURES:
            raise JaxllmError(
                f"{kind} has no sequence-classification head in transformers; a score model "
                f"(model.num_labels={cfg.num_labels}) of this family cannot be exported"
            )
        out.update(
            architectures=[SCORE_ARCHITECTURES[kind]],
            num_labels=cfg.num_labels,
            id2label={str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
            label2id={f"LABEL_{i}": i for i in range(cfg.num_labels)},
        )
    rope = dict(rope_theta=cfg.rope_theta, rope_parameters=dict(rope_theta=cfg.rope_theta, rope_type="default"))
    if kind == "llama":
        out.update(
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_size,
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            attention_bias=cfg.use_bias,
            mlp_bias=cfg.use_bias,
            **rope,
        )
    elif kind == "falcon":
        out.update(
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            ffn_hidden_size=cfg.mlp_dim,
            activation="gelu",
            alibi=False,
            bias=cfg.use_bias,
            layer_norm_epsilon=cfg.norm_eps,
            max_position_embeddings=cfg.max_seq_len,
            **falcon_layout(cfg),
            **rope,
        )
    else:
        out.update(
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            layer_norm_epsilon=cfg.norm_eps,
            apply_residual_connection_post_layernorm=False,
            seq_length=cfg.max_seq_len,
        )
    return out
