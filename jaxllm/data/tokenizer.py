"""Tokenizers: a SentencePiece `.model` file, a model folder's `tokenizer.json` (Hugging Face) or
`tokenizer.model`, or a small BPE trained on the corpus and cached.

A trained tokenizer is cached under `$JAXLLM_CACHE_DIR/tokenizers/<fingerprint>.model`, keyed by the
training text and every training setting, so a second run (or every host of a multi-host job) loads
the same model instead of training again. The cache and `.model` files may be local or on a bucket
(gs://...); files are written through `jaxllm.atomic` (locally temp file + rename, on a bucket one
upload): concurrent trainers and crashes never leave a half-written model behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from jaxllm import JaxllmError, atomic

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# BPE rather than unigram: on the 3 MB embedded corpus it trains in ~1 s vs ~10-20 s on 2 cores, with
# the same chars/token. Identity normalization + kept whitespace + byte fallback make encode/decode
# a lossless round trip for any text (code indentation included).
_TRAINER_SETTINGS: dict[str, Any] = dict(
    model_type="bpe",
    byte_fallback=True,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=0.9995,
    max_sentence_length=8192,
)
DEFAULT_VOCAB_SIZE = 8000  # vocab_size=0 trains this many pieces, or fewer on a corpus that supports fewer
_TRAIN_MAX_CHARS = 8_000_000  # text read from the source to train on: keeps training to a few seconds
_TRAIN_MAX_SENTENCES = 300_000  # lines given to the trainer (evenly strided when there are more)
_SAMPLE_SEED = 0


class Tokenizer:
    """A SentencePiece model with the ids the pipeline needs; picklable for Grain worker processes."""

    def __init__(self, model_proto: bytes, path: str):
        self.path = path
        self.proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._sp_continuation: spm.SentencePieceProcessor | None = None  # built on first use
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        """Loads a `.model` file; a missing or corrupt file is the user's to fix."""
        file = atomic.as_path(path)
        if not file.is_file():
            raise JaxllmError(
                f"tokenizer file {path!r} not found; set data.tokenizer to an existing SentencePiece "
                "'.model' file, or to '' to train one on the corpus"
            )
        try:
            proto = file.read_bytes()
        except OSError as e:
            raise JaxllmError(f"cannot read tokenizer file {path!r} ({e.strerror or e})") from None
        try:
            tokenizer = cls(proto, path)
            tokenizer.encode("a")  # some corrupt protos load, then fail on use ("Model is not initialized")
            return tokenizer
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JaxllmError(
                f"tokenizer file {path!r} is not a SentencePiece model ({first}); point "
                "data.tokenizer at a SentencePiece .model file or a model folder"
            ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (the pipeline adds those per config)."""
        return self._sp.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` where it continues earlier text: without the space SentencePiece puts before a
        text (its dummy prefix), so `encode(a) + encode_continuation(b)` decodes to `a + b`."""
        if self._sp_continuation is None:
            # Protobuf merges a repeated message field into the first and the last scalar wins, so
            # appending `normalizer_spec { add_dummy_prefix: false }` (field 3 { field 3 = 0 }) turns the
            # prefix off without the generated ModelProto class, whose protobuf pin other packages clash with.
            self._sp_continuation = spm.SentencePieceProcessor(model_proto=self.proto + b"\x1a\x02\x18\x00")
        return self._sp_continuation.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad ids are dropped so padded rows decode cleanly."""
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "proto": self.proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


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
        return ids[len(anchor) :] if ids[: len(anchor)] == anchor else self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._json, "path": self.path, "special": self._special}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["json"], state["path"], state["special"])

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def cache_dir() -> str:
    """Root of jaxllm's cache: `$JAXLLM_CACHE_DIR` (a folder or a bucket URL), default `~/.cache/jaxllm`."""
    return os.path.expanduser(os.environ.get("JAXLLM_CACHE_DIR") or "~/.cache/jaxllm")


def load_tokenizer(path: str, vocab_size: int = 0, documents: Sequence[str] = ()) -> Tokenizer | HFTokenizer:
    """The tokenizer at `path`: a SentencePiece `.model` file or a model folder (its `tokenizer.json` or
    `tokenizer.model`); for path "", a `vocab_size` BPE trained on `documents` (cached; vocab_size 0:
    DEFAULT_VOCAB_SIZE, or fewer on a corpus that supports fewer)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return load_tokenizer_from_folder(path, vocab_size=1 << 62)  # run checks
    if path:
        return Tokenizer.from_file(path)
    texts = _training_sample(documents)
    settings = dict(_TRAINER_SETTINGS, vocab_size=vocab_size or DEFAULT_VOCAB_SIZE)
    key = dict(
        settings,
        max_sentences=_TRAIN_MAX_SENTENCES,
        sentencepiece=spm.__version__,
        **({} if vocab_size else {"capped": True}),
    )
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for text in texts:
        digest.update(len(text).to_bytes(8, "little"))
        digest.update(text.encode("utf-8", "surrogatepass"))
    path = os.path.join(cache_dir(), "tokenizers", f"{digest.hexdigest()[:32]}.model")
    if atomic.as_path(path).is_file():
        return Tokenizer.from_file(path)
    proto = _train(texts, settings, not vocab_size)  # vocab_size 0: capped to the corpus
    try:
        atomic.write(path, proto)
    except OSError as e:
        raise JaxllmError(
            f"cannot write the tokenizer cache in {os.path.dirname(path)!r} ({e}); set "
            "JAXLLM_CACHE_DIR to a writable folder"
        ) from None
    return Tokenizer(proto, path)


def _read_json(path: str) -> dict[str, Any]:
    """The JSON object in `path` ({} when there is no such file); anything else there is an error."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as e:
        raise JaxllmError(f"cannot read {path} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too deep, a number past int's digit limit
        raise JaxllmError(f"{path} is not valid JSON ({type(e).__name__}: {e}); restore the file") from None
    if not isinstance(data, dict):
        raise JaxllmError(f"{path} holds a JSON {type(data).__name__}, not an object; restore the file")
    return data


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _special_tokens(folder: str) -> dict[str, str | None]:
    """bos/eos/pad token strings from tokenizer_config.json, else special_tokens_map.json."""
    out: dict[str, str | None] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        data = _read_json(os.path.join(folder, file))
        for kind in ("bos", "eos", "pad"):
            token = data.get(f"{kind}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token and isinstance(token, str):
                out[kind] = token
    return out


def load_tokenizer_from_folder(path: str, vocab_size: int | None = None) -> HFTokenizer | Tokenizer:
    """`tokenizer.json` or SentencePiece `tokenizer.model` of a model folder. A vocab larger than the
    model's (`vocab_size`, default config.json's) is an error: its ids would index past the embedding."""
    path = os.path.expanduser(path)
    json_file, sp_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.isfile(json_file):
        try:
            with open(json_file, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:
            raise JaxllmError(f"cannot read {json_file} ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise JaxllmError(f"{json_file} is not UTF-8 JSON (byte {e.start}); restore the file") from None
        special = _special_tokens(path)
        try:
            tokenizer: HFTokenizer | Tokenizer = HFTokenizer(text, json_file, special)
        except BaseException as e:  # tokenizers: an Exception, or on some inputs a Rust panic (PanicException)
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise JaxllmError(f"{json_file} is not a tokenizers file ({_first_line(e)}); restore the file") from None
    elif os.path.isfile(sp_file):
        tokenizer = Tokenizer.from_file(sp_file)
    else:
        raise JaxllmError(f"{path}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files there")
    if vocab_size is None:
        vocab_size = _read_json(os.path.join(path, "config.json")).get("vocab_size")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            raise JaxllmError(f"{os.path.join(path, 'config.json')}: vocab_size={vocab_size!r} is not an integer")
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise JaxllmError(
            f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}; use the tokenizer the model was trained with"
        )
    return tokenizer


def _training_sample(documents: Sequence[str]) -> list[str]:
    """Documents in a fixed pseudo-random order until `_TRAIN_MAX_CHARS`: spread over the corpus."""
    if len(documents) == 0:
        raise JaxllmError("cannot train a tokenizer on an empty corpus; point data.paths at some text")
    read: dict[int, str] = {}  # each sampled document is read once (a spool read parses JSON)

    def length(i: int) -> int:
        read[i] = documents[i]
        return len(read[i])

    return [read[i][:take] for i, take in training_sample(len(documents), length)]


def training_sample(n: int, length: Callable[[int], int]) -> list[tuple[int, int]]:
    """(document index, characters taken) of the tokenizer's training sample of `n` documents, given
    each one's length: a distributed run picks the same sample without holding the documents."""
    picks, chars = [], 0
    for i in np.random.default_rng(_SAMPLE_SEED).permutation(n):
        take = min(length(int(i)), _TRAIN_MAX_CHARS - chars)
        picks.append((int(i), take))
        chars += take
        if chars >= _TRAIN_MAX_CHARS:
            break
    return picks


def _train(texts: list[str], settings: dict[str, Any], capped: bool = False) -> bytes:
    """Trains in memory, deterministically; the trainer sees one sentence per non-blank line. `capped`:
    a vocab_size the corpus cannot fill becomes the most it can, rounded down to a multiple of 128 (for
    sharding the vocab), else of 8, else unrounded, whichever still holds the corpus's characters."""
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise JaxllmError("cannot train a tokenizer: the corpus has no non-blank text")
    # Every host of a job may train its own copy (caches are per machine), so the model must be a pure
    # function of the text: we subsample lines ourselves, as SentencePiece's own sampling is random
    # even after set_random_generator_seed.
    stride = -(-len(lines) // _TRAIN_MAX_SENTENCES)
    lines = lines[::stride]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            num_threads=2,
            input_sentence_size=0,  # all of `lines`, no sampling
            shuffle_input_sentence=False,
            minloglevel=2,
            **settings,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg:  # "... too high (N). Please set it to a value <= M."
            limit = int(msg.rsplit("<= ", 1)[-1].rstrip(". \n"))
            for size in sorted({limit // 128 * 128, limit // 8 * 8, limit} - {0}) if capped else ():
                try:
                    return _train(texts, dict(settings, vocab_size=size))
                except JaxllmError:  # fewer pieces than the corpus's characters: the next size up
                    continue
            raise JaxllmError(
                f"data.vocab_size={settings['vocab_size']} is too large for this corpus (at most {limit}); "
                "lower data.vocab_size or add text"
            ) from None
        if "Vocabulary size" in msg:
            raise JaxllmError(
                f"data.vocab_size={settings['vocab_size']} is too small for this corpus "
                f"({msg.rsplit('] ', 1)[-1].split('. Increase')[0]}); increase data.vocab_size"
            ) from None
        raise JaxllmError(f"SentencePiece training failed: {msg}") from None
    return model.getvalue()
