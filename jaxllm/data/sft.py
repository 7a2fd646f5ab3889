"""Supervised fine-tuning examples: rows -> pieces of text flagged "assistant or not" -> tokens + mask.

A row (a Guanaco text, a list of chat messages, or a prompt/completion pair) is rendered to *pieces*:
runs of text that are all prompt or all assistant. Each piece is tokenized on its own and the ids are
concatenated, so the loss mask is exact at token level (no token straddles a prompt/answer boundary),
and the prompt is tokenized as `generate` tokenizes it at inference. Pieces after the first are
encoded as continuations (no SentencePiece dummy-prefix space), so the ids decode to the rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxllm import JaxllmError
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import RowSource
from jaxllm.data.tokenizer import Tokenizer

ROLES: tuple[str, ...] = ("system", "user", "assistant")
HUMAN, ASSISTANT = "### Human:", "### Assistant:"  # timdettmers/openassistant-guanaco turn markers

# A piece is (text, is_assistant). Text None ends a turn with EOS and starts the next with BOS, as
# Llama-2 chat does between turns ("... answer </s><s>[INST] ..."); the EOS counts when is_assistant.
Piece = tuple[str | None, bool]


def assistant_only(cfg: DataConfig) -> bool:
    """Whether the loss counts only assistant tokens: loss_on, with "auto" as in TRL's SFTTrainer."""
    return cfg.loss_on == "assistant" or (cfg.loss_on == "auto" and cfg.format == "prompt_completion")


def parse_guanaco(text: str) -> list[Piece]:
    """`### Human: q### Assistant: a...` -> pieces; an answer is the text after `### Assistant:` up to
    the next `### Human:` (its leading space included, as generation continues the prompt with it)."""
    pieces: list[Piece] = []
    pos = 0
    while (marker := text.find(ASSISTANT, pos)) >= 0:
        start = marker + len(ASSISTANT)
        end = text.find(HUMAN, start)
        end = len(text) if end < 0 else end
        pieces += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    return _merged(pieces + [(text[pos:], False)])


def render_messages(messages: Any, template: str) -> list[Piece]:
    """Chat messages -> pieces in `template` ("guanaco", "chatml" or "llama2")."""
    messages = _checked_messages(messages)
    pieces: list[Piece] = []
    system = ""
    for i, (role, content) in enumerate(messages):
        if role == "system":
            if template == "guanaco":
                pieces.append((f"{content}\n\n", False))
            elif template == "chatml":
                pieces.append((f"<|im_start|>system\n{content}<|im_end|>\n", False))
            else:  # llama2: folded into the first user turn, as Llama-2 chat's template does
                system = f"<<SYS>>\n{content.strip()}\n<</SYS>>\n\n"
        elif role == "user":
            if template == "guanaco":
                pieces.append((f"{HUMAN} {content}", False))
            elif template == "chatml":
                pieces.append((f"<|im_start|>user\n{content}<|im_end|>\n", False))
            else:
                pieces.append((f"[INST] {system}{content.strip()} [/INST]", False))
                system = ""
        elif template == "guanaco":
            pieces += [(ASSISTANT, False), (f" {content}", True)]
        elif template == "chatml":
            pieces += [("<|im_start|>assistant\n", False), (f"{content}<|im_end|>\n", True)]
        else:
            pieces.append((f" {content.strip()}", True))
            if i + 1 < len(messages):
                pieces.append((None, True))
    return _merged(pieces)


def render_prompt_completion(prompt: Any, completion: Any) -> list[Piece]:
    """Prompt text immediately followed by completion text, no template (as TRL does)."""
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise JaxllmError(f"the {name} field holds {type(value).__name__}, expected text")
    return _merged([(prompt, False), (completion, True)])


def render_row(row: Any, cfg: DataConfig) -> list[Piece]:
    """The pieces of one source row for `cfg.format` (the row holds the fields the format needs)."""
    if cfg.format == "messages":
        return render_messages(row[cfg.messages_field], cfg.chat_template)
    if cfg.format == "prompt_completion":
        return render_prompt_completion(row[cfg.prompt_field], row[cfg.completion_field])
    text = row[cfg.text_field]
    if not isinstance(text, str):
        raise JaxllmError(f"field {cfg.text_field!r} holds {type(text).__name__}, expected text")
    return parse_guanaco(text)


def text_of(pieces: Sequence[Piece]) -> str:
    """The rendered text of `pieces` (turn breaks are tokens, not text)."""
    return "".join(text for text, _ in pieces if text is not None)


class Examples:
    """The pieces of every row of a source: random access, so Grain can split, shard and shuffle it.
    A malformed row fails with the source's file and row."""

    def __init__(self, rows: RowSource, cfg: DataConfig):
        self._rows = rows
        self._cfg = cfg

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> list[Piece]:
        try:
            return self._render(index)
        except JaxllmError as e:
            if str(e).startswith(self._rows.where(index)):
                raise
            raise JaxllmError(f"{self._rows.where(index)}: {e}") from None

    def _render(self, index: int) -> list[Piece]:
        return render_row(self._rows[index], self._cfg)

    def __repr__(self) -> str:
        return f"Examples({self._rows!r}, format={self._cfg.format!r})"


class Texts:
    """The rendered text of every example of `examples`: what a tokenizer for the corpus trains on."""

    def __init__(self, examples: Examples):
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> str:
        return text_of(self._examples[index])


def special_ids(tokenizer: Tokenizer, add_bos: bool, add_eos: bool) -> tuple[list[int], list[int]]:
    """([BOS] or [], [EOS] or []) per config; a tokenizer without the token is the config's to fix."""
    for flag, name, token_id in ((add_bos, "bos", tokenizer.bos_id), (add_eos, "eos", tokenizer.eos_id)):
        if flag and token_id < 0:
            raise JaxllmError(f"tokenizer {tokenizer.path} has no {name.upper()} token; set data.add_{name}=False")
    return ([tokenizer.bos_id] if add_bos else []), ([tokenizer.eos_id] if add_eos else [])


class Tokenize:
    """Pieces -> {"tokens", "mask"} (int32, at most `max_tokens`); mask 1 = the token counts in the loss.

    With `assistant_only`, assistant tokens count, and so does the EOS that closes an assistant turn
    (so the model learns to stop); otherwise every token does. A class so Grain workers can pickle it.
    """

    def __init__(self, tokenizer: Tokenizer, *, add_bos: bool, add_eos: bool, assistant_only: bool, max_tokens: int):
        self._tokenizer = tokenizer
        self._prefix, self._suffix = special_ids(tokenizer, add_bos, add_eos)
        self._assistant_only = assistant_only
        self._max_tokens = max_tokens

    def __call__(self, pieces: Sequence[Piece]) -> dict[str, np.ndarray]:
        tok = self._tokenizer
        encode_continuation = getattr(tok, "encode_continuation", tok.encode)
        ids, flags = list(self._prefix), [False] * len(self._prefix)
        fresh = True  # the next text starts a turn: encoded as a prompt is at generation time
        for text, assistant in pieces:
            if text is None:
                breaks = [(t, f) for t, f in ((tok.eos_id, assistant), (tok.bos_id, False)) if t >= 0]
                ids += [t for t, _ in breaks]
                flags += [f for _, f in breaks]
                fresh = True
                continue
            piece_ids = tok.encode(text) if fresh else encode_continuation(text)
            ids += piece_ids
            flags += [assistant] * len(piece_ids)
            fresh = False
        closes_answer = bool(pieces) and pieces[-1][1]
        ids += self._suffix
        flags += [closes_answer] * len(self._suffix)
        mask = np.asarray(flags, np.int32) if self._assistant_only else np.ones(len(ids), np.int32)
        return {"tokens": np.asarray(ids[: self._max_tokens], np.int32), "mask": mask[: self._max_tokens]}


def _checked_messages(messages: Any) -> list[tuple[str, str]]:
    """(role, content) pairs; a dict of lists (as TFDS stores a sequence of dicts) is accepted too."""
    if isinstance(messages, dict) and {"role", "content"} <= set(messages):
        messages = [dict(role=r, content=c) for r, c in zip(messages["role"], messages["content"])]
    if not isinstance(messages, list) or not messages:
        raise JaxllmError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise JaxllmError(f"message {i} must be an object with a text 'content', got {message!r:.80}")
        role = message.get("role")
        if role not in ROLES:
            raise JaxllmError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise JaxllmError(f"message {i} is a system message; only the first message may be one")
        out.append((role, message["content"]))
    return out


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind as one (tokenized together), empty pieces dropped."""
    out: list[Piece] = []
    for text, assistant in pieces:
        if text == "":
            continue
        if out and text is not None and out[-1][0] is not None and out[-1][1] == assistant:
            out[-1] = (out[-1][0] + text, assistant)
        else:
            out.append((text, assistant))
    return out
