"""Hugging Face interop: Llama / Falcon / BLOOM config.json + safetensors (or .bin) import, safetensors
export, PEFT adapters, the Hub cache. (A model folder's tokenizer is `jaxllm.data.tokenizer`'s.)

    model, params = load_pretrained("path/to/hf_model")          # streamed, directly sharded
    logits_BLV = model.apply({"params": params}, input_ids_BL)
    save_pretrained(model, params, "out/")                        # transformers can load it

jaxllm never imports torch; only numpy and safetensors. PyTorch .bin files
are read by `torch_pickle`, which refuses any pickle that would call more than a state dict needs.
"""

from jaxllm.hf.config import family, hf_config_from_model, model_config_from_hf
from jaxllm.hf.peft import load_adapter, save_adapter
from jaxllm.hf.weights import load_pretrained, save_pretrained

__all__ = [
    "family",
    "hf_config_from_model",
    "load_adapter",
    "load_pretrained",
    "model_config_from_hf",
    "save_adapter",
    "save_pretrained",
]
