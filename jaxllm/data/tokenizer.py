"""SentencePiece tokenizers: load a `.model` file, or train a small BPE one on the corpus and cache it.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import sentencepiece as spm

from jaxllm import JaxllmError, atomic

if TYPE_CHECKING:
    from jaxllm.data.pipeline import DataConfig

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
_TRAIN_MAX_CHARS = 8_000_000  # text read from the source to train on: keeps training to a few seconds
_TRAIN_MAX_SENTENCES = 300_000  # lines given to the trainer (evenly strided when there are more)
_SAMPLE_SEED = 0


class Tokenizer:
    """A SentencePiece model with the ids the pipeline needs; picklable for Grain worker processes."""

    def __init__(self, model_proto: bytes, path: str):
        self.path = path
        self._proto = model_proto
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
        proto = file.read_bytes()
        try:
            return cls(proto, path)
        except RuntimeError as e:
            raise JaxllmError(f"tokenizer file {path!r} is not a SentencePiece model ({e})") from None

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
            self._sp_continuation = spm.SentencePieceProcessor(model_proto=self._proto + b"\x1a\x02\x18\x00")
        return self._sp_continuation.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad ids are dropped so padded rows decode cleanly."""
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def cache_dir() -> str:
    """Root of jaxllm's cache: `$JAXLLM_CACHE_DIR` (a folder or a bucket URL), default `~/.cache/jaxllm`."""
    return os.path.expanduser(os.environ.get("JAXLLM_CACHE_DIR") or "~/.cache/jaxllm")


def load_tokenizer(cfg: DataConfig, documents: Sequence[str] | None = None) -> Tokenizer:
    """The tokenizer of `cfg`: a SentencePiece `.model` file or a model folder (its `tokenizer.json` or
    `tokenizer.model`) at `cfg.tokenizer`, or one trained on the corpus (cached).

    `documents` defaults to the documents of `cfg`'s source (SFT examples as the model reads them).
    """
    if cfg.tokenizer and os.path.isdir(os.path.expanduser(cfg.tokenizer)):
        from jaxllm.hf.tokenizer import load_tokenizer_from_folder  # pylint: disable=g-import-not-at-top

        return load_tokenizer_from_folder(os.path.expanduser(cfg.tokenizer), vocab_size=1 << 62)  # run checks
    if cfg.tokenizer:
        return Tokenizer.from_file(os.path.expanduser(cfg.tokenizer))
    if documents is None:
        from jaxllm.data.pipeline import document_texts  # pylint: disable=g-import-not-at-top

        documents = document_texts(cfg)
    texts = _training_sample(documents)
    settings = dict(_TRAINER_SETTINGS, vocab_size=cfg.vocab_size)
    key = dict(settings, max_sentences=_TRAIN_MAX_SENTENCES, sentencepiece=spm.__version__)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for text in texts:
        digest.update(len(text).to_bytes(8, "little"))
        digest.update(text.encode("utf-8", "surrogatepass"))
    path = os.path.join(cache_dir(), "tokenizers", f"{digest.hexdigest()[:32]}.model")
    if atomic.as_path(path).is_file():
        return Tokenizer.from_file(path)
    proto = _train(texts, settings)
    try:
        atomic.write(path, proto)
    except OSError as e:
        raise JaxllmError(f"cannot write the tokenizer cache in {os.path.dirname(path)!r} ({e}); set "
                          "JAXLLM_CACHE_DIR to a writable folder") from None
    return Tokenizer(proto, path)


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


def _train(texts: list[str], settings: dict[str, Any]) -> bytes:
    """Trains in memory, deterministically; the trainer sees one sentence per non-blank line."""
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
            limit = msg.rsplit("<= ", 1)[-1].rstrip(". \n")
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
