"""Tests for preference data (data.format="preference"): tokenization equal to TRL 1.16's DPOTrainer, the row
layout, truncation, packing, the reference log-prob fields, errors and the embedded preference set."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
import random
import types

import numpy as np
import pytest

from jaxllm import JaxllmError
from jaxllm.data import corpus, preference
from jaxllm.data.config import DataConfig, make_source
from jaxllm.data.pipeline import (
    check_splits,
    make_eval_iterator,
    make_reference_iterator,
    make_train_iterator,
    preference_documents,
    tokenize_fn,
    tokenizer_for,
)
from jaxllm.data.tokenizer import load_tokenizer

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the sky is blue green red sea sun in a of what color where you are not ok yes no".split()


def _save_hf_tokenizer(folder, model, pre_tokenizer=None, train_text=()):
    """A Hugging Face tokenizer folder (tokenizer.json + config) whose __call__ adds BOS, as Llama's does."""
    from tokenizers import Tokenizer, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    if train_text:
        alphabet = sorted(set("".join(train_text)))
        tok.train_from_iterator(
            train_text,
            trainers.BpeTrainer(
                vocab_size=400, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], initial_alphabet=alphabet
            ),
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = CHATML
    hf.save_pretrained(str(folder))
    return hf


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """(HF tokenizer, jaxllm tokenizer) of a BPE with no pre-tokenizer: merges cross spaces, so a prompt's
    last token can merge with its answer's first (TRL's common-prefix rule then matters)."""
    from tokenizers import models

    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    text += [f"<|im_start|>{r}\n{t}<|im_end|>\n" for r in ("system", "user", "assistant") for t in text[:50]]
    folder = tmp_path_factory.mktemp("bpe")
    hf = _save_hf_tokenizer(folder, models.BPE(unk_token="<unk>"), train_text=text)
    return hf, load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """A word-level tokenizer folder: ids that can be checked by hand (q=4, a=5, b=6)."""
    from tokenizers import models, pre_tokenizers

    folder = tmp_path_factory.mktemp("words")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "q", "a", "b", "c"])}
    _save_hf_tokenizer(folder, models.WordLevel(vocab, unk_token="<unk>"), pre_tokenizers.Whitespace())
    return str(folder)


def _trl(hf, rows, max_length=None):
    """TRL 1.16 DPOTrainer's own dataset preparation and collator: (input_ids, completion_mask) per sequence,
    chosen sequences first, padding cut off."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=hf), Dataset.from_list(rows), hf, args, "t")
    batch = DataCollatorForPreference(pad_token_id=hf.pad_token_id, max_length=max_length)(list(ds))
    n = batch["attention_mask"].sum(1).tolist()
    return (
        [ids[:k] for ids, k in zip(batch["input_ids"].tolist(), n)],
        [m[:k] for m, k in zip(batch["completion_mask"].tolist(), n)],
    )


def _ours(tok, rows, cfg):
    """jaxllm's tokenized examples of `rows` as (sequences, masks), chosen sequences first (TRL's order)."""
    pairs = [preference.render_pair(r, cfg, f"row {i}") for i, r in enumerate(rows)]
    examples = [tokenize_fn(cfg, tok)(p) for p in pairs]
    seqs, masks = [[], []], [[], []]
    for e in examples:
        cut = int(e["lengths"][0])
        assert int(e["lengths"].sum()) == len(e["tokens"]) <= cfg.block_size
        for j, part in enumerate((slice(None, cut), slice(cut, None))):
            seqs[j].append(e["tokens"][part].tolist())
            masks[j].append(e["mask"][part].tolist())
    return seqs[0] + seqs[1], masks[0] + masks[1]


PLAIN = [
    dict(prompt="the sky is", chosen=" blue", rejected=" green"),
    dict(prompt="what color is the s", chosen="ky?", rejected="un"),  # merges across the boundary
    dict(prompt="where are you", chosen=" in the sea</s>", rejected=" not ok"),  # already ends with EOS
    dict(prompt="yes", chosen=" no no no the sun is red", rejected=" ok"),
]


def test_tokenization_equals_trl(bpe):
    hf, tok = bpe
    cfg = DataConfig(source="jsonl", format="preference", block_size=512)
    want = _trl(hf, PLAIN)
    assert _ours(tok, PLAIN, cfg) == want
    # The rule matters here: row 1's prompt alone ends with a token that its answers merge away.
    p = [tok.bos_id] + tok.encode(PLAIN[1]["prompt"])
    assert want[1][1].index(1) < len(p)


def test_long_pairs_keep_half_a_block_each_as_trl_keep_start(bpe):
    """A pair longer than block_size keeps the first block_size // 2 tokens of each sequence: TRL's
    collator with max_length = block_size // 2 (truncation_mode keep_start); a pair that fits is whole."""
    hf, tok = bpe
    seqs, masks = _ours(tok, PLAIN, DataConfig(source="jsonl", format="preference", block_size=12))
    full, cut, n = _trl(hf, PLAIN), _trl(hf, PLAIN, max_length=6), len(PLAIN)
    long = [len(full[0][i]) + len(full[0][n + i]) > 12 for i in range(n)]
    assert any(long) and not all(long)
    for j in range(2 * n):
        want = cut if long[j % n] else full
        assert (seqs[j], masks[j]) == (want[0][j], want[1][j])


def test_conversational_rows_equal_trl_with_the_same_template(bpe):
    hf, tok = bpe
    system = {"role": "system", "content": "you are ok"}
    rows = [
        dict(
            prompt=[system, {"role": "user", "content": "what color is the sky"}],
            chosen=[{"role": "assistant", "content": "blue"}],
            rejected=[{"role": "assistant", "content": "the sea is green"}],
        ),
        dict(
            prompt=[{"role": "user", "content": "where is the sun"}],
            chosen=[{"role": "assistant", "content": "in the sky"}],
            rejected=[{"role": "assistant", "content": "no"}],
        ),
    ]
    cfg = DataConfig(source="jsonl", format="preference", chat_template="chatml", block_size=512, add_eos=False)
    assert _ours(tok, rows, cfg) == _trl(hf, rows)
    # Without a prompt column (TRL's implicit prompt): whole chats, the shared leading messages are the prompt.
    implicit = [dict(chosen=r["prompt"] + r["chosen"], rejected=r["prompt"] + r["rejected"]) for r in rows]
    assert _ours(tok, implicit, cfg) == _trl(hf, implicit)
    # With EOS (add_eos, the default) each answer ends with it, counted.
    seqs, masks = _ours(tok, rows, dataclasses.replace(cfg, add_eos=True))
    base, base_masks = _trl(hf, rows)
    assert seqs == [s + [tok.eos_id] for s in base] and masks == [m + [1] for m in base_masks]


def test_implicit_prompt_is_trls_extract_prompt():
    from trl import extract_prompt

    user = {"role": "user", "content": "hi"}
    cases = [
        dict(chosen="The sky is blue.", rejected="The sky is green."),
        dict(chosen="abc", rejected="abcd"),
        dict(chosen="x y", rejected="x z"),
        dict(
            chosen=[user, {"role": "assistant", "content": "a"}], rejected=[user, {"role": "assistant", "content": "b"}]
        ),
    ]
    for case in cases:
        want = extract_prompt(case)
        assert preference.extract_prompt(case["chosen"], case["rejected"]) == (
            want["prompt"],
            want["chosen"],
            want["rejected"],
        )
    cfg = DataConfig(source="jsonl", format="preference")
    pair = preference.render_pair(cases[0], cfg, "row 0")
    assert pair.prompt == ("The sky is",) and pair.prompt_chosen == ("The sky is blue.",)


def test_chat_templates_mixed_forms_and_turn_breaks(tmp_path, tok):
    cfg = DataConfig(source="jsonl", format="preference", chat_template="guanaco")
    # A text prompt with message answers is the user's turn; a text answer is the assistant's.
    pair = preference.render_pair(
        dict(prompt="q?", chosen=[{"role": "assistant", "content": "yes"}], rejected="no"), cfg, "r"
    )
    assert pair[:3] == (
        ("### Human: q?### Assistant:",),
        ("### Human: q?### Assistant: yes",),
        ("### Human: q?### Assistant: no",),
    )
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    pair = preference.render_pair(
        dict(prompt=chat, chosen="ciao", rejected="no"), dataclasses.replace(cfg, chat_template="llama2"), "r"
    )
    assert pair.prompt == ("[INST] hi [/INST] hello", "[INST] bye [/INST]")  # Llama-2's "</s><s>" between turns
    assert pair.prompt_chosen == ("[INST] hi [/INST] hello", "[INST] bye [/INST] ciao")
    ids = tokenize_fn(dataclasses.replace(cfg, chat_template="llama2"), tok)(pair)["tokens"].tolist()
    first = [tok.bos_id] + tok.encode("[INST] hi [/INST] hello") + [tok.eos_id, tok.bos_id]
    assert ids[: len(first)] == first
    with pytest.raises(JaxllmError, match="field 'chosen' must end with the assistant's message"):
        preference.render_pair(dict(prompt="q", chosen=chat, rejected="no"), cfg, "r")


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- rows


# word ids: <s>=2 </s>=3 q=4 a=5 b=6
ROWS = [dict(prompt="q", chosen=" a", rejected=" b b"), dict(prompt="q", chosen=" a", rejected=" b")]
TOKENS = [2, 4, 5, 3, 2, 4, 6, 6, 3, 2, 4, 5, 3, 2, 4, 6, 3, 0]  # 17 = block_size: the last slot stays padding
SEGMENTS = [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 0]
POSITIONS = [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0]
WEIGHTS = [0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0]  # targets that are answer tokens or their EOS


@pytest.fixture
def words_cfg(tmp_path, words):
    return DataConfig(
        source="jsonl",
        paths=(_write_jsonl(tmp_path / "p.jsonl", ROWS),),
        format="preference",
        tokenizer=words,
        block_size=17,
        batch_size=1,
        val_fraction=0.0,
        shuffle=False,
    )


def test_row_layout_by_hand(words_cfg, words):
    tok = load_tokenizer(words)
    batch = next(make_train_iterator(words_cfg, tok))
    want = dict(
        inputs=TOKENS[:-1],
        targets=TOKENS[1:],
        segment_ids=SEGMENTS[:-1],
        positions=POSITIONS[:-1],
        loss_weights=WEIGHTS,
    )
    assert {k: batch[k][0].tolist() for k in KEYS} == want
    assert batch["loss_weights"].dtype == np.float32 and batch["inputs"].dtype == np.int32
    ref = np.asarray([[-1.5, -2.5], [-3.5, -4.5]], np.float32)
    batch = next(make_train_iterator(words_cfg, tok, ref_logps=ref))
    want_ref = np.zeros(17, np.float32)
    want_ref[[0, 4, 9, 13]] = [-1.5, -2.5, -3.5, -4.5]  # at each sequence's first input position
    np.testing.assert_array_equal(batch["ref_logps"][0], want_ref)
    # Without packing: one pair per row, padded.
    it = make_train_iterator(dataclasses.replace(words_cfg, packing=False), tok, ref_logps=ref)
    rows = [next(it) for _ in range(2)]
    assert rows[0]["segment_ids"][0].tolist() == SEGMENTS[:9] + [0] * 8
    assert rows[1]["inputs"][0].tolist() == TOKENS[9:17] + [0] * 9
    assert rows[1]["loss_weights"][0].tolist() == [0, 1, 1, 0, 0, 1, 1, 0] + [0] * 9
    assert rows[1]["ref_logps"][0].tolist() == [-3.5] + [0] * 3 + [-4.5] + [0] * 12


def test_truncation_and_empty_answers(words_cfg, words):
    tok = load_tokenizer(words)
    pair = preference.render_pair(dict(prompt="q a q b q", chosen=" a a a", rejected=" b"), words_cfg, "f.jsonl:3")

    def run(**kw):
        out = tokenize_fn(dataclasses.replace(words_cfg, **kw), tok)(pair)
        cut = int(out["lengths"][0])
        return out["tokens"][:cut].tolist(), out["tokens"][cut:].tolist(), out["mask"][:cut].tolist()

    assert run(block_size=64) == ([2, 4, 5, 4, 6, 4, 5, 5, 5, 3], [2, 4, 5, 4, 6, 4, 6, 3], [0] * 6 + [1] * 4)
    # The prompt keeps its last tokens (BOS too goes), each answer its first (EOS too).
    assert run(block_size=64, max_prompt_length=2, max_completion_length=2) == (
        [6, 4, 5, 5],
        [6, 4, 6, 3],
        [0, 0, 1, 1],
    )
    # A pair longer than block_size keeps block_size // 2 tokens of each sequence.
    assert run(block_size=16) == ([2, 4, 5, 4, 6, 4, 5, 5], [2, 4, 5, 4, 6, 4, 6, 3], [0] * 6 + [1] * 2)
    with pytest.raises(JaxllmError) as info:
        run(block_size=12)
    assert str(info.value).startswith("f.jsonl:3: the chosen answer has no tokens left")
    assert "data.max_prompt_length" in str(info.value) and "\n" not in str(info.value)
    assert run(block_size=12, max_prompt_length=3) == ([4, 6, 4, 5, 5, 5, 3], [4, 6, 4, 6, 3], [0] * 3 + [1] * 4)
    empty = preference.render_pair(dict(prompt="q", chosen="", rejected=" a"), words_cfg, "f.jsonl:9")
    with pytest.raises(JaxllmError, match=r"^f.jsonl:9: the chosen answer is empty"):
        tokenize_fn(dataclasses.replace(words_cfg, add_eos=False), tok)(empty)
    assert tokenize_fn(words_cfg, tok)(empty)["tokens"].tolist()[:3] == [2, 4, 3]  # EOS alone is an answer
    # In a run, the row is named by file and line.
    path = _write_jsonl(
        pathlib.Path(words_cfg.paths[0] + ".long.jsonl"), ROWS + [dict(prompt="q " * 20, chosen="a", rejected="b")]
    )
    cfg = dataclasses.replace(words_cfg, paths=(path,))
    with pytest.raises(JaxllmError, match=r"long.jsonl:3: the chosen answer has no tokens left"):
        it = make_train_iterator(cfg, tok)
        for _ in range(3):
            next(it)


def test_missing_columns_are_one_line_errors(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl", [dict(prompt="p", chosen="a", rejected="b"), dict(prompt="p", chosen="a")]
    )
    cfg = DataConfig(source="jsonl", paths=(path,), format="preference")
    with pytest.raises(JaxllmError) as info:
        make_source(cfg)
    assert str(info.value) == (
        f"{path}:2: no field 'rejected' (fields: 'chosen', 'prompt'); set data.rejected_field "
        "(finetune: --rejected_text_column) to the field that holds it"
    )
    path = _write_jsonl(tmp_path / "e.jsonl", [dict(question="p", good="a", rejected="b")])
    with pytest.raises(
        JaxllmError,
        match=r"e.jsonl:1: no field 'chosen' .*set data.chosen_field \(finetune: "
        r"--text_column\)",
    ):
        make_source(dataclasses.replace(cfg, paths=(path,)))
    # No prompt column: the shared start of the answers is the prompt; none shared names the prompt's keys.
    path = _write_jsonl(
        tmp_path / "f.jsonl", [dict(chosen="Q: x A: y", rejected="Q: x A: z"), dict(chosen="y", rejected="z")]
    )
    cfg = dataclasses.replace(cfg, paths=(path,), val_fraction=0.0, shuffle=False)
    pairs = preference_documents(cfg)[0]
    assert pairs[0][:3] == (("Q: x A:",), ("Q: x A: y",), ("Q: x A: z",))
    with pytest.raises(JaxllmError) as info:
        pairs[1]
    assert str(info.value).startswith(f"{path}:2: no field 'prompt', and 'chosen' and 'rejected' share no leading")
    assert "data.prompt_field (finetune: --prompt_text_column)" in str(info.value) and "\n" not in str(info.value)


def test_parquet_without_a_prompt_column(tmp_path, bpe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf, tok = bpe
    rows = [dict(chosen="the sky is blue", rejected="the sky is red") for _ in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    cfg = DataConfig(
        source="parquet", paths=(str(tmp_path / "train.parquet"),), format="preference", block_size=64, val_fraction=0.0
    )
    pairs = preference_documents(cfg)[0]
    assert _ours(tok, [rows[0]], cfg) == _trl(hf, rows[:1])
    assert pairs[5].prompt == ("the sky is",)


# ---------------------------------------------------------------- pipelines


@pytest.fixture
def pref_cfg(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        dict(
            prompt=f"q{i:03d} " + " ".join(rng.choice(WORDS, rng.integers(1, 6))) + "?",
            chosen=f" a{i:03d} " + " ".join(rng.choice(WORDS, rng.integers(0, 8))),
            rejected=f" b{i:03d} " + " ".join(rng.choice(WORDS, rng.integers(0, 8))),
        )
        for i in range(48)
    ]
    return DataConfig(
        source="jsonl",
        paths=(_write_jsonl(tmp_path / "pairs.jsonl", rows),),
        format="preference",
        block_size=96,
        batch_size=4,
        val_fraction=0.25,
    )


def _sequences(batches):
    """[(segment, token ids)] of every sequence of every row, from the inputs alone."""
    out = []
    for batch in batches:
        for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
            for s in range(1, seg.max() + 1):
                out.append((s, inputs[seg == s].tolist()))
    return out


def _pair_ids(cfg, tok, docs):
    examples = [tokenize_fn(cfg, tok)(docs[i]) for i in range(len(docs))]
    return [(e["tokens"][: e["lengths"][0]].tolist(), e["tokens"][e["lengths"][0] :].tolist()) for e in examples]


@pytest.mark.parametrize("packing", [True, False])
def test_train_and_eval_rows_hold_whole_pairs(pref_cfg, tok, packing):
    cfg = dataclasses.replace(pref_cfg, packing=packing)
    check_splits(cfg, tok)
    train, val = preference_documents(cfg)
    assert (len(train), len(val)) == (36, 12)
    pairs = set(map(tuple, map(lambda p: tuple(map(tuple, p)), _pair_ids(cfg, tok, train))))
    it = make_train_iterator(cfg, tok)
    batches = [next(it) for _ in range(12)]
    seqs = _sequences(batches)  # every sequence ends on an input position: none is cut by the row's end
    got = {(tuple(c), tuple(r)) for (sc, c), (sr, r) in zip(seqs[::2], seqs[1::2])}
    assert all(sc % 2 == 1 and sr == sc + 1 for (sc, _), (sr, _) in zip(seqs[::2], seqs[1::2]))
    assert got <= pairs and len(got) == len(pairs)  # 12 batches of 4 rows cover the 36 training pairs
    for batch in batches:
        assert (batch["positions"][batch["segment_ids"] == 0] == 0).all()
    if not packing:
        assert max(b["segment_ids"].max() for b in batches) == 2
    else:
        assert max(b["segment_ids"].max() for b in batches) > 2
    evals = list(make_eval_iterator(cfg, tok))
    seqs = _sequences(evals)
    assert sorted((tuple(c), tuple(r)) for (_, c), (_, r) in zip(seqs[::2], seqs[1::2])) == sorted(
        (tuple(c), tuple(r)) for c, r in _pair_ids(cfg, tok, val)
    )
    assert set(evals[0]) == set(KEYS)


def test_worker_processes_and_resume(pref_cfg, tok):
    ref = np.random.default_rng(1).normal(size=(len(preference_documents(pref_cfg)[0]), 2)).astype(np.float32)
    want = [next(it) for it in [make_train_iterator(pref_cfg, tok, ref_logps=ref)] for _ in range(5)]
    it = make_train_iterator(dataclasses.replace(pref_cfg, num_workers=1), tok, ref_logps=ref)
    got = [next(it) for _ in range(5)]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(want, got) for k in (*KEYS, "ref_logps"))
    it = make_train_iterator(pref_cfg, tok, ref_logps=ref)
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = make_train_iterator(pref_cfg, tok, ref_logps=ref)
    restored.set_state(state)
    assert all(np.array_equal(next(it)[k], next(restored)[k]) for _ in range(3) for k in (*KEYS, "ref_logps"))
    pairs, tokenize = preference_documents(pref_cfg)[0], tokenize_fn(pref_cfg, tok)
    pairs2, tokenize2 = pickle.loads(pickle.dumps((pairs, tokenize)))
    assert all(np.array_equal(tokenize(pairs[3])[k], tokenize2(pairs2[3])[k]) for k in ("tokens", "mask", "lengths"))


def test_reference_pass_fills_ref_logps_by_document(pref_cfg, tok):
    """The lead's precompute flow: a pass over each split gives every pair's sequences by doc_index; the
    values stored by index come back at those sequences' first input positions in training and eval."""
    for split, n in (("train", 36), ("val", 12)):
        ref, seen = np.full((n, 2), np.nan, np.float32), []
        for p in range(2):  # two processes, each its rows of the global batch
            for batch in make_reference_iterator(pref_cfg, tok, split, process_index=p, process_count=2):
                starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
                assert (batch["doc_index"][~starts] == -1).all()
                for b, t in zip(*np.nonzero(starts)):
                    seg = batch["segment_ids"][b]
                    doc, which = batch["doc_index"][b, t], 1 - seg[t] % 2
                    ref[doc, which] = batch["inputs"][b][seg == seg[t]].sum()  # a stand-in "log-prob sum"
                    seen.append((doc, which))
        assert sorted(seen) == [(d, w) for d in range(n) for w in (0, 1)]
        batches = (
            [next(it) for it in [make_train_iterator(pref_cfg, tok, ref_logps=ref)] for _ in range(9)]
            if split == "train"
            else list(make_eval_iterator(pref_cfg, tok, ref_logps=ref))
        )
        for batch in batches:
            starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
            assert (batch["ref_logps"][~starts] == 0).all() and starts.any()
            for b, t in zip(*np.nonzero(starts)):
                seg = batch["segment_ids"][b]
                assert batch["ref_logps"][b, t] == batch["inputs"][b][seg == seg[t]].sum()
    with pytest.raises(JaxllmError, match=r"ref_logps of shape \(35, 2\) do not fit the training split's 36"):
        make_train_iterator(pref_cfg, tok, ref_logps=np.zeros((35, 2)))


def test_too_small_training_split(pref_cfg, tok):
    with pytest.raises(JaxllmError, match="training split is too small for one batch"):
        check_splits(dataclasses.replace(pref_cfg, batch_size=64), tok)


# ---------------------------------------------------------------- embedded preference set, config


def test_embedded_preference_set(tok):
    records = corpus.embedded_preference_records()
    assert records == corpus.embedded_preference_records() and len(records) >= 300
    sft_records = corpus.embedded_sft_records()
    assert [r["prompt"] for r in records] == [r["prompt"] for r in sft_records]
    assert [r["chosen"] for r in records] == [r["completion"] for r in sft_records]  # the question's own answer
    shuffled = [sorted(r["rejected"].split()) == sorted(r["chosen"].split()) for r in records]
    assert all(r["rejected"] != r["chosen"] for r in records) and np.mean(shuffled) > 0.99  # the words reordered
    cfg = DataConfig(source="embedded_preference", format="preference", block_size=256, batch_size=4)
    pairs = preference_documents(cfg)[0]
    conversational = dataclasses.replace(
        cfg, prompt_field="prompt_messages", chosen_field="chosen_messages", rejected_field="rejected_messages"
    )
    assert [pairs[i][:3] for i in (0, 99)] == [preference_documents(conversational)[0][i][:3] for i in (0, 99)]
    check_splits(cfg, tok)
    batch = next(make_train_iterator(cfg, tok))
    assert batch["loss_weights"].sum() > 0 and batch["segment_ids"].max() >= 2
    texts = preference.Texts(pairs)
    assert texts[0].count(records[0]["prompt"]) == 1 and records[0]["rejected"].strip() in texts[0]


def test_tokenizer_trains_on_the_rendered_pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    cfg = DataConfig(
        source="embedded_preference",
        format="preference",
        chat_template="chatml",
        vocab_size=400,
        prompt_field="prompt_messages",
        chosen_field="chosen_messages",
        rejected_field="rejected_messages",
    )
    assert len(tokenizer_for(cfg).encode("<|im_start|>assistant\n")) < 8  # learnt the template's markers


def test_config_validation():
    for bad, match in [
        (dict(format="preference", max_prompt_length=-1), "data.max_prompt_length must be an integer >= 0"),
        (dict(format="preference", max_completion_length=1.5), "data.max_completion_length must be an integer"),
        (dict(format="preference", source="embedded_preference", chosen_field=""), "data.chosen_field must name"),
        (dict(format="preference", source="embedded_preference", rejected_field="chosen"), "both name 'chosen'"),
        (dict(format="preference"), "data.format='preference' needs records with fields"),
        (dict(format="preference", source="jsonl", loss_on="all"), "loss_on='all' does not apply"),
    ]:
        with pytest.raises(JaxllmError, match=match):
            DataConfig(**bad)
    cfg = DataConfig(source="embedded_preference", format="preference")
    assert (cfg.chosen_field, cfg.rejected_field, cfg.max_prompt_length, cfg.max_completion_length) == (
        "chosen",
        "rejected",
        0,
        0,
    )
    from jaxllm.config import load_config

    data = load_config("configs/common.py").data
    for key in ("chosen_field", "rejected_field", "max_prompt_length", "max_completion_length"):
        assert data[key] == getattr(DataConfig(), key)
