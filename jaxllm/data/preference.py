"""Preference pairs (DPO / ORPO / reward models): rows -> (prompt, prompt + chosen, prompt + rejected) text ->
one example holding both sequences.

A row holds a prompt and two answers, as plain text (TRL's prompt / chosen / rejected) or as chat messages
rendered with `data.chat_template`; without a prompt column, the prompt is the leading part the two answers
share (TRL's `extract_prompt`). Tokenization follows TRL's DPOTrainer, so pairs train on the ids TRL would:
the prompt and each prompt + answer are tokenized whole, and the answer starts where the ids diverge from
the prompt's (a token merging across the boundary stays with the answer). The example keeps the two
sequences apart (`lengths`), so `lanes` packs them as two segments of one row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxllm import JaxllmError
from jaxllm.data import sft
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import AUTOTRAIN_FLAGS
from jaxllm.data.tokenizer import Tokenizer

# Rendered text is a tuple of segments: a chat template's turn break (Llama-2's "</s><s>") lies between two
# segments and is tokenized as EOS + BOS ids, as `sft.Tokenize` does; plain text is one segment.
Text = tuple[str, ...]


class Pair(NamedTuple):
    """A rendered preference row: the prompt, and the prompt followed by each answer (as TRL tokenizes)."""

    prompt: Text
    prompt_chosen: Text
    prompt_rejected: Text
    where: str  # the source row, for errors
    index: int = -1  # the document's index in its split (set by the pipeline where batches carry `doc_index`)
    ref: tuple[float, float] | None = None  # precomputed reference log-prob sums (chosen, rejected)


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected): the leading messages (or characters) the two share, split as TRL's
    `extract_prompt` does (a space just before the split goes with the answers)."""
    n = min(len(chosen), len(rejected))
    idx = max(n - 1, 0)  # TRL's loop index when nothing differs: the last shared item stays an answer
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def render_pair(row: dict[str, Any], cfg: DataConfig, where: str) -> Pair:
    """The texts of one row: plain strings, or messages (prompt: messages or a user's text; answers:
    messages ending in the assistant's, or its text) rendered with `cfg.chat_template`."""
    chosen, rejected = (_value(row[f], f) for f in (cfg.chosen_field, cfg.rejected_field))
    if cfg.prompt_field in row:
        prompt = _value(row[cfg.prompt_field], cfg.prompt_field)
    else:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if len(prompt) == 0:
            raise JaxllmError(
                f"no field {cfg.prompt_field!r}, and {cfg.chosen_field!r} and {cfg.rejected_field!r} share no "
                f"leading {'text' if isinstance(chosen, str) else 'messages'} to take as the prompt; set "
                f"data.prompt_field (finetune: {AUTOTRAIN_FLAGS['prompt_field']}) to the prompt column"
            )
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        return Pair((prompt,), (prompt + chosen,), (prompt + rejected,), where)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    answers = []
    for name, answer in ((cfg.chosen_field, chosen), (cfg.rejected_field, rejected)):
        answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        if not answer or not isinstance(answer[-1], dict) or answer[-1].get("role") != "assistant":
            raise JaxllmError(f"field {name!r} must end with the assistant's message (the answer), got {answer!r:.80}")
        answers.append(_segments(sft.render_messages(prompt + answer, cfg.chat_template)))
    # The prompt as generation sees it: rendered up to where an assistant turn's own text starts.
    pieces = sft.render_messages(prompt + [{"role": "assistant", "content": ""}], cfg.chat_template)
    while pieces and pieces[-1][1]:
        pieces.pop()
    return Pair(_segments(pieces), answers[0], answers[1], where)


def _value(value: Any, name: str) -> str | list[Any]:
    """A field's text, or its messages as a list (TFDS stores a list of dicts as a dict of lists)."""
    if isinstance(value, dict) and {"role", "content"} <= set(value):
        value = [dict(role=r, content=c) for r, c in zip(value["role"], value["content"])]
    if not isinstance(value, (str, list)):
        raise JaxllmError(
            f"field {name!r} holds {type(value).__name__}, expected text or a list of {{'role', 'content'}} messages"
        )
    return value


def _segments(pieces: Sequence[sft.Piece]) -> Text:
    out = [""]
    for text, _ in pieces:
        if text is None:
            out.append("")
        else:
            out[-1] += text
    return tuple(out)


class Pairs(sft.Examples):
    """The `Pair` of every row of a source (random access for Grain); a bad row fails with its file:row."""

    def _render(self, index: int) -> Pair:
        return render_pair(self._rows[index], self._cfg, self._rows.where(index))


class Texts(sft.Texts):
    """The text of every pair (prompt, both answers): what a tokenizer for the corpus trains on."""

    def __getitem__(self, index: int) -> str:
        chosen, rejected = ("\n".join(text) for text in self._examples[index][1:3])
        return f"{chosen}\n{rejected[len(os.path.commonprefix([chosen, rejected])) :]}"


class Attached:
    """Pairs with their reference log-prob sums (`ref_logps` [len(pairs), 2], by index) and/or their index
    in the split (`index`) set, so tokenized examples carry "ref_logps" / "doc_index"."""

    def __init__(self, pairs: Sequence[Pair], ref_logps: Any = None, split: str = "", *, index: bool = False):
        self._pairs, self._index, self._ref = pairs, index, None
        if ref_logps is not None:
            ref = np.asarray(ref_logps, np.float32)
            if ref.shape != (len(pairs), 2) or not np.isfinite(ref).all():
                raise JaxllmError(
                    f"ref_logps of shape {ref.shape} do not fit the {split} split's {len(pairs)} "
                    f"preference pairs: pass finite floats [{len(pairs)}, 2] (chosen, rejected sums), "
                    "row i for pair i of pipeline.preference_documents"
                )
            self._ref = ref

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> Pair:
        ref = None if self._ref is None else (float(self._ref[index, 0]), float(self._ref[index, 1]))
        return self._pairs[index]._replace(index=index if self._index else -1, ref=ref)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Tokenize:
    """`Pair` -> {"tokens", "mask", "lengths"}: the chosen sequence then the rejected one (each prompt +
    answer + EOS, at most `block_size` together), mask 1 on answer tokens, lengths [n_chosen, n_rejected];
    with "ref_logps" [2] and "doc_index" where the pair carries them. A class so workers can pickle it.

    As TRL 1.16's DPOTrainer: p = [BOS] + ids(prompt), pc = [BOS] + ids(prompt + chosen), pr likewise; the
    prompt is p[:k] with k = min(common prefix(p, pc), common prefix(p, pr)); each answer is the rest of its
    sequence, + EOS unless it already ends with one. Truncation: the prompt keeps its last
    `max_prompt_length` tokens, an answer its first `max_completion_length`; a pair still longer than
    `block_size` keeps the first block_size // 2 tokens of each sequence. (BOS, EOS, limits: `cfg`'s.)
    """

    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig):
        self._tokenizer = tokenizer
        self._prefix, self._suffix = sft.special_ids(tokenizer, cfg.add_bos, cfg.add_eos)
        self._max_prompt, self._max_answer = cfg.max_prompt_length, cfg.max_completion_length
        self._block_size = cfg.block_size

    def _ids(self, text: Text) -> list[int]:
        tok, ids = self._tokenizer, list(self._prefix)
        for i, segment in enumerate(text):
            if i:
                ids += [t for t in (tok.eos_id, tok.bos_id) if t >= 0]
            ids += tok.encode(segment) if segment else []
        return ids

    def __call__(self, pair: Pair) -> dict[str, np.ndarray]:
        p, pc, pr = self._ids(pair.prompt), self._ids(pair.prompt_chosen), self._ids(pair.prompt_rejected)
        k = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
        prompt, answers = p[:k], [pc[k:], pr[k:]]
        for i, answer in enumerate(answers):
            if self._suffix and answer[-1:] != self._suffix:
                answers[i] = answer + self._suffix
        if self._max_prompt:
            prompt = prompt[-self._max_prompt :]
        if self._max_answer:
            answers = [a[: self._max_answer] for a in answers]
        seqs = [prompt + a for a in answers]
        flags = [[0] * len(prompt) + [1] * len(a) for a in answers]
        if sum(map(len, seqs)) > self._block_size:
            half = self._block_size // 2
            seqs, flags = [s[:half] for s in seqs], [f[:half] for f in flags]
        for name, flag in zip(("chosen", "rejected"), flags):
            if not any(flag):
                raise JaxllmError(self._empty(pair.where, name, len(prompt)))
        out = {
            "tokens": np.asarray(seqs[0] + seqs[1], np.int32),
            "mask": np.asarray(flags[0] + flags[1], np.int32),
            "lengths": np.asarray([len(s) for s in seqs], np.int32),
        }
        if pair.ref is not None:
            out["ref_logps"] = np.asarray(pair.ref, np.float32)
        if pair.index >= 0:
            out["doc_index"] = np.asarray(pair.index, np.int32)
        return out

    def _empty(self, where: str, name: str, prompt_tokens: int) -> str:
        if prompt_tokens >= self._block_size // 2:
            return (
                f"{where}: the {name} answer has no tokens left: its prompt's {prompt_tokens} tokens fill the "
                f"{self._block_size // 2} each sequence keeps when a pair is longer than data.block_size="
                f"{self._block_size}; set data.max_prompt_length below {self._block_size // 2} or raise "
                "data.block_size"
            )
        return f"{where}: the {name} answer is empty (no tokens after the prompt); fix or drop that row"
