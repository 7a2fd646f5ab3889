"""PEFT interop: jaxllm adapters exported to PEFT's format give transformers+PEFT the same logits (per
family), the merged export equals both, adapters import back, and mismatched adapters are refused."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import _assert_close, _hf_logits, _hf_model, _jax_logits, _padded_batch  # noqa: E402

from jaxllm import JaxllmError, hf, tree  # noqa: E402
from jaxllm.models import lora  # noqa: E402
from jaxllm.models.decoder import Decoder  # noqa: E402

CASES = {  # variant -> lora config
    "llama_gqa": lora.LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",), modules_to_save=("lm_head",)),
    "llama_tied": lora.LoraConfig(r=4, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"), rslora=True),
    "falcon_grouped": lora.LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",)),
    "falcon_mq": lora.LoraConfig(r=2, alpha=4.0, target_modules=("query_key_value", "dense_h_to_4h")),
    "bloom": lora.LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",)),
}


def _trained_adapters(cfg, lcfg, base):
    """Adapters as training leaves them: A from the init, B and modules_to_save moved away from it."""
    fresh = nn.meta.unbox(jax.jit(Decoder(cfg).init)(jax.random.key(1), np.zeros((1, 1), np.int32))["params"])
    adapters, _ = tree.partition(fresh, lambda p: p[-1] in lora.ADAPTER_LEAVES)
    rng = np.random.RandomState(0)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) if p[-1].key == "lora_b" else v, adapters
    )
    saved, frozen = tree.partition(base, lora.trainable_fn(lcfg, cfg))
    return tree.union(adapters, jax.tree.map(lambda x: x * 1.1, saved)), frozen


@pytest.mark.parametrize("variant", sorted(CASES))
def test_peft_parity_export_import_and_merge(variant, tmp_path):
    hf_model = _hf_model(variant)
    hf_model.save_pretrained(tmp_path / "base")
    model, base = hf.load_pretrained(str(tmp_path / "base"))
    lcfg = CASES[variant]
    cfg = lora.apply(lcfg, model.cfg)
    trainable, frozen = _trained_adapters(cfg, lcfg, base)
    ids, mask, positions = _padded_batch()
    ours = _jax_logits(Decoder(cfg), tree.union(trainable, frozen), ids, mask, positions)
    assert np.abs(ours - _jax_logits(model, base, ids, mask, positions))[mask.astype(bool)].max() > 0.5

    hf.save_adapter(trainable, cfg, lcfg, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == lcfg.r
    peft_model = peft.PeftModel.from_pretrained(_hf_model(variant), str(tmp_path / "adapter"))
    _assert_missing_none(peft_model, tmp_path / "adapter")
    _assert_close(ours, _hf_logits(peft_model.eval(), ids, mask, positions), mask, f"{variant} PEFT")

    back, back_cfg = hf.load_adapter(str(tmp_path / "adapter"), model.cfg)
    assert lora.apply(back_cfg, model.cfg) == cfg
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    merged_cfg, merged = lora.merge_adapters(tree.union(trainable, frozen), cfg)
    hf.save_pretrained(Decoder(merged_cfg), merged, str(tmp_path / "merged"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    _assert_close(ours, _hf_logits(reloaded, ids, mask, positions), mask, f"{variant} merged")


def _assert_missing_none(peft_model, folder):
    """Every adapter tensor PEFT created (and every module it saves) is in the file, and nothing else."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        stored = set(f.keys())
    names = [n for n, _ in peft_model.named_parameters()]
    expected = {n.replace(".default", "") for n in names if "lora_" in n}
    expected |= {n.replace(".modules_to_save.default", "") for n in names if ".modules_to_save.default." in n}
    assert expected and expected == stored, (sorted(expected - stored)[:3], sorted(stored - expected)[:3])


def test_qlora_adapters_match_peft_on_the_dequantized_base(tmp_path):
    """A QLoRA run's adapters sit on the NF4 base: PEFT on the dequantized base gives the same logits."""
    _hf_model("llama_gqa").save_pretrained(tmp_path / "base")
    model, base = hf.load_pretrained(str(tmp_path / "base"))
    lcfg = lora.LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",), quantization="nf4", quant_block_size=16)
    cfg = lora.apply(lcfg, model.cfg)
    quantized = lora.quantize_params(base, cfg)
    from jaxllm import sharding as shd
    from jaxllm.train.start import load_init_params

    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=-1, tensor=1))
    streamed = load_init_params(str(tmp_path / "base"), model.cfg, mesh, quantized=cfg)  # quantized as it loads
    assert jax.tree.structure(streamed) == jax.tree.structure(quantized)
    for a, b in zip(
        jax.tree.leaves(lora.dequantize_params(streamed, cfg)), jax.tree.leaves(lora.dequantize_params(quantized, cfg))
    ):  # up to reduction order
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    trainable, frozen = _trained_adapters(cfg, lcfg, quantized)
    ids, mask, positions = _padded_batch()
    ours = _jax_logits(Decoder(cfg), tree.union(trainable, frozen), ids, mask, positions)
    hf.save_pretrained(model, lora.dequantize_params(quantized, cfg), str(tmp_path / "dequantized"))
    hf.save_adapter(trainable, cfg, lcfg, str(tmp_path / "adapter"))
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dequantized"))
    peft_model = peft.PeftModel.from_pretrained(dequantized, str(tmp_path / "adapter")).eval()
    _assert_close(ours, _hf_logits(peft_model, ids, mask, positions), mask, "QLoRA vs PEFT on dequantized base")


def test_adapters_for_another_base_are_refused(tmp_path):
    _hf_model("llama_gqa").save_pretrained(tmp_path / "base")
    model, base = hf.load_pretrained(str(tmp_path / "base"))
    lcfg = CASES["llama_gqa"]
    cfg = lora.apply(lcfg, model.cfg)
    trainable, _ = _trained_adapters(cfg, lcfg, base)
    hf.save_adapter(trainable, cfg, lcfg, str(tmp_path / "adapter"))
    other = model.cfg.__class__(**{**model.cfg.__dict__, "embed_dim": 96, "head_dim": 8})
    with pytest.raises(JaxllmError, match=r"has shape .* needs .*another base model"):
        hf.load_adapter(str(tmp_path / "adapter"), other)
    falcon = _hf_model("falcon_grouped")
    falcon.save_pretrained(tmp_path / "falcon")
    with pytest.raises(JaxllmError, match="unknown module '[a-z_]+_proj' for this model"):
        hf.load_adapter(str(tmp_path / "adapter"), hf.load_pretrained(str(tmp_path / "falcon"))[0].cfg)
    with pytest.raises(JaxllmError, match="adapter_config.json not found"):
        hf.load_adapter(str(tmp_path / "nothing"), model.cfg)
