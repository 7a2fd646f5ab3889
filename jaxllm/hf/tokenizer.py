"""The tokenizer of a Hugging Face model folder, with jaxllm's Tokenizer interface."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from jaxllm import JaxllmError
from jaxllm.data.tokenizer import Tokenizer


class HFTokenizer:
    """A `tokenizer.json` (the `tokenizers` package): vocab_size, bos_id, eos_id, pad_id (-1 = none),
    encode (no special tokens added), decode (pad dropped), path; picklable for Grain workers."""

    def __init__(self, tokenizer_json: str, path: str, special: dict[str, str | None]):
        import tokenizers  # pylint: disable=g-import-not-at-top  (only needed for HF folders)

        self.path, self._json, self._special = path, tokenizer_json, special
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

        def token_id(token):
            found = self._tok.token_to_id(token) if token else None
            return -1 if found is None else found

        self.bos_id: int = token_id(special.get("bos"))
        self.eos_id: int = token_id(special.get("eos"))
        self.pad_id: int = token_id(special.get("pad"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` continuing earlier text: a tokenizer that prepends a space marker to every
        encode (Llama's Metaspace) does not here. Encodes after a newline anchor and drops its ids."""
        anchor = self._tok.encode("\n", add_special_tokens=False).ids
        ids = self._tok.encode("\n" + text, add_special_tokens=False).ids
        return ids[len(anchor):] if ids[:len(anchor)] == anchor else self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._json, "path": self.path, "special": self._special}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["json"], state["path"], state["special"])

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise JaxllmError(f"{path} is not valid JSON ({e})") from None


def _special_tokens(folder: str) -> dict[str, str | None]:
    """bos/eos/pad token strings from tokenizer_config.json, else special_tokens_map.json."""
    out: dict[str, str | None] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        data = _read_json(os.path.join(folder, file))
        for kind in ("bos", "eos", "pad"):
            token = data.get(f"{kind}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                out[kind] = token
    return out


def load_tokenizer_from_folder(path: str, vocab_size: int | None = None) -> HFTokenizer | Tokenizer:
    """`tokenizer.json` or SentencePiece `tokenizer.model` of a model folder. A vocab larger than the
    model's (`vocab_size`, default config.json's) is an error: its ids would index past the embedding."""
    path = os.path.expanduser(path)
    json_file, sp_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.isfile(json_file):
        with open(json_file) as f:
            text = f.read()
        try:
            tokenizer: HFTokenizer | Tokenizer = HFTokenizer(text, json_file, _special_tokens(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise JaxllmError(f"{json_file} is not a tokenizers file ({e})") from None
    elif os.path.isfile(sp_file):
        tokenizer = Tokenizer.from_file(sp_file)
    else:
        raise JaxllmError(f"{path}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files there")
    if vocab_size is None:
        vocab_size = _read_json(os.path.join(path, "config.json")).get("vocab_size")
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise JaxllmError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{vocab_size}; use the tokenizer the model was trained with")
    return tokenizer
