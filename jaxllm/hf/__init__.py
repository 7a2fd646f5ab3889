"""Hugging Face interop: Llama / Falcon / BLOOM config.json + safetensors (or .bin) import, safetensors
export, tokenizers.

    model, params = load_pretrained("path/to/hf_model")          # streamed, directly sharded
    logits_BLV = model.apply({"params": params}, input_ids_BL)
    save_pretrained(model, params, "out/")                        # transformers can load it

jaxllm never imports torch; only numpy, safetensors and (for tokenizer.json) tokenizers. PyTorch .bin files
are read by `torch_pickle`, which refuses any pickle that would call more than a state dict needs.
"""

from jaxllm.data.tokenizer import HFTokenizer, load_tokenizer_from_folder
from jaxllm.hf.config import family, hf_config_from_model, model_config_from_hf
from jaxllm.hf.weights import load_pretrained, save_pretrained
from jaxllm.hf.peft import load_adapter, save_adapter

__all__ = ["HFTokenizer", "family", "hf_config_from_model", "load_adapter", "load_pretrained",
           "load_tokenizer_from_folder",
           "model_config_from_hf", "save_adapter", "save_pretrained"]
